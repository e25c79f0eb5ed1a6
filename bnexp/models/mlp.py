"""The fully connected family: input (flattened) -> hidden blocks -> Linear output."""

from __future__ import annotations

import math
from torch import nn

from bnexp.config import NormConfig, Placement
from bnexp.models.blocks import Net, activation, block_noise, hidden_block, init_weights, needs_bias
from bnexp.models.schemas import MLPConfig, normed_indices  # the schema and its checks (torch-free), registered there
from bnexp.norms import make_norm


def build(cfg: MLPConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> Net:
    placement = Placement(norm_cfg.placement)
    normed = set(normed_indices(norm_cfg, len(cfg.hidden)))
    width, blocks = math.prod(input_shape), []
    for i, out in enumerate(cfg.hidden):
        norm = make_norm(norm_cfg, out, spatial_dims=0) if i in normed else None
        blocks.append(hidden_block("linear", nn.Linear(width, out, bias=needs_bias(norm, placement)), norm, activation(cfg), placement,
                                   block_noise(norm_cfg, i, len(cfg.hidden))))
        width = out
    # Flattening is the MLP's own business: the data keeps its natural shape.
    net = Net(nn.Flatten(), blocks, nn.Identity(), nn.Linear(width, num_classes))
    init_weights(net, cfg)
    return net

