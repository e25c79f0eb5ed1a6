"""Probes: measurements taken on a model during training that never change it.

The protocol (:class:`Probe`): a probe is built once per run by its factory,
runs every ``every`` steps (and at the last step), and when called with a
:class:`ProbeContext` (the model, the fixed probe batch, this step's training
batch, the optimizer, the loss function, the step) returns ``{tag: 0-d tensor}``
still on the device; the loop copies every value of a step to the host at once.

The loop calls :meth:`ProbeSet.due` at every step where anything is reported
(a logging, eval or probe step): the one call site. A probe that perturbs the model (a trial step along the gradient, a
Hessian-vector product, a forward pass in train mode) declares
``read_only = False`` and runs inside :func:`preserved`, which gives back
parameters, buffers (BN running statistics, num_batches_tracked), gradients,
the optimizer's state, the train/eval mode and the RNG states exactly.

A new probe is its schema (a dataclass with an ``every`` field; it appears as
``probes.<name>`` in the config) and checks in :mod:`bnexp.probes.schemas`, one
:func:`register` line there naming its factory, and its module in this package
with the factory. A user's probe calls :func:`register` with a callable factory.

Importing this package loads no torch (the registry and the schemas are all
that composing and validating a config need); the protocol's names below come
from :mod:`bnexp.probes.base` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from bnexp.probes import schemas  # noqa: F401  registers every probe
from bnexp.probes.registry import PROBES, register

__all__ = ["PROBES", "Probe", "ProbeContext", "ProbeSet", "ProbeSetup", "build_probes", "preserved", "register"]

_FROM_BASE = ("Probe", "ProbeContext", "ProbeSet", "ProbeSetup", "build_probes", "preserved")


def __getattr__(name: str) -> Any:  # PEP 562: torch comes in with the first of these
    if name in _FROM_BASE:
        return getattr(importlib.import_module("bnexp.probes.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
