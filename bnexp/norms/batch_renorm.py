"""``norm=batch_renorm``: batch renormalization (Ioffe 2017), not in torch.nn; ``norm.rmax``, ``norm.dmax``.
Written so that rmax=1, dmax=0 trains as BatchNorm exactly (tests check)."""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import ConfigError
from bnexp.norms.base import PER_CHANNEL, BatchStatsNorm, FP32Norm, broadcast, register
from bnexp.norms.sync import moments_twin, synchronized


class _BatchRenorm(BatchStatsNorm):
    """Batch renormalization, Ioffe 2017, Algorithm 1.

    Training, per channel, with the batch's mu_B and sigma_B = sqrt(biased
    batch variance + eps) and the running mu and sigma::

        r = clip(sigma_B / sigma, 1/rmax, rmax)        (stop-gradient)
        d = clip((mu_B - mu) / sigma, -dmax, dmax)     (stop-gradient)
        y = ((x - mu_B) / sigma_B * r + d) * gamma + beta
        mu    <- mu + momentum * (mu_B - mu)
        sigma <- sigma + momentum * (sigma_B - sigma)

    and inference ``y = (x - mu) / sigma * gamma + beta``. Buffers:
    ``running_mean`` (mu, starts at 0) and ``running_std`` (sigma, a standard
    deviation with eps already inside, starts at 1; not a variance, so there is
    no ``running_var``). Momentum is PyTorch's convention (the paper's alpha).
    With rmax=1 and dmax=0 training is BatchNorm's; the running sigma still
    follows the algorithm, so inference differs from nn.BatchNorm's, which
    normalizes by sqrt(running unbiased variance + eps).
    """

    spread = "running_std"

    def __init__(self, num_features: int, rmax: float = 3.0, dmax: float = 5.0, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.rmax, self.dmax = rmax, dmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_batch_stats():
            return self._affine((x - broadcast(self.running_mean, x)) / broadcast(self.running_std, x))
        mean, var, _ = self._moments(x)
        std = torch.sqrt(var + self.eps)
        x_hat = (x - broadcast(mean, x)) / broadcast(std, x)
        if self.track_running_stats:
            with torch.no_grad():
                r = (std / self.running_std).clamp(1.0 / self.rmax, self.rmax)
                d = ((mean - self.running_mean) / self.running_std).clamp(-self.dmax, self.dmax)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_std.lerp_(std, self.momentum)
            x_hat = x_hat * broadcast(r, x) + broadcast(d, x)
        return self._affine(x_hat)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}"


class BatchRenorm(FP32Norm, _BatchRenorm):
    __doc__ = _BatchRenorm.__doc__


# Its batch statistics (and so r and d) those of the global batch.
SyncBatchRenorm = synchronized(BatchRenorm)


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return BatchRenorm(num_features, rmax=cfg.rmax, dmax=cfg.dmax, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)


def check(cfg) -> None:
    if cfg.norm.rmax < 1:
        raise ConfigError("norm.rmax", f"got {cfg.norm.rmax}; allowed: rmax >= 1")
    if cfg.norm.dmax < 0:
        raise ConfigError("norm.dmax", f"got {cfg.norm.dmax}; allowed: dmax >= 0")


def running_sigma(norm: nn.Module, var: torch.Tensor, count: int) -> torch.Tensor:
    """PreciseBN's sigma for a pooled variance (Ioffe 2017, Algorithm 1): eps inside."""
    return torch.sqrt(var + norm.eps)


register("batch_renorm", build, layers=(BatchRenorm,), check=check, batch_stats=True, running=("running_mean", "running_std"),
         spread_of=running_sigma, centers=True, fold=PER_CHANNEL, sync=moments_twin, twins=(SyncBatchRenorm,))
