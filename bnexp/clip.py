"""Gradient clipping before each update (``optim.clip``, ``optim.clip_value``),
per run, also for the replicas of a stack.

- ``norm``: the gradients scaled by min(1, c / (||g|| + 1e-6)), ||g|| the L2
  norm of all of the run's gradients together (torch.nn.utils.clip_grad_norm_'s
  rule; c = ``optim.clip_value``, 1.0 when null).
- ``agc``: adaptive gradient clipping (Brock et al. 2021b, "High-Performance
  Large-Scale Image Recognition Without Normalization", Sec. 4.1): per unit i
  (a row of a Linear's weight, an output channel of a conv's; a vector or
  scalar parameter is one unit), G_i is scaled by lambda * max(||W_i||, 1e-3) / ||G_i||
  where that ratio is below 1 (lambda = ``optim.clip_value``, 0.01 when null).
  As the paper (and timm's ``exclude_head``), the classifier (``output``) is not clipped.

Written here rather than with torch.nn.utils.clip_grad_norm_ (which the tests
use as the reference for ``norm``): a stack of R replicas keeps each tensor as
[R, *shape], and each replica's gradient must be clipped by its own norm, which
torch's function (one norm over everything it is given) cannot do. One function
serves a run alone (R = 1) and a stack, so both clip by the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bnexp.config import Clip

DEFAULTS = {Clip.norm: 1.0, Clip.agc: 0.01}
AGC_EPS = 1e-3  # Brock et al. 2021b's epsilon: a zero-initialized weight still gets gradient


@dataclass
class Leaf:
    """One parameter as the clipper sees it: ``view()`` gives it and ``grad_view()`` its
    gradient as [R, *standalone shape] (R = 1 for a run alone)."""

    name: str  # the standalone parameter's name (hidden0.linear.weight)
    param: torch.Tensor
    shape: tuple[int, ...]  # the standalone shape

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *self.shape)


def leaves_of(model: torch.nn.Module) -> list[Leaf]:
    """A run's own parameters that train (R = 1)."""
    return [Leaf(name, p, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]


def _unit_norms(v: torch.Tensor) -> torch.Tensor:
    """||.|| per replica and unit of [R, *shape]: over everything but the replica (a vector or scalar is
    one unit) or but the replica and the first (output) dim, kept as broadcastable dims."""
    dims = list(range(1, v.dim())) if v.dim() <= 2 else list(range(2, v.dim()))
    return torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()


@torch.no_grad()
def clip_norm(leaves: list[Leaf], max_norm: float) -> None:
    """Each replica's gradients scaled by min(1, max_norm / (its global norm + 1e-6))."""
    grads = [(leaf, leaf.view(leaf.param.grad)) for leaf in leaves if leaf.param.grad is not None]
    if not grads:
        return
    # One replica at a time, each sum over a contiguous 1-D tensor: a sum over dim 1 of
    # [R, N] (or dim 0 of [L, R]) is vectorized differently for R = 1 and R = 8, and a
    # replica reproduced alone (a stack of one) must clip by the same bits as in its stack.
    replicas = grads[0][1].shape[0]
    squares = torch.stack([torch.stack([g[r].reshape(-1).square().sum() for _, g in grads]).sum() for r in range(replicas)])
    factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for _, g in grads:
        g.mul_(factor.view(-1, *[1] * (g.dim() - 1)))


@torch.no_grad()
def clip_agc(leaves: list[Leaf], clipping: float) -> None:
    """Each unit's gradient scaled to at most ``clipping`` times its weight's norm (floored at 1e-3)."""
    for leaf in leaves:
        if leaf.param.grad is None or leaf.name.startswith("output."):
            continue
        w, g = leaf.view(leaf.param.detach()), leaf.view(leaf.param.grad)
        max_norm = _unit_norms(w).clamp(min=AGC_EPS) * clipping
        g_norm = _unit_norms(g)
        # where(g_norm > max_norm): the unclipped gradient keeps its bits (timm's form).
        g.copy_(torch.where(g_norm > max_norm, g * (max_norm / g_norm.clamp(min=1e-6)), g))


def make_clip(optim_cfg, leaves: list[Leaf]) -> Callable[[], None] | None:
    """The clipping the step calls between backward and the update; None for ``optim.clip=none``."""
    kind = Clip(optim_cfg.get("clip", Clip.none))
    if kind == Clip.none:
        return None
    value = optim_cfg.get("clip_value")
    value = DEFAULTS[kind] if value is None else float(value)
    fn = clip_norm if kind == Clip.norm else clip_agc
    return lambda: fn(leaves, value)
