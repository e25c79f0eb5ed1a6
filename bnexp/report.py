"""Comparing runs: group them by the config keys that differ (except the seed),
aggregate each group over its seeds, and show the result as a table, CSV,
JSON or Markdown, with learning curves and seed bands as a plot.

Choices a reader should know:

- Metrics are aggregated over the group's ``completed`` runs; ``failed``,
  ``diverged``, ``interrupted`` and still-running runs count in the status
  column only (a diverged run's last finite value is no result).
- std is the sample standard deviation (ddof=1, what a paper's "mean ± std
  over seeds" means); a group of one run has none.
- Curves are averaged over the steps that every run of a group logged.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bnexp.config import NON_RESULT_KEYS
from bnexp.runs import HEADLINE, Run, format_value, load_scalars

# Keys that never separate two runs' results: the seed is what a group averages
# over; the rest change no recorded number.
IGNORED_KEYS = {"seed", *NON_RESULT_KEYS}
DEFAULT_METRICS = HEADLINE
CURVE_TAGS = ("train/loss", "val/loss", "train/acc", "val/acc")
PERCENTILES = ("p15", "p50", "p85")


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat":
        xs = [v for v in values if v is not None]
        if not xs:
            return cls(None, None, 0)
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        return cls(mean, std, len(xs))

    def text(self, digits: int = 4, of: int | None = None) -> str:
        if self.mean is None:
            return "-"
        s = f"{self.mean:.{digits}f}" if abs(self.mean) < 1e4 else f"{self.mean:.4g}"
        if self.std is not None:
            s += f" ± {self.std:.{digits}f}" if abs(self.std) < 1e4 else f" ± {self.std:.4g}"
        if of is not None and self.n != of:
            s += f" ({self.n}/{of})"
        return s


@dataclass
class Group:
    key: dict[str, Any]  # the grouping keys' values
    runs: list[Run] = field(default_factory=list)
    columns: dict[str, Stat] = field(default_factory=dict)
    speedup: float | None = None

    @property
    def label(self) -> str:
        return group_label(self.key)

    @property
    def status(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.runs))

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]


def group_label(key: dict[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in key.items()) or "all runs"


def differing_keys(runs: list[Run], ignore: set[str] = IGNORED_KEYS) -> list[str]:
    """Config keys whose value is not the same in every run (a missing key counts as a value)."""
    configs = [r.config for r in runs if r.config is not None]
    keys = sorted({k for c in configs for k in c})
    out = []
    for k in keys:
        if k in ignore:
            continue
        if len({json.dumps(c.get(k, "<missing>"), sort_keys=True, default=str) for c in configs}) > 1:
            out.append(k)
    return out


def _sort_key(v: Any) -> tuple:
    if isinstance(v, bool) or v is None:
        return (1, str(v))
    if isinstance(v, (int, float)):
        return (0, v)
    return (1, format_value(v))


def group_runs(runs: list[Run], by: list[str] | None = None) -> list[Group]:
    """Groups of runs with equal values of ``by`` (default: every differing key but the seed)."""
    readable = [r for r in runs if r.config is not None]
    keys = list(by) if by else differing_keys(readable)
    groups: dict[str, Group] = {}
    for r in readable:
        key = {k: r.config.get(k) for k in keys}
        label = json.dumps(key, sort_keys=True, default=str)
        groups.setdefault(label, Group(key=key)).runs.append(r)
    return sorted(groups.values(), key=lambda g: tuple(_sort_key(v) for v in g.key.values()))


def has_best(metric: str) -> bool:
    # The best of an accuracy over the run's evaluations; test/* is evaluated
    # once, at the end, so its best is its final value.
    return metric.endswith("/acc") and not metric.startswith("test/")


def column_names(metrics: Iterable[str], best: bool = True) -> list[str]:
    cols = []
    for m in metrics:
        cols.append(m)
        if best and has_best(m):
            cols.append(f"best {m}")
    return cols


def aggregate(groups: list[Group], metrics: Iterable[str] = DEFAULT_METRICS) -> list[Group]:
    """Fill each group's columns (mean ± std over its completed runs) and steps-to-target speed-ups."""
    metrics = list(metrics)
    for g in groups:
        done = g.completed
        for m in metrics:
            g.columns[m] = Stat.of(r.final(m) for r in done)
            if has_best(m):
                g.columns[f"best {m}"] = Stat.of(r.best(m) for r in done)
        g.columns["steps to target"] = Stat.of(r.steps_to_target for r in done)
        g.columns["steps/s"] = Stat.of(r.steps_per_sec for r in done)
    # Speed-up: the slowest group's mean steps-to-target over this group's.
    reached = [g.columns["steps to target"].mean for g in groups if g.columns["steps to target"].mean]
    if len(reached) >= 2:
        slowest = max(reached)
        for g in groups:
            mean = g.columns["steps to target"].mean
            g.speedup = slowest / mean if mean else None
    return groups


