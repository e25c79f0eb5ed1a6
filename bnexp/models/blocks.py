"""What the model families share. Where the norm goes relative to the
activation is decided in one place, :func:`hidden_block`.

Module names are stable and reused by TensorBoard tags: hidden block ``i`` is
``hidden{i}`` with children ``linear``/``conv``, ``norm``, ``act`` (and ``pool``),
and the classifier is ``output``. So ``grad_norm/hidden1.linear`` and
``act/hidden1/p50`` always mean the same layer. The image families (ResNet,
VGG: :class:`StagedNet`) name stages and blocks instead: ``stage1.block0.conv1``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from bnexp.config import Activation, ConfigError, DataName, Init, ModelConfig, NormConfig, Placement, example_shape
from bnexp.norms import is_centered, make_noise
from bnexp.norms import norm as norm_entry

ACTIVATIONS = {
    Activation.relu: nn.ReLU,
    Activation.sigmoid: nn.Sigmoid,
    Activation.tanh: nn.Tanh,
    Activation.gelu: nn.GELU,
    Activation.silu: nn.SiLU,
    Activation.elu: nn.ELU,
    Activation.leaky_relu: nn.LeakyReLU,
    Activation.identity: nn.Identity,
}


def activation(cfg: ModelConfig) -> nn.Module:
    return ACTIVATIONS[Activation(cfg.activation)]()


def hidden_block(layer_name: str, layer: nn.Module, norm: nn.Module | None, act: nn.Module, placement: Placement,
                 noise: nn.Module | None = None) -> nn.Sequential:
    """One hidden block; ``placement`` orders it.

    pre:  layer -> norm -> act   (Ioffe & Szegedy 2015: normalize x = Wu, the nonlinearity's input)
    post: layer -> act -> norm   (normalize the activation's output, the next layer's input)
    none: layer -> act

    ``noise`` (norm.noise, Santurkar et al. 2018's noisy BN) goes right after the
    norm; a block without one gets it where a pre norm would be, on the pre-activation.
    (preact is a residual block's order: bnexp/models/resnet.py places norm and
    noise the same way there; plain families refuse it, see check_plain_norm.)
    """
    noisy = [("noise", noise)] if noise is not None else []
    parts: list[tuple[str, nn.Module]] = [(layer_name, layer)]
    if norm is None or placement == Placement.none:
        parts += [*noisy, ("act", act)]
    elif placement == Placement.pre:
        parts += [("norm", norm), *noisy, ("act", act)]
    elif placement == Placement.post:
        parts += [("act", act), ("norm", norm), *noisy]
    else:
        raise ValueError(f"a plain block has no {placement.value} placement")
    return nn.Sequential(OrderedDict(parts))


def block_noise(norm_cfg: NormConfig, index: int, n_hidden: int) -> nn.Module | None:
    """norm.noise's module for hidden block ``index``: every block that norm.layers
    names gets one, with or without a norm (placement=none); None when off."""
    if not getattr(norm_cfg, "noise", False) or index not in hidden_norm_indices(norm_cfg.layers, n_hidden):
        return None
    return make_noise(norm_cfg)


def needs_bias(norm: nn.Module | None, placement: Placement) -> bool:
    """A BN right after the layer subtracts the batch mean per feature, so the
    layer's bias is redundant (BN paper Sec. 3.2): such a layer has none."""
    return not (placement == Placement.pre and is_centered(norm))


class Net(nn.Module):
    """``stem`` (the family's input adapter), hidden blocks ``hidden0..hiddenK``,
    ``head`` (pool + flatten for a CNN), ``output``."""

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

    def activations(self) -> dict[str, nn.Module]:
        """Hidden block name -> its nonlinearity, whose input the BN paper's Fig. 1 tracks."""
        return {f"hidden{i}": block.act for i, block in enumerate(self._blocks)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.output(self.head(x))


class StagedNet(nn.Module):
    """The image families' layout (ResNet, VGG): ``stem`` (if any), ``stage1..stageS``,
    ``final`` (if any), ``head`` (global pool + flatten), ``output``. Their
    nonlinearities are the children named ``act``, ``act1``, ``act2``, ..., and
    ``act/*`` tags name them by module path (``stage1.block0.act1``)."""

    def __init__(self, stem: nn.Module | None, stages: list[nn.Module], final: nn.Module | None, output: nn.Module):
        super().__init__()
        if stem is not None:
            self.stem = stem
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"stage{i}", stage)
        if final is not None:
            self.final = final
        self.head = nn.Sequential(OrderedDict([("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]))
        self.output = output
        # The same modules as a plain tuple (registered above): forward iterates it without attribute lookups.
        self._body = tuple(m for m in (stem, *stages, final) if m is not None)

    def activations(self) -> dict[str, nn.Module]:
        """Module path -> nonlinearity, whose input ``act/*`` tracks."""
        return {name: m for name, m in self.named_modules() if name.rsplit(".", 1)[-1].rstrip("0123456789") == "act"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self._body:
            x = part(x)
        return self.output(self.head(x))


def init_weights(net: nn.Module, cfg: ModelConfig) -> None:
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


def check_norm_widths(norm_cfg: NormConfig, normalized_widths: dict[str, int]) -> None:
    """What the norm needs of the width of every normalized layer (name -> width), e.g.
    norm=group's norm.groups dividing it: its registry entry's ``widths`` check."""
    if Placement(norm_cfg.placement) == Placement.none:
        return
    entry = norm_entry(norm_cfg.kind)
    if entry.widths is not None:
        entry.widths(norm_cfg, normalized_widths)


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
