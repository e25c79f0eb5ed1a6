"""What a norm's synchronized twin (``norm.sync=true``, :mod:`bnexp.sync_norms`) is made of:
the moments of a batch spread over a group of ranks.

Why bnexp has synchronized norms of its own, besides torch.nn.SyncBatchNorm:
torch's refuses every device but a GPU ("SyncBatchNorm expected input tensor
to be on GPU"), so it cannot serve gloo runs on CPU, and torch has no
synchronized ghost BN or batch renorm at all (``convert_sync_batchnorm`` skips
them). :func:`group_moments`: each rank's per-channel mean and sum of squared
deviations go through an all-gather with autograd (:class:`AllGather`), so
backward reaches every rank's inputs and the gradients are those of the norm
over the concatenated batch, as in detectron2's NaiveSyncBatchNorm. Unlike
that one, the moments are combined with Chan et al.'s pairwise update (as
torch's SyncBatchNorm does), not as E[x^2] - E[x]^2, which loses digits when a
channel's mean is large against its spread.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from bnexp.norms.base import broadcast, reduce_dims


class AllGather(torch.autograd.Function):
    """[K] on every rank -> [W, K], row r from rank r; backward gives each rank
    the gradient of every rank's loss with respect to its row.

    Written here because torch's own differentiable collectives are either
    deprecated (torch.distributed.nn.functional) or, as the functional
    collectives that replace them, cost seconds on their first call (they set
    up torch.compile's tracing machinery: 17 s per process, measured with four
    ranks on the loaded 2-core dev box) for an exchange of a few floats."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, x.contiguous())
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's row
        return grad[dist.get_rank()]


def group_moments(x: torch.Tensor, ranks_per_group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance over the batches of this rank's
    group of ``ranks_per_group`` consecutive ranks (all ranks: the global
    batch), and their count; differentiable. Every rank's batch has the shape
    of this one's (training splits the global batch evenly), so the counts need
    no exchange and nothing waits for the host."""
    dims, channels = reduce_dims(x), x.shape[1]
    n = x.numel() // channels
    mean = x.mean(dims)
    m2 = (x - broadcast(mean, x)).square().sum(dims)
    rows = AllGather.apply(torch.cat([mean, m2]))
    first = dist.get_rank() // ranks_per_group * ranks_per_group
    means, m2s = rows[first : first + ranks_per_group].split(channels, dim=1)
    group_mean = means.mean(0)
    group_m2 = m2s.sum(0) + n * (means - group_mean).square().sum(0)
    count = n * ranks_per_group
    return group_mean, group_m2 / count, count


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
              weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, as one multiply-add over x."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return x * broadcast(scale, x) + broadcast(shift, x)


class Synchronized:
    """Training statistics over ``ranks_per_group`` consecutive ranks, for a
    norm that takes them from ``self._moments(x)`` (bnexp.norms.base.BatchStatsNorm)."""

    ranks_per_group: int

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return group_moments(x, self.ranks_per_group)


_TWIN_CLASSES: dict[type, type] = {}


def synchronized(cls: type) -> type:
    """``cls`` with its batch moments over a group of ranks (one class per ``cls``)."""
    if cls not in _TWIN_CLASSES:
        doc = f"{cls.__name__} whose batch statistics (and all that follows from them) are those of a group of ranks."
        _TWIN_CLASSES[cls] = type(f"Sync{cls.__name__}", (Synchronized, cls), {"__module__": cls.__module__, "__doc__": doc})
    return _TWIN_CLASSES[cls]


def moments_twin(norm: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module:
    """The synchronized twin of a norm whose training statistics come from
    ``self._moments(x)``: the same layer, its moments over the global batch.
    (A copy whose class is :func:`synchronized`'s: the layer's own settings
    without knowing its constructor; synchronize() hands it the layer's tensors.)"""
    twin = copy.deepcopy(norm)
    twin.__class__ = synchronized(type(norm))
    twin.ranks_per_group = world
    return twin
