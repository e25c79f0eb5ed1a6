"""Synchronized batch-statistics norms for data-parallel runs (``norm.sync=true``).

In a run of W processes each normalizes only its own share of the global
batch unless its norms are synchronized. :func:`synchronize` replaces every
BN, ghost BN and batch renorm of a model by a twin that shares its parameters
and buffers but takes its training statistics from the whole global batch (a
ghost BN whose virtual batch spans several devices: from those devices), as if
one process had normalized the concatenated batch.

Why there is a synchronized BN of bnexp's own, besides torch.nn.SyncBatchNorm:
torch's refuses every device but a GPU ("SyncBatchNorm expected input tensor
to be on GPU"), so it cannot serve gloo runs on CPU, and torch has no
synchronized ghost BN or batch renorm at all (``convert_sync_batchnorm`` skips
them). On CUDA, plain BN becomes torch's SyncBatchNorm (cuDNN kernels); every
other case uses :func:`group_moments`: each rank's per-channel mean and sum of
squared deviations go through an all-gather with autograd (:class:`AllGather`),
so backward reaches every rank's inputs and the gradients are those of BN over
the concatenated batch, as in detectron2's NaiveSyncBatchNorm. Unlike that one, the moments are combined with Chan et
al.'s pairwise update (as torch's SyncBatchNorm does), not as E[x^2] - E[x]^2,
which loses digits when a channel's mean is large against its spread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bnexp.norms import FP32Norm, _BatchRenorm, _BiasedRunningVar, _broadcast, _GhostBatchNorm, _reduce_dims, _RunningStatsNorm, _unbiased


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
    dims, channels = _reduce_dims(x), x.shape[1]
    n = x.numel() // channels
    mean = x.mean(dims)
    m2 = (x - _broadcast(mean, x)).square().sum(dims)
    rows = AllGather.apply(torch.cat([mean, m2]))
    first = dist.get_rank() // ranks_per_group * ranks_per_group
    means, m2s = rows[first : first + ranks_per_group].split(channels, dim=1)
    group_mean = means.mean(0)
    group_m2 = m2s.sum(0) + n * (means - group_mean).square().sum(0)
    count = n * ranks_per_group
    return group_mean, group_m2 / count, count


def _normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
               weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, as one multiply-add over x."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return x * _broadcast(scale, x) + _broadcast(shift, x)


class _Synchronized:
    """Training statistics over ``ranks_per_group`` consecutive ranks."""

    ranks_per_group: int

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return group_moments(x, self.ranks_per_group)


class _SyncBatchNorm(_Synchronized, nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any backend (gloo on CPU included).
    In eval mode it is plain BatchNorm: running statistics, nothing exchanged,
    as torch's SyncBatchNorm."""

    def __init__(self, num_features: int, ranks_per_group: int, eps: float, momentum: float, track_running_stats: bool,
                 unbiased: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=track_running_stats)
        self.ranks_per_group, self.unbiased = ranks_per_group, unbiased

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean, var, count = self._moments(x)
        if self.track_running_stats:
            with torch.no_grad():  # the rule of the norm it replaces (norm.running_var: unbiased as torch's, or biased)
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(_unbiased(var.detach(), count) if self.unbiased else var.detach(), self.momentum)
        return _normalize(x, mean, var, self.eps, self.weight, self.bias)


class _SyncGhostBatchNorm(_Synchronized, _GhostBatchNorm):
    """Ghost BN over the global batch: a virtual batch of ``virtual_batch_size``
    examples spans ``ranks_per_group`` devices, whose batches it normalizes
    together; the running statistics move towards this group's, and the
    groups' are averaged across ranks after the step (bnexp.distributed)."""

    def __init__(self, num_features: int, virtual_batch_size: int, ranks_per_group: int, eps: float, momentum: float, track_running_stats: bool,
                 unbiased: bool = True):
        super().__init__(num_features, virtual_batch_size, eps, momentum, track_running_stats, unbiased)
        self.ranks_per_group = ranks_per_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats() or not self.training:
            return super().forward(x)  # eval: running statistics, or this batch's own without them
        mean, var, count = self._moments(x)
        if self.track_running_stats:
            self._update_running(mean, self._running_var_of(var, count))
        return self._affine(_normalize(x, mean, var, self.eps, None, None))


