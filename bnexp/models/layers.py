"""Where every family gets its weight layers (as timm injects ``conv_layer``):
the hidden blocks' linear and conv layers, the stems and the projection
shortcuts come from :func:`linear` and :func:`conv`, and their norms from
:func:`bnexp.norms.make_norm`. A reparametrized layer (weight standardization
selected by a ``norm.*`` key, say) is one change here, and reaches every
family. The classifier (``output``) is a plain ``nn.Linear``: it is no layer
a norm follows.

``cfg`` is the run's norm config (None: plain layers, as for a block built by hand).
"""

from __future__ import annotations

from torch import nn

from bnexp.config import NormConfig


def linear(in_features: int, out_features: int, bias: bool = True, *, cfg: NormConfig | None = None) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True, *,
         dims: int = 2, cfg: NormConfig | None = None) -> nn.Module:
    """A ``dims``-D convolution (1: [N, C, L], 2: [N, C, H, W])."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    return cls(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
