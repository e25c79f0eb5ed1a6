"""VGG for CIFAR-sized images, as Santurkar et al. (2018, "How Does Batch
Normalization Help Optimization?") train it with and without BN.

The layer lists are VGG's configurations A, B and D (Simonyan & Zisserman
2015, Table 1: VGG-11, -13, -16): 3x3 convs with padding 1 in five stages of
64, 128, 256, 512, 512 channels (times ``model.width``), each stage ending in
a 2x2 max-pool. The classifier is the one of the CIFAR-10 VGG in MadryLab's
``robustness`` library (``robustness/cifar_models/vgg.py``, from Santurkar's
group): after five pools a 32x32 image is 1x1x512, and a single Linear maps
those 512 features to the classes (no 4096-wide fully connected layers).

Each conv is one plain block (``hidden_block``): ``pre`` is conv -> norm -> act
as in that code, ``post`` conv -> act -> norm, ``none`` conv -> act;
``norm.layers`` picks conv blocks by their 0-based index in network order.
A stage's pool is left out while the map is narrower than 2 pixels (28x28
Fashion-MNIST reaches 1x1 after four), and global average pooling, the
identity at 1x1, takes any remaining map to the Linear.

Module names: ``stage1.block0.conv``, ``stage1.block0.norm``,
``stage1.block0.act``, ``stage1.pool``, ``output``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from omegaconf import DictConfig
from torch import nn

from bnexp.config import ConfigError, ModelConfig, NormConfig, Placement
from bnexp.models.blocks import (
    StagedNet, activation, block_noise, check_norm_widths, check_images, check_plain_norm, hidden_block, init_weights, needs_bias, normed_indices, scaled,
)
from bnexp.models.layers import conv
from bnexp.models.registry import register
from bnexp.norms import make_norm

# Convs per stage of VGG-11 (A), -13 (B), -16 (D); Simonyan & Zisserman 2015, Table 1.
STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3)}
STAGE_CHANNELS = (64, 128, 256, 512, 512)


@dataclass
class VGGConfig(ModelConfig):
    kind: str = "vgg"
    variant: int = 11  # 11, 13 or 16
    width: float = 1.0  # multiplies the 64..512 channels


def conv_widths(variant: int, width: float) -> list[list[int]]:
    """Output channels of each conv, stage by stage."""
    return [[scaled(c, width)] * k for k, c in zip(STAGES[variant], STAGE_CHANNELS)]


def build(cfg: VGGConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> StagedNet:
    if len(input_shape) != 3:
        raise ValueError(f"model=vgg needs [C,H,W] images, got shape {list(input_shape)}")
    placement = Placement(norm_cfg.placement)
    widths = conv_widths(cfg.variant, cfg.width)
    n_convs = sum(map(len, widths))
    normed = set(normed_indices(norm_cfg, n_convs))
    channels, size, i, stages = input_shape[0], min(input_shape[1:]), 0, []
    for stage_widths in widths:
        parts: list[tuple[str, nn.Module]] = []
        for b, out in enumerate(stage_widths):
            norm = make_norm(norm_cfg, out, spatial_dims=2) if i in normed else None
            layer = conv(channels, out, 3, padding=1, bias=needs_bias(norm, placement), cfg=norm_cfg)
            block = hidden_block("conv", layer, norm, activation(cfg), placement, block_noise(norm_cfg, i, n_convs))
            parts.append((f"block{b}", block))
            channels, i = out, i + 1
        if size >= 2:
            parts.append(("pool", nn.MaxPool2d(2)))
            size //= 2
        stages.append(nn.Sequential(OrderedDict(parts)))
    net = StagedNet(None, stages, None, nn.Linear(channels, num_classes))
    init_weights(net, cfg)
    return net


def check(cfg: DictConfig) -> None:
    check_images(cfg)
    check_plain_norm(cfg)
    m = cfg.model
    if m.variant not in STAGES:
        raise ConfigError("model.variant", f"got {m.variant}; allowed: {', '.join(map(str, STAGES))} (VGG-11, -13, -16)")
    if not m.width > 0:
        raise ConfigError("model.width", f"got {m.width}; allowed: a multiplier > 0 of the 64..512 channels")
    flat = [w for stage in conv_widths(m.variant, m.width) for w in stage]
    normed = normed_indices(cfg.norm, len(flat))
    check_norm_widths(cfg.norm, {f"conv block {i}": flat[i] for i in normed})


register("vgg", VGGConfig, build, check)
