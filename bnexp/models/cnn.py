"""The plain convolutional family: conv blocks (Conv2d for [C,H,W] images,
Conv1d for [C,L] signals and for flat [D] features, taken as one channel),
each followed by 2x max-pooling while the input is large enough, then global
average pooling and a Linear output."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from omegaconf import DictConfig
from torch import nn

from bnexp.config import ConfigError, ModelConfig, NormConfig, Placement
from bnexp.models.blocks import (
    Net, activation, block_noise, check_norm_widths, check_plain_norm, check_widths, hidden_block, init_weights, needs_bias, normed_indices,
)
from bnexp.models.layers import conv
from bnexp.models.registry import register
from bnexp.norms import make_norm


@dataclass
class CNNConfig(ModelConfig):
    kind: str = "cnn"
    hidden: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per conv block
    kernel_size: int = 3
    pool: bool = True  # 2x max-pool after each conv block while the signal is long enough


def build(cfg: CNNConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> Net:
    if len(input_shape) not in (1, 2, 3):
        raise ValueError(f"model=cnn needs [D], [C,L] or [C,H,W] inputs, got shape {list(input_shape)}")
    stem: nn.Module = nn.Identity()
    if len(input_shape) == 1:  # flat features: one channel, a 1-D signal
        stem, input_shape = nn.Unflatten(1, (1, input_shape[0])), (1, input_shape[0])
    spatial = len(input_shape) - 1
    pool_cls = nn.MaxPool1d if spatial == 1 else nn.MaxPool2d
    placement = Placement(norm_cfg.placement)
    normed = set(normed_indices(norm_cfg, len(cfg.hidden)))
    channels, size, k = input_shape[0], min(input_shape[1:]), cfg.kernel_size
    blocks = []
    for i, out in enumerate(cfg.hidden):
        norm = make_norm(norm_cfg, out, spatial_dims=spatial) if i in normed else None
        layer = conv(channels, out, k, padding=k // 2, bias=needs_bias(norm, placement), dims=spatial, cfg=norm_cfg)
        block = hidden_block("conv", layer, norm, activation(cfg), placement, block_noise(norm_cfg, i, len(cfg.hidden)))
        # Halve the resolution after each block while it stays >= 4 wide.
        if cfg.pool and size >= 8:
            block.add_module("pool", pool_cls(2))
            size //= 2
        blocks.append(block)
        channels = out
    pool = nn.AdaptiveAvgPool1d(1) if spatial == 1 else nn.AdaptiveAvgPool2d(1)
    head = nn.Sequential(OrderedDict([("pool", pool), ("flatten", nn.Flatten())]))
    net = Net(stem, blocks, head, nn.Linear(channels, num_classes))
    init_weights(net, cfg)
    return net


def check(cfg: DictConfig) -> None:
    check_plain_norm(cfg)
    check_widths("model.hidden", cfg.model.hidden)
    if cfg.model.kernel_size <= 0:
        raise ConfigError("model.kernel_size", f"got {cfg.model.kernel_size}; allowed: a positive size")
    normed = normed_indices(cfg.norm, len(cfg.model.hidden))
    check_norm_widths(cfg.norm, {f"conv block {i}": cfg.model.hidden[i] for i in normed})


register("cnn", CNNConfig, build, check)
