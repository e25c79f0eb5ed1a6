"""``norm=frn``: Filter Response Normalization with its thresholded linear unit
(Singh & Krishnan 2020, Sec. 3).

Per example and channel, over the spatial positions only (no batch statistics,
no mean subtraction): nu^2 = mean(x^2), x_hat = x / sqrt(nu^2 + eps),
y = gamma * x_hat + beta. The TLU z = max(y, tau), tau learned per channel,
is the nonlinearity: it takes the place of the model's activation wherever
that activation takes the norm's output directly (``pre``: layer -> FRN -> TLU;
a residual block's ``preact``: FRN -> TLU -> conv). Where nothing follows the
norm directly (``post``: layer -> act -> FRN; the norm that ends a ``pre``
residual branch, before the addition) FRN stands alone and the model's
activation stays (bnexp.models.blocks.activation_after).

Over an MLP's [N, C] there are no positions: nu^2 = x^2 and x_hat is nearly
sign(x), which is why the paper learns eps there (Sec. 3.1.1): ``norm.learn_eps=true``
makes eps = |eps_l| with one eps_l per layer, starting at ``norm.eps`` (the
paper's 1e-6 by default), so a run starts as it would with a fixed eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnexp.norms.base import FP32Norm, Fold, affine, broadcast, join_channels, register


@dataclass
class FRNKeys:
    learn_eps: bool = False  # norm.learn_eps: eps = |eps_l|, eps_l learned per layer (from norm.eps)


class _FilterResponseNorm(nn.Module):
    def __init__(self, num_features: int, eps: float, learn_eps: bool):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        # One value per replica when stacked ([R]): each replica's channels read theirs.
        self.learned_eps = nn.Parameter(torch.full((1,), float(eps))) if learn_eps else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.square().mean(list(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.square()
        if self.learned_eps is None:
            eps: torch.Tensor | float = self.eps
        else:
            per = self.learned_eps.abs().repeat_interleave(self.num_features // self.learned_eps.numel())
            eps = broadcast(per, x)
        return affine(x * torch.rsqrt(nu2 + eps), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learn_eps={self.learned_eps is not None}"


class FilterResponseNorm(FP32Norm, _FilterResponseNorm):
    """x / sqrt(mean over positions of x^2 + eps) * gamma + beta, per example and channel (see the module)."""


class TLU(nn.Module):
    """Thresholded linear unit max(x, tau), tau per channel (zero at init: ReLU)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, broadcast(self.tau, x))

    def extra_repr(self) -> str:
        return str(self.num_features)


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return FilterResponseNorm(num_features, cfg.eps, getattr(cfg, "learn_eps", False))  # NormConfig(...) from Python has no own keys


def tlu(norm: nn.Module) -> nn.Module:
    return TLU(norm.num_features)


# Per example and channel: a stack hands it [B, R*C, ...] (examples first).
register("frn", build, layers=(FilterResponseNorm,), schema=FRNKeys, fold=Fold(join_channels), activation=tlu)
