"""What does norm.running_var=biased cost next to torch.nn.BatchNorm?

Times one training forward + backward of a norm layer alone, in shapes bnexp
trains: the seed_keras layer ([10, 32]), a BN-paper MLP layer ([60, 100]) and
a CNN layer ([64, 32, 16, 16]). Contenders:

  torch      nn.BatchNorm1d/2d (running_var: unbiased batch variance)
  biased     bnexp.norms.BiasedBatchNorm1d/2d: the same fused kernel, running_var
             scaled by n/(n-1) before it and back after it (two tiny in-place ops)
  recompute  the alternative not taken: the kernel without running statistics,
             then torch.var_mean of the batch again and two lerp_ updates

Contenders run interleaved over rounds; the table gives the fastest round's
time per call (other load only ever adds time: the minimum is the closest to
the cost itself, as timeit's docs advise) and the median round's, with ratios
to torch. One thread by default (--threads), so other load disturbs less.

    python benchmarks/bench_norms.py
    python benchmarks/bench_norms.py --threads 2 --calls 5000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bnexp.norms import BiasedBatchNorm1d, BiasedBatchNorm2d  # noqa: E402


class RecomputedStats(nn.Module):
    """The biased running variance from a second pass over the batch."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        out = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], unbiased=False)
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var, bn.momentum)
        return out


# label -> (input shape, share of --calls: a CNN layer's call costs ~20x an MLP layer's)
SHAPES = {"seed_keras [10, 32]": ((10, 32), 1), "BN-paper MLP [60, 100]": ((60, 100), 1),
          "CNN [64, 32, 16, 16]": ((64, 32, 16, 16), 1 / 20)}


def contenders(shape: tuple[int, ...]) -> dict[str, nn.Module]:
    c = shape[1]
    torch_cls, biased_cls = (nn.BatchNorm1d, BiasedBatchNorm1d) if len(shape) == 2 else (nn.BatchNorm2d, BiasedBatchNorm2d)
    return {"torch": torch_cls(c), "biased": biased_cls(c), "recompute": RecomputedStats(torch_cls(c))}


def time_calls(norm: nn.Module, x: torch.Tensor, grad: torch.Tensor, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        norm(x).backward(grad)
    return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=400, help="forward + backward calls per contender and round (CNN: 1/20 of it)")
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); us per forward + backward, {args.rounds} rounds")
    print(f"{'shape':<24} {'round':<7} {'torch':>8} {'biased':>8} {'recompute':>10} {'biased/torch':>13} {'recompute/torch':>16}")
    for label, (shape, share) in SHAPES.items():
        calls = max(1, int(args.calls * share))
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        norms = contenders(shape)
        times: dict[str, list[float]] = {k: [] for k in norms}
        names = list(norms)
        for r in range(args.rounds + 1):  # round 0 warms up
            for k in names[r % 3:] + names[: r % 3]:
                t = time_calls(norms[k], x, grad, calls)
                if r:
                    times[k].append(t)
        for which, pick in (("fastest", min), ("median", statistics.median)):
            t = {k: pick(v) * 1e6 for k, v in times.items()}
            print(f"{label:<24} {which:<7} {t['torch']:>8.1f} {t['biased']:>8.1f} {t['recompute']:>10.1f} "
                  f"{t['biased'] / t['torch']:>13.3f} {t['recompute'] / t['torch']:>16.3f}")


if __name__ == "__main__":
    main()