class _SyncBatchRenorm(_Synchronized, _BatchRenorm):
    """Batch renorm whose batch statistics (and so r and d) are the global batch's."""

    def __init__(self, num_features: int, ranks_per_group: int, rmax: float, dmax: float, eps: float, momentum: float, track_running_stats: bool):
        super().__init__(num_features, rmax, dmax, eps, momentum, track_running_stats)
        self.ranks_per_group = ranks_per_group


class SyncBatchNorm(FP32Norm, _SyncBatchNorm):
    __doc__ = _SyncBatchNorm.__doc__


class SyncGhostBatchNorm(FP32Norm, _SyncGhostBatchNorm):
    __doc__ = _SyncGhostBatchNorm.__doc__


class SyncBatchRenorm(FP32Norm, _SyncBatchRenorm):
    __doc__ = _SyncBatchRenorm.__doc__


class CudaSyncBatchNorm(FP32Norm, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm, kept in fp32 under autocast like every bnexp norm."""


def _twin(norm: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module | None:
    """The synchronized twin of ``norm`` (None: it needs none), without parameters or buffers yet."""
    if not isinstance(norm, (nn.modules.batchnorm._BatchNorm, _RunningStatsNorm)):
        return None
    common = {"eps": norm.eps, "momentum": norm.momentum, "track_running_stats": norm.track_running_stats}
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not isinstance(norm, nn.SyncBatchNorm):
        unbiased = not isinstance(norm, _BiasedRunningVar)
        if cuda and unbiased:  # torch's has torch's running_var rule only
            return CudaSyncBatchNorm(norm.num_features, affine=True, **common)
        return SyncBatchNorm(norm.num_features, world, **common, unbiased=unbiased)
    if isinstance(norm, _GhostBatchNorm) and not isinstance(norm, _Synchronized):
        vbs = norm.virtual_batch_size
        if vbs <= per_device_batch:  # every virtual batch lies on one device: ghost BN as it is
            return None
        return SyncGhostBatchNorm(norm.num_features, vbs, vbs // per_device_batch, **common, unbiased=norm.unbiased)
    if isinstance(norm, _BatchRenorm) and not isinstance(norm, _Synchronized):
        return SyncBatchRenorm(norm.num_features, world, norm.rmax, norm.dmax, **common)
    return None


def synchronize(model: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module:
    """Replace, in place, every batch-statistics norm of ``model`` by its
    synchronized twin, which takes over the norm's own parameters and buffers
    (so optimizer, checkpoint keys and TensorBoard names stay what they were).

    Written here rather than through torch.nn.SyncBatchNorm.convert_sync_batchnorm,
    which makes plain torch SyncBatchNorms only: it would drop bnexp's fp32 mixin
    and skip ghost BN and batch renorm."""
    for name, child in list(model.named_children()):
        twin = _twin(child, per_device_batch, world, cuda)
        if twin is None:
            synchronize(child, per_device_batch, world, cuda)
            continue
        for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
            setattr(twin, key, value)
        for key in ("weight", "bias"):  # center=false / scale=false: no parameter at all
            if getattr(child, key, None) is None:
                twin.register_parameter(key, None)
        twin.train(child.training)
        setattr(model, name, twin)
    return model


def per_device_buffers(model: nn.Module, world: int) -> list[torch.Tensor]:
    """The running statistics that each rank moves on its own: those of every
    norm not synchronized over all ranks. Averaged across ranks after every
    step, they are what one process's ghost BN over the global batch keeps
    (the mean of its virtual batches' statistics: the update is linear)."""
    out = []
    for m in model.modules():
        full = isinstance(m, nn.SyncBatchNorm) or getattr(m, "ranks_per_group", 0) == world
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, _RunningStatsNorm)) and not full and m.track_running_stats:
            out += [m.running_mean, m.running_std if isinstance(m, _BatchRenorm) else m.running_var]  # renorm keeps a std
    return out
