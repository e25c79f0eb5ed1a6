"""The norm registry (see :mod:`bnexp.norms`) and what every norm layer builds on.

A registered :class:`Norm` names the exact layer classes its builder makes,
and every question bnexp asks about a norm layer goes through
:func:`entry_of` (matched by exact type, never by subclass: a subclass with its
own forward is another norm, and must register as one).
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, fields, is_dataclass
from enum import Enum
from typing import Any, Callable, get_type_hints

import torch
from torch import nn

from bnexp import config
from bnexp.config import ConfigError, NormConfig

# --------------------------------------------------------------------------- what norm layers build on


class FP32Norm(nn.Module):
    """Mixed into every norm layer: under autocast it normalizes in fp32 (as
    cifar10-airbench keeps BN in fp32): batch statistics of half-precision
    activations lose too much. Without autocast it adds one flag check.

    A mixin rather than a wrapper module or a patched ``forward``: state_dict
    keys stay those of the torch layer, and a deepcopy is a self-contained copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta and torch.is_autocast_enabled(x.device.type):  # meta (bnexp.memory's estimate) has no autocast
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dim but the channels' (dim 1): what per-channel statistics are taken over."""
    return [0] + list(range(2, x.dim()))


def broadcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``x`` ([N, C, ...])."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def per_channel(x: torch.Tensor) -> int:
    """How many values of ``x`` one channel's statistics are taken over."""
    return x.numel() // x.shape[1]


def unbiased(var: torch.Tensor, count: int) -> torch.Tensor:
    """The biased variance of ``count`` values made unbiased, as BatchNorm's running_var is."""
    return var * count / max(count - 1, 1)


