"""``norm=evonorm_b0``: EvoNorm-B0 (Liu et al. 2020, "Evolving Normalization-Activation
Layers", Table 1), a batch-statistics normalization and activation in one layer:

    y = x / max(sqrt(var_b + eps), v * x + sqrt(var_i + eps)) * gamma + beta

var_b the batch variance per channel over the examples and positions (biased;
in eval mode the running variance), var_i each example's own variance per
channel over its positions (over an MLP's [N, C] there are none: var_i = 0);
v, gamma, beta learned per channel (v and gamma start at 1, beta at 0). It keeps
torch's running statistics, ``running_var`` moving towards the unbiased batch
variance with ``norm.momentum`` as BatchNorm's does (``running_mean`` too, which
its forward never reads: it is there so that norm.sync, PreciseBN and the BN-gap
probe treat it as every batch-statistics norm). No mean is subtracted, so the
layer before it keeps its bias. Like EvoNorm-S0 it is its own activation:
with ``pre`` the block's ``act`` is an identity; with ``post`` the model's stays.
"""

from __future__ import annotations

import torch
from torch import nn

from bnexp.norms.base import FP32Norm, BatchStatsNorm, Fold, broadcast, join_channels, register, unbiased
from bnexp.norms.evonorm_s0 import no_activation
from bnexp.norms.sync import moments_twin, synchronized


def instance_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(var + eps) per example and channel over the positions (biased); sqrt(eps) without positions."""
    if x.dim() == 2:
        return torch.full_like(x, eps).sqrt()
    return (x.var(list(range(2, x.dim())), unbiased=False, keepdim=True) + eps).sqrt()


class _EvoNormB0(BatchStatsNorm):
    def __init__(self, num_features: int, eps: float, momentum: float, track_running_stats: bool):
        super().__init__(num_features, eps, momentum, track_running_stats)
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_batch_stats():
            mean, var, count = self._moments(x)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(unbiased(var.detach(), count), self.momentum)
        else:
            var = self.running_var
        left = broadcast(torch.sqrt(var + self.eps), x)
        right = broadcast(self.v, x) * x + instance_std(x, self.eps)
        return self._affine(x / torch.maximum(left, right))


class EvoNormB0(FP32Norm, _EvoNormB0):
    """x / max(batch std, v x + instance std) * gamma + beta, with running statistics (see the module)."""


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return EvoNormB0(num_features, eps=cfg.eps, momentum=cfg.momentum, track_running_stats=cfg.track_running_stats)


# Per channel, but its instance std is per example: the stack hands it [B, R*C, ...].
register("evonorm_b0", build, layers=(EvoNormB0,), batch_stats=True, fold=Fold(join_channels), sync=moments_twin,
         twins=(synchronized(EvoNormB0),), activation=no_activation)
