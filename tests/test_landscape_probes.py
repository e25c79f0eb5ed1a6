"""The optimization-landscape probes (Santurkar et al. 2018; PyHessian) against
independent references: a deep linear net's gradients, updates and losses in
float64 NumPy for ICS and the landscape, the explicit Hessian of a tiny net
for the power iteration, and runs whose weights must not notice the probes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import NormConfig
from bnexp.models import build_model
from bnexp.models.mlp import MLPConfig
from bnexp.probes import ProbeContext, ProbeSet
from bnexp.probes.hessian import HessianMode, TopEigenvalue
from bnexp.probes.ics import InternalCovariateShift
from bnexp.probes.landscape import Landscape
from bnexp.runs import load_scalars
from bnexp.schema import compose
from bnexp.train import train

TINY = ["data=synthetic", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]", "train.steps=12",
        "train.log_every=3", "train.eval_every=4", "train.batch_size=32", "train.progress=false", "train.device=cpu"]
EVERY_PROBE = ["probes.ics.every=2", "probes.landscape.every=2", "probes.hessian.every=3", "probes.hessian.iterations=5",
               "probes.bn_gap.every=4", "probes.bn_gap.batches=3"]


# --------------------------------------------------------------------------- a deep linear net in NumPy


def linear_net(widths: list[int], seed: int = 0) -> nn.Sequential:
    """Bias-free linear layers hidden0..hiddenK-1, output: y = W_k ... W_1 x."""
    torch.manual_seed(seed)
    names = [f"hidden{i}" for i in range(len(widths) - 2)] + ["output"]
    return nn.Sequential(OrderedDict((n, nn.Linear(a, b, bias=False)) for n, a, b in zip(names, widths, widths[1:])))


def np_grads(ws: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """mean((W_k..W_1 x - y)^2) over samples and outputs, and its gradient w.r.t. each W_i."""
    acts = [x.T]  # P_{i-1} x for each layer i
    for w in ws:
        acts.append(w @ acts[-1])
    r = acts[-1] - y.T
    scale = 2.0 / r.size
    grads, back = [None] * len(ws), r * scale
    for i in reversed(range(len(ws))):
        grads[i] = back @ acts[i].T
        back = ws[i].T @ back
    return float((r**2).mean()), grads


def np_norm(ts: list[np.ndarray]) -> float:
    return float(np.sqrt(sum((t**2).sum() for t in ts)))


def dln_problem(widths=(6, 5, 5, 5, 4), n=40, seed=0):
    model = linear_net(list(widths), seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, widths[0])).astype(np.float32)
    y = rng.standard_normal((n, widths[-1])).astype(np.float32)
    return model, torch.from_numpy(x), torch.from_numpy(y)


def call(probe, model, x, y, optimizer, lr, step=7) -> dict[str, float]:
    """The probe through the loop's own call site (ProbeSet.due: preserved() around it)."""
    ctx = ProbeContext(model, x, y, x, y, optimizer, F.mse_loss, lr, step)
    out = ProbeSet({"p": probe}).due(step, 100, lambda: ctx)
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- ICS