class BatchStatsNorm(nn.Module):
    """What a batch-statistics norm written here shares: gamma, beta, eps,
    momentum, and running statistics ``running_mean`` and ``spread``
    (``running_var``, or batch renorm's ``running_std``). A subclass that takes
    its training statistics from :meth:`_moments` is synchronized across ranks
    by :func:`bnexp.norms.sync.moments_twin` as it is."""

    # The running statistic of spread: running_var here (nn.BatchNorm's name),
    # running_std for batch renorm (Ioffe 2017 keeps sigma).
    spread = "running_var"

    def __init__(self, num_features: int, eps: float, momentum: float, track_running_stats: bool):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer(self.spread, torch.ones(num_features))
        else:
            self.running_mean = None
            setattr(self, self.spread, None)

    def _affine(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x_hat = x_hat * broadcast(self.weight, x_hat)
        if self.bias is not None:
            x_hat = x_hat + broadcast(self.bias, x_hat)
        return x_hat

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean and biased variance of the batch, and how many values each is over."""
        var, mean = torch.var_mean(x, reduce_dims(x), unbiased=False)
        return mean, var, per_channel(x)

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, track_running_stats={self.track_running_stats}"


# --------------------------------------------------------------------------- folding R replicas into one layer


class NotFoldable(ValueError):
    """Replicas of a norm layer that its fold rule cannot make one layer of (bnexp.models.stacked: NotStackable)."""


def join_tensors(folded: nn.Module, parts: list[nn.Module]) -> nn.Module:
    """Give ``folded`` the parameters and buffers of ``parts`` concatenated along
    channels (a 0-dim buffer, such as num_batches_tracked, is the first part's:
    the replicas of a stack are at the same step). A missing parameter (norm.scale=false)
    stays missing; a tensor that is not one vector per channel cannot be concatenated."""
    first = parts[0]
    for kind, put in (("_parameters", folded.register_parameter), ("_buffers", folded.register_buffer)):
        for name, t in getattr(first, kind).items():
            if t is None:
                put(name, None)
                continue
            if t.dim() == 0 and kind == "_buffers":
                put(name, t.detach().clone())
                continue
            if t.dim() != 1:
                raise NotFoldable(f"{type(first).__name__}.{name} of shape {tuple(t.shape)} is not one value per channel")
            with torch.no_grad():
                joined = torch.cat([getattr(m, name) for m in parts])
            put(name, nn.Parameter(joined, requires_grad=t.requires_grad) if kind == "_parameters" else joined)
    return folded


def join_channels(parts: list[nn.Module]) -> nn.Module:
    """R replicas of a per-channel norm of C channels as one of R*C channels: the same class and
    settings, each replica's channels with their own parameters and statistics (BN and its kin)."""
    folded = copy.deepcopy(parts[0])
    if hasattr(folded, "num_features"):
        folded.num_features = sum(m.num_features for m in parts)
    return join_tensors(folded, parts)


def join_groups(parts: list[nn.Module]) -> nn.Module:
    """R replicas of a norm over G channel groups as one over R*G groups (group norm)."""
    folded = copy.deepcopy(parts[0])
    folded.num_groups, folded.num_channels = len(parts) * parts[0].num_groups, len(parts) * parts[0].num_channels
    return join_tensors(folded, parts)


@dataclass(frozen=True)
class Fold:
    """How the stacked model (``hydra/launcher=vectorized``) makes R replicas' layers of a norm one layer."""

    # Consecutive replicas' layers (same settings) -> one layer over their channels, replica-major.
    join: Callable[[list[nn.Module]], nn.Module]
    # True: the layer needs [B, R*C, ...] (examples in dim 0: per-example statistics,
    # ghost BN's virtual batches). False: per channel over every other dim alike,
    # so an MLP's stack hands it [1, R*C, B] without a copy.
    examples_first: bool = True


PER_CHANNEL = Fold(join_channels, examples_first=False)
GROUPS = Fold(join_groups)


# --------------------------------------------------------------------------- the registry


def variance_spread(norm: nn.Module, var: torch.Tensor, count: int) -> torch.Tensor:
    """What running_var holds for a biased variance pooled over ``count`` values: made
    unbiased (torch's rule), or as it is for a norm whose ``unbiased`` is False (Keras')."""
    return unbiased(var, count) if getattr(norm, "unbiased", True) else var


@dataclass(frozen=True)
class Norm:
    """One norm kind: ``norm=<name>``. The traits are what the rest of bnexp asks of a norm."""

    name: str
    # (norm config, channels, spatial dims: 0 for [N, C], 1 for [N, C, L], 2 for [N, C, H, W]) -> the layer,
    # with gamma and beta (make_norm sets them from norm.scale/center/gamma_init/beta_init).
    build: Callable[[Any, int, int], nn.Module]
    # The exact classes ``build`` makes: how a layer finds its entry (a layer norm over images
    # is a one-group GroupNorm, which norm=group names).
    layers: tuple[type, ...]
    # A dataclass of this norm's own keys (norm.<field>, beyond config.NormConfig's); None: none.
    schema: type | None = None
    # (the whole config) -> ConfigError, for what its keys' types cannot say; run where a norm is placed.
    check: Callable[[Any], None] | None = None
    # (norm config, {layer: width}) -> ConfigError, for what it needs of each normalized width (groups divide it).
    widths: Callable[[Any, dict[str, int]], None] | None = None
    # Normalizes with statistics over the batch and keeps running statistics for eval: what norm.sync
    # synchronizes, PreciseBN recomputes, bn_gap measures; `momentum` and `track_running_stats` attributes.
    batch_stats: bool = False
    # Its running statistics' buffers: the mean, then the spread (a variance, or batch renorm's std).
    running: tuple[str, str] = ("running_mean", "running_var")
    # (layer, biased variance, values pooled) -> the spread buffer's value (PreciseBN).
    spread_of: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] = variance_spread
    # Subtracts a per-channel mean, so a bias right before it is redundant (bnexp.models.blocks.needs_bias).
    centers: bool = False
    # How R replicas fold into one layer of the stacked model; None: not stackable.
    fold: Fold | None = None
    # (layer, per-device batch, world size, cuda) -> its synchronized twin, or None where it needs none.
    sync: Callable[[nn.Module, int, int, bool], nn.Module | None] | None = None
    # The classes ``sync`` makes: they are this norm too, and already synchronized.
    twins: tuple[type, ...] = ()


NORMS: dict[str, Norm] = {}
_BY_TYPE: dict[type, Norm] = {}
# Each norm's own keys: field name -> (type, default), for config.LATER_KEYS and the composed norm node.
_OWN_KEYS: dict[str, tuple[Any, Any]] = {}


def register(name: str, build: Callable[[Any, int, int], nn.Module], layers: tuple[type, ...], **traits: Any) -> Norm:
    """Register ``norm=<name>``; ``traits`` are :class:`Norm`'s fields. Registering a name again replaces it."""
    entry = Norm(name, build, tuple(layers), **traits)
    unregister(name)
    for cls in (*entry.layers, *entry.twins):
        if cls in _BY_TYPE:
            raise ValueError(f"norm={name}: {cls.__name__} is already norm={_BY_TYPE[cls].name}'s layer")
    keys = _own_keys(entry)
    NORMS[name] = entry
    _BY_TYPE.update({cls: entry for cls in (*entry.layers, *entry.twins)})
    for key, (kind, default) in keys.items():
        _OWN_KEYS[key] = (kind, default)
        # At its default a norm's own key leaves a run's config hash as it was before the norm existed.
        config.LATER_KEYS[f"norm.{key}"] = default
    return entry


