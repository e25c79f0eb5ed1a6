"""``norm=ghost_batch``: BN statistics per virtual sub-batch (Hoffer et al. 2017, Sec. 4), not in torch.nn,
written so that one virtual batch equals BatchNorm exactly (tests check). ``norm.virtual_batch_size``."""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import ConfigError, RunningVar, launch_world_size
from bnexp.norms.base import FP32Norm, BatchStatsNorm, Fold, broadcast, join_channels, register, unbiased
from bnexp.norms.sync import Synchronized, normalize


class _GhostBatchNorm(BatchStatsNorm):
    """BatchNorm whose training statistics come from virtual sub-batches (Hoffer et al. 2017, Sec. 4).

    The batch is cut into chunks of ``virtual_batch_size``; each chunk is
    normalized with its own mean and variance, and the running statistics move
    towards the average of the chunks' statistics. With one chunk it is BatchNorm.
    Buffers as torch.nn.BatchNorm's: ``running_mean`` and ``running_var``, a
    variance (each chunk's unbiased one by default, its biased one with
    ``unbiased=False``); eval mode normalizes by sqrt(running_var + eps).
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True, unbiased: bool = True):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.virtual_batch_size, self.unbiased = virtual_batch_size, unbiased

    def _running_var_of(self, var: torch.Tensor, count: int) -> torch.Tensor:
        """What running_var moves towards for a biased variance of ``count`` values."""
        return unbiased(var, count) if self.unbiased else var

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        # The rule of torch.nn.BatchNorm: running = (1 - m) * running + m * batch.
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            rm, rv = broadcast(self.running_mean, x), broadcast(self.running_var, x)
            return self._affine((x - rm) / torch.sqrt(rv + self.eps))
        n, vbs = x.shape[0], self.virtual_batch_size
        if n % vbs:
            # A ragged batch (only seen outside training's fixed batch size) is split unevenly.
            outs, means, vars_ = [], [], []
            for c in torch.split(x, vbs):
                mean, var, count = self._moments(c)
                outs.append((c - broadcast(mean, c)) / torch.sqrt(broadcast(var, c) + self.eps))
                means.append(mean)
                vars_.append(self._running_var_of(var, count))
            x_hat = torch.cat(outs)
            mean, running_var = torch.stack(means).mean(0), torch.stack(vars_).mean(0)
        else:
            g = x.reshape(n // vbs, vbs, *x.shape[1:])
            dims = [1] + list(range(3, g.dim()))
            var, mean = torch.var_mean(g, dims, unbiased=False, keepdim=True)
            x_hat = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
            mean = mean.flatten(1).mean(0)
            running_var = self._running_var_of(var.flatten(1), g[0].numel() // g.shape[2]).mean(0)
        if self.track_running_stats:
            self._update_running(mean, running_var)
        return self._affine(x_hat)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}, unbiased={self.unbiased}"


class _SyncGhostBatchNorm(Synchronized, _GhostBatchNorm):
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
        return self._affine(normalize(x, mean, var, self.eps, None, None))


class GhostBatchNorm(FP32Norm, _GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__


class SyncGhostBatchNorm(FP32Norm, _SyncGhostBatchNorm):
    __doc__ = _SyncGhostBatchNorm.__doc__


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return GhostBatchNorm(num_features, cfg.virtual_batch_size, eps=cfg.eps, momentum=cfg.momentum,
                          track_running_stats=cfg.track_running_stats, unbiased=RunningVar(cfg.running_var) == RunningVar.unbiased)


def sync(norm: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module | None:
    vbs = norm.virtual_batch_size
    if vbs <= per_device_batch:  # every virtual batch lies on one device: ghost BN as it is
        return None
    return SyncGhostBatchNorm(norm.num_features, vbs, vbs // per_device_batch, norm.eps, norm.momentum, norm.track_running_stats,
                              unbiased=norm.unbiased)


def check(cfg) -> None:
    n, t = cfg.norm, cfg.train
    vbs = n.virtual_batch_size
    if vbs is None:
        raise ConfigError("norm.virtual_batch_size", "is unset; norm=ghost_batch needs a ghost batch size that divides train.batch_size")
    if vbs <= 0 or vbs > t.batch_size or t.batch_size % vbs:
        raise ConfigError("norm.virtual_batch_size", f"got {vbs}; allowed: a positive divisor of train.batch_size={t.batch_size}")
    world = launch_world_size()
    if world == 1 or t.batch_size % world:  # an uneven global batch is train.batch_size's error (bnexp.schema)
        return
    per_device = t.batch_size // world
    if per_device % vbs and not n.sync:
        raise ConfigError("norm.virtual_batch_size", f"{vbs} does not divide the per-device batch {per_device} "
                                                     f"(train.batch_size / {world}); allowed: a divisor of {per_device}, "
                                                     "or norm.sync=true for ghost batches that span devices")
    if per_device % vbs and vbs % per_device:
        raise ConfigError("norm.virtual_batch_size", f"{vbs} neither divides the per-device batch {per_device} nor is a multiple "
                                                     f"of it; allowed: a divisor or a multiple of {per_device}")


# Per channel, but its virtual batches are runs of examples in dim 0: the stack hands it [B, R*C, ...].
register("ghost_batch", build, layers=(GhostBatchNorm,), check=check, batch_stats=True, centers=True, fold=Fold(join_channels),
         sync=sync, twins=(SyncGhostBatchNorm,))