def available_metrics(runs: list[Run]) -> list[str]:
    return sorted({t for r in runs for t in ((r.metrics or {}).get("final") or {}) if not t.startswith(("time/", "act/"))})


# --------------------------------------------------------------------------- output


def status_text(status: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(status.items(), key=lambda kv: -kv[1]))


def _cells(g: Group, cols: list[str], show_speedup: bool, show_status: bool) -> list[str]:
    n = len(g.completed)
    cells = [g.label, str(len(g.runs))] + ([status_text(g.status)] if show_status else [])
    for c in cols:
        stat = g.columns[c]
        cells.append(stat.text(digits=0 if c == "steps to target" else (1 if c == "steps/s" else 4), of=n if c != "steps to target" else None))
        if c == "steps to target" and stat.n and stat.n != n:
            cells[-1] += f" ({stat.n}/{n} reached)"
    if show_speedup:
        cells.append(f"{g.speedup:.2f}x" if g.speedup else "-")
    return cells


def _layout(groups: list[Group], metrics: list[str], best: bool = True) -> tuple[list[str], bool]:
    cols = column_names(metrics, best)
    if any(g.columns["steps to target"].n for g in groups):
        cols.append("steps to target")
    cols.append("steps/s")
    return cols, any(g.speedup for g in groups)


