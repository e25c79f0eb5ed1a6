"""Synchronized norms (norm.sync=true) on real gloo process groups: each rank
normalizes its share of a batch, and together they give what one process
gives on the concatenated batch: outputs, input and parameter gradients,
running statistics (float64, so any difference is a wrong formula, not
rounding)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnexp import distributed
from bnexp.config import NormConfig
from bnexp.norms import make_norm
from bnexp.sync_norms import SyncBatchNorm, SyncBatchRenorm, SyncGhostBatchNorm, per_device_buffers, synchronize

WORLD, SHARE, CHANNELS = 4, 3, 5  # 4 ranks of 3 examples: a global batch of 12


def norm(case: str) -> nn.Module:
    """The case's norm layer, the same on every rank and in the reference."""
    options, spatial, _ = CASES[case]
    torch.manual_seed(1)
    layer = make_norm(NormConfig(**options), CHANNELS, spatial).double()
    with torch.no_grad():  # affine parameters and running statistics away from their neutral start
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        spread(layer).uniform_(0.5, 2)
    return layer


def spread(layer: nn.Module) -> torch.Tensor:
    """The running spread: a variance, or batch renorm's standard deviation (Ioffe 2017, Algorithm 1)."""
    return layer.running_std if hasattr(layer, "running_std") else layer.running_var


CASES = {
    "batch": (dict(kind="batch"), 0, SyncBatchNorm),
    "batch_keras_running_var": (dict(kind="batch", running_var="biased"), 0, SyncBatchNorm),
    "batch_2d": (dict(kind="batch"), 2, SyncBatchNorm),
    # virtual batches of 6 = two ranks' shares: ranks 0-1 and 2-3 normalize together
    "ghost_batch": (dict(kind="ghost_batch", virtual_batch_size=6), 0, SyncGhostBatchNorm),
    # tight clips, so that r and d (from the global batch and the running statistics) matter
    "batch_renorm": (dict(kind="batch_renorm", rmax=1.2, dmax=0.1), 1, SyncBatchRenorm),
}


def data(spatial: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    shape = (WORLD * SHARE, CHANNELS, *([4] * spatial))
    return 3 + 2 * torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def step(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer.train()(x)
    (y * w).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad}


def rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for name, (_, spatial, cls) in CASES.items():
        holder = nn.Sequential(norm(name))
        synchronize(holder, SHARE, WORLD, cuda=False)
        assert isinstance(holder[0], cls), type(holder[0])
        x, w = data(spatial)
        share = slice(rank * SHARE, (rank + 1) * SHARE)
        res = step(holder[0], x[share], w[share])
        buffers = per_device_buffers(holder, WORLD)  # those of norms not synchronized over all ranks
        if buffers:
            distributed._average(buffers, WORLD)  # as a data-parallel run does after each step
        res["running_mean"], res["running_spread"] = holder[0].running_mean.clone(), spread(holder[0]).clone()
        results[name] = res
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    # fork: the ranks inherit the imported torch instead of importing it four times
    mp.start_processes(rank_main, args=(free_port(), str(out)), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES)
def test_synchronized_norm_on_four_ranks_equals_one_process_on_the_concatenated_batch(per_rank, case):
    reference = norm(case)
    x, w = data(CASES[case][1])
    want = step(reference, x, w)
    got = [r[case] for r in per_rank]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), want["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), want["x_grad"], rtol=1e-10, atol=1e-12)
    for key in ("weight_grad", "bias_grad"):  # each rank holds its share's part; DDP sums (averages) them
        torch.testing.assert_close(sum(g[key] for g in got), want[key], rtol=1e-10, atol=1e-12)
    for g in got:
        torch.testing.assert_close(g["running_mean"], reference.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g["running_spread"], spread(reference), rtol=1e-12, atol=1e-12)
