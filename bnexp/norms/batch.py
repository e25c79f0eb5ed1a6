"""``norm=batch``: torch.nn.BatchNorm1d/2d (Ioffe & Szegedy 2015), kept in fp32 under autocast.

Running variance (``norm.running_var``): torch.nn.BatchNorm moves running_var
towards the *unbiased* batch variance (times n / (n - 1), n values per
channel); Keras' BatchNormalization towards the *biased* one, the variance the
batch was normalized with. At batch 10 the two differ by 10/9. ``biased`` is
:class:`BiasedBatchNorm1d` / ``2d``.

Synchronized (``norm.sync=true``): on CUDA plain BN becomes torch's
SyncBatchNorm (cuDNN kernels); otherwise, and for the biased rule,
:class:`SyncBatchNorm` (:mod:`bnexp.norms.sync`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import RunningVar
from bnexp.norms.base import PER_CHANNEL, FP32Norm, per_channel, register, unbiased
from bnexp.norms.sync import Synchronized, normalize


class BatchNorm1d(FP32Norm, nn.BatchNorm1d):
    pass


class BatchNorm2d(FP32Norm, nn.BatchNorm2d):
    pass


class _BiasedRunningVar:
    """torch.nn.BatchNorm with running_var moved towards the biased batch variance (Keras' rule).

    PyTorch's fused kernel (CPU, CUDA, cuDNN) always updates running_var with
    the unbiased variance v * n/(n-1) and offers no switch. Rather than take
    the batch statistics a second time, the kernel updates a copy of the buffer
    scaled by k = n/(n-1), and the buffer gets that divided by k:
    ((1-m)*k*rv + m*k*v) / k = (1-m)*rv + m*v. The copy, not the buffer, goes
    into the kernel because autograd keeps the kernel's running_var for the
    backward and refuses one changed in place after the forward. Two small ops
    on a C-sized vector per step; benchmarks/bench_norms.py measures the cost
    against nn.BatchNorm1d and against taking the statistics again.
    """

    unbiased = False  # what PreciseBN and the synchronized twin follow

    # k = n/(n-1) as a 0-dim tensor on the buffer's device, made again when n, the
    # device or the dtype change: an op with a Python float converts it to a
    # tensor on every call, twice the op's cost on CPU.
    _n: int | None = None
    _k: torch.Tensor | None = None

    def _apply(self, fn, *args, **kwargs):
        self._n = None  # .to(), .cuda(), .double(): k follows the buffer
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        # nn.BatchNorm's training path, with the buffer handling above.
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        rv, n = self.running_var, per_channel(x)
        if n != self._n:
            self._n, self._k = n, torch.tensor(n / (n - 1) if n > 1 else 1.0, device=rv.device, dtype=rv.dtype)
        scaled = rv * self._k
        out = F.batch_norm(x, self.running_mean, scaled, self.weight, self.bias, True, momentum, self.eps)
        torch.div(scaled, self._k, out=rv)  # no autograd here: neither tensor requires grad
        return out


class BiasedBatchNorm1d(FP32Norm, _BiasedRunningVar, nn.BatchNorm1d):
    """nn.BatchNorm1d whose running_var averages the biased batch variance (norm.running_var=biased)."""


class BiasedBatchNorm2d(FP32Norm, _BiasedRunningVar, nn.BatchNorm2d):
    """nn.BatchNorm2d whose running_var averages the biased batch variance (norm.running_var=biased)."""


class _SyncBatchNorm(Synchronized, nn.modules.batchnorm._BatchNorm):
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
                self.running_var.lerp_(unbiased(var.detach(), count) if self.unbiased else var.detach(), self.momentum)
        return normalize(x, mean, var, self.eps, self.weight, self.bias)


class SyncBatchNorm(FP32Norm, _SyncBatchNorm):
    __doc__ = _SyncBatchNorm.__doc__


class CudaSyncBatchNorm(FP32Norm, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm, kept in fp32 under autocast like every bnexp norm."""


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    unbiased_rule = RunningVar(cfg.running_var) == RunningVar.unbiased
    one_d, two_d = (BatchNorm1d, BatchNorm2d) if unbiased_rule else (BiasedBatchNorm1d, BiasedBatchNorm2d)
    cls = {0: one_d, 1: one_d, 2: two_d}[spatial_dims]
    return cls(num_features, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)


def sync(norm: nn.Module, per_device_batch: int, world: int, cuda: bool) -> nn.Module:
    common = {"eps": norm.eps, "momentum": norm.momentum, "track_running_stats": norm.track_running_stats}
    unbiased_rule = getattr(norm, "unbiased", True)
    if cuda and unbiased_rule:  # torch's has torch's running_var rule only
        twin: nn.Module = CudaSyncBatchNorm(norm.num_features, affine=True, **common)
        twin.ranks_per_group = world
        return twin
    return SyncBatchNorm(norm.num_features, world, **common, unbiased=unbiased_rule)


# The biased ones fold as they are: their n/(n-1) is over one channel's values, in a stack as alone.
register("batch", build, layers=(BatchNorm1d, BatchNorm2d, BiasedBatchNorm1d, BiasedBatchNorm2d), batch_stats=True, centers=True,
         fold=PER_CHANNEL, sync=sync, twins=(SyncBatchNorm, CudaSyncBatchNorm))
