"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", Sec. 4.2) with a
choice of where the norm goes in a residual block.

Depth 6n+2: a 3x3 stem conv with 16 channels, three stages of n basic blocks
(two 3x3 convs each) with 16, 32 and 64 channels (times ``model.width``), the
first block of stages 2 and 3 halving the resolution with stride 2, then
global average pooling and a Linear output. Shortcuts are identities; where a
block changes the shape, ``model.shortcut=identity`` subsamples with stride 2
and pads the new channels with zeros (option A, the paper's CIFAR choice: no
parameters) and ``projection`` uses a 1x1 conv (option B).

Where the norm goes in a basic block; ``(+)`` adds the shortcut (diagrams in
docs/configuration.md):

    pre:    conv1 norm1 act1 conv2 norm2 (+) act2    He et al. 2016a, the original
    post:   conv1 act1 norm1 conv2 (+) act2 norm2    each conv -> act -> norm, as post means for plain nets
    preact: norm1 act1 conv1 norm2 act2 conv2 (+)    He et al. 2016b, "Identity Mappings": nothing after (+)
    none:   conv1 act1 conv2 (+) act2

With ``preact`` the stem is a bare conv and a final norm -> act follows the
last block (He et al. 2016b); a projection shortcut then reads the block's
pre-activated input, as in their code. The stem of the other placements is
one plain block (``hidden_block``: conv, norm and act in the placement's order).

``norm.noise`` (Santurkar et al. 2018's noisy BN) puts a ``noise1``/``noise2``
right after ``norm1``/``norm2`` (after the stem's, the final and a projection
shortcut's norm too: ``stem.noise``, ``final.noise``, ``shortcut.noise``), in
every placement; with ``none`` where ``pre`` would have its norms.

Module names are stable and reused by TensorBoard tags: ``stem.conv``,
``stage1.block0.conv1``, ``stage1.block0.norm2``, ``stage2.block0.shortcut.conv``,
``final.norm``, ``output``; nonlinearities ``stem.act``, ``stage1.block0.act1``, ...

Stacking replicas for the vectorized launcher (issue 12) is not built here;
docs/architecture.md says what it would take.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnexp.config import ConfigError, ModelConfig, NormConfig, Placement
from bnexp.models import layers
from bnexp.models.blocks import StagedNet, activation, check_images, check_norm_widths, hidden_block, init_weights, needs_bias, scaled
from bnexp.models.registry import register
from bnexp.norms import make_noise, make_norm

STAGE_CHANNELS = (16, 32, 64)  # He et al. 2016a, Sec. 4.2


class Shortcut(str, Enum):
    identity = "identity"  # option A: zero-padded channels, stride-2 subsampling
    projection = "projection"  # option B: 1x1 conv where the shape changes


@dataclass
class ResNetConfig(ModelConfig):
    kind: str = "resnet"
    depth: int = 20  # 6n+2: 20, 32, 44, 56, 110; 8 and 14 for CPU-sized runs
    width: float = 1.0  # multiplies the 16/32/64 channels of the three stages
    shortcut: Shortcut = Shortcut.identity


class ZeroPadShortcut(nn.Module):
    """Option A: the identity, subsampled by ``stride``, with ``extra`` zero channels appended."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut. ``forward`` is ``lead`` -> ``branch`` -> (+ shortcut) -> ``after``:
    which modules sit in each part is the placement (see the module docstring).
    Children are registered in the order they run, the shortcut right at the addition."""

    def __init__(self, cin: int, cout: int, stride: int, placement: Placement, norm: Callable[[int], nn.Module | None],
                 act: Callable[[], nn.Module], shortcut: Shortcut, noise: Callable[[], nn.Module | None] = lambda: None,
                 conv: Callable[..., nn.Module] = layers.conv):
        super().__init__()
        self.placement = placement
        norm1, norm2 = norm(cout if placement != Placement.preact else cin), norm(cout)
        # A bias right before a mean-subtracting norm is redundant (BN paper Sec. 3.2); in preact every conv
        # reaches the next norm through additions only, so the same holds there.
        bias_placement = Placement.pre if placement == Placement.preact else placement
        conv1 = conv(cin, cout, 3, stride, 1, bias=needs_bias(norm1 if placement != Placement.preact else norm2, bias_placement))
        conv2 = conv(cout, cout, 3, 1, 1, bias=needs_bias(norm2, bias_placement))
        named = {"conv1": conv1, "norm1": norm1, "noise1": noise(), "act1": act(), "conv2": conv2, "norm2": norm2, "noise2": noise(),
                 "act2": act()}
        # (applied to x before the branch and read by it, the branch, after the addition); None norms (none) and
        # noises (norm.noise off) drop out. A noise follows its norm; without norms it sits where pre's would be.
        parts = {
            Placement.pre: ("", "conv1 norm1 noise1 act1 conv2 norm2 noise2", "act2"),
            Placement.post: ("", "conv1 act1 norm1 noise1 conv2", "act2 norm2 noise2"),
            Placement.preact: ("norm1 noise1 act1", "conv1 norm2 noise2 act2 conv2", ""),
            Placement.none: ("", "conv1 noise1 act1 conv2 noise2", "act2"),
        }[placement]
        lead, branch, after = ([k for k in part.split() if named[k] is not None] for part in parts)
        for k in lead + branch:
            self.add_module(k, named[k])
        self.shortcut = self._shortcut(cin, cout, stride, shortcut, norm if placement == Placement.pre else None, noise, conv)
        for k in after:
            self.add_module(k, named[k])
        # Plain tuples of the modules registered above: forward iterates them without attribute lookups.
        self._lead, self._branch, self._after = (tuple(named[k] for k in ks) for ks in (lead, branch, after))
        # He et al.'s pre-activation code projects the pre-activated input; an identity keeps the raw one.
        self._shortcut_reads_lead = placement == Placement.preact and not isinstance(self.shortcut, (nn.Identity, ZeroPadShortcut))

    @staticmethod
    def _shortcut(cin: int, cout: int, stride: int, kind: Shortcut, norm: Callable[[int], nn.Module | None] | None,
                  noise: Callable[[], nn.Module | None], conv: Callable[..., nn.Module]) -> nn.Module:
        if stride == 1 and cin == cout:
            return nn.Identity()
        if kind == Shortcut.identity:
            return ZeroPadShortcut(stride, cout - cin)
        # No bias: the branch's own bias or the norm after the addition makes one redundant.
        parts: list[tuple[str, nn.Module]] = [("conv", conv(cin, cout, 1, stride, bias=False))]
        shortcut_norm = norm(cout) if norm is not None else None
        if shortcut_norm is not None:  # placement pre: the projection is normalized like the branch it is added to
            parts += [(k, m) for k, m in (("norm", shortcut_norm), ("noise", noise())) if m is not None]
        return nn.Sequential(OrderedDict(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for m in self._lead:
            h = m(h)
        out = h
        for m in self._branch:
            out = m(out)
        out = out + self.shortcut(h if self._shortcut_reads_lead else x)
        for m in self._after:
            out = m(out)
        return out

    def last_residual_layer(self) -> nn.Module:
        """What ``norm.zero_init_residual`` zeroes so that the branch starts at zero: the norm
        that ends the branch (pre), else the branch's last conv (see zero_init_residual)."""
        return self.norm2 if self.placement == Placement.pre else self.conv2


class ResNet(StagedNet):
    """``stem``, ``stage1..stage3`` (each ``block0..``), ``final`` (preact only), ``head``, ``output``."""

    def blocks(self) -> list[BasicBlock]:
        return [m for m in self.modules() if isinstance(m, BasicBlock)]


def build(cfg: ResNetConfig, norm_cfg: NormConfig, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    if len(input_shape) != 3:
        raise ValueError(f"model=resnet needs [C,H,W] images, got shape {list(input_shape)}")
    placement = Placement(norm_cfg.placement)

    def norm(channels: int) -> nn.Module | None:
        return None if placement == Placement.none else make_norm(norm_cfg, channels, spatial_dims=2)

    def act() -> nn.Module:
        return activation(cfg)

    def noise() -> nn.Module | None:  # norm.noise (Santurkar et al. 2018, Algorithm 1): after every norm
        return make_noise(norm_cfg)

    conv = partial(layers.conv, cfg=norm_cfg)

    n = (cfg.depth - 2) // 6
    widths = [scaled(c, cfg.width) for c in STAGE_CHANNELS]
    stem_norm = norm(widths[0])
    if placement == Placement.preact:  # the first block's norm1 follows, through no addition
        stem: nn.Module = nn.Sequential(OrderedDict([("conv", conv(input_shape[0], widths[0], 3, 1, 1, bias=needs_bias(stem_norm, Placement.pre)))]))
    else:
        stem = hidden_block("conv", conv(input_shape[0], widths[0], 3, 1, 1, bias=needs_bias(stem_norm, placement)), stem_norm, act(), placement, noise())
    stages, cin = [], widths[0]
    for s, cout in enumerate(widths):
        blocks = []
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            blocks.append((f"block{b}", BasicBlock(cin, cout, stride, placement, norm, act, Shortcut(cfg.shortcut), noise, conv)))
            cin = cout
        stages.append(nn.Sequential(OrderedDict(blocks)))
    final_parts = [(k, m) for k, m in (("norm", norm(cin)), ("noise", noise()), ("act", act())) if m is not None]
    final = nn.Sequential(OrderedDict(final_parts)) if placement == Placement.preact else None
    net = ResNet(stem, stages, final, nn.Linear(cin, num_classes))
    init_weights(net, cfg)
    if norm_cfg.zero_init_residual:
        zero_init_residual(net)
    return net


def zero_init_residual(net: ResNet) -> None:
    """Each residual branch starts at zero, so each block starts as (nearly) the
    identity. pre: the gamma of norm2, which ends the branch (Goyal et al. 2017,
    Sec. 5.1). preact: conv2's weights, because norm2 feeds a ReLU there, whose
    gradient at 0 is 0: a zero gamma before it would never train (timm's
    pre-activation blocks zero conv2 for the same reason). post, none: conv2's
    weights too, the branch's last layer (Zhang et al. 2019, Fixup)."""
    with torch.no_grad():
        for block in net.blocks():
            layer = block.last_residual_layer()
            nn.init.zeros_(layer.weight)
            if getattr(layer, "bias", None) is not None:
                nn.init.zeros_(layer.bias)


def check(cfg: DictConfig) -> None:
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
    check_norm_widths(n, {f"stage{i}": scaled(c, m.width) for i, c in enumerate(STAGE_CHANNELS, start=1)})


register("resnet", ResNetConfig, build, check)
