"""The two figures of docs/results.md that `bnexp report --plot` does not draw.

    python docs/figures/make_figures.py fig1 RUNS_DIR OUT.png    # bn_paper_mnist sweep
    python docs/figures/make_figures.py batch RUNS_DIR OUT.png   # batch_size_ablation sweep

fig1: Ioffe & Szegedy 2015, Figure 1: (a) validation accuracy vs steps with and
without BN (mean, ±std band over seeds); (b, c) the 15th/50th/85th percentiles
of one last-hidden-layer sigmoid input (act/hidden2/unit0/pNN, seed 0, like the
paper's single network) without and with BN. It also prints the steps each
group needs to reach the no-BN runs' final validation accuracy (the paper's
"same accuracy in N times fewer steps"), computed from the val/acc curves.

batch: Wu & He 2018, Figure 1: test error vs batch size per norm (mean ±std
over seeds, log2 x axis).

Runs are read with bnexp.report/bnexp.runs, so groups and seeds mean exactly
what `bnexp report` means.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnexp.report import Stat, group_curves, group_runs, seed_band  # noqa: E402
from bnexp.runs import find_runs, load_scalars  # noqa: E402

PCTS = ("p15", "p50", "p85")


def first_crossing(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v >= target), None)


def fig1(root: Path, out: Path) -> None:
    groups = {g.key["norm.placement"]: g for g in group_runs(find_runs([root]), by=["norm.placement"])}
    none, pre = groups["none"], groups["pre"]
    target = Stat.of(r.final("val/acc") for r in none.completed).mean
    print(f"target = mean final val/acc without BN = {target:.4f}")
    for name, g in (("without BN", none), ("with BN", pre)):
        steps = [first_crossing(c, target) for c in group_curves(g, ["val/acc"])["val/acc"]]
        print(f"{name}: steps to {target:.4f}: {steps}")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, g, color in (("without BN", none, "tab:blue"), ("with BN", pre, "tab:orange")):
        steps, mean, std = seed_band(group_curves(g, ["val/acc"])["val/acc"])
        axes[0].plot(steps, mean, color=color, label=f"{label} (n={len(g.completed)})")
        axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.25, lw=0)
    axes[0].set(title="(a) validation accuracy", xlabel="step", ylim=(0.9, 1.0))
    axes[0].legend()
    for ax, (label, g) in zip(axes[1:], (("(b) without BN", none), ("(c) with BN", pre))):
        run = min(g.completed, key=lambda r: r.config["seed"])
        curves = load_scalars(run.path, [f"act/hidden2/unit0/{p}" for p in PCTS])
        for p, style in zip(PCTS, ("--", "-", "--")):
            pts = curves[f"act/hidden2/unit0/{p}"]
            ax.plot([s for s, _ in pts], [v for _, v in pts], "k" + style, lw=1.2 if p == "p50" else 0.9, label=p)
        ax.set(title=f"{label}: hidden2 unit 0 input, seed {run.config['seed']}", xlabel="step")
        ax.legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def batch(root: Path, out: Path) -> None:
    groups = group_runs(find_runs([root]), by=["norm.kind", "train.batch_size"])
    by_norm: dict[str, list[tuple[int, Stat]]] = {}
    for g in groups:
        err = Stat.of(1 - r.final("test/acc") for r in g.completed)
        by_norm.setdefault(g.key["norm.kind"], []).append((g.key["train.batch_size"], err))
    fig, ax = plt.subplots(figsize=(6, 4))
    for norm, points in by_norm.items():
        points.sort()
        xs = [b for b, _ in points]
        ax.errorbar(xs, [100 * s.mean for _, s in points], yerr=[100 * (s.std or 0) for _, s in points], marker="o", capsize=3, label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({b for pts in by_norm.values() for b, _ in pts}), labels=[str(b) for b in sorted({b for pts in by_norm.values() for b, _ in pts})])
    ax.set(xlabel="batch size (images per update)", ylabel="test error (%)", title="Fashion-MNIST CNN: error vs batch size (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("fig1", "batch"):
        sys.exit(__doc__)
    {"fig1": fig1, "batch": batch}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
