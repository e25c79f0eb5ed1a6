"""``norm=evonorm_s0``: EvoNorm-S0 (Liu et al. 2020, "Evolving Normalization-Activation
Layers", Table 1), a normalization and activation in one layer, batch-free:

    y = x * sigmoid(v * x) / s(x) * gamma + beta

s(x) the standard deviation per example over a group of channels and the
spatial positions, sqrt(var + eps) with the biased variance (as group norm,
``norm.groups`` groups); v, gamma, beta learned per channel (v and gamma
start at 1, beta at 0). No mean is subtracted, so the layer before it keeps
its bias. It is a normalization and an activation in one (it replaces BN + ReLU
in the paper): like FRN's TLU, it takes the place of the model's activation
wherever that activation takes its output directly (``pre``: layer -> EvoNorm,
the block's ``act`` an identity); with ``post`` (layer -> act -> EvoNorm) the
model's activation stays.
"""

from __future__ import annotations

import torch
from torch import nn

from bnexp.norms.base import GROUPS, FP32Norm, affine, broadcast, register
from bnexp.norms.group import check, groups_divide


def group_std(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """sqrt(var + eps) per example and channel group (biased variance over the group's channels and positions), shaped like x."""
    g = x.reshape(x.shape[0], groups, -1)
    std = (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return std.expand_as(g).reshape(x.shape)


class _EvoNormS0(nn.Module):
    def __init__(self, num_channels: int, num_groups: int, eps: float):
        super().__init__()
        self.num_channels, self.num_groups, self.eps = num_channels, num_groups, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x * torch.sigmoid(broadcast(self.v, x) * x) / group_std(x, self.num_groups, self.eps), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}"


class EvoNormS0(FP32Norm, _EvoNormS0):
    """x * sigmoid(v x) / group std(x) * gamma + beta (see the module)."""


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return EvoNormS0(num_features, cfg.groups, cfg.eps)


def no_activation(norm: nn.Module) -> nn.Module:
    """An EvoNorm is its own activation: nothing more after it."""
    return nn.Identity()


# Per example over channel groups: R replicas of G groups are one layer of R*G groups, examples first.
register("evonorm_s0", build, layers=(EvoNormS0,), check=check, widths=groups_divide, fold=GROUPS, activation=no_activation)