def test_ics_is_zero_for_a_one_layer_net_and_for_the_first_layer_of_any():
    model, x, y = dln_problem(widths=(6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = call(InternalCovariateShift(model, 1), model, x, y, opt, 0.1)
    assert set(out) == {"ics/output/l2", "ics/output/cos"}
    assert out["ics/output/l2"] == 0.0 and out["ics/output/cos"] == pytest.approx(1.0, abs=1e-6)
    deep, x, y = dln_problem()
    out = call(InternalCovariateShift(deep, 1), deep, x, y, torch.optim.SGD(deep.parameters(), lr=0.1), 0.1)
    assert out["ics/hidden0/l2"] == 0.0 and out["ics/hidden1/l2"] > 0


def test_ics_equals_the_numpy_gradient_change_after_the_earlier_layers_take_their_momentum_update():
    model, x, y = dln_problem()
    lr, momentum = 0.05, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    F.mse_loss(model(x), y).backward()
    opt.step()  # a momentum buffer exists: the update is lr * (momentum * buf + g)
    bufs = [opt.state[p]["momentum_buffer"].double().numpy() for p in model.parameters()]
    ws = [p.detach().double().numpy() for p in model.parameters()]
    xd, yd = x.double().numpy(), y.double().numpy()
    _, g = np_grads(ws, xd, yd)
    updated = [w - lr * (momentum * b + gi) for w, b, gi in zip(ws, bufs, g)]
    out = call(InternalCovariateShift(model, 1), model, x, y, opt, lr)
    names = ["hidden0", "hidden1", "hidden2", "output"]
    for i, name in enumerate(names):
        _, g_shift = np_grads(updated[:i] + ws[i:], xd, yd)
        l2 = np.linalg.norm(g[i] - g_shift[i])
        cos = (g[i] * g_shift[i]).sum() / (np.linalg.norm(g[i]) * np.linalg.norm(g_shift[i]))
        assert out[f"ics/{name}/l2"] == pytest.approx(l2, rel=1e-4, abs=1e-7), name
        assert out[f"ics/{name}/cos"] == pytest.approx(cos, rel=1e-5), name
    assert out["ics/output/l2"] > 0


# --------------------------------------------------------------------------- landscape


def test_landscape_at_one_eta_equals_direct_numpy_evaluation_of_the_loss_and_gradient_there():
    model, x, y = dln_problem()
    lr, eta = 0.05, 3.0
    ws = [p.detach().double().numpy() for p in model.parameters()]
    xd, yd = x.double().numpy(), y.double().numpy()
    _, g = np_grads(ws, xd, yd)
    moved = [w - eta * lr * gi for w, gi in zip(ws, g)]
    loss_there, g_there = np_grads(moved, xd, yd)
    diff = np_norm([a - b for a, b in zip(g, g_there)])
    out = call(Landscape(model, 1, [eta]), model, x, y, torch.optim.SGD(model.parameters(), lr=lr), lr)
    assert out["landscape/loss_min"] == out["landscape/loss_max"] == pytest.approx(loss_there, rel=1e-5)
    assert out["landscape/grad_diff_min"] == out["landscape/grad_diff_max"] == pytest.approx(diff, rel=1e-4)
    assert out["landscape/beta"] == pytest.approx(diff / (eta * lr * np_norm(g)), rel=1e-4)
    assert out["landscape/grad_norm"] == pytest.approx(np_norm(g), rel=1e-5)


def test_landscape_band_spans_the_min_and_max_over_the_eta_grid():
    model, x, y = dln_problem()
    lr, etas = 0.5, [0.5, 2.0, 8.0]
    ws = [p.detach().double().numpy() for p in model.parameters()]
    xd, yd = x.double().numpy(), y.double().numpy()
    _, g = np_grads(ws, xd, yd)
    losses = [np_grads([w - e * lr * gi for w, gi in zip(ws, g)], xd, yd)[0] for e in etas]
    out = call(Landscape(model, 1, etas), model, x, y, torch.optim.SGD(model.parameters(), lr=lr), lr)
    assert out["landscape/loss_min"] == pytest.approx(min(losses), rel=1e-5)
    assert out["landscape/loss_max"] == pytest.approx(max(losses), rel=1e-5)
    assert max(losses) > 1.01 * min(losses)  # the grid is wide enough to make a band


# --------------------------------------------------------------------------- Hessian


def explicit_top_eigenvalue(model: nn.Module, x, y, train_mode: bool) -> float:
    """The largest-magnitude eigenvalue of the full Hessian (torch.autograd.functional.hessian)."""
    model = copy.deepcopy(model).train(train_mode)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    model.double()

    def loss(theta):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, parts, (x.double(),)), y)

    h = torch.autograd.functional.hessian(loss, flat)
    eig = torch.linalg.eigvalsh((h + h.T) / 2)
    return float(eig[eig.abs().argmax()])


@pytest.mark.parametrize("mode", [HessianMode.train, HessianMode.eval])
def test_power_iteration_finds_the_explicit_hessians_top_eigenvalue(mode):
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[5, 4], activation="tanh"), NormConfig(), (3,), 3)
    x, y = torch.randn(24, 3), torch.randint(0, 3, (24,))
    model.train()(x * 2 + 1)  # running statistics away from their init, so eval mode is a different function
    reference = explicit_top_eigenvalue(model, x, y, train_mode=mode == HessianMode.train)
    probe = TopEigenvalue(model, 1, x, y, iterations=1000, tolerance=1e-7, mode=mode)
    ctx = ProbeContext(model, x, y, x, y, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, 0.1, 3)
    out = ProbeSet({"h": probe}).due(3, 10, lambda: ctx)
    assert float(out["hessian/top_eig"]) == pytest.approx(reference, rel=1e-3)
    assert 1 < float(out["hessian/iterations"]) < 1000


def test_pyhessian_defaults_stop_within_a_hundred_iterations_close_to_the_explicit_value():
    torch.manual_seed(1)
    model = build_model(MLPConfig(hidden=[6], activation="tanh"), NormConfig(), (4,), 2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    reference = explicit_top_eigenvalue(model, x, y, train_mode=True)
    ctx = ProbeContext(model, x, y, x, y, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, 0.1, 3)
    out = ProbeSet({"h": TopEigenvalue(model, 1, x, y, 100, 1e-3, HessianMode.train)}).due(3, 10, lambda: ctx)
    assert float(out["hessian/top_eig"]) == pytest.approx(reference, rel=0.05)
    assert float(out["hessian/iterations"]) <= 100


# --------------------------------------------------------------------------- runs with every probe on


def weights_and_losses(run_dir: Path, overrides: list[str]) -> tuple[dict[str, torch.Tensor], list[float]]:
    with contextlib.redirect_stdout(io.StringIO()):
        train(compose([*TINY, *overrides]), run_dir)
    weights = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return weights, [v for _, v in load_scalars(run_dir, ["train/loss"])["train/loss"]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["norm.noise=true"]], ids=["bn", "noisy_bn"])
