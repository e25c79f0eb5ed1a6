"""``var_shift/<norm layer>``: Li et al. 2019's variance shift ("Understanding the
Disharmony between Dropout and Batch Normalization by Variance Shift", Sec. 3),
every ``probes.var_shift.every`` steps: for each norm with running statistics,
the variance of its input over the fixed probe batch in eval mode (the network
as it is evaluated: dropout off), per channel and by the norm's own running
rule (unbiased for torch's BN), summed over channels, divided by the sum of
the channels' running variances, which training accumulated with dropout on.
1: the statistics the norm evaluates with fit what it sees in eval mode.
Inverted dropout of rate p right before a norm, on an input of mean 0, gives
1 - p: the training-mode variance is 1 / (1 - p) times the eval-mode one (Li
et al.'s Delta(p), p their keep rate); on an input of mean mu and second moment
m2 it gives (m2 - mu^2) / (m2 / (1 - p) - mu^2) (0.405 for ReLU outputs of a
standard normal at p = 0.5). A ratio of sums rather than a mean of per-channel
ratios: a channel that is dead in training (a ReLU that never fires: running
variance ~1e-13) would otherwise divide by nothing. Read only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnexp.norms import entry_of, running_stat_norms, running_stats
from bnexp.probes.base import ProbeContext, ProbeSetup, forward_capture, register


@dataclass
class VarShiftConfig:
    every: int = 0  # steps; 0: off. One eval-mode forward pass of the probe batch.


class VarShift:
    read_only = True

    def __init__(self, model: torch.nn.Module, every: int):
        self.every = every
        norms = set(running_stat_norms(model))
        self.norms = {name: m for name, m in model.named_modules() if m in norms}

    @torch.inference_mode()
    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        captured = forward_capture(ctx.model, self.norms, ctx.x, eval_mode=True)
        out = {}
        for name, a in captured.items():
            m = self.norms[name]
            a = a.double()
            var = a.var([0, *range(2, a.dim())], unbiased=False)
            seen, running = entry_of(m).spread_of(m, var, a.numel() // a.shape[1]), running_stats(m)[1].double()
            if entry_of(m).running[1].endswith("std"):  # batch renorm keeps sigma: the ratio of variances is its square
                seen, running = seen.square(), running.square()
            out[f"var_shift/{name}"] = seen.sum() / running.sum()
        return out


def build(setup: ProbeSetup, cfg: VarShiftConfig | None) -> VarShift | None:
    if cfg is None or not cfg.every:
        return None
    probe = VarShift(setup.model, cfg.every)
    return probe if probe.norms else None


register("var_shift", VarShiftConfig, build)
