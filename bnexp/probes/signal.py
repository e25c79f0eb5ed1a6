"""``signal/<layer>/{mean_sq,var,stable_rank,cos}``: how a signal propagates
through the network, on the fixed probe batch, per hidden layer (the output
of each hidden block; of the stem, each residual block and the final norm
in the image families): at step 0 (before the first update) and every
``probes.signal.every`` steps.

For a layer's output A ([N, C, ...], N examples):

- ``mean_sq``: the channels' squared mean, averaged over channels (Brock et al.
  2021a, "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", Sec. 3: signal propagation plots, "average channel
  squared mean");
- ``var``: the channels' variance (over examples and positions, biased),
  averaged over channels (their "average channel variance");
- ``stable_rank``: ||A||_F^2 / ||A||_2^2 of A as an N x D matrix (D = all of
  an example's values), a smooth lower bound of its rank: 1 when every example
  is a multiple of one vector, N for orthogonal examples of equal norm
  (Daneshmand et al. 2020, "Batch normalization provably avoids rank collapse");
- ``cos``: the mean cosine similarity of two different examples' rows of A
  (1 when the representations have collapsed to one direction).

The network runs as in training but without randomness: each batch-statistics
norm normalizes the probe batch with its own statistics (at step 0 a BN network
in eval mode would be the identity norm of its initial running statistics,
which is not the network Daneshmand et al. analyse), dropout and norm.noise are
off; the running statistics that forward moves are restored (``preserved()``).
Statistics in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnexp.norms import use_batch_statistics
from bnexp.probes.base import ProbeContext, ProbeSetup, forward_capture, register


@dataclass
class SignalConfig:
    every: int = 0  # steps; 0: off. One forward pass of the probe batch, and an N x N eigenproblem per layer.


def signal_stats(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean_sq, var, stable_rank and cos of one layer's output ``a`` [N, C, ...] (see the module).
    A layer whose outputs are all zero or not finite has no direction: its stable rank and cosine are NaN;
    an example whose output is all zero (a dead ReLU layer for it) has no cosine with the others and is left out."""
    a = a.detach().double()
    dims = [0, *range(2, a.dim())]
    var, mean = torch.var_mean(a, dims, unbiased=False)
    rows = a.flatten(1)
    peak = rows.abs().max()
    nan = torch.full((), float("nan"), dtype=torch.float64, device=a.device)
    out = {"mean_sq": mean.square().mean(), "var": var.mean(), "stable_rank": nan, "cos": nan}
    if not torch.isfinite(peak) or peak == 0:
        return out
    # LAPACK's eigensolver fails on a NaN (a diverging run: seen on a Fixup ResNet at lr 0.1), hence the
    # check above; both measures are scale-free, and scaled to a peak of 1 a Gram matrix of huge
    # (finite) outputs does not overflow to inf.
    rows = rows / peak
    gram = rows @ rows.T  # N x N: its trace is ||A||_F^2, its top eigenvalue ||A||_2^2
    out["stable_rank"] = gram.trace() / torch.linalg.eigvalsh(gram)[-1]
    norms = gram.diagonal().sqrt()
    live = norms > 0
    n = int(live.sum())
    if n >= 2:
        cos = gram[live][:, live] / (norms[live][:, None] * norms[live][None, :])
        out["cos"] = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
    return out


class Signal:
    read_only = False  # batch statistics move running statistics: run inside preserved()
    at_start = True  # also before the first update (bnexp.probes.base.ProbeSet.initial)

    def __init__(self, model: torch.nn.Module, every: int):
        self.every = every
        self.layers = model.representations()  # every bnexp family has this

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        use_batch_statistics(ctx.model)  # modes (and running statistics) come back through preserved()
        captured = forward_capture(ctx.model, self.layers, ctx.x, outputs=True)
        return {f"signal/{name}/{k}": v for name, a in captured.items() for k, v in signal_stats(a).items()}


def build(setup: ProbeSetup, cfg: SignalConfig | None) -> Signal | None:
    return Signal(setup.model, cfg.every) if cfg is not None and cfg.every else None


register("signal", SignalConfig, build)
