"""``ics/<layer>/l2`` and ``ics/<layer>/cos``: internal covariate shift as
Santurkar et al. 2018 define it (Def. 2.1, Fig. 3): how much a layer's gradient
changes when only the layers before it take their update.

For layer i, G_i is the gradient of the loss w.r.t. layer i's parameters, and
G'_i the same gradient on the same batch after layers 1..i-1 have taken the
update the optimizer makes from G (layers i..k unchanged). Logged: ||G_i - G'_i||_2
and cos(G_i, G'_i). Measured at the parameters after the step just taken, on
that step's training batch, in train mode (batch statistics, as the step saw
them); the update is one trial step of the run's own optimizer (lr, momentum,
weight decay), undone afterwards with everything else by ``preserved()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnexp.models.blocks import parameterized_layers
from bnexp.norms import is_norm
from bnexp.probes import grads
from bnexp.probes.base import ProbeContext, ProbeSetup, register


@dataclass
class ICSConfig:
    every: int = 0  # steps; 0: off. Costs one forward + backward per weight layer.


class InternalCovariateShift:
    read_only = False

    def __init__(self, model: torch.nn.Module, every: int):
        self.every = every
        named = parameterized_layers(model)
        self.params = [p for ps in named.values() for p in ps]
        # The paper's layers are the weight layers (conv / linear); a norm's gamma
        # and beta count among "the layers before" a later one. BN-only training
        # (optim.train_only=norm) leaves only norms trainable: then they are the layers.
        kinds = {name: module for name, module in model.named_modules() if name in named}
        weight_layers = [n for n in named if not is_norm(kinds[n])] or list(named)
        # Per measured layer: its slice of self.params, and where the parameters before it end.
        self.layers: list[tuple[str, slice]] = []
        start = 0
        for name, ps in named.items():
            if name in weight_layers:
                self.layers.append((name, slice(start, start + len(ps))))
            start += len(ps)

    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        params = self.params
        theta, g = grads.here(ctx, params)
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        ctx.optimizer.step()  # the step-t update of every layer
        updated = [p.detach().clone() for p in params]
        grads.assign(params, theta)
        out: dict[str, torch.Tensor] = {}
        for name, own in self.layers:
            grads.assign(params[: own.start], updated[: own.start])  # layers 1..i-1 updated, i..k as they were
            _, g_shifted = grads.on_step_batch(ctx, params[own])
            g_own = g[own]
            diff = [a - b for a, b in zip(g_own, g_shifted)]
            out[f"ics/{name}/l2"] = grads.norm(diff)
            out[f"ics/{name}/cos"] = grads.cosine(g_own, g_shifted)
        return out


def build(setup: ProbeSetup, cfg: ICSConfig | None) -> InternalCovariateShift | None:
    return InternalCovariateShift(setup.model, cfg.every) if cfg is not None and cfg.every else None


register("ics", ICSConfig, build)
