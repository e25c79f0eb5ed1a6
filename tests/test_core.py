"""The core's seams: probes never change training (the probe seam and
``preserved``), norms keep themselves in fp32 under autocast without patching
instances, and bnexp's modules form no import cycle."""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import NormConfig, NormKind
from bnexp.models import build_model
from bnexp.models.mlp import MLPConfig
from bnexp.norms import make_norm
from bnexp.probes import ProbeContext, preserved
from bnexp.schema import compose
from bnexp.train import train
from tests.conftest import REPO

TINY = ["data=synthetic", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]", "train.steps=12",
        "train.log_every=3", "train.eval_every=4", "train.batch_size=32", "train.progress=false", "train.device=cpu"]


def weights_and_losses(run_dir: Path, overrides: list[str]) -> tuple[dict[str, torch.Tensor], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with contextlib.redirect_stdout(io.StringIO()):
        train(compose([*TINY, *overrides]), run_dir)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    weights = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return weights, [e.value for e in acc.Scalars("train/loss")]


class Meddler:
    """A probe that does everything a landscape or Hessian probe does to a model:
    a trial SGD step along the gradient, a forward pass in train mode (BN running
    statistics move), random draws, a changed optimizer state."""

    every, read_only = 2, False

    def __call__(self, ctx):
        ctx.model.train()
        loss = ctx.loss_fn(ctx.model(ctx.train_x), ctx.train_y)
        loss.backward()
        with torch.no_grad():
            for p in ctx.model.parameters():
                p -= 10 * ctx.lr * p.grad + torch.randn_like(p)
        ctx.model(ctx.x)  # train mode: running statistics and num_batches_tracked change
        ctx.optimizer.state.clear()
        ctx.model.eval()
        np.random.rand(5), random.random()
        return {"meddler/loss": loss.detach()}


def test_a_run_with_every_probe_on_trains_bit_identical_weights_and_losses_to_one_without(tmp_path, register_probe):
    quiet, quiet_losses = weights_and_losses(tmp_path / "off", ["probes.param_norms.every=0", "probes.activations.every=0"])
    register_probe("meddler", lambda setup, cfg: Meddler())
    probed, probed_losses = weights_and_losses(tmp_path / "on", ["probes.param_norms.every=1", "probes.activations.every=1"])
    assert probed_losses == quiet_losses and len(quiet_losses) == 4
    assert probed.keys() == quiet.keys()
    for k in quiet:
        assert torch.equal(probed[k], quiet[k]), k
    from bnexp.runs import load_scalars

    tags = load_scalars(tmp_path / "on")
    assert len(tags["meddler/loss"]) == 6 and "grad_norm/total" in tags and "act/hidden0/p50" in tags  # every 2 of 12 steps
    assert "grad_norm/total" not in load_scalars(tmp_path / "off")


def test_preserved_gives_back_parameters_buffers_gradients_optimizer_state_mode_and_rng():
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[8]), NormConfig(), (4,), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers exist now
    model.eval()
    before = copy.deepcopy((model.state_dict(), [p.grad.clone() for p in model.parameters()], opt.state_dict()))
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with preserved(model, opt):
        Meddler()(ProbeContext(model, x, y, x, y, opt, F.cross_entropy, lr=0.1, step=1))
        model.train()
    state, grads, opt_state = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(opt.state_dict()["state"][i]["momentum_buffer"], s["momentum_buffer"]) for i, s in opt_state["state"].items())
    assert not model.training and not model.hidden0.norm.training
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]


@pytest.mark.parametrize("kind", list(NormKind))
def test_norms_run_in_fp32_under_autocast_and_a_deepcopy_leaves_the_original_alone(kind):
    norm = make_norm(NormConfig(kind=kind, virtual_batch_size=4, groups=2), 8, spatial_dims=0)
    reference = {nn.BatchNorm1d: nn.BatchNorm1d(8), nn.LayerNorm: nn.LayerNorm(8), nn.GroupNorm: nn.GroupNorm(2, 8)}
    for base, ref in reference.items():
        if isinstance(norm, base):  # the keys of the torch layer it is
            assert list(norm.state_dict()) == list(ref.state_dict())
    x = torch.randn(8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm.train()(x).dtype == torch.float32
    original = copy.deepcopy(norm.state_dict())
    twin = copy.deepcopy(norm)
    twin.train()(torch.randn(8, 8) * 5 + 3)  # an instance-patched forward would update the original here
    for k, v in norm.state_dict().items():
        assert torch.equal(v, original[k]), k


# --------------------------------------------------------------------------- imports


def bnexp_modules() -> dict[str, Path]:
    root = REPO / "bnexp"
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """bnexp modules ``name`` imports anywhere in its file (module level and inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_bnexp_has_no_import_cycle_even_through_imports_inside_functions():
    modules = bnexp_modules()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    # A package's __init__ that imports its own submodules is how a package works, not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") and modules[name].name == "__init__.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]) if dep in path else dep)
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.slow
def test_every_bnexp_module_imports_alone_in_a_fresh_interpreter():
    import os

    code = "import importlib, sys; importlib.import_module(sys.argv[1])"
    pending, running, failures = sorted(bnexp_modules()), {}, {}
    while pending or running:  # as many interpreters at a time as there are cores
        while pending and len(running) < (os.cpu_count() or 2):
            name = pending.pop()
            running[name] = subprocess.Popen([sys.executable, "-c", code, name], cwd=REPO, text=True,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        name = next(iter(running))
        proc = running.pop(name)
        if proc.wait(timeout=120):
            failures[name] = proc.stderr.read().strip().splitlines()[-1]
    assert not failures, failures

