"""The fully connected family: input (flattened) -> hidden blocks -> Linear output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig
from torch import nn

from bnexp.config import ModelConfig, NormConfig, Placement
from bnexp.models.blocks import (
    Net, activation, block_noise, check_norm_widths, check_plain_norm, check_widths, hidden_block, init_weights, needs_bias, normed_indices,
)
from bnexp.models.layers import linear
from bnexp.models.registry import register
from bnexp.norms import make_norm


@dataclass
class MLPConfig(ModelConfig):
    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100, 100])


def build(cfg: MLPConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> Net:
    placement = Placement(norm_cfg.placement)
    normed = set(normed_indices(norm_cfg, len(cfg.hidden)))
    width, blocks = math.prod(input_shape), []
    for i, out in enumerate(cfg.hidden):
        norm = make_norm(norm_cfg, out, spatial_dims=0) if i in normed else None
        blocks.append(hidden_block("linear", linear(width, out, bias=needs_bias(norm, placement), cfg=norm_cfg), norm, activation(cfg), placement,
                                   block_noise(norm_cfg, i, len(cfg.hidden))))
        width = out
    # Flattening is the MLP's own business: the data keeps its natural shape.
    net = Net(nn.Flatten(), blocks, nn.Identity(), nn.Linear(width, num_classes))
    init_weights(net, cfg)
    return net


def check(cfg: DictConfig) -> None:
    check_plain_norm(cfg)
    check_widths("model.hidden", cfg.model.hidden)
    normed = normed_indices(cfg.norm, len(cfg.model.hidden))
    check_norm_widths(cfg.norm, {f"hidden layer {i}": cfg.model.hidden[i] for i in normed})


register("mlp", MLPConfig, build, check)
