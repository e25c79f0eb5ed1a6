"""The values of grad_norm/<layer>, weight_norm/<layer> and act/<layer>/pNN as
TensorBoard reads them back, against values computed here independently from
a checkpoint's weights and the step's batch: a float64 forward written out
with torch.nn.functional (not bnexp's modules), NumPy norms and percentiles."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnexp import data as data_mod
from bnexp.schema import compose
from bnexp.step import Sampler
from bnexp.train import train
from tests.conftest import event_scalars

# A 2x16 sigmoid MLP, BN before the activation; deterministic, so that 11 steps of
# one run are the first 11 steps of the other.
TINY = ["data=synthetic", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]", "model.activation=sigmoid",
        "train.batch_size=32", "train.log_every=6", "train.eval_every=6", "train.probe_size=200",
        "train.deterministic=true", "train.device=cpu", "train.progress=false", "optim=sgd", "optim.momentum=0"]
pytestmark = pytest.mark.slow  # two short trainings, then float64 references
LAYERS = ("hidden0.linear", "hidden0.norm", "hidden1.linear", "hidden1.norm", "output")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(the state before step 12, a run whose step 12 is logged)."""
    root = tmp_path_factory.mktemp("instruments")
    with contextlib.redirect_stdout(io.StringIO()):
        train(compose([*TINY, "train.steps=11"]), root / "before")
        train(compose([*TINY, "train.steps=12"]), root / "logged")
    return root / "before", root / "logged"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"].items()}


def forward(w: dict[str, torch.Tensor], x: torch.Tensor, train_mode: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MLP written out: linear (no bias) -> BN -> sigmoid, twice, then the output layer;
    also each sigmoid's input."""
    h, pre = x.flatten(1), {}
    for i in range(2):
        z = F.linear(h, w[f"hidden{i}.linear.weight"])
        z = F.batch_norm(z, w[f"hidden{i}.norm.running_mean"].clone(), w[f"hidden{i}.norm.running_var"].clone(),
                         w[f"hidden{i}.norm.weight"], w[f"hidden{i}.norm.bias"], training=train_mode, eps=1e-5)
        pre[f"hidden{i}"] = z
        h = torch.sigmoid(z)
    return F.linear(h, w["output.weight"], w["output.bias"]), pre


def logged_at(run_dir: Path, step: int) -> dict[str, float]:
    return {tag: points[step] for tag, points in event_scalars(run_dir).items() if step in points}


def test_grad_norms_are_the_l2_norms_of_each_layers_gradient_on_the_steps_batch(runs):
    before, logged = runs
    cfg = compose([*TINY, "train.steps=12"])
    d = data_mod.load(cfg.data, torch.device("cpu"))
    sampler = Sampler(len(d.x_train), 32, cfg.seed, torch.device("cpu"))
    sampler.load_state_dict(torch.load(before / "checkpoint.pt", weights_only=True)["sampler"])
    idx = sampler.next()  # step 12's batch
    w = {k: v.requires_grad_(v.is_floating_point() and "running" not in k) for k, v in weights(before).items()}
    logits, _ = forward(w, d.x_train[idx].double(), train_mode=True)
    F.cross_entropy(logits, d.y_train[idx]).backward()
    got = logged_at(logged, 12)
    total = 0.0
    for layer in LAYERS:
        grads = [w[k].grad.numpy() for k in w if k.startswith(layer + ".") and w[k].grad is not None]
        want = np.sqrt(sum((g**2).sum() for g in grads))
        total += want**2
        assert got[f"grad_norm/{layer}"] == pytest.approx(want, rel=1e-4), layer
    assert got["grad_norm/total"] == pytest.approx(np.sqrt(total), rel=1e-4)


def test_weight_norms_are_the_l2_norms_of_each_layers_parameters_in_the_checkpoint(runs):
    _, logged = runs
    w, got = weights(logged), logged_at(logged, 12)
    for layer in LAYERS:
        params = [w[k].numpy() for k in w if k.startswith(layer + ".") and k.rsplit(".", 1)[1] in ("weight", "bias")]
        assert got[f"weight_norm/{layer}"] == pytest.approx(np.sqrt(sum((p**2).sum() for p in params)), rel=1e-5), layer


def test_activation_percentiles_are_those_of_each_sigmoids_input_on_the_probe_batch_in_eval_mode(runs):
    _, logged = runs
    cfg = compose([*TINY, "train.steps=12"])
    d = data_mod.load(cfg.data, torch.device("cpu"))
    _, pre = forward(weights(logged), d.x_val[:200].double(), train_mode=False)
    got = logged_at(logged, 12)
    for layer, z in pre.items():
        values = z.detach().numpy()
        for p in (15, 50, 85):
            assert got[f"act/{layer}/p{p}"] == pytest.approx(np.percentile(values, p), rel=1e-4, abs=1e-5), (layer, p)
            assert got[f"act/{layer}/unit0/p{p}"] == pytest.approx(np.percentile(values[:, 0], p), rel=1e-4, abs=1e-5), (layer, p)
