"""PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3; fvcore's
``update_bn_stats``) and ``bn_gap/*``, the gap between the statistics a BN
network can be evaluated with.

:func:`recompute_bn_stats` replaces every running mean and variance by the
pooled population statistics of N training batches (what ``train.precise_bn=N``
does before each evaluation and the final test). ``probes.bn_gap`` evaluates
the validation split three ways at a step:

- ``bn_gap/val_acc_ema``, ``bn_gap/val_loss_ema``: with the running statistics
  as training left them (PyTorch's EMA; with ``train.precise_bn`` on, the
  precise statistics of this evaluation);
- ``bn_gap/val_acc_precise``, ``bn_gap/val_loss_precise``: after
  :func:`recompute_bn_stats` over ``probes.bn_gap.batches`` training batches;
- ``bn_gap/val_acc_batch``, ``bn_gap/val_loss_batch``: each norm normalizing
  every chunk of ``train.batch_size`` validation examples with its own
  statistics, as in training.

Regression runs log the losses only. A network without running statistics
(placement none, layer or group norm) logs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnexp.config import ConfigError
from bnexp.norms import entry_of, running_stat_norms, running_stats, use_batch_statistics
from bnexp.probes.base import ProbeContext, ProbeSetup, register
from bnexp.step import evaluate


def batch_indices(n: int, batches: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """``batches`` batches of training indices (epochs of permutations, so each
    example at most once until all were used), drawn from their own generator
    seeded by (seed, step): the run's sampler and RNG are never touched, and a
    resumed run draws the same batches."""
    rng = np.random.default_rng((seed, step))
    need = batches * batch_size
    perms = [rng.permutation(n) for _ in range(-(-need // n))]
    return np.concatenate(perms)[:need].reshape(batches, batch_size)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, x: torch.Tensor, batches: int, batch_size: int, seed: int, step: int) -> int:
    """Set each running mean / variance to the pooled statistics of its layer's
    inputs over ``batches`` batches of ``x`` (as fvcore's _PopulationVarianceEstimator:
    the mean and the variance over every value a channel saw, H and W counting as
    batch). The spread buffer gets what the norm's registry entry makes of the
    pooled variance (``Norm.spread_of``): a variance by the norm's own running rule (norm.running_var):
    ``biased`` is exactly fvcore's (its estimator undoes torch's Bessel correction
    per batch and keeps the biased variance of all values pooled); ``unbiased``
    (the default, torch's rule for its EMA) is n/(n-1) times fvcore's, n the values
    a channel pooled (batches x batch size x positions: 32/31 at 4 batches of 8).
    Batch renorm gets its running sigma, sqrt(variance + eps). Returns the number
    of norms recomputed.

    Written here rather than taken from fvcore: fvcore is not a dependency, its
    BN_MODULE_TYPES miss bnexp's ghost BN and batch renorm, and it rebinds the
    buffers (``bn.running_mean = ...``) where :func:`bnexp.probes.preserved`
    restores a model by copying into the tensors it saved. During the passes the
    network runs as it is evaluated (norm.noise off) while each norm normalizes
    with the batch's own statistics, as in training; momentum 0 holds the running
    statistics still meanwhile (batch renorm reads them in its training forward).
    """
    if not running_stat_norms(model):
        return 0
    modes = [(m, m.training) for m in model.modules()]
    norms = use_batch_statistics(model)
    kept = [(m, m.momentum, getattr(m, "num_batches_tracked", None)) for m in norms]
    kept = [(m, momentum, None if tracked is None else tracked.clone()) for m, momentum, tracked in kept]
    # Per channel, in float64: the count, the sum, the sum of squares (from each batch's stable var_mean).
    sums = {m: [0, *(torch.zeros_like(running_stats(m)[0], dtype=torch.float64) for _ in range(2))] for m in norms}

    def collect(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        a = inputs[0].float()
        var, mean = torch.var_mean(a, dim=[0, *range(2, a.dim())], correction=0)
        count = a.numel() // a.shape[1]
        acc = sums[m]
        acc[0] += count
        acc[1] += count * mean.double()
        acc[2] += count * (var.double() + mean.double() ** 2)

    hooks = [m.register_forward_pre_hook(collect) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        idx = torch.from_numpy(batch_indices(len(x), batches, batch_size, seed, step)).to(x.device)
        for b in idx:
            model(x[b])
    finally:
        for h in hooks:
            h.remove()
        for m, momentum, tracked in kept:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        for m, training in modes:
            m.training = training
    for m in norms:
        count, s1, s2 = sums[m]
        mean = s1 / count
        var = s2 / count - mean**2  # biased, over every value pooled
        running_mean, spread = running_stats(m)
        running_mean.copy_(mean)
        spread.copy_(entry_of(m).spread_of(m, var, count))  # a variance by its running rule, batch renorm's sigma
    return len(norms)


NEEDS_VALIDATION = "needs a validation split; allowed: data.val_size > 0, or probes.bn_gap.every=0"


@dataclass
class BNGapConfig:
    every: int = 0  # steps; 0: off. Costs three validation passes and `batches` training forwards.
    batches: int = 200  # training batches (of train.batch_size) for the precise statistics; fvcore's default


class BNGap:
    read_only = False

    def __init__(self, every: int, batches: int, batch_size: int, eval_batch_size: int, seed: int, data):
        self.every, self.batches, self.batch_size, self.eval_batch_size, self.seed = every, batches, batch_size, eval_batch_size, seed
        self.data = data

    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        d, model = self.data, ctx.model
        values = {"ema": evaluate(model, d.x_val, d.y_val, self.eval_batch_size),
                  "batch": evaluate(model, d.x_val, d.y_val, self.batch_size, batch_stats=True)}
        recompute_bn_stats(model, d.x_train, self.batches, self.batch_size, self.seed, ctx.step)
        values["precise"] = evaluate(model, d.x_val, d.y_val, self.eval_batch_size)
        return {f"bn_gap/val_{metric}_{how}": v for how, result in values.items() for metric, v in result.items()}


def build(setup: ProbeSetup, cfg: BNGapConfig | None) -> BNGap | None:
    if cfg is None or not cfg.every or not running_stat_norms(setup.model):
        return None
    if not len(setup.data.x_val):
        raise ConfigError("probes.bn_gap.every", NEEDS_VALIDATION)
    t = setup.cfg.train
    return BNGap(cfg.every, int(cfg.batches), int(t.batch_size), int(t.eval_batch_size), int(setup.cfg.seed), setup.data)


def check(cfg) -> None:
    if cfg.probes.bn_gap.batches < 1:
        raise ConfigError("probes.bn_gap.batches", f"got {cfg.probes.bn_gap.batches}; allowed: a whole number >= 1")
    if cfg.probes.bn_gap.every and cfg.data.val_size == 0:
        raise ConfigError("probes.bn_gap.every", NEEDS_VALIDATION)


register("bn_gap", BNGapConfig, build, check)
