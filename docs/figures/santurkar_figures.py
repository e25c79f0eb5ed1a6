"""The figures of docs/results.md for Santurkar et al. 2018 ("How Does Batch
Normalization Help Optimization?"), in the style of its Figs. 3 and 4:

    python docs/figures/santurkar_figures.py RUNS_DIR OUT.png LAYER [LAYER ...]

Top row (Fig. 3): internal covariate shift of each LAYER (e.g. hidden1.linear):
||G - G'||_2 and cos(G, G'), mean over seeds with a ±std band, BN vs none.
Bottom row (Fig. 4 and sharpness): (a) the loss band L(theta - eta g) over the
eta grid (min..max shaded, each edge the mean over seeds), (b) the gradient
predictiveness band ||g - g'||, (c) effective beta-smoothness, (d) the
Hessian's top eigenvalue. Runs are read with bnexp.report / bnexp.runs, so
groups and seeds mean exactly what `bnexp report` means.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnexp.report import draw_band, group_curves, group_runs, seed_band  # noqa: E402
from bnexp.runs import find_runs  # noqa: E402

STYLE = {"pre": ("with BN", "tab:red"), "none": ("without BN", "tab:blue")}


def curve(ax, curves, tag: str, label: str, color: str) -> None:
    steps, mean, std = seed_band(curves.get(tag, []))
    if not steps:
        return
    ax.plot(steps, mean, color=color, label=label)
    finite = [m for m in mean if math.isfinite(m)]
    if finite and min(finite) > 0 and max(finite) > 100 * min(finite):
        ax.set_yscale("log")  # orders of magnitude (a deep net without BN): see unbanded()
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.2, lw=0)


def unbanded(ax) -> None:
    """A log-scale curve panel shows the seed means alone: a ±std band below zero has no place on it."""
    if ax.get_yscale() == "log":
        for band in list(ax.collections):
            band.remove()


def over_training(curves, tag: str, lo: str | None = None) -> str:
    """Mean over the logged steps (after step 0) of the seed-mean of ``tag`` (or of ``tag`` - ``lo``), ± the std over seeds of each run's mean."""
    runs = curves.get(tag, [])
    if lo is not None:
        runs = [[(s, v - dict(low)[s]) for s, v in hi if s in dict(low)] for hi, low in zip(runs, curves.get(lo, []))]
    per_run = [statistics.fmean(v for _, v in c if math.isfinite(v)) for c in runs if c]
    if not per_run:
        return "-"
    sd = f" ± {statistics.stdev(per_run):.3g}" if len(per_run) > 1 else ""
    return f"{statistics.fmean(per_run):.3g}{sd}"


def summary(groups, curves, layers: list[str]) -> str:
    """A markdown table of each probe averaged over training, per group (mean ± std over seeds)."""
    rows = [("loss band width (max - min)", "landscape/loss_max", "landscape/loss_min"), ("loss_max", "landscape/loss_max", None),
            ("grad_diff_max", "landscape/grad_diff_max", None), ("beta", "landscape/beta", None),
            ("grad_norm", "landscape/grad_norm", None), ("hessian top_eig", "hessian/top_eig", None)]
    rows += [(f"ICS {layer} {m}", f"ics/{layer}/{m}", None) for layer in layers for m in ("l2", "cos")]
    shown = [p for p in STYLE if p in curves]
    lines = ["| averaged over training | " + " | ".join(f"{STYLE[p][0]} (n={len(groups[p].completed)})" for p in shown) + " |",
             "|---|" + "---:|" * len(shown)]
    for name, tag, lo in rows:
        lines.append(f"| {name} | " + " | ".join(over_training(curves[p], tag, lo) for p in shown) + " |")
    return "\n".join(lines)


def main(root: Path, out: Path, layers: list[str]) -> None:
    groups = {g.key["norm.placement"]: g for g in group_runs(find_runs([root]), by=["norm.placement"])}
    curves = {p: group_curves(g) for p, g in groups.items()}
    print(summary(groups, curves, layers))
    ncols = max(4, 2 * len(layers))
    fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 6.4), squeeze=False)
    for p, (label, color) in STYLE.items():
        if p not in curves:
            continue
        c, n = curves[p], len(groups[p].completed)
        for i, layer in enumerate(layers):
            curve(axes[0, 2 * i], c, f"ics/{layer}/l2", f"{label} (n={n})", color)
            curve(axes[0, 2 * i + 1], c, f"ics/{layer}/cos", label, color)
        draw_band(axes[1, 0], c, "landscape/loss", color, label)
        draw_band(axes[1, 1], c, "landscape/grad_diff", color, label)
        curve(axes[1, 2], c, "landscape/beta", label, color)
        curve(axes[1, 3], c, "hessian/top_eig", label, color)
    for i, layer in enumerate(layers):
        axes[0, 2 * i].set_title(f"ICS {layer}: ||G - G'||_2")
        axes[0, 2 * i + 1].set_title(f"ICS {layer}: cos(G, G')")
    for ax, title in zip(axes[1], ("(a) loss landscape: L(theta - eta g)", "(b) gradient predictiveness: ||g - g'||",
                                   "(c) effective beta-smoothness", "(d) Hessian top eigenvalue")):
        ax.set_title(title)
    for ax in [*axes[0], axes[1, 2], axes[1, 3]]:
        unbanded(ax)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[1, 4:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
