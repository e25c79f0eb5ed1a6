"""A norm is one file: the toy batch-statistics norm below (its layer, its own
key, its check, one ``register`` call) is all there is of it, and it trains
alone, as stacked replicas (``hydra/launcher=vectorized``) that equal their
standalone runs, under the probes, PreciseBN and the BN-gap probe, and
synchronized over ranks, through bnexp's public paths; no other module
knows it."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnexp.config import ConfigError, config_hash
from bnexp.norms import PER_CHANNEL, BatchStatsNorm, FP32Norm, register, unregister
from bnexp.norms.base import broadcast
from bnexp.norms.sync import moments_twin, synchronized
from tests.conftest import TINY, run_inprocess
from tests.test_replicas import assert_close_tensors, checkpoint

# ----------------------------------------------------------------- the norm's one file


class _ToyNorm(BatchStatsNorm):
    """Batch normalization in plain torch ops, with Keras' running-variance rule
    (the biased batch variance) and a constant ``shift`` added to the normalized value."""

    unbiased = False

    def __init__(self, num_features: int, shift: float, eps: float, momentum: float, track_running_stats: bool):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_batch_stats():
            mean, var, _ = self._moments(x)
            if self.track_running_stats:
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return self._affine((x - broadcast(mean, x)) / torch.sqrt(broadcast(var, x) + self.eps) + self.shift)


class ToyNorm(FP32Norm, _ToyNorm):
    pass


@dataclass
class ToyKeys:
    toy_shift: float = 0.0  # norm.toy_shift


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return ToyNorm(num_features, cfg.toy_shift, cfg.eps, cfg.momentum, cfg.track_running_stats)


def check(cfg) -> None:
    if not 0 <= cfg.norm.toy_shift <= 1:
        raise ConfigError("norm.toy_shift", f"got {cfg.norm.toy_shift}; allowed: 0 <= toy_shift <= 1")


def register_toy() -> None:
    register("toy", build, layers=(ToyNorm,), schema=ToyKeys, check=check, batch_stats=True, centers=True, fold=PER_CHANNEL,
             sync=moments_twin, twins=(synchronized(ToyNorm),))


# ----------------------------------------------------------------- the tests


@pytest.fixture(autouse=True, scope="module")
def toy_norm():
    register_toy()
    yield
    unregister("toy")


# Smooth units, so that replicas match their standalone runs to fp32 rounding (tests/test_replicas.py).
TOY = [*TINY, "norm=toy", "norm.toy_shift=0.25", "model.activation=tanh", "probes.activations.every=15"]


@pytest.mark.slow  # two in-process sweeps of 3 jobs: ~3 s idle, 7 s on the loaded box
def test_a_norm_from_one_file_trains_alone_and_as_stacked_replicas_that_equal_their_standalone_runs(tmp_path):
    alone = run_inprocess(["sweep", *TOY, "seed=0,1,2", "hydra.sweep.dir=alone"], tmp_path)
    stacked = run_inprocess(["sweep", *TOY, "seed=0,1,2", "hydra/launcher=vectorized", "hydra.sweep.dir=stacked"], tmp_path)
    assert alone.returncode == 0 and stacked.returncode == 0, alone.stderr + stacked.stderr
    assert "Launching 3 jobs: 1 stack of replicas (3), 0 alone" in stacked.stdout
    from bnexp.runs import load_scalars

    for seed in range(3):
        want_dir, got_dir = (next((tmp_path / sweep).glob(f"*seed={seed}")) for sweep in ("alone", "stacked"))
        record = json.loads((got_dir / "metrics.json").read_text())
        assert record["status"] == "completed" and record["replica"] == {"index": seed, "of": 3}
        want, got = checkpoint(want_dir), checkpoint(got_dir)
        assert {"hidden0.norm.running_mean", "hidden0.norm.running_var", "hidden1.norm.weight"} <= want["model"].keys()
        assert "hidden0.linear.bias" not in want["model"]  # centers: the bias before it is redundant
        assert_close_tensors(got["model"], want["model"], 1e-5, f"replica {seed} weights")
        a, b = load_scalars(want_dir), load_scalars(got_dir)
        tags = {t for t in a if not t.startswith("time/")}
        assert tags == {t for t in b if not t.startswith("time/")}
        assert {"act/hidden1/p50", "grad_norm/hidden0.norm", "weight_norm/hidden1.norm", "val/acc"} <= tags
        for tag in tags:
            assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
            for (_, va), (_, vb) in zip(a[tag], b[tag]):
                assert abs(va - vb) <= 1e-4 * max(1.0, abs(va)), f"replica {seed} {tag}: {vb} vs standalone {va}"


def test_a_norm_from_one_file_is_a_norm_option_with_its_key_and_check_and_leaves_other_runs_config_hashes_alone(tmp_path):
    from bnexp.schema import compose

    assert compose(["norm=toy"]).norm.toy_shift == 0.0 and compose(["norm=toy"]).norm.kind.value == "toy"
    # What test_distributed records for bnexp at 77b4f55: the toy's key at its default is not hashed.
    assert config_hash(compose(["data=synthetic"])) == "cc1df50f7b333183"
    shown = run_inprocess(["show", "norm=toy"], tmp_path)
    assert "  kind: toy\n" in shown.stdout and "  toy_shift: 0.0\n" in shown.stdout
    assert "#   norm: batch, batch_renorm, ghost_batch, group, layer, toy\n" in shown.stdout
    out = run_inprocess(["train", *TINY, "norm=toy", "norm.toy_shift=2"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == ["error: norm.toy_shift: got 2.0; allowed: 0 <= toy_shift <= 1"]
    assert list(tmp_path.iterdir()) == []


def test_a_batch_statistics_norm_from_one_file_gets_precise_bn_and_the_bn_gap_probe(tmp_path):
    from bnexp.models import build_model
    from bnexp.models.mlp import MLPConfig
    from bnexp.probes.bn_gap import batch_indices, recompute_bn_stats
    from bnexp.runs import load_scalars
    from bnexp.schema import compose

    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=[6]), compose(["norm=toy"]).norm, (4,), 3)
    x = torch.randn(100, 4) * 3 + 1
    assert recompute_bn_stats(model, x, batches=5, batch_size=16, seed=3, step=40) == 1
    w = model.hidden0.linear.weight.detach().double().numpy()
    pooled = np.concatenate([x.double().numpy()[b] @ w.T for b in batch_indices(100, 5, 16, seed=3, step=40)])
    np.testing.assert_allclose(model.hidden0.norm.running_mean.double().numpy(), pooled.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.hidden0.norm.running_var.double().numpy(), pooled.var(0), rtol=1e-5, atol=1e-6)  # its biased rule

    out = run_inprocess(["train", *TOY, "train.precise_bn=2", "probes.bn_gap.every=15", "probes.bn_gap.batches=3", "hydra.run.dir=gap"],
                        tmp_path)
    assert out.returncode == 0, out.stderr
    tags = load_scalars(tmp_path / "gap")
    for how in ("ema", "precise", "batch"):
        assert [s for s, _ in tags[f"bn_gap/val_loss_{how}"]] == [15, 30]
    assert tags["bn_gap/val_loss_batch"] != tags["bn_gap/val_loss_ema"]


WORLD, SHARE = 2, 4


def rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from bnexp.sync_norms import synchronize

    holder = nn.Sequential(toy_layer())
    synchronize(holder, SHARE, WORLD, cuda=False)
    assert type(holder[0]) is synchronized(ToyNorm)
    x = toy_batch()[rank * SHARE : (rank + 1) * SHARE].clone().requires_grad_()
    y = holder[0](x)
    y.square().sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "running_var": holder[0].running_var}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def toy_layer() -> nn.Module:
    return ToyNorm(3, shift=0.5, eps=1e-5, momentum=0.1, track_running_stats=True).double().train()


def toy_batch() -> torch.Tensor:
    return 2 + 3 * torch.randn(WORLD * SHARE, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_a_batch_statistics_norm_from_one_file_synchronizes_over_ranks_as_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(port, str(tmp_path)), nprocs=WORLD, start_method="fork")
    got = [torch.load(Path(tmp_path) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference, x = toy_layer(), toy_batch().requires_grad_()
    y = reference(x)
    y.square().sum().backward()
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), x.grad, rtol=1e-10, atol=1e-12)
    for g in got:
        torch.testing.assert_close(g["running_var"], reference.running_var, rtol=1e-12, atol=1e-12)
