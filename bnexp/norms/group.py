"""``norm=group``: group norm (Wu & He 2018), per-example statistics over ``norm.groups`` channel groups."""

from __future__ import annotations

from torch import nn

from bnexp.config import ConfigError
from bnexp.norms.base import GROUPS, FP32Norm, register


class GroupNorm(FP32Norm, nn.GroupNorm):
    pass


def build(cfg, num_features: int, spatial_dims: int) -> nn.Module:
    return GroupNorm(cfg.groups, num_features, eps=cfg.eps)


def check(cfg) -> None:
    if not cfg.norm.groups > 0:
        raise ConfigError("norm.groups", f"got {cfg.norm.groups!r}; allowed: a number > 0")


def groups_divide(norm_cfg, widths: dict[str, int]) -> None:
    """norm.groups must divide the width of every normalized layer (name -> width)."""
    for name, width in widths.items():
        if width % norm_cfg.groups:
            raise ConfigError("norm.groups", f"{norm_cfg.groups} does not divide {name}'s width {width}; allowed: a divisor of every normalized width")


# Also the layer of norm=layer over images (one group): the traits are the same.
register("group", build, layers=(GroupNorm,), check=check, widths=groups_divide, fold=GROUPS)
