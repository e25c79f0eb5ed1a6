"""Normalization layers by name, as :mod:`bnexp.models` holds families and
:mod:`bnexp.probes` probes: each module here (but ``base``, the registry, and
``sync``, what synchronized twins are made of) is one norm, registered on
import with its builder and its traits (:class:`bnexp.norms.base.Norm`);
``noise`` is norm.noise's module. The rest of bnexp asks the registry
(``entry_of(layer)``, by exact type) instead of testing classes.

Adding a norm: one module here that defines its layer class (mixing in
:class:`FP32Norm` keeps it in fp32 under autocast) and calls
``register(name, build, layers=(...), ...traits)``, and ``configs/norm/<name>.yaml``
(``defaults: [base_norm]``, ``kind: <name>``, its defaults for users). A norm
defined anywhere else works the same once its module is imported; without a
YAML file, ``norm=<name>`` selects the node :func:`bnexp.schema.register_configs`
stores for it.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from bnexp.config import NormKind
from bnexp.norms.base import (
    GROUPS, NORMS, PER_CHANNEL, BatchStatsNorm, Fold, FP32Norm, Norm, NotFoldable, entry_of, is_centered, is_norm, join_channels,
    join_groups, join_tensors, make_norm, norm, register, running_stat_norms, running_stats, unregister,
    use_batch_statistics,
)

# The built-in norms first, in the order bnexp lists them (config.NormKind), then any other module here.
_BUILT_IN = [k.value for k in NormKind]
for _name in _BUILT_IN + sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _name not in ("base", "sync"):
        importlib.import_module(f"{__name__}.{_name}")
for _name in sorted(NORMS, key=lambda n: _BUILT_IN.index(n) if n in _BUILT_IN else len(_BUILT_IN)):
    NORMS[_name] = NORMS.pop(_name)  # layer imports group's GroupNorm, which registers group first

from bnexp.norms.batch import BatchNorm1d, BatchNorm2d, BiasedBatchNorm1d, BiasedBatchNorm2d  # noqa: E402
from bnexp.norms.batch_renorm import BatchRenorm  # noqa: E402
from bnexp.norms.ghost_batch import GhostBatchNorm  # noqa: E402
from bnexp.norms.group import GroupNorm  # noqa: E402
from bnexp.norms.layer import LayerNorm  # noqa: E402
from bnexp.norms.noise import BatchNoise, make_noise  # noqa: E402

# Kept for code outside bnexp that matched norm layers by base class (bnexp itself asks the registry: is_norm).
_RunningStatsNorm = BatchStatsNorm
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, BatchStatsNorm)

__all__ = [
    "GROUPS", "NORMS", "NORM_TYPES", "PER_CHANNEL", "BatchNoise", "BatchNorm1d", "BatchNorm2d", "BatchRenorm", "BatchStatsNorm",
    "BiasedBatchNorm1d", "BiasedBatchNorm2d", "FP32Norm", "Fold", "GhostBatchNorm", "GroupNorm", "LayerNorm", "Norm", "NotFoldable",
    "entry_of", "is_centered", "is_norm", "join_channels", "join_groups", "join_tensors", "make_noise", "make_norm", "norm", "register",
    "running_stat_norms", "running_stats", "unregister", "use_batch_statistics",
]
