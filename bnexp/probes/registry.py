"""Probes by name: each one's config schema, its checks and its factory (see
:mod:`bnexp.probes`). Torch-free, like :mod:`bnexp.models.registry`: composing and
validating a config reads the schemas and checks; a factory, named by an import
path (``"bnexp.probes.hessian:build"``) or given as a callable, is imported
when a run builds its probes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from bnexp.models.registry import resolve

# (a bnexp.probes.base.ProbeSetup, the probe's config node or None) -> a Probe, or None when off
Factory = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class ProbeKind:
    name: str
    schema: type | None  # a dataclass with an `every` field, composed as probes.<name>; None: no keys
    factory: Union[Factory, str]  # or the import path of the factory
    # (the whole config) -> None or ConfigError, for what its keys' types cannot say; run by schema.validate
    check: Callable[[Any], None] | None = None

    def make(self, setup: Any, node: Any) -> Any:
        return resolve(self.factory)(setup, node)


PROBES: dict[str, ProbeKind] = {}


def register(name: str, schema: type | None, factory: Union[Factory, str],
             check: Callable[[Any], None] | None = None) -> None:
    PROBES[name] = ProbeKind(name, schema, factory, check)
