"""The signal-propagation probes (probes.signal: stable rank, cosine, channel
mean and variance, also at step 0) against independent computations, dropout's
positions, and probes.var_shift measuring inverted dropout's 1 - p shift at a
norm's input (Li et al. 2019); neither probe changes training."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from torch import nn

from bnexp.models import build_model
from bnexp.probes import ProbeContext
from bnexp.probes.signal import Signal, signal_stats
from bnexp.probes.var_shift import VarShift
from bnexp.runs import load_scalars
from bnexp.schema import compose
from bnexp.train import train
from tests.conftest import TINY


def test_stable_rank_is_1_for_a_rank_one_batch_and_d_for_orthonormal_rows():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(32, 1, generator=gen), torch.randn(1, 40, generator=gen)
    one = signal_stats(u @ v)
    assert one["stable_rank"].item() == pytest.approx(1, abs=1e-12)
    plus = int((u > 0).sum())  # rows are +-v: cosine +1 within a sign, -1 across
    assert one["cos"].item() == pytest.approx(((2 * plus - 32) ** 2 - 32) / (32 * 31), abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    rows = q[:12]  # 12 orthonormal rows of length 40
    ortho = signal_stats(rows)
    assert ortho["stable_rank"].item() == pytest.approx(12, rel=1e-12) and ortho["cos"].item() == pytest.approx(0, abs=1e-12)


def test_dead_examples_are_left_out_of_the_cosine_and_a_dead_huge_or_diverged_layer_does_not_break_the_probe():
    rows = torch.randn(6, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows[[1, 4]] = 0  # two examples a dead ReLU layer maps to zero
    live = rows[[0, 2, 3, 5]]
    got, want = signal_stats(rows), signal_stats(live)
    assert got["cos"].item() == pytest.approx(want["cos"].item(), rel=1e-12) and got["stable_rank"].item() == pytest.approx(want["stable_rank"].item())
    assert got["var"].item() == pytest.approx(rows.var(0, unbiased=False).mean().item())
    huge = signal_stats(rows * 1e160)  # its Gram matrix would overflow
    assert huge["stable_rank"].item() == pytest.approx(want["stable_rank"].item(), rel=1e-12)
    dead = signal_stats(torch.zeros(8, 3, 2, 2))
    assert dead["mean_sq"].item() == 0 and np.isnan(dead["stable_rank"].item()) and np.isnan(dead["cos"].item())
    assert np.isnan(signal_stats(torch.full((4, 3), float("inf")))["stable_rank"].item())


def test_signal_statistics_are_numpys_for_an_image_batch():
    a = torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 0.5
    got = {k: v.item() for k, v in signal_stats(a).items()}
    x = a.double().numpy()
    rows = x.reshape(6, -1)
    sv = np.linalg.svd(rows, compute_uv=False)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert got["mean_sq"] == pytest.approx((x.mean(axis=(0, 2, 3)) ** 2).mean(), rel=1e-12)
    assert got["var"] == pytest.approx(x.var(axis=(0, 2, 3)).mean(), rel=1e-12)
    assert got["stable_rank"] == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=1e-10)
    assert got["cos"] == pytest.approx(cos[~np.eye(6, dtype=bool)].mean(), rel=1e-12)


def mlp(overrides: list[str], width: int = 32) -> nn.Module:
    cfg = compose(["data=synthetic", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.norm, (width,), 10)


def probe(model: nn.Module, x: torch.Tensor, kind=Signal) -> dict[str, float]:
    ctx = ProbeContext(model, x, None, x, None, None, None, 0.1, 0)
    return {k: v.item() for k, v in kind(model, every=1)(ctx).items()}


def test_a_deep_relu_net_without_norms_collapses_in_rank_at_init_and_one_with_batch_norm_does_not():
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(2))
    deep = ["model.hidden=[64,64,64,64,64,64,64,64,64,64,64,64]"]
    none, bn = probe(mlp([*deep, "norm.placement=none"]), x), probe(mlp(deep), x)
    assert none["signal/hidden11/stable_rank"] < 0.5 * none["signal/hidden0/stable_rank"]  # Daneshmand et al. 2020, Fig. 1
    assert none["signal/hidden11/cos"] > 0.9 > bn["signal/hidden11/cos"]
    assert bn["signal/hidden11/stable_rank"] > 2 * none["signal/hidden11/stable_rank"]  # 2.9 vs 1.0: ReLU's mean direction dominates
    # With batch statistics, as in training (eval mode at init would be BN with running statistics (0, 1)):
    # each unit is relu(z) of a standardized z, of mean 1 / sqrt(2 pi) and variance 1/2 - 1 / (2 pi) for a normal z.
    assert bn["signal/hidden0/mean_sq"] == pytest.approx(1 / (2 * np.pi), rel=0.05)
    assert bn["signal/hidden0/var"] == pytest.approx(0.5 - 1 / (2 * np.pi), rel=0.05)


def test_signal_is_logged_at_step_0_and_every_n_steps_and_neither_probe_changes_training(tmp_path):
    def run(name: str, *probes: str) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):
            train(compose([*TINY, "model.dropout=0.5", "model.dropout_position=before_norm", *probes]), tmp_path / name)
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]

    quiet, probed = run("off"), run("on", "probes.signal.every=10", "probes.var_shift.every=15")
    assert all(torch.equal(probed[k], v) for k, v in quiet.items())
    tags = load_scalars(tmp_path / "on")
    assert [s for s, _ in tags["signal/hidden1/stable_rank"]] == [0, 10, 20, 30]
    assert [s for s, _ in tags["var_shift/hidden0.norm"]] == [15, 30]
    assert {f"signal/hidden0/{k}" for k in ("mean_sq", "var", "stable_rank", "cos")} <= tags.keys()
    assert train_loss(tmp_path / "off") == train_loss(tmp_path / "on")


def train_loss(run_dir) -> list:
    return load_scalars(run_dir)["train/loss"]


# ----------------------------------------------------------------- dropout


def children(overrides: list[str]) -> list[str]:
    return [n for n, _ in mlp(["model.hidden=[8]", *overrides]).named_modules() if n]


@pytest.mark.parametrize("overrides, order", [
    (["model.dropout_position=before_norm"], ["hidden0.linear", "hidden0.dropout", "hidden0.norm", "hidden0.act"]),
    (["model.dropout_position=after_norm"], ["hidden0.linear", "hidden0.norm", "hidden0.dropout", "hidden0.act"]),
    (["model.dropout_position=before_norm", "norm.placement=post"], ["hidden0.linear", "hidden0.act", "hidden0.dropout", "hidden0.norm"]),
    (["model.dropout_position=after_norm", "norm.placement=post"], ["hidden0.linear", "hidden0.act", "hidden0.norm", "hidden0.dropout"]),
    (["model.dropout_position=after_norm", "norm.placement=none"], ["hidden0.linear", "hidden0.dropout", "hidden0.act"]),
    (["model.dropout_position=head"], ["hidden0.linear", "hidden0.norm", "hidden0.act", "head.dropout"]),
], ids=["pre before", "pre after", "post before", "post after", "none", "head"])
def test_dropout_goes_right_before_or_after_each_norm_or_once_before_the_classifier(overrides, order):
    names = children(["model.dropout=0.3", *overrides])
    assert [n for n in names if n.startswith(("hidden0.", "head."))] == order
    assert "hidden0.dropout" not in children(overrides)  # model.dropout=0: no dropout layers at all


def test_resnets_dropout_goes_before_the_classifier():
    cfg = compose(["data=synthetic", "data.shape=[1,8,8]", "model=resnet", "model.depth=8", "model.dropout=0.3"])
    model = build_model(cfg.model, cfg.norm, (1, 8, 8), 10)
    assert [n for n, _ in model.head.named_children()] == ["pool", "flatten", "dropout"]


@pytest.mark.parametrize("position, shift", [("before_norm", 0.5), ("after_norm", 1.0)])
def test_var_shift_measures_inverted_dropouts_1_minus_p_at_a_norms_input(position, shift):
    # Li et al. 2019, Sec. 3: dropout of rate p before a norm makes the training-mode variance
    # 1 / (1 - p) times the eval-mode one; eval variance / running variance = 1 - p. The input
    # has mean 0 (no bias before a centering norm); BN's momentum is small, so the running
    # variance averages ~25k examples.
    model = mlp(["model.hidden=[64,64]", "model.dropout=0.5", f"model.dropout_position={position}", "norm.momentum=0.01"])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(1000):
            model(torch.randn(256, 32, generator=gen))
    values = probe(model, torch.randn(8192, 32, generator=gen), VarShift)
    assert values["var_shift/hidden0.norm"] == pytest.approx(shift, rel=0.03)
