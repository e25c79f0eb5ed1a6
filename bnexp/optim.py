"""torch.optim's SGD, Adam and AdamW, minus the import of torch._dynamo that their
first use costs every process.

In torch 2.13 an optimizer imports torch._dynamo (the compiler behind
torch.compile) the first time it is used, whether anything is compiled or not
(torch/optim/optimizer.py): ``Optimizer.add_param_group`` (and so the
constructor), ``zero_grad``, ``state_dict`` and ``load_state_dict`` are
decorated with ``torch._disable_dynamo``, which imports torch._dynamo at its
first call to build the disabled function, and each optimizer's ``step`` is
wrapped by ``_use_grad_for_differentiable``, which imports it to place two
``graph_break()`` calls. No argument, import order, flag or environment
variable of torch avoids it. The import costs 1.2-1.3 s on the 2-core dev box
(``python -X importtime``: sympy, torch.fx, inductor's config, dynamo itself),
as much as half of ``import torch``, once per process: a third of `bnexp train`'s
time to its first step (docs/performance.md).

So, a workaround: these subclasses call the methods as torch wrote them,
undecorated (:func:`inspect.unwrap` follows the ``__wrapped__`` attribute
that ``functools.wraps`` leaves on each decorator), and take over the one
thing ``_use_grad_for_differentiable`` does besides its graph breaks: grad
mode off in the step. The decorators only matter while TorchDynamo traces the
optimizer, which bnexp never does (``train.compile`` compiles forward and
loss; the optimizer steps eagerly); with ``train.compile=true`` bnexp uses
torch's own classes all the same (:func:`optimizer_class`). Were a later torch to
stop leaving ``__wrapped__``, the decorated method runs: dynamo is imported
again, nothing else changes. Tested: the same
parameters, state and state_dict, bit for bit, as torch's classes, and no
torch._dynamo in a fresh process that trains with one (tests/test_optim.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


# Optimizer's methods as torch wrote them, without torch._disable_dynamo around them.
_AS_WRITTEN = {name: inspect.unwrap(getattr(torch.optim.Optimizer, name)) for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")}


class _WithoutDynamoImport(torch.optim.Optimizer):
    """The Optimizer methods a training run calls, without their dynamo decorators."""

    _torch_step: Any = None  # the torch class's step as written, set for each subclass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        torch_class = next(c for c in cls.__mro__[1:] if c.__module__.startswith("torch.optim."))
        cls._torch_step = staticmethod(inspect.unwrap(torch_class.step))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _AS_WRITTEN["add_param_group"](self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _AS_WRITTEN["zero_grad"](self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _AS_WRITTEN["state_dict"](self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _AS_WRITTEN["load_state_dict"](self, state_dict)

    def step(self, closure: Any = None) -> Any:
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return self._torch_step(self, closure)


class SGD(_WithoutDynamoImport, torch.optim.SGD):
    pass


class Adam(_WithoutDynamoImport, torch.optim.Adam):
    pass


class AdamW(_WithoutDynamoImport, torch.optim.AdamW):
    pass


def optimizer_class(name: str, compile: bool = False) -> type[torch.optim.Optimizer]:
    """The class of ``optim.name`` (sgd, adam, adamw): torch's own when the run compiles, else its subclass here."""
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW} if compile else \
        {"sgd": SGD, "adam": Adam, "adamw": AdamW}
    return classes[name]
