"""Model families. Each module here (but ``registry``, ``blocks``, ``layers``, the
weight-layer factory, and ``stacked``, which folds R replicas of a family's
network into one) is one family: its schema, builder and checks, registered by
name on import. Adding a family means adding its module and
``configs/model/<name>.yaml``; nothing else."""

from __future__ import annotations

import importlib
import pkgutil

from bnexp.models.registry import FAMILIES, Family, build_model, family, register

__all__ = ["FAMILIES", "Family", "build_model", "family", "register"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("registry", "blocks", "layers", "stacked"):
        importlib.import_module(f"{__name__}.{_module.name}")
