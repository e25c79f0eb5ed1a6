"""``landscape/*``: the loss landscape along the gradient (Santurkar et al. 2018,
Sec. 3.1, Fig. 4). At a step, with g the gradient of the loss on that step's
training batch at the current parameters theta, for every eta of the grid
(``probes.landscape.etas`` x the current lr):

- ``landscape/loss_min``, ``landscape/loss_max``: min and max over eta of
  L(theta - eta g), the shaded band of Fig. 4(a) ("loss landscape");
- ``landscape/grad_diff_min``, ``landscape/grad_diff_max``: min and max of
  ||g(theta) - g(theta - eta g)||_2, Fig. 4(b) ("gradient predictiveness");
- ``landscape/beta``: max over eta of ||g(theta) - g(theta - eta g)|| / ||eta g||,
  Fig. 4(c) ("effective" beta-smoothness);
- ``landscape/grad_norm``: ||g(theta)||.

Same batch and train mode (batch statistics) at every point; the parameters,
running statistics and RNG come back afterwards (``preserved()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bnexp.config import ConfigError
from bnexp.probes import grads
from bnexp.probes.base import ProbeContext, ProbeSetup, register


@dataclass
class LandscapeConfig:
    every: int = 0  # steps; 0: off. Costs one forward + backward per eta, plus one.
    # Step sizes as multiples of the current lr: the paper's VGG range [1/2, 4] x lr
    # (its deep linear net uses [1/100, 30]; preset santurkar_dln).
    etas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])


class Landscape:
    read_only = False

    def __init__(self, model: torch.nn.Module, every: int, etas: list[float]):
        self.every, self.etas = every, [float(e) for e in etas]
        self.params = grads.params(model)

    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        params = self.params
        theta, g = grads.here(ctx, params)
        g_norm = grads.norm(g)
        losses, diffs, betas = [], [], []
        for eta in self.etas:
            step = eta * ctx.lr
            grads.assign(params, [t - step * gp for t, gp in zip(theta, g)])
            loss, g_moved = grads.on_step_batch(ctx, params)
            diff = grads.norm([a - b for a, b in zip(g, g_moved)])
            losses.append(loss)
            diffs.append(diff)
            betas.append(diff / (step * g_norm))
        losses_t, diffs_t = torch.stack(losses), torch.stack(diffs)
        return {"landscape/loss_min": losses_t.min(), "landscape/loss_max": losses_t.max(),
                "landscape/grad_diff_min": diffs_t.min(), "landscape/grad_diff_max": diffs_t.max(),
                "landscape/beta": torch.stack(betas).max(), "landscape/grad_norm": g_norm}


def build(setup: ProbeSetup, cfg: LandscapeConfig | None) -> Landscape | None:
    return Landscape(setup.model, cfg.every, list(cfg.etas)) if cfg is not None and cfg.every else None


def check(cfg) -> None:
    etas = list(cfg.probes.landscape.etas)
    if not etas or any(not e > 0 for e in etas):
        raise ConfigError("probes.landscape.etas", f"got {etas}; allowed: a non-empty list of positive multiples of the lr, e.g. [0.5,1,2,4]")


register("landscape", LandscapeConfig, build, check)
