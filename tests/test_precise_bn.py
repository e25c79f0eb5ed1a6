"""PreciseBN (train.precise_bn, Wu & Johnson 2021 / fvcore's update_bn_stats) and
the bn_gap probe: running statistics become the pooled statistics of the
training batches seen, computed here independently in float64 NumPy; training
itself never notices."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnexp.config import NormConfig, NormKind
from bnexp.models import build_model
from bnexp.models.cnn import CNNConfig
from bnexp.models.mlp import MLPConfig
from bnexp.probes.bn_gap import batch_indices, recompute_bn_stats
from bnexp.runs import load_scalars
from bnexp.schema import compose
from bnexp.train import train

TINY = ["data=synthetic", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]", "train.steps=12",
        "train.log_every=3", "train.eval_every=4", "train.batch_size=32", "train.progress=false", "train.device=cpu"]


def np_bn_forward(model, x: np.ndarray, eps: float) -> list[np.ndarray]:
    """The inputs of hidden0.norm and hidden1.norm for one batch of a 2-block MLP
    (linear -> BN with the batch's statistics -> relu), in float64."""
    inputs, h = [], x
    for block in (model.hidden0, model.hidden1):
        z = h @ block.linear.weight.detach().double().numpy().T
        inputs.append(z)
        z_hat = (z - z.mean(0)) / np.sqrt(z.var(0) + eps)
        h = np.maximum(z_hat * block.norm.weight.detach().double().numpy() + block.norm.bias.detach().double().numpy(), 0)
    return inputs


@pytest.mark.parametrize("kind, running_var", [(NormKind.batch, "unbiased"), (NormKind.batch, "biased"), (NormKind.batch_renorm, "unbiased"),
                                               (NormKind.ghost_batch, "unbiased"), (NormKind.ghost_batch, "biased")])
def test_precise_bn_sets_running_stats_to_the_pooled_statistics_of_the_batches_it_saw(kind, running_var):
    torch.manual_seed(0)
    norm_cfg = NormConfig(kind=kind, virtual_batch_size=4, running_var=running_var)
    model = build_model(MLPConfig(hidden=[6, 5]), norm_cfg, (4,), 3)
    with torch.no_grad():
        for m in (model.hidden0.norm, model.hidden1.norm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(100, 4) * 3 + 1
    before = copy.deepcopy(model.state_dict())
    assert recompute_bn_stats(model, x, batches=5, batch_size=16, seed=3, step=40) == 2
    idx = batch_indices(100, 5, 16, seed=3, step=40)
    assert len(np.unique(idx)) == 80  # 5 batches of 16 distinct examples
    seen = [np_bn_forward(model, x.double().numpy()[b], model.hidden0.norm.eps) for b in idx]
    if kind != NormKind.batch:  # ghost BN normalizes by sub-batches and renorm corrects by running stats: check the first layer only
        seen = [s[:1] for s in seen]
    for layer, norm in enumerate((model.hidden0.norm, model.hidden1.norm)[: len(seen[0])]):
        pooled = np.concatenate([s[layer] for s in seen])
        np.testing.assert_allclose(norm.running_mean.double().numpy(), pooled.mean(0), rtol=1e-5, atol=1e-6)
        if kind == NormKind.batch_renorm:  # a running sigma (Ioffe 2017, Algorithm 1), eps inside
            np.testing.assert_allclose(norm.running_std.double().numpy(), np.sqrt(pooled.var(0) + norm.eps), rtol=1e-5, atol=1e-6)
        else:  # the norm's own running-variance rule (norm.running_var) over the 80 values pooled
            ddof = 1 if running_var == "unbiased" else 0
            np.testing.assert_allclose(norm.running_var.double().numpy(), pooled.var(0, ddof=ddof), rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    for k, v in before.items():  # parameters and counters untouched; only the running statistics change
        if "running" not in k:
            assert torch.equal(after[k], v), k
    assert model.training


def test_precise_bn_of_a_conv_layer_pools_over_examples_and_positions():
    torch.manual_seed(0)
    model = build_model(CNNConfig(hidden=[4], pool=False), NormConfig(), (2, 6, 6), 3)
    x = torch.randn(32, 2, 6, 6) + 0.5
    recompute_bn_stats(model, x, batches=4, batch_size=8, seed=0, step=1)  # 4 x 8 = every example once
    z = F.conv2d(x.double(), model.hidden0.conv.weight.detach().double(), padding=1).numpy()
    np.testing.assert_allclose(model.hidden0.norm.running_mean.numpy(), z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.hidden0.norm.running_var.numpy(), z.var((0, 2, 3), ddof=1), rtol=1e-5)  # torch's unbiased rule


def test_precise_bn_leaves_a_network_without_running_statistics_alone():
    model = build_model(MLPConfig(hidden=[6]), NormConfig(kind=NormKind.layer), (4,), 3)
    before = copy.deepcopy(model.state_dict())
    assert recompute_bn_stats(model, torch.randn(64, 4), 2, 16, 0, 1) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def run(tmp_path, name: str, overrides: list[str]) -> tuple[dict, dict]:
    with contextlib.redirect_stdout(io.StringIO()):
        train(compose([*TINY, *overrides]), tmp_path / name)
    weights = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return weights, load_scalars(tmp_path / name)


@pytest.mark.slow
def test_train_precise_bn_changes_evaluation_and_running_stats_but_not_one_trained_weight(tmp_path):
    ema_w, ema = run(tmp_path, "ema", [])
    precise_w, precise = run(tmp_path, "precise", ["train.precise_bn=4"])
    assert precise["train/loss"] == ema["train/loss"]  # same batches, same steps
    for k in ema_w:
        if "running" in k:
            assert not torch.equal(precise_w[k], ema_w[k]), k
        else:
            assert torch.equal(precise_w[k], ema_w[k]), k
    assert precise["val/loss"] != ema["val/loss"] and precise["test/loss"] != ema["test/loss"]
    # The checkpoint holds the statistics the final test used: step 12's recomputation.
    model = build_model(MLPConfig(hidden=[16, 16]), NormConfig(), (32,), 10)
    model.load_state_dict(precise_w)
    from bnexp.data import load

    data = load(compose(TINY).data, torch.device("cpu"))
    recalibrated = copy.deepcopy(model)
    recompute_bn_stats(recalibrated, data.x_train, 4, 32, seed=0, step=12)
    for a, b in zip(model.buffers(), recalibrated.buffers()):
        assert torch.equal(a, b)


def test_bn_gap_reports_ema_precise_and_batch_statistics_accuracies(tmp_path):
    _, tags = run(tmp_path, "gap", ["probes.bn_gap.every=4", "probes.bn_gap.batches=3"])
    for how in ("ema", "precise", "batch"):
        assert [s for s, _ in tags[f"bn_gap/val_acc_{how}"]] == [4, 8, 12]
        assert [s for s, _ in tags[f"bn_gap/val_loss_{how}"]] == [4, 8, 12]
    # The EMA figures are the run's own validation at those steps; the others differ from them.
    assert tags["bn_gap/val_loss_ema"] == tags["val/loss"] and tags["bn_gap/val_acc_ema"] == tags["val/acc"]
    assert tags["bn_gap/val_loss_precise"] != tags["val/loss"] and tags["bn_gap/val_loss_batch"] != tags["val/loss"]


def test_bn_gap_batch_statistics_figure_is_the_train_mode_loss_over_chunks_of_the_training_batch_size(tmp_path):
    from bnexp.data import load
    from bnexp.probes import ProbeContext, ProbeSet
    from bnexp.probes.bn_gap import BNGap

    data = load(compose(TINY).data, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[16]), NormConfig(), (32,), 10)
    model.train()(data.x_train[:64] * 2)  # running statistics differ from the batches'
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        chunks = [F.cross_entropy(reference(data.x_val[i : i + 32]), data.y_val[i : i + 32], reduction="sum")
                  for i in range(0, len(data.x_val), 32)]
    expected = float(sum(chunks)) / len(data.x_val)
    ctx = ProbeContext(model, data.x_val, data.y_val, data.x_train[:32], data.y_train[:32], torch.optim.SGD(model.parameters(), lr=0.1),
                       F.cross_entropy, 0.1, 4)
    before = copy.deepcopy(model.state_dict())
    out = ProbeSet({"g": BNGap(1, 2, 32, 2048, 0, data)}).due(4, 10, lambda: ctx)
    assert float(out["bn_gap/val_loss_batch"]) == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # preserved() restored the running stats


def fvcore_population_estimate(layer: torch.nn.BatchNorm1d, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """fvcore.nn.precise_bn.update_bn_stats's arithmetic (its _PopulationVarianceEstimator),
    written out as the reference: torch's BN at momentum 1 leaves each batch's mean and
    Bessel-corrected variance in the buffers; fvcore undoes the correction per batch,
    pools E[x] and E[x^2] weighted by batch size, and sets running_var = E[x^2] - E[x]^2."""
    layer.momentum, tot = 1.0, 0
    pop_mean = torch.zeros_like(layer.running_mean)
    pop_square_mean = torch.zeros_like(layer.running_var)
    for x in batches:
        layer.train()(x)
        n = x.shape[0]
        tot += n
        square_mean = layer.running_mean.square() + layer.running_var * ((n - 1) / n)
        pop_mean += (layer.running_mean - pop_mean) * (n / tot)
        pop_square_mean += (square_mean - pop_square_mean) * (n / tot)
    return pop_mean, pop_square_mean - pop_mean.square()


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_precise_bn_variance_is_fvcores_biased_pooled_variance_or_n_over_n_minus_1_times_it(running_var):
    # batch 8 x 4 batches: n = 32 values a channel, so the unbiased rule is 32/31 (3.2%) above fvcore's
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[6]), NormConfig(kind=NormKind.batch, running_var=running_var), (4,), 3).double()
    x = torch.randn(64, 4, dtype=torch.float64) * 3 + 1
    recompute_bn_stats(model, x, batches=4, batch_size=8, seed=1, step=7)
    inputs = [model.hidden0.linear(x[torch.from_numpy(b)]).detach() for b in batch_indices(64, 4, 8, seed=1, step=7)]
    reference = torch.nn.BatchNorm1d(6).double()
    mean, var = fvcore_population_estimate(reference, inputs)
    torch.testing.assert_close(model.hidden0.norm.running_mean, mean)
    factor = 32 / 31 if running_var == "unbiased" else 1.0
    torch.testing.assert_close(model.hidden0.norm.running_var, var * factor)
