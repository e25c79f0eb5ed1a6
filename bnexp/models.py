"""MLP and CNN builders. Where the norm goes relative to the activation is decided in
one place, :func:`hidden_block`.

Module names are stable and reused by TensorBoard tags: hidden block ``i`` is
``hidden{i}`` with children ``linear``/``conv``, ``norm``, ``act`` (and ``pool``),
and the classifier is ``output``. So ``grad_norm/hidden1.linear`` and
``act/hidden1/p50`` always mean the same layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from bnexp.config import Activation, Init, ModelConfig, ModelKind, NormConfig, Placement, hidden_norm_indices
from bnexp.norms import is_centered, make_norm

_ACTIVATIONS = {
    Activation.relu: nn.ReLU,
    Activation.sigmoid: nn.Sigmoid,
    Activation.tanh: nn.Tanh,
    Activation.gelu: nn.GELU,
    Activation.silu: nn.SiLU,
    Activation.elu: nn.ELU,
    Activation.leaky_relu: nn.LeakyReLU,
    Activation.identity: nn.Identity,
}


def hidden_block(layer_name: str, layer: nn.Module, norm: nn.Module | None, act: nn.Module, placement: Placement) -> nn.Sequential:
    """One hidden block; ``placement`` orders it.

    pre:  layer -> norm -> act   (Ioffe & Szegedy 2015: normalize x = Wu, the nonlinearity's input)
    post: layer -> act -> norm   (normalize the activation's output, the next layer's input)
    none: layer -> act
    """
    parts: list[tuple[str, nn.Module]] = [(layer_name, layer)]
    if norm is None or placement == Placement.none:
        parts.append(("act", act))
    elif placement == Placement.pre:
        parts += [("norm", norm), ("act", act)]
    else:
        parts += [("act", act), ("norm", norm)]
    return nn.Sequential(OrderedDict(parts))


class Net(nn.Module):
    """``stem`` (flatten for an MLP), hidden blocks ``hidden0..hiddenK``, ``head`` (pool + flatten for a CNN), ``output``."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Sequential], head: nn.Module, output: nn.Module):
        super().__init__()
        self.stem = stem
        for i, block in enumerate(blocks):
            self.add_module(f"hidden{i}", block)
        # The same modules again, as a plain tuple (not registered twice): forward
        # iterates it instead of looking up hidden0..hiddenK per call (~3 us a step).
        self._blocks = tuple(blocks)
        self.head = head
        self.output = output

    def hidden_blocks(self) -> list[nn.Sequential]:
        return list(self._blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.output(self.head(x))


def _layer_followed_by_centered_norm(norm: nn.Module | None, placement: Placement) -> bool:
    return placement == Placement.pre and is_centered(norm)


def build_model(model_cfg: ModelConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> Net:
    """An MLP (input flattened) or a CNN (Conv2d for [C,H,W] inputs, Conv1d for [C,L])."""
    placement = Placement(norm_cfg.placement)
    normed = set(hidden_norm_indices(norm_cfg.layers, len(model_cfg.hidden))) if placement != Placement.none else set()
    act_cls = _ACTIVATIONS[Activation(model_cfg.activation)]
    blocks: list[nn.Sequential] = []
    if ModelKind(model_cfg.kind) == ModelKind.mlp:
        width = math.prod(input_shape)
        for i, out in enumerate(model_cfg.hidden):
            norm = make_norm(norm_cfg, out, spatial_dims=0) if i in normed else None
            # A BN right after the layer subtracts the batch mean per feature, so
            # the layer's bias is redundant (BN paper Sec. 3.2): drop it.
            bias = not _layer_followed_by_centered_norm(norm, placement)
            blocks.append(hidden_block("linear", nn.Linear(width, out, bias=bias), norm, act_cls(), placement))
            width = out
        stem: nn.Module = nn.Flatten()
        head: nn.Module = nn.Identity()
        output = nn.Linear(width, num_classes)
    else:
        if len(input_shape) not in (2, 3):
            raise ValueError(f"model=cnn needs [C,L] or [C,H,W] inputs, got shape {list(input_shape)}")
        spatial = len(input_shape) - 1
        conv_cls, pool_cls = (nn.Conv1d, nn.MaxPool1d) if spatial == 1 else (nn.Conv2d, nn.MaxPool2d)
        stem = nn.Identity()
        channels, size = input_shape[0], min(input_shape[1:])
        k = model_cfg.kernel_size
        for i, out in enumerate(model_cfg.hidden):
            norm = make_norm(norm_cfg, out, spatial_dims=spatial) if i in normed else None
            bias = not _layer_followed_by_centered_norm(norm, placement)
            block = hidden_block("conv", conv_cls(channels, out, k, padding=k // 2, bias=bias), norm, act_cls(), placement)
            # Halve the resolution after each block while it stays >= 4 wide.
            if model_cfg.pool and size >= 8:
                block.add_module("pool", pool_cls(2))
                size //= 2
            blocks.append(block)
            channels = out
        pool = nn.AdaptiveAvgPool1d(1) if spatial == 1 else nn.AdaptiveAvgPool2d(1)
        head = nn.Sequential(OrderedDict([("pool", pool), ("flatten", nn.Flatten())]))
        output = nn.Linear(channels, num_classes)
    net = Net(stem, blocks, head, output)
    _init_weights(net, model_cfg)
    return net


def _init_weights(net: Net, cfg: ModelConfig) -> None:
    init = Init(cfg.init)
    if init == Init.default:
        return
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if init == Init.normal:
                nn.init.normal_(module.weight, 0.0, cfg.init_std)
            elif init == Init.kaiming:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def parameterized_layers(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Layer name (e.g. ``hidden0.linear``) -> its trainable parameters, in model order."""
    layers: dict[str, list[nn.Parameter]] = {}
    for name, module in net.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            layers[name] = params
    return layers


def activation_modules(net: Net) -> dict[str, nn.Module]:
    """Hidden block name -> its nonlinearity, whose input the BN paper's Fig. 1 tracks."""
    return {f"hidden{i}": block.act for i, block in enumerate(net.hidden_blocks())}