def test_a_run_with_every_landscape_probe_on_trains_bit_identical_weights_to_one_without(tmp_path, extra):
    quiet, quiet_losses = weights_and_losses(tmp_path / "off", extra)
    probed, probed_losses = weights_and_losses(tmp_path / "on", [*extra, *EVERY_PROBE])
    assert probed_losses == quiet_losses and len(quiet_losses) == 4
    assert probed.keys() == quiet.keys()
    for k in quiet:  # parameters and running statistics
        assert torch.equal(probed[k], quiet[k]), k
    tags = load_scalars(tmp_path / "on")
    assert len(tags["ics/hidden1.linear/l2"]) == 6 and len(tags["landscape/loss_max"]) == 6
    assert len(tags["hessian/top_eig"]) == 4 and len(tags["bn_gap/val_acc_precise"]) == 3
    assert not any(t.startswith(("ics/", "landscape/", "hessian/", "bn_gap/")) for t in load_scalars(tmp_path / "off"))


def test_landscape_tags_are_in_metrics_json_and_ics_has_one_pair_per_weight_layer(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        train(compose([*TINY, *EVERY_PROBE]), tmp_path)
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    ics = sorted(k for k in final if k.startswith("ics/"))
    assert ics == [f"ics/{layer}/{m}" for layer in ("hidden0.linear", "hidden1.linear", "output") for m in ("cos", "l2")]
    assert final["landscape/loss_min"] <= final["landscape/loss_max"]
    assert final["landscape/grad_diff_min"] <= final["landscape/grad_diff_max"] and final["landscape/beta"] > 0
    assert final["hessian/top_eig"] != 0 and final["hessian/iterations"] <= 5


def test_probes_on_a_noisy_bn_net_compare_surfaces_under_one_noise_draw():
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[8, 8]), NormConfig(noise=True), (5,), 3)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = ProbeContext(model, x, y, x, y, opt, F.cross_entropy, 0.1, 5)
    # A step of 1e-7 x lr moves nothing measurable: the gradient there is the same one unless the noise was redrawn.
    out = ProbeSet({"l": Landscape(model, 1, [1e-7]), "i": InternalCovariateShift(model, 1)}).due(5, 10, lambda: ctx)
    assert float(out["landscape/grad_diff_max"]) < 1e-4 * float(out["landscape/grad_norm"])
    assert float(out["ics/hidden0.linear/l2"]) == 0.0


def test_ics_cosine_is_computed_in_a_float64_models_dtype_and_never_exceeds_1():
    model, x, y = dln_problem()
    model, x, y = model.double(), x.double(), y.double()
    ctx = ProbeContext(model, x, y, x, y, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, 0.1, 7)
    out = ProbeSet({"p": InternalCovariateShift(model, 1)}).due(7, 100, lambda: ctx)
    first = out["ics/hidden0/cos"]  # no layer before it: G' = G, cos 1 by definition
    assert first.dtype == torch.float64 and first.item() == 1.0
    assert all(v.item() <= 1.0 for k, v in out.items() if k.endswith("/cos"))
    float32_model, x32, y32 = dln_problem()
    out32 = call(InternalCovariateShift(float32_model, 1), float32_model, x32, y32, torch.optim.SGD(float32_model.parameters(), lr=0.1), 0.1)
    assert all(v <= 1.0 for k, v in out32.items() if k.endswith("/cos"))


def test_power_iteration_stops_at_0_where_the_hessian_vector_product_is_zero():
    # a loss linear in the parameters: its Hessian is 0, and H v / ||H v|| would be 0/0
    model = nn.Sequential(OrderedDict(output=nn.Linear(3, 1)))
    x, y = torch.randn(8, 3), torch.zeros(8)
    probe = TopEigenvalue(model, 1, x, y, iterations=10, tolerance=1e-3, mode=HessianMode.train)
    ctx = ProbeContext(model, x, y, x, y, torch.optim.SGD(model.parameters(), lr=0.1), lambda out, _y: out.sum(), 0.1, 3)
    out = ProbeSet({"p": probe}).due(3, 100, lambda: ctx)
    assert out["hessian/top_eig"].item() == 0.0 and out["hessian/iterations"].item() == 1


def test_power_iteration_stops_at_0_where_the_hessian_vector_product_is_zero_with_a_graph():
    model = nn.Sequential(OrderedDict(output=nn.Linear(3, 1)))
    x, y = torch.randn(8, 3), torch.zeros(8)
    probe = TopEigenvalue(model, 1, x, y, iterations=10, tolerance=1e-3, mode=HessianMode.train)
    flat = lambda out, _y: out.sum() + 0 * out.square().sum()  # noqa: E731  a graph through g, and still H = 0
    ctx = ProbeContext(model, x, y, x, y, torch.optim.SGD(model.parameters(), lr=0.1), flat, 0.1, 3)
    out = ProbeSet({"p": probe}).due(3, 100, lambda: ctx)
    assert out["hessian/top_eig"].item() == 0.0 and out["hessian/iterations"].item() == 1
