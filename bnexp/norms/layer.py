"""``norm=layer``: layer norm (Ba et al. 2016), per-example statistics, no batch dependence.

Over an image, "layer" norm normalizes each example over (C, H, W): GroupNorm
with one group is exactly that, with per-channel gamma/beta (C of each), where
nn.LayerNorm([C, H, W]) and Keras' LayerNormalization(axis=[1, 2, 3]) learn
one per element (C*H*W)."""

from __future__ import annotations

from torch import nn

from bnexp.norms.base import Fold, FP32Norm, NotFoldable, join_tensors, register
from bnexp.norms.group import GroupNorm


class LayerNorm(FP32Norm, nn.LayerNorm):
    pass


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return LayerNorm(num_features, eps=cfg.eps) if spatial_dims == 0 else GroupNorm(1, num_features, eps=cfg.eps)


def join(parts: list[nn.Module]) -> nn.Module:
    """R layer norms over C features as one GroupNorm of R groups over R*C channels (one group per replica)."""
    t = parts[0]
    if len(t.normalized_shape) != 1:
        raise NotFoldable(f"layer norm over {tuple(t.normalized_shape)}")
    return join_tensors(GroupNorm(len(parts), len(parts) * t.normalized_shape[0], eps=t.eps), parts)


register("layer", build, layers=(LayerNorm,), fold=Fold(join))