def unregister(name: str) -> None:
    """Forget ``norm=<name>`` (a norm registered for one test or notebook cell) and its own keys."""
    entry = NORMS.pop(name, None)
    if entry is None:
        return
    for cls in (*entry.layers, *entry.twins):
        _BY_TYPE.pop(cls, None)
    still = {key for other in NORMS.values() for key in _own_keys(other)}
    for key in set(_own_keys(entry)) - still:
        _OWN_KEYS.pop(key, None)
        config.LATER_KEYS.pop(f"norm.{key}", None)


def _own_keys(entry: Norm) -> dict[str, tuple[Any, Any]]:
    if entry.schema is None:
        return {}
    if not is_dataclass(entry.schema):
        raise TypeError(f"norm={entry.name}: schema must be a dataclass of its own keys")
    base = {f.name for f in fields(NormConfig)}
    types = get_type_hints(entry.schema)  # the types themselves where the module postpones annotations
    out = {}
    for f in fields(entry.schema):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name in base:
            raise ValueError(f"norm={entry.name}: norm.{f.name} is already a key of every norm (bnexp.config.NormConfig)")
        if f.name in _OWN_KEYS and _OWN_KEYS[f.name] != (types[f.name], default):
            raise ValueError(f"norm={entry.name}: norm.{f.name} is another norm's key with another type or default")
        out[f.name] = (types[f.name], default)
    return out


def own_keys() -> dict[str, tuple[Any, Any]]:
    """Every registered norm's own keys: name -> (type, default), for the composed ``norm`` node."""
    return dict(_OWN_KEYS)


def kind_name(kind: Any) -> str:
    """``norm.kind`` as a name, whatever enum or string holds it."""
    return kind.value if isinstance(kind, Enum) else str(kind)


def norm(kind: Any) -> Norm:
    """The entry of ``norm.kind``; ConfigError naming the registered norms if there is none."""
    name = kind_name(kind)
    if name not in NORMS:
        raise ConfigError("norm.kind", f"got {name!r}; allowed: {', '.join(NORMS)} (the options of group 'norm')")
    return NORMS[name]


def entry_of(layer: nn.Module | None) -> Norm | None:
    """The entry whose layer ``layer`` is, by exact type (None: not a norm layer)."""
    return _BY_TYPE.get(type(layer))


def is_norm(layer: nn.Module) -> bool:
    return type(layer) in _BY_TYPE


# --------------------------------------------------------------------------- building


def make_norm(cfg: NormConfig, num_features: int, spatial_dims: int) -> nn.Module:
    """The norm layer of kind ``cfg.kind`` for ``num_features`` channels.

    ``spatial_dims`` is 0 for an MLP's [N, C], 1 for [N, C, L], 2 for [N, C, H, W].
    """
    entry = norm(cfg.kind)
    layer = entry.build(cfg, num_features, spatial_dims)
    if not is_norm(layer):
        raise TypeError(f"norm={entry.name} built a {type(layer).__name__}, which no norm names in register(layers=...)")
    _set_affine(layer, cfg)
    return layer


def _set_affine(norm: nn.Module, cfg: NormConfig) -> None:
    # Keras' center=False / scale=False: no beta / no gamma at all (not a frozen
    # parameter), so optimizers and gradient-norm logging never see them.
    # torch's functional norms accept weight=None and bias=None.
    with torch.no_grad():
        if cfg.scale:
            norm.weight.fill_(cfg.gamma_init)
        else:
            norm.register_parameter("weight", None)
        if cfg.center:
            norm.bias.fill_(cfg.beta_init)
        else:
            norm.register_parameter("bias", None)


# --------------------------------------------------------------------------- questions about a model's norms


def is_centered(norm: nn.Module | None) -> bool:
    """Whether the norm subtracts a per-feature mean, which makes a preceding bias redundant."""
    entry = entry_of(norm)
    return entry is not None and entry.centers


def running_stat_norms(model: nn.Module) -> list[nn.Module]:
    """The norm layers that keep running statistics of batches (BN, ghost BN, batch renorm): what PreciseBN recomputes."""
    out = []
    for m in model.modules():
        entry = entry_of(m)
        if entry is not None and entry.batch_stats and m.track_running_stats:
            out.append(m)
    return out


def running_stats(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-statistics norm's running mean and running spread (its registered buffers)."""
    mean, spread = entry_of(norm).running
    return getattr(norm, mean), getattr(norm, spread)


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Eval mode for everything (norm.noise off) except the norms with running
    statistics, which normalize with each batch's own statistics as in training
    (and update their running statistics: callers restore or replace them).
    Returns those norms."""
    model.eval()
    norms = running_stat_norms(model)
    for m in norms:
        m.train()
    return norms
