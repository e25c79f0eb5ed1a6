"""Every model family's config schema and checks, and the registry entries that
name each family's builder (the network itself: ``bnexp/models/<name>.py``).

Nothing here imports torch: Hydra composes ``model=<name>`` onto these
dataclasses and :func:`bnexp.schema.validate` runs these checks before any
network exists, so a config error is answered in a fraction of torch's import
time. A new family is a schema and a check here, one :func:`register` line,
its module with ``build``, and ``configs/model/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig

from bnexp.config import ConfigError, DataName, ModelConfig, NormConfig, NormKind, Placement, example_shape
from bnexp.models.registry import register

# --------------------------------------------------------------------------- checks shared by families


def normed_indices(norm_cfg: NormConfig, n_hidden: int) -> list[int]:
    """Which of ``n_hidden`` hidden blocks get a norm (none with placement=none)."""
    if Placement(norm_cfg.placement) == Placement.none:
        return []
    return hidden_norm_indices(norm_cfg.layers, n_hidden)


def hidden_norm_indices(norm_layers: Any, n_hidden: int) -> list[int]:
    """``norm.layers`` as sorted block indices (before placement=none is applied)."""
    allowed = f"allowed: 'all' or a list of hidden-layer indices 0..{n_hidden - 1}"
    if isinstance(norm_layers, str):
        if norm_layers == "all":
            return list(range(n_hidden))
        raise ConfigError("norm.layers", f"got {norm_layers!r}; {allowed}")
    if isinstance(norm_layers, int) and not isinstance(norm_layers, bool):
        norm_layers = [norm_layers]
    if isinstance(norm_layers, (list, tuple, ListConfig)):
        idx = list(norm_layers)
        if all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_hidden for i in idx):
            return sorted(set(idx))
    raise ConfigError("norm.layers", f"got {norm_layers!r}; {allowed}")


def check_widths(key: str, widths: Any) -> None:
    if len(widths) == 0:
        raise ConfigError(key, "is empty; allowed: a non-empty list of positive widths, e.g. [100,100,100]")
    if any(not isinstance(w, int) or w <= 0 for w in widths):
        raise ConfigError(key, f"got {list(widths)}; allowed: positive whole widths")


def check_groups_divide(norm_cfg: NormConfig, normalized_widths: dict[str, int]) -> None:
    """norm=group needs norm.groups to divide the width of every normalized layer (name -> width)."""
    if NormKind(norm_cfg.kind) != NormKind.group or Placement(norm_cfg.placement) == Placement.none:
        return
    for name, width in normalized_widths.items():
        if width % norm_cfg.groups:
            raise ConfigError("norm.groups", f"{norm_cfg.groups} does not divide {name}'s width {width}; allowed: a divisor of every normalized width")


def check_plain_norm(cfg: DictConfig) -> None:
    """A family without residual blocks has no pre-activation order and no residual branch to zero."""
    kind = cfg.model.kind
    if Placement(cfg.norm.placement) == Placement.preact:
        raise ConfigError("norm.placement", f"preact (norm -> act -> layer) orders residual blocks, and model={kind} has none; "
                                            "allowed: pre, post, none (or model=resnet)")
    if cfg.norm.zero_init_residual:
        raise ConfigError("norm.zero_init_residual", f"model={kind} has no residual blocks; allowed: false (or model=resnet)")


def check_images(cfg: DictConfig) -> None:
    """Families built for [C,H,W] images refuse other data at validation, before any file is read."""
    shape = example_shape(cfg.data)
    if len(shape) != 3:
        raise ConfigError("model.kind", f"model={cfg.model.kind} needs images [C,H,W], and data={DataName(cfg.data.name).value} gives examples "
                                        f"of shape {list(shape)}; allowed data: mnist, fashion_mnist, cifar10, or synthetic with a 3-D data.shape")


def scaled(channels: int, width: float) -> int:
    """A width multiplier applied to a channel count (at least one channel)."""
    return max(1, int(round(channels * width)))


# --------------------------------------------------------------------------- mlp: bnexp/models/mlp.py


@dataclass
class MLPConfig(ModelConfig):
    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100, 100])


def check_mlp(cfg: DictConfig) -> None:
    check_plain_norm(cfg)
    check_widths("model.hidden", cfg.model.hidden)
    normed = normed_indices(cfg.norm, len(cfg.model.hidden))
    check_groups_divide(cfg.norm, {f"hidden layer {i}": cfg.model.hidden[i] for i in normed})


# --------------------------------------------------------------------------- cnn: bnexp/models/cnn.py


@dataclass
class CNNConfig(ModelConfig):
    kind: str = "cnn"
    hidden: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per conv block
    kernel_size: int = 3
    pool: bool = True  # 2x max-pool after each conv block while the signal is long enough


def check_cnn(cfg: DictConfig) -> None:
    check_plain_norm(cfg)
    check_widths("model.hidden", cfg.model.hidden)
    if cfg.model.kernel_size <= 0:
        raise ConfigError("model.kernel_size", f"got {cfg.model.kernel_size}; allowed: a positive size")
    normed = normed_indices(cfg.norm, len(cfg.model.hidden))
    check_groups_divide(cfg.norm, {f"conv block {i}": cfg.model.hidden[i] for i in normed})


# --------------------------------------------------------------------------- resnet: bnexp/models/resnet.py

RESNET_STAGE_CHANNELS = (16, 32, 64)  # He et al. 2016a, Sec. 4.2


class Shortcut(str, Enum):
    identity = "identity"  # option A: zero-padded channels, stride-2 subsampling
    projection = "projection"  # option B: 1x1 conv where the shape changes


@dataclass
class ResNetConfig(ModelConfig):
    kind: str = "resnet"
    depth: int = 20  # 6n+2: 20, 32, 44, 56, 110; 8 and 14 for CPU-sized runs
    width: float = 1.0  # multiplies the 16/32/64 channels of the three stages
    shortcut: Shortcut = Shortcut.identity


def check_resnet(cfg: DictConfig) -> None:
    check_images(cfg)
    m, n = cfg.model, cfg.norm
    if m.depth < 8 or (m.depth - 2) % 6:
        raise ConfigError("model.depth", f"got {m.depth}; allowed: 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    if not m.width > 0:
        raise ConfigError("model.width", f"got {m.width}; allowed: a multiplier > 0 of the 16/32/64 stage channels")
    if n.layers != "all":
        raise ConfigError("norm.layers", f"got {n.layers}; model=resnet normalizes every conv of its blocks; allowed: all (or norm.placement=none)")
    placement = Placement(n.placement)
    if n.zero_init_residual and placement == Placement.pre and not n.scale:
        raise ConfigError("norm.zero_init_residual", "with norm.placement=pre it zeroes each block's last gamma, which norm.scale=false removes; "
                                                     "allowed: false, or norm.scale=true")
    check_groups_divide(n, {f"stage{i}": scaled(c, m.width) for i, c in enumerate(RESNET_STAGE_CHANNELS, start=1)})


# --------------------------------------------------------------------------- vgg: bnexp/models/vgg.py

# Convs per stage of VGG-11 (A), -13 (B), -16 (D); Simonyan & Zisserman 2015, Table 1.
VGG_STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3)}
VGG_STAGE_CHANNELS = (64, 128, 256, 512, 512)


@dataclass
class VGGConfig(ModelConfig):
    kind: str = "vgg"
    variant: int = 11  # 11, 13 or 16
    width: float = 1.0  # multiplies the 64..512 channels


def vgg_conv_widths(variant: int, width: float) -> list[list[int]]:
    """Output channels of each conv, stage by stage."""
    return [[scaled(c, width)] * k for k, c in zip(VGG_STAGES[variant], VGG_STAGE_CHANNELS)]


def check_vgg(cfg: DictConfig) -> None:
    check_images(cfg)
    check_plain_norm(cfg)
    m = cfg.model
    if m.variant not in VGG_STAGES:
        raise ConfigError("model.variant", f"got {m.variant}; allowed: {', '.join(map(str, VGG_STAGES))} (VGG-11, -13, -16)")
    if not m.width > 0:
        raise ConfigError("model.width", f"got {m.width}; allowed: a multiplier > 0 of the 64..512 channels")
    flat = [w for stage in vgg_conv_widths(m.variant, m.width) for w in stage]
    normed = normed_indices(cfg.norm, len(flat))
    check_groups_divide(cfg.norm, {f"conv block {i}": flat[i] for i in normed})


# --------------------------------------------------------------------------- the registry

register("cnn", CNNConfig, "bnexp.models.cnn:build", check_cnn)
register("mlp", MLPConfig, "bnexp.models.mlp:build", check_mlp)
register("resnet", ResNetConfig, "bnexp.models.resnet:build", check_resnet)
register("vgg", VGGConfig, "bnexp.models.vgg:build", check_vgg)
