"""The figures of docs/results.md for the presets that compare BN with what the
field compares it with, each read from one sweep directory:

    python docs/figures/normfree_figures.py zoo RUNS_DIR OUT.png       # norm_zoo
    python docs/figures/normfree_figures.py resnet RUNS_DIR OUT.png    # normfree_resnet
    python docs/figures/normfree_figures.py dropout RUNS_DIR OUT.png   # dropout_bn
    python docs/figures/normfree_figures.py rank RUNS_DIR OUT.png      # rank_collapse

zoo: test error vs batch size per norm (Wu & He 2018, Fig. 1), mean ± std over seeds.
resnet: validation accuracy and training loss vs step per arm (mean, ± std band), and each
block's output at init: its channels' variance and squared mean (Brock et al. 2021a's
signal propagation plot), mean over seeds.
dropout: var_shift per BN layer at the end, and test accuracy, per dropout position,
with PreciseBN off and on (mean ± std).
rank: stable rank and mean cosine of each hidden layer's output at step 0 and
at the end (Daneshmand et al. 2020), BN vs none; the last layer's stable rank
and validation accuracy over training.

Each also prints the numbers it draws. Runs are read with bnexp.report/bnexp.runs,
so groups and seeds mean exactly what `bnexp report` means.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnexp.report import Group, Stat, group_curves, group_runs, seed_band  # noqa: E402
from bnexp.runs import find_runs  # noqa: E402


def stat(g: Group, tag: str, fn=lambda v: v) -> Stat:
    return Stat.of(fn(r.final(tag)) for r in g.completed if r.final(tag) is not None)


def zoo_label(key: dict) -> str:
    if key.get("norm.placement") == "none":
        return "none"
    return key["norm.kind"] + ("+ws" if key.get("norm.weight_std") is True else "")


def band(ax, g: Group, tag: str, label: str, color=None) -> None:
    steps, mean, std = seed_band(group_curves(g, [tag]).get(tag, []))
    line, = ax.plot(steps, mean, label=f"{label} (n={len(g.completed)})", color=color)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2, lw=0)


def finish(fig, axes, title: str, out: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def zoo(root: Path, out: Path) -> None:
    groups = group_runs(find_runs([root]), by=["norm.kind", "norm.weight_std", "norm.placement", "train.batch_size"])
    by_norm: dict[str, list[tuple[int, Stat]]] = {}
    for g in groups:
        by_norm.setdefault(zoo_label(g.key), []).append((g.key["train.batch_size"], stat(g, "test/acc", lambda v: 100 * (1 - v))))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({b for pts in by_norm.values() for b, _ in pts})
    for norm, points in by_norm.items():
        points.sort()
        print(norm, "  ".join(f"B={b}: {s.mean:.1f}±{s.std or 0:.1f} (n={s.n})" for b, s in points))
        style = "--" if norm in ("batch", "evonorm_b0", "none") else "-"  # batch statistics (or nothing) dashed
        ax.errorbar([b for b, _ in points], [s.mean for _, s in points], yerr=[s.std or 0 for _, s in points], marker="o", ls=style,
                    capsize=3, label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, labels=[str(b) for b in sizes])
    ax.set(xlabel="batch size (images per update)", ylabel="test error (%)", title="norm_zoo: Fashion-MNIST CNN, error vs batch (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def resnet_label(key: dict) -> str:
    if key.get("norm.placement") != "none":
        return "bn"
    for k, v, name in (("model.init", "fixup", "fixup"), ("model.skipinit", True, "skipinit"), ("optim.clip", "agc", "agc")):
        if key.get(k) == v:
            return name
    return "none"


def resnet(root: Path, out: Path) -> None:
    groups = group_runs(find_runs([root]))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4))
    for g in groups:
        label = resnet_label(g.key)
        acc, loss = stat(g, "test/acc"), stat(g, "train/loss")
        print(f"{label}: test/acc {acc.mean:.4f}±{acc.std or 0:.4f}  final train/loss {loss.mean:.3f}±{loss.std or 0:.3f}  "
              f"values {[round(v, 4) for v in acc.values]}")
        band(axes[0], g, "val/acc", label)
        band(axes[1], g, "train/loss", label)
        curves = group_curves(g)
        layers = [k for k in ("stem", "stage1.block0", "stage2.block0", "stage3.block0") if curves.get(f"signal/{k}/var")]
        for what, style in (("var", "-"), ("mean_sq", ":")):
            means = [sum(c[0][1] for c in curves[f"signal/{k}/{what}"]) / len(curves[f"signal/{k}/{what}"]) for k in layers]
            # The agc arm is the none network until its first clipped step: its markers sit on none's.
            axes[2].plot(range(len(layers)), means, style, marker="o" if label != "agc" else "x", color=axes[0].lines[-1].get_color(),
                         label=(label if label != "agc" else "agc (= none at init)") if what == "var" else None)
            print(f"{label} signal/*/{what} at step 0 by block: " + " ".join(f"{m:.3g}" for m in means))
    axes[0].set(title="validation accuracy", xlabel="step")
    axes[1].set(title="training loss (window mean)", xlabel="step", yscale="log")
    axes[2].set(title="each block's output at init: channel variance (solid), mean² (dotted)", xticks=range(len(layers)),
                xticklabels=layers, yscale="log", ylabel="averaged over channels", ylim=(1e-3, None))  # room for the legend
    finish(fig, axes, "normfree_resnet: ResNet-8 (half width), Fashion-MNIST, mean ± std over seeds", out)


def dropout(root: Path, out: Path) -> None:
    groups = group_runs(find_runs([root]), by=["model.dropout_position", "train.precise_bn"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels, width = [], 0.13
    for i, g in enumerate(groups):
        label = f"{g.key['model.dropout_position']}, PreciseBN {'on' if g.key['train.precise_bn'] else 'off'}"
        labels.append(label)
        shifts = [stat(g, f"var_shift/hidden{layer}.norm") for layer in range(3)]
        acc = stat(g, "test/acc")
        print(f"{label}: var_shift " + " ".join(f"{s.mean:.3f}±{s.std or 0:.3f}" for s in shifts) + f"  test/acc {acc.mean:.4f}±{acc.std or 0:.4f}")
        axes[0].bar([layer + (i - (len(groups) - 1) / 2) * width for layer in range(3)], [s.mean for s in shifts], width,
                    yerr=[s.std or 0 for s in shifts], capsize=2, label=label)
        axes[1].errorbar([i], [100 * acc.mean], yerr=[100 * (acc.std or 0)], marker="o", capsize=4)
    axes[0].axhline(1.0, color="k", lw=0.8)
    # (m2 - mu^2) / (m2 / (1 - p) - mu^2) for relu(z), z ~ N(0, 1): mu = 1/sqrt(2 pi), m2 = 1/2, p = 0.5
    relu_shift = (0.5 - 1 / (2 * math.pi)) / (0.5 / 0.5 - 1 / (2 * math.pi))
    axes[0].axhline(relu_shift, color="k", lw=0.8, ls=":")
    axes[0].set(xticks=range(3), xticklabels=[f"hidden{layer}.norm" for layer in range(3)], ylabel="eval-mode var / running var",
                title=f"var_shift at the end (1: no shift; dotted: {relu_shift:.3f}, ReLU outputs at p = 0.5)")
    axes[0].legend(fontsize="x-small")
    axes[1].set(xticks=range(len(labels)), ylabel="test accuracy (%)", title="test accuracy (mean ± std)")
    axes[1].set_xticklabels(labels, rotation=25, ha="right", fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("dropout_bn: 3x256 ReLU MLP, BN after each ReLU, dropout p = 0.5, Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def rank(root: Path, out: Path) -> None:
    groups = {g.key["norm.placement"]: g for g in group_runs(find_runs([root]), by=["norm.placement"])}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    colors = {"pre": "tab:orange", "none": "tab:blue"}
    for placement, g in groups.items():
        name = "BN" if placement == "pre" else "none"
        curves = group_curves(g)
        layers = sorted({int(t.split("/")[1][6:]) for t in curves if t.startswith("signal/hidden")})
        last = max(layers)
        for what, ax in (("stable_rank", axes[0]), ("cos", axes[1])):
            for when, style in (("first", "--"), ("last", "-")):
                means = []
                for layer in layers:
                    values = [c[0][1] if when == "first" else c[-1][1] for c in curves[f"signal/hidden{layer}/{what}"]]
                    means.append(sum(values) / len(values))
                step = curves[f"signal/hidden{last}/{what}"][0][0 if when == "first" else -1][0]
                ax.plot(layers, means, style, color=colors[placement], label=f"{name}, step {step}")
                print(f"{name} {what} at step {step} by layer: " + " ".join(f"{m:.2f}" for m in means))
        band(axes[2], g, f"signal/hidden{last}/stable_rank", name, colors[placement])
        band(axes[3], g, "val/acc", name, colors[placement])
    axes[0].set(title="stable rank of each layer's output", xlabel="hidden layer", yscale="log")
    axes[1].set(title="mean cosine of two examples' outputs", xlabel="hidden layer")
    axes[2].set(title="last hidden layer's stable rank", xlabel="step", yscale="log")
    axes[3].set(title="validation accuracy", xlabel="step")
    finish(fig, axes, "rank_collapse: 30-layer ReLU MLP (128 wide, Kaiming init), Fashion-MNIST, probe batch of 256 (mean over seeds)", out)


if __name__ == "__main__":
    FIGURES = {"zoo": zoo, "resnet": resnet, "dropout": dropout, "rank": rank}
    if len(sys.argv) != 4 or sys.argv[1] not in FIGURES:
        sys.exit(__doc__)
    FIGURES[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
