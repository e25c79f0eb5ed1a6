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

A new probe is one module in this package that calls :func:`register` with its
name, its config schema (a dataclass with an ``every`` field; it appears as
``probes.<name>`` in the config) and its factory.
"""

from __future__ import annotations

import importlib
import pkgutil

from bnexp.probes.base import PROBES, Probe, ProbeContext, ProbeSet, ProbeSetup, build_probes, preserved, register

__all__ = ["PROBES", "Probe", "ProbeContext", "ProbeSet", "ProbeSetup", "build_probes", "preserved", "register"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
