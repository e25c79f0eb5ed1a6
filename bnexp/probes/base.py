"""The probe protocol, the registry, :func:`preserved` and the per-run :class:`ProbeSet` (see :mod:`bnexp.probes`)."""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn


@dataclass
class ProbeContext:
    model: nn.Module
    x: torch.Tensor  # the fixed probe batch: the same examples at every call
    y: torch.Tensor
    train_x: torch.Tensor  # this step's training batch
    train_y: torch.Tensor
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lr: float
    step: int


class Probe(Protocol):
    every: int  # steps between calls; 0: off
    read_only: bool  # False: run inside preserved()

    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]: ...


@dataclass
class ProbeSetup:
    """What a probe factory may use to build its probe."""

    cfg: Any  # the run's composed config
    model: nn.Module
    log_every: int  # the run's logging and evaluation cadences, in steps
    eval_every: int
    x: torch.Tensor  # the fixed probe batch
    y: torch.Tensor
    data: Any  # bnexp.data.Splits


@dataclass(frozen=True)
class ProbeKind:
    name: str
    schema: type | None  # a dataclass with an `every` field, composed as probes.<name>; None: no keys
    factory: Callable[[ProbeSetup, Any], Probe | None]  # (setup, its config node or None) -> probe, or None when off
    # (the whole config) -> None or ConfigError, for what its keys' types cannot say; run by schema.validate
    check: Callable[[Any], None] | None = None


PROBES: dict[str, ProbeKind] = {}


def register(name: str, schema: type | None, factory: Callable[[ProbeSetup, Any], Probe | None],
             check: Callable[[Any], None] | None = None) -> None:
    PROBES[name] = ProbeKind(name, schema, factory, check)


@contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Run the block on ``model`` and leave no trace: parameters, buffers,
    gradients, the optimizer's state, train/eval mode and every RNG come back
    bit for bit, however the block changed them."""
    params = [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    devices = [d.index for d in {p.device for p, _, _ in params} if d.type == "cuda"]
    py_rng, np_rng = random.getstate(), np.random.get_state()
    # torch.random.fork_rng saves and restores the CPU and CUDA generators.
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_rng)
            np.random.set_state(np_rng)
            with torch.no_grad():
                for p, data, grad in params:
                    p.copy_(data)
                    p.grad = grad
                for b, data in buffers:
                    b.copy_(data)
            for m, training in modes:
                m.training = training
            if optimizer is not None:
                optimizer.load_state_dict(opt_state)


class ProbeSet:
    """The probes of one run; :meth:`due` is the loop's one call site."""

    def __init__(self, probes: dict[str, Probe]):
        self.probes = {name: p for name, p in probes.items() if p is not None and p.every}

    def cadences(self) -> set[int]:
        return {p.every for p in self.probes.values()}

    def due(self, step: int, total: int, ctx: Callable[[], ProbeContext]) -> dict[str, torch.Tensor]:
        """The values of every probe due at ``step`` (every ``every`` steps and at the
        last step); ``ctx`` makes the context only when one is due."""
        out: dict[str, torch.Tensor] = {}
        context = None
        for probe in self.probes.values():
            if step % probe.every and step != total:
                continue
            context = context or ctx()
            if probe.read_only:
                out.update(probe(context))
            else:
                with preserved(context.model, context.optimizer):
                    out.update(probe(context))
        return out


def build_probes(setup: ProbeSetup) -> ProbeSet:
    """Every registered probe, configured from ``setup.cfg.probes.<name>`` (off ones left out)."""
    nodes = setup.cfg.get("probes") or {}
    return ProbeSet({name: kind.factory(setup, nodes.get(name)) for name, kind in PROBES.items()})

