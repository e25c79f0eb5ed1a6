"""Every probe's config schema (``probes.<name>``) and checks, and the registry
entries that name each probe's factory (in ``bnexp/probes/<name>.py``).

Torch-free, for the reason :mod:`bnexp.models.schemas` is: Hydra composes
these and :func:`bnexp.schema.validate` runs these checks before any model
exists. A new probe is its schema (a dataclass with an ``every`` field) and
check here, one :func:`register` line, and its module with the factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from bnexp.config import ConfigError
from bnexp.probes.registry import register

# --------------------------------------------------------------------------- activations: act/<layer>/pNN


@dataclass
class ActivationsConfig:
    every: Optional[int] = None  # steps; null: at every evaluation (train.eval_every); 0: off


# --------------------------------------------------------------------------- bn_gap: PreciseBN's gap

BN_GAP_NEEDS_VALIDATION = "needs a validation split; allowed: data.val_size > 0, or probes.bn_gap.every=0"


@dataclass
class BNGapConfig:
    every: int = 0  # steps; 0: off. Costs three validation passes and `batches` training forwards.
    batches: int = 200  # training batches (of train.batch_size) for the precise statistics; fvcore's default


def check_bn_gap(cfg) -> None:
    if cfg.probes.bn_gap.batches < 1:
        raise ConfigError("probes.bn_gap.batches", f"got {cfg.probes.bn_gap.batches}; allowed: a whole number >= 1")
    if cfg.probes.bn_gap.every and cfg.data.val_size == 0:
        raise ConfigError("probes.bn_gap.every", BN_GAP_NEEDS_VALIDATION)


# --------------------------------------------------------------------------- hessian: hessian/top_eig


class HessianMode(str, Enum):
    train = "train"
    eval = "eval"


@dataclass
class HessianConfig:
    every: int = 0  # steps; 0: off. Costs ~2 backward passes per iteration.
    iterations: int = 100
    tolerance: float = 1e-3
    batch_size: int = 200
    mode: HessianMode = HessianMode.train


def check_hessian(cfg) -> None:
    h = cfg.probes.hessian
    for key in ("iterations", "batch_size"):
        if h[key] < 1:
            raise ConfigError(f"probes.hessian.{key}", f"got {h[key]}; allowed: a whole number >= 1")
    if not h.tolerance > 0:
        raise ConfigError("probes.hessian.tolerance", f"got {h.tolerance}; allowed: a number > 0")


# --------------------------------------------------------------------------- ics: ics/<layer>/{l2,cos}


@dataclass
class ICSConfig:
    every: int = 0  # steps; 0: off. Costs one forward + backward per weight layer.


# --------------------------------------------------------------------------- landscape: landscape/*


@dataclass
class LandscapeConfig:
    every: int = 0  # steps; 0: off. Costs one forward + backward per eta, plus one.
    # Step sizes as multiples of the current lr: the paper's VGG range [1/2, 4] x lr
    # (its deep linear net uses [1/100, 30]; preset santurkar_dln).
    etas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])


def check_landscape(cfg) -> None:
    etas = list(cfg.probes.landscape.etas)
    if not etas or any(not e > 0 for e in etas):
        raise ConfigError("probes.landscape.etas", f"got {etas}; allowed: a non-empty list of positive multiples of the lr, e.g. [0.5,1,2,4]")


# --------------------------------------------------------------------------- param_norms: grad_norm/*, weight_norm/*


@dataclass
class ParamNormsConfig:
    every: Optional[int] = None  # steps; null: every train.log_every; 0: off (divergence is then told by the loss alone)


# --------------------------------------------------------------------------- the registry (this order: probes.* in the config)

register("activations", ActivationsConfig, "bnexp.probes.activations:build")
register("bn_gap", BNGapConfig, "bnexp.probes.bn_gap:build", check_bn_gap)
register("hessian", HessianConfig, "bnexp.probes.hessian:build", check_hessian)
register("ics", ICSConfig, "bnexp.probes.ics:build")
register("landscape", LandscapeConfig, "bnexp.probes.landscape:build", check_landscape)
register("param_norms", ParamNormsConfig, "bnexp.probes.param_norms:build")
