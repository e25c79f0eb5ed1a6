"""What the optimization-landscape probes share (Santurkar et al. 2018; PyHessian):
the trainable parameters in model order, a loss and its gradient at the
current parameters, and norms and dot products over lists of tensors.
No probe is registered here."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from bnexp.models.blocks import parameterized_layers
from bnexp.probes.base import ProbeContext


def params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters, layer by layer in model order (bnexp's families: forward order)."""
    return [p for ps in parameterized_layers(model).values() for p in ps]


def loss_and_grads(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, wrt: Sequence[torch.Tensor],
                   seed: int, create_graph: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The loss on (x, y) at the current parameters and its gradient w.r.t. ``wrt``.

    The torch generator is reseeded first, so every evaluation of one probe call
    draws the same norm.noise: the probe compares loss surfaces, not noise draws
    (the caller runs inside :func:`bnexp.probes.preserved`, which gives the
    training RNG back)."""
    torch.manual_seed(seed)
    loss = loss_fn(model(x).float(), y)
    return loss.detach(), torch.autograd.grad(loss, list(wrt), create_graph=create_graph)


def on_step_batch(ctx: ProbeContext, wrt: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`loss_and_grads` on the training batch of the step just taken (one noise draw per probe call)."""
    return loss_and_grads(ctx.model, ctx.loss_fn, ctx.train_x, ctx.train_y, wrt, ctx.step)


def here(ctx: ProbeContext, params: Sequence[nn.Parameter]) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """In train mode (batch statistics, as the step saw them): copies of the
    current parameters theta, and the gradient g at theta on the step's batch."""
    ctx.model.train()
    theta = [p.detach().clone() for p in params]
    return theta, on_step_batch(ctx, params)[1]


def _wide(ts: Sequence[torch.Tensor]) -> torch.dtype:
    """float32, or the model's dtype where it is wider (a float64 model's probes
    keep float64: a cosine rounded to float32 reads 1.0000001)."""
    return torch.promote_types(ts[0].dtype, torch.float32) if len(ts) else torch.float32


def norm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a list of tensors taken as one vector."""
    dt = _wide(ts)
    return torch.stack(torch._foreach_norm([t.to(dt) for t in ts])).norm()


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    dt = _wide(a)
    return sum((u.to(dt) * v.to(dt)).sum() for u, v in zip(a, b))


def cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """cos(a, b) of two lists taken as vectors, clamped to [-1, 1] (rounding can
    step past 1 for parallel vectors); NaN where either is zero (no direction)."""
    return (dot(a, b) / (norm(a) * norm(b))).clamp(-1.0, 1.0)


@torch.no_grad()
def assign(ps: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    for p, v in zip(ps, values):
        p.copy_(v)