def to_rows(groups: list[Group], metrics: list[str], compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and text cells. ``compact`` (the sweep's closing table) leaves out
    best-of-run columns, and the status column when every run completed."""
    cols, show_speedup = _layout(groups, metrics, best=not compact)
    show_status = not compact or any(set(g.status) != {"completed"} for g in groups)
    header = ["group", "n", *(["status"] if show_status else []), *cols] + (["speed-up"] if show_speedup else [])
    return header, [_cells(g, cols, show_speedup, show_status) for g in groups]


def console():
    """Rich console for tables; when the output is not a terminal (a log file, CI,
    a pipe) tables keep their natural width instead of wrapping at 80 columns."""
    import os

    from rich.console import Console

    c = Console()
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(width=200)
    return c


def to_rich(groups: list[Group], metrics: list[str], title: str | None = None, compact: bool = False):
    from rich.table import Table

    header, rows = to_rows(groups, metrics, compact)
    table = Table(title=title, show_header=True, header_style="bold")
    for h in header:
        table.add_column(h, justify="left" if h in ("group", "status") else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def to_markdown(groups: list[Group], metrics: list[str]) -> str:
    header, rows = to_rows(groups, metrics)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" if h in ("group", "status") else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_records(groups: list[Group], metrics: list[str]) -> list[dict[str, Any]]:
    """One plain dict per group: what JSON and CSV carry (numbers, not formatted text)."""
    cols, _ = _layout(groups, metrics)
    out = []
    for g in groups:
        rec: dict[str, Any] = {"group": g.label, "keys": g.key, "n": len(g.runs), "status": g.status}
        rec["metrics"] = {c: {"mean": g.columns[c].mean, "std": g.columns[c].std, "n": g.columns[c].n} for c in cols}
        rec["speedup"] = g.speedup
        rec["runs"] = [str(r.path) for r in g.runs]
        out.append(rec)
    return out


def to_json(groups: list[Group], metrics: list[str], unreadable: list[Run]) -> str:
    doc = {"groups": to_records(groups, metrics), "unreadable": [{"path": str(r.path), "problem": r.problem} for r in unreadable]}
    return json.dumps(doc, indent=2, default=str)


def to_csv(groups: list[Group], metrics: list[str]) -> str:
    records = to_records(groups, metrics)
    keys = list(groups[0].key) if groups else []
    cols, _ = _layout(groups, metrics)
    header = ["group", *keys, "n", "status"]
    for c in cols:
        header += [f"{c} mean", f"{c} std", f"{c} n"]
    header.append("speedup")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for rec in records:
        row = [rec["group"], *(format_value(rec["keys"][k]) for k in keys), rec["n"], status_text(rec["status"])]
        for c in cols:
            m = rec["metrics"][c]
            row += ["" if m["mean"] is None else m["mean"], "" if m["std"] is None else m["std"], m["n"]]
        row.append("" if rec["speedup"] is None else rec["speedup"])
        w.writerow(row)
    return buf.getvalue()


# --------------------------------------------------------------------------- curves


def seed_band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Per step: mean and sample std over the curves, on the steps every curve has."""
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    maps = [dict(c) for c in curves]
    means, stds = [], []
    for s in steps:
        st = Stat.of(m[s] if math.isfinite(m[s]) else None for m in maps)
        means.append(st.mean if st.mean is not None else math.nan)
        stds.append(st.std or 0.0)
    return steps, means, stds


def group_curves(g: Group, tags: Iterable[str] | None = None) -> dict[str, list[list[tuple[int, float]]]]:
    """{tag: [curve of each completed run]} for the group."""
    out: dict[str, list[list[tuple[int, float]]]] = {}
    for r in g.completed:
        curves = load_scalars(r.path, tags)
        if not curves:
            print(f"{r.path}: no readable TensorBoard events; left out of the curves", file=sys.stderr)
        for tag, points in curves.items():
            out.setdefault(tag, []).append(points)
    return out


# Tags a plot already draws or that are no curves: never an extra panel.
_NOT_PROBES = ("train/", "val/", "test/", "optim/", "time/", "act/")


def probe_panels(metrics: Iterable[str]) -> list[tuple[str, str]]:
    """Extra plot panels for the probe metrics a user asked for: a tag ending in
    ``_min`` or ``_max`` (``landscape/loss_min``) stands for its band, min..max
    shaded (Santurkar et al. 2018, Fig. 4); any other probe tag is a curve with
    its seed band (``hessian/top_eig``, ``ics/hidden1.linear/l2``)."""
    panels: list[tuple[str, str]] = []
    for m in metrics:
        if m.startswith(_NOT_PROBES):
            continue
        base, _, end = m.rpartition("_")
        panel = ("band", base) if end in ("min", "max") and base else ("curve", m)
        if panel not in panels:
            panels.append(panel)
    return panels


def draw_band(ax, curves: dict[str, list[list[tuple[int, float]]]], base: str, color: str, label: str) -> None:
    """``base``_min .. ``base``_max shaded, each edge the mean over the group's seeds."""
    (lo_steps, lo, _), (hi_steps, hi, _) = seed_band(curves.get(f"{base}_min", [])), seed_band(curves.get(f"{base}_max", []))
    common = sorted(set(lo_steps) & set(hi_steps))
    if not common:
        return
    lo_at, hi_at = dict(zip(lo_steps, lo)), dict(zip(hi_steps, hi))
    ax.fill_between(common, [lo_at[s] for s in common], [hi_at[s] for s in common], color=color, alpha=0.35, lw=0,
                    label=f"{label} (n={len(curves[f'{base}_min'])})")
    for edge in (lo_at, hi_at):
        ax.plot(common, [edge[s] for s in common], color=color, lw=0.8)
    finite = [v for v in (*lo, *hi) if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 100 * min(finite):
        ax.set_yscale("log")  # a network without BN can span orders of magnitude along its gradient


def plot(groups: list[Group], path: Path, metrics: Iterable[str] = ()) -> Path:
    """Learning curves per group with ±std seed bands, and the 15/50/85th
    percentiles of each hidden layer's pre-activation (the BN paper's Fig. 1);
    plus a panel for each of ``metrics`` outside those (see :func:`probe_panels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {g.label: group_curves(g) for g in groups}
    curve_tags = [t for t in CURVE_TAGS if any(t in c for c in curves.values())]
    layers = sorted({t.split("/")[1] for c in curves.values() for t in c if t.startswith("act/") and t.count("/") == 2})
    panels = [("curve", t) for t in curve_tags] + [("act", layer) for layer in layers] + probe_panels(metrics)
    if not panels:
        raise ValueError("no event files with curves in these runs")
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, name) in zip(axes.flat, panels):
        for i, g in enumerate(groups):
            color = colors[i % len(colors)]
            c = curves[g.label]
            if kind == "band":
                draw_band(ax, c, name, color, g.label)
            elif kind == "curve":
                steps, mean, std = seed_band(c.get(name, []))
                if not steps:
                    continue
                ax.plot(steps, mean, color=color, label=f"{g.label} (n={len(c[name])})")
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.2, lw=0)
            else:
                bands = [seed_band(c.get(f"act/{name}/{p}", [])) for p in PERCENTILES]
                if not bands[1][0]:
                    continue
                ax.plot(bands[1][0], bands[1][1], color=color, label=g.label)
                for b in (bands[0], bands[2]):
                    ax.plot(b[0], b[1], color=color, lw=0.8, ls="--")
        ax.set_title({"curve": name, "band": f"{name}: min..max band"}.get(kind, f"act/{name}: p15, p50, p85 (mean over seeds)"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small", bbox_to_anchor=(0.5, 0))
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
