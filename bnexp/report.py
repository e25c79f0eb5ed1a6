"""Comparing runs: group them by the config keys that differ (except the seed),
aggregate each group over its seeds, compare each group with a baseline group,
and show the result as a table, CSV, JSON or Markdown, with learning curves
and seed bands as a plot.

Choices a reader should know:

- Metrics are aggregated over the group's ``completed`` runs; ``failed``,
  ``diverged``, ``interrupted`` and still-running runs count in the status
  column only (a diverged run's last finite value is no result).
- A group counts each (config, seed) once: a second run of the same config
  and seed (a ``bnexp reproduce`` copy, the same sweep found twice) is left
  out and named, so that n is the number of seeds.
- std is the sample standard deviation (ddof=1, what a paper's "mean ± std
  over seeds" means); the 95% confidence interval of a mean is Student's t
  over the seeds; a group of one run has neither.
- The baseline is the no-normalization group (``norm.placement=none``) where
  there is one, else the first group; ``--baseline KEY=VALUE`` chooses. Each
  group is compared with the baseline group that has its other keys: the
  steps-to-target speed-up, and for every metric the difference of the means
  with its 95% interval and the p-value of Welch's t-test (unequal variances:
  a BN and a no-BN group rarely spread alike).
- Groups keep the order of the sweep that made them (job number), not the
  alphabet: ``norm.placement=pre,post,none`` lists pre, post, none.
- Curves are averaged over the steps that every run of a group logged.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from bnexp.config import NON_RESULT_KEYS, is_non_result_key
from bnexp.io import atomic_write
from bnexp.runs import HEADLINE, Run, format_value, load_scalars, sweep_order

# Keys that never separate two runs' results: the seed is what a group averages
# over; the rest change no recorded number.
IGNORED_KEYS = {"seed", *NON_RESULT_KEYS}
DEFAULT_METRICS = HEADLINE
CURVE_TAGS = ("train/loss", "val/loss", "train/acc", "val/acc")
PERCENTILES = ("p15", "p50", "p85")
STEPS_TO_TARGET, STEPS_PER_SEC = "steps to target", "steps/s"
NEEDS_SEEDS = "needs >= 2 seeds"
NO_SPREAD = "no spread"  # every seed of both groups gave the same value: no t-test


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int
    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat":
        xs = tuple(v for v in values if v is not None)
        if not xs:
            return cls(None, None, 0)
        if len(set(xs)) == 1:  # exactly: a sum of equal floats need not divide back to them
            return cls(xs[0], 0.0 if len(xs) > 1 else None, len(xs), xs)
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        return cls(mean, std, len(xs), xs)

    @property
    def ci95(self) -> tuple[float, float] | None:
        """The 95% confidence interval of the mean (Student t, n - 1 degrees of freedom); None below 2 values."""
        if self.n < 2:
            return None
        if self.std == 0:
            return (self.mean, self.mean)
        with _scipy_stats() as stats:
            ci = stats.ttest_1samp(self.values, 0.0).confidence_interval(0.95)
        return (float(ci.low), float(ci.high))

    def text(self, digits: int = 4, of: int | None = None) -> str:
        if self.mean is None:
            return "-"
        s = number_text(self.mean, digits)
        if self.std is not None:
            s += f" ± {number_text(self.std, digits)}"
        if of is not None and self.n != of:
            s += f" ({self.n}/{of})"
        return s


@contextmanager
def _scipy_stats() -> Iterator[Any]:
    """scipy.stats (imported on first use: ~1 s), quiet about precision loss: it warns
    for a group whose seeds agree to within rounding (all at 100% accuracy, say),
    whose variance is then 0 to within rounding, which is what the test uses."""
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        yield stats


def number_text(x: float, digits: int = 4, sign: bool = False) -> str:
    return f"{x:{'+' if sign else ''}.{digits}f}" if abs(x) < 1e4 else f"{x:{'+' if sign else ''}.4g}"


@dataclass
class Difference:
    """A group's mean minus its baseline group's, with Welch's t-test."""

    diff: float | None
    ci95: tuple[float, float] | None = None
    p: float | None = None
    note: str | None = None  # why ci95 and p are missing: NEEDS_SEEDS or NO_SPREAD

    @classmethod
    def welch(cls, a: Stat, b: Stat) -> "Difference":
        if a.mean is None or b.mean is None:
            return cls(None)
        d = a.mean - b.mean
        if a.n < 2 or b.n < 2:
            return cls(d, note=NEEDS_SEEDS)
        if a.std == 0 and b.std == 0:
            return cls(d, (d, d), note=NO_SPREAD)
        with _scipy_stats() as stats:
            test = stats.ttest_ind(a.values, b.values, equal_var=False)
            ci = test.confidence_interval(0.95)
        return cls(d, (float(ci.low), float(ci.high)), float(test.pvalue))


@dataclass
class Group:
    key: dict[str, Any]  # the grouping keys' values
    runs: list[Run] = field(default_factory=list)
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (left out, the run of that config and seed counted)
    columns: dict[str, Stat] = field(default_factory=dict)
    reference: "Group | None" = None  # the baseline group this one is compared with
    differences: dict[str, Difference] = field(default_factory=dict)
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

    @property
    def is_baseline(self) -> bool:
        return self.reference is self


def group_label(key: dict[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in key.items()) or "all runs"


def differing_keys(runs: list[Run], ignore: set[str] = IGNORED_KEYS) -> list[str]:
    """Config keys whose value is not the same in every run (a missing key counts as a value)."""
    configs = [r.config for r in runs if r.config is not None]
    keys = sorted({k for c in configs for k in c})
    out = []
    for k in keys:
        if k in ignore or (ignore is IGNORED_KEYS and is_non_result_key(k)):  # probes.*: a node covers its keys
            continue
        if len({json.dumps(c.get(k, "<missing>"), sort_keys=True, default=str) for c in configs}) > 1:
            out.append(k)
    return out


def _identity(run: Run) -> str:
    """The run's config and seed: two runs with the same identity are one result twice."""
    return json.dumps({k: v for k, v in run.config.items() if k not in NON_RESULT_KEYS}, sort_keys=True, default=str)


def _preference(run: Run) -> tuple[bool, bool]:
    # Of runs of one config and seed, count a completed one, and the original over a reproduction.
    return (run.status != "completed", "reproduce_of" in (run.metrics or {}))


def group_runs(runs: list[Run], by: list[str] | None = None) -> list[Group]:
    """Groups of runs with equal values of ``by`` (default: every differing key
    but the seed), in sweep order; each (config, seed) counted once."""
    readable = sweep_order([r for r in runs if r.config is not None])
    keys = list(by) if by else differing_keys(readable)
    groups: dict[str, Group] = {}
    for r in readable:
        key = {k: r.config.get(k) for k in keys}
        groups.setdefault(json.dumps(key, sort_keys=True, default=str), Group(key=key)).runs.append(r)
    for g in groups.values():
        identities = [_identity(r) for r in g.runs]
        same: dict[str, list[Run]] = {}
        for r, identity in zip(g.runs, identities):
            same.setdefault(identity, []).append(r)
        kept = {identity: min(rs, key=_preference) for identity, rs in same.items()}  # min: the first of the preferred
        g.duplicates = [(r, kept[i]) for r, i in zip(g.runs, identities) if r is not kept[i]]
        g.runs = [r for r, i in zip(g.runs, identities) if r is kept[i]]
    return list(groups.values())


def duplicates_text(groups: list[Group]) -> str | None:
    """One line naming the runs left out as repeats of a config and seed already counted."""
    pairs = [pair for g in groups for pair in g.duplicates]
    if not pairs:
        return None
    shown = "; ".join(f"{r.path} (same as {kept.path})" for r, kept in pairs[:SHOWN_DUPLICATES])
    more = f"; and {len(pairs) - SHOWN_DUPLICATES} more (--format json lists every one)" if len(pairs) > SHOWN_DUPLICATES else ""
    return f"left out {len(pairs)} run{'s' * (len(pairs) > 1)} of a config and seed already counted: {shown}{more}"


SHOWN_DUPLICATES = 3  # a tree holding a sweep twice would otherwise print one line of thousands of characters


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


# --------------------------------------------------------------------------- the baseline


class BaselineError(ValueError):
    """--baseline names a key or value that no group has."""


@dataclass
class Baseline:
    keys: dict[str, str]  # KEY -> VALUE (as format_value writes it) that a baseline group has
    chosen: str  # how it was chosen, for the reader

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.keys.items())

    def text(self, groups: list[Group]) -> str:
        matched = any(set(g.key) - set(self.keys) for g in groups)
        return f"baseline {self.label} ({self.chosen}" + ("; each group against the one with its other keys" if matched else "") + ")"


def choose_baseline(groups: list[Group], given: list[str] | None = None) -> Baseline | None:
    """``--baseline KEY=VALUE`` (repeatable), else norm.placement=none where a
    group has it, else the first group; None with fewer than two groups."""
    if len(groups) < 2:
        return None
    keys = list(groups[0].key)
    if given:
        spec: dict[str, str] = {}
        for item in given:
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                raise BaselineError(f"--baseline {item}: expected KEY=VALUE with KEY one of the grouping keys: {', '.join(keys) or 'none'}")
            values = list(dict.fromkeys(format_value(g.key[key]) for g in groups))
            if value not in values:
                raise BaselineError(f"--baseline {item}: no group has {key}={value}; allowed: {', '.join(values)}")
            spec[key] = value
        return Baseline(spec, "--baseline")
    if "norm.placement" in keys and any(format_value(g.key["norm.placement"]) == "none" for g in groups):
        return Baseline({"norm.placement": "none"}, "no normalization; --baseline KEY=VALUE chooses another")
    return Baseline({k: format_value(v) for k, v in groups[0].key.items()}, "the first group; --baseline KEY=VALUE chooses another")


def _reference(g: Group, groups: list[Group], baseline: Baseline) -> Group | None:
    wanted = {k: format_value(v) for k, v in g.key.items()} | baseline.keys
    return next((h for h in groups if {k: format_value(v) for k, v in h.key.items()} == wanted), None)


def compared_columns(g: Group) -> list[str]:
    """The columns that get confidence intervals and differences: every result, not the timing."""
    return [c for c in g.columns if c != STEPS_PER_SEC]


def aggregate(groups: list[Group], metrics: Iterable[str] = DEFAULT_METRICS, baseline: Baseline | None = None,
              differences: bool = True) -> list[Group]:
    """Fill each group's columns (mean ± std over its completed runs) and, with a
    ``baseline``, its reference group, steps-to-target speed-up and (unless
    ``differences`` is off: the sweep's summary shows none, and needs no scipy)
    the differences from it."""
    metrics = list(metrics)
    for g in groups:
        done = g.completed
        for m in metrics:
            g.columns[m] = Stat.of(r.final(m) for r in done)
            if has_best(m):
                g.columns[f"best {m}"] = Stat.of(r.best(m) for r in done)
        g.columns[STEPS_TO_TARGET] = Stat.of(r.steps_to_target for r in done)
        g.columns[STEPS_PER_SEC] = Stat.of(r.steps_per_sec for r in done)
    if baseline is None:
        return groups
    for g in groups:
        ref = g.reference = _reference(g, groups, baseline)
        if ref is None:
            continue
        if ref is not g and differences:
            g.differences = {c: Difference.welch(g.columns[c], ref.columns[c]) for c in compared_columns(g)}
        ours, theirs = g.columns[STEPS_TO_TARGET].mean, ref.columns[STEPS_TO_TARGET].mean
        g.speedup = theirs / ours if ours and theirs else None
    return groups


def available_metrics(runs: list[Run]) -> list[str]:
    return sorted({t for r in runs for t in ((r.metrics or {}).get("final") or {}) if not t.startswith(("time/", "act/"))})


# --------------------------------------------------------------------------- output


def status_text(status: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(status.items(), key=lambda kv: -kv[1]))


def _digits(column: str) -> int:
    return {STEPS_TO_TARGET: 0, STEPS_PER_SEC: 1}.get(column, 4)


def _cells(g: Group, cols: list[str], show_speedup: bool, show_status: bool) -> list[str]:
    n = len(g.completed)
    cells = [g.label, str(len(g.runs))] + ([status_text(g.status)] if show_status else [])
    for c in cols:
        stat = g.columns[c]
        cells.append(stat.text(digits=_digits(c), of=n if c != STEPS_TO_TARGET else None))
        if c == STEPS_TO_TARGET and stat.n and stat.n != n:
            cells[-1] += f" ({stat.n}/{n} reached)"
    if show_speedup:
        cells.append(f"{g.speedup:.2f}x" if g.speedup else "-")
    return cells


def _layout(groups: list[Group], metrics: list[str], best: bool = True) -> tuple[list[str], bool]:
    cols = column_names(metrics, best)
    if any(g.columns[STEPS_TO_TARGET].n for g in groups):
        cols.append(STEPS_TO_TARGET)
    cols.append(STEPS_PER_SEC)
    return cols, any(g.speedup for g in groups)


def to_rows(groups: list[Group], metrics: list[str], compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and text cells. ``compact`` (the sweep's closing table) leaves out
    best-of-run columns, and the status column when every run completed."""
    cols, show_speedup = _layout(groups, metrics, best=not compact)
    show_status = not compact or any(set(g.status) != {"completed"} for g in groups)
    header = ["group", "n", *(["status"] if show_status else []), *cols] + (["speed-up"] if show_speedup else [])
    return header, [_cells(g, cols, show_speedup, show_status) for g in groups]


def _interval_text(ci: tuple[float, float] | None, digits: int, sign: bool = False) -> str:
    return NEEDS_SEEDS if ci is None else f"[{number_text(ci[0], digits, sign)}, {number_text(ci[1], digits, sign)}]"


def p_text(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def comparison_rows(groups: list[Group], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per (result column, group): n, mean, 95% CI; with a baseline, the
    difference from it with its 95% CI and Welch's p."""
    cols = [c for c in _layout(groups, metrics)[0] if c != STEPS_PER_SEC]
    compared = any(g.reference is not None for g in groups)
    header = ["metric", "group", "n", "mean", "95% CI"] + (["Δ vs baseline", "95% CI of Δ", "p (Welch)"] if compared else [])
    rows = []
    for c in cols:
        digits = _digits(c)
        for g in groups:
            stat = g.columns[c]
            row = [c, g.label, str(stat.n), "-" if stat.mean is None else number_text(stat.mean, digits),
                   "-" if stat.mean is None else _interval_text(stat.ci95, digits)]
            if compared:
                d = g.differences.get(c)
                if g.is_baseline:
                    row += ["baseline", "", ""]
                elif d is None or d.diff is None:
                    row += ["-", "", ""]
                else:
                    row += [number_text(d.diff, digits, sign=True), _interval_text(d.ci95, digits, sign=True),
                            d.note if d.note and d.p is None else p_text(d.p)]
            rows.append(row)
    return header, rows


def console():
    """Rich console for tables; when the output is not a terminal (a log file, CI,
    a pipe) tables keep their natural width instead of wrapping at 80 columns."""
    from rich.console import Console

    c = Console()
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(width=200)
    return c


def print_titled(out, heading: str, table) -> None:
    """``heading`` (a path, most often) whole on its own line, then ``table``: a Rich
    table title wraps at the table's width and breaks a long path in the middle."""
    out.print(heading, soft_wrap=True, highlight=False, style="bold")
    out.print(table)


def _rich_table(header: list[str], rows: list[list[str]], title: str | None = None, caption: str | None = None):
    from rich.table import Table

    table = Table(title=title, caption=caption, show_header=True, header_style="bold")
    for h in header:
        table.add_column(h, justify="left" if h in ("group", "status", "metric") else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def to_rich(groups: list[Group], metrics: list[str], title: str | None = None, compact: bool = False, baseline: Baseline | None = None):
    """The groups' table; its caption says what the speed-up compares with."""
    caption = f"speed-up: steps to target of the baseline over the group's; {baseline.text(groups)}" if baseline and any(g.speedup for g in groups) else None
    return _rich_table(*to_rows(groups, metrics, compact), title=title, caption=caption)


def comparison_title(groups: list[Group], baseline: Baseline | None) -> str:
    title = "95% confidence intervals over seeds (Student t)"
    if baseline is not None:
        title += f"; differences from the baseline with Welch's t-test: {baseline.text(groups)}"
    return title


def comparison_to_rich(groups: list[Group], metrics: list[str], baseline: Baseline | None):
    return _rich_table(*comparison_rows(groups, metrics), title=comparison_title(groups, baseline))


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    left = ("group", "status", "metric")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" if h in left else "---:" for h in header) + "|"]
    return lines + ["| " + " | ".join(map(esc, row)) + " |" for row in rows]


def to_markdown(groups: list[Group], metrics: list[str], baseline: Baseline | None = None) -> str:
    lines = _markdown_table(*to_rows(groups, metrics))
    if baseline is not None and any(g.speedup for g in groups):
        lines += ["", f"Speed-up: steps to target of the baseline over the group's; {baseline.text(groups)}."]
    lines += ["", f"{comparison_title(groups, baseline)}:", "", *_markdown_table(*comparison_rows(groups, metrics))]
    return "\n".join(lines)


def _interval_record(ci: tuple[float, float] | None) -> list[float] | str:
    return NEEDS_SEEDS if ci is None else [ci[0], ci[1]]


def _difference_record(g: Group, c: str) -> dict[str, Any] | None:
    d = g.differences.get(c)
    if d is None or d.diff is None:
        return None
    return {"diff": d.diff, "ci95": _interval_record(d.ci95), "p": d.p if d.p is not None else d.note}


def to_records(groups: list[Group], metrics: list[str]) -> list[dict[str, Any]]:
    """One plain dict per group: what JSON and CSV carry (numbers, not formatted text)."""
    cols, _ = _layout(groups, metrics)
    out = []
    for g in groups:
        rec: dict[str, Any] = {"group": g.label, "keys": g.key, "n": len(g.runs), "status": g.status}
        rec["metrics"] = {}
        for c in cols:
            stat = g.columns[c]
            rec["metrics"][c] = {"mean": stat.mean, "std": stat.std, "n": stat.n}
            if c != STEPS_PER_SEC:
                rec["metrics"][c]["ci95"] = _interval_record(stat.ci95) if stat.mean is not None else None
                rec["metrics"][c]["vs_baseline"] = _difference_record(g, c)
        rec["speedup"] = g.speedup
        rec["baseline"] = g.reference.label if g.reference is not None else None
        rec["runs"] = [str(r.path) for r in g.runs]
        rec["duplicates"] = [{"path": str(r.path), "same_as": str(kept.path)} for r, kept in g.duplicates]
        out.append(rec)
    return out


def to_json(groups: list[Group], metrics: list[str], unreadable: list[Run], baseline: Baseline | None = None) -> str:
    doc = {"groups": to_records(groups, metrics),
           "baseline": {"keys": baseline.keys, "chosen": baseline.chosen} if baseline else None,
           "unreadable": [{"path": str(r.path), "problem": r.problem} for r in unreadable]}
    return json.dumps(doc, indent=2, default=str)


def to_csv(groups: list[Group], metrics: list[str]) -> str:
    records = to_records(groups, metrics)
    keys = list(groups[0].key) if groups else []
    cols, _ = _layout(groups, metrics)
    compared = any(g.reference is not None for g in groups)
    header = ["group", *keys, "n", "status"]
    for c in cols:
        header += [f"{c} mean", f"{c} std", f"{c} n"]
        if c != STEPS_PER_SEC:
            header += [f"{c} ci95 low", f"{c} ci95 high"]
            if compared:
                header += [f"{c} diff", f"{c} diff ci95 low", f"{c} diff ci95 high", f"{c} p"]
    header += ["speedup", "baseline"]
    blank = lambda v: "" if v is None else v  # noqa: E731
    bounds = lambda ci: ["", ""] if ci is None else ([ci, ci] if isinstance(ci, str) else ci)  # noqa: E731
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for rec in records:
        row = [rec["group"], *(format_value(rec["keys"][k]) for k in keys), rec["n"], status_text(rec["status"])]
        for c in cols:
            m = rec["metrics"][c]
            row += [blank(m["mean"]), blank(m["std"]), m["n"]]
            if c != STEPS_PER_SEC:
                row += bounds(m["ci95"])
                if compared:
                    d = m["vs_baseline"] or {}
                    row += [blank(d.get("diff")), *bounds(d.get("ci95")), blank(d.get("p"))]
        row += [blank(rec["speedup"]), blank(rec["baseline"])]
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


class PlotError(ValueError):
    """--plot cannot write where it was asked to (exit 2, nothing written)."""


def plot_file(path: Path) -> Path:
    """The file ``--plot PATH`` writes: a name without an extension gets .png
    (what matplotlib itself would add)."""
    return path if path.suffix else path.with_name(path.name + ".png")


def check_plot_file(path: Path, overwrite: bool) -> Path:
    """The file to write, or PlotError before anything is drawn: an image format
    matplotlib does not know, or a file that exists and ``overwrite`` is off."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not path.name or str(path).endswith(os.sep) or (path.exists() and not path.is_file()):
        raise PlotError(f"{path}: not a file name (a directory, a device, or empty); allowed: an image file name, e.g. curves.png")
    path = plot_file(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise PlotError(f"{path}: '{path.suffix}' is no image format matplotlib writes; allowed: {', '.join(sorted(formats))}")
    if path.is_dir():
        raise PlotError(f"{path} is a directory; allowed: an image file name")
    if path.exists() and not overwrite:
        raise PlotError(f"{path} exists; choose another name, or --overwrite to replace it")
    return path


def _save(fig, path: Path, overwrite: bool) -> None:
    """Atomically: a viewer never shows half an image, and without ``overwrite``
    a file that appeared in the meantime is not replaced either."""
    write = lambda f: fig.savefig(f, format=path.suffix[1:].lower(), dpi=110)  # noqa: E731
    if overwrite:
        atomic_write(path, write, mode="wb")
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write(staging, write, mode="wb")
    try:
        os.link(staging, path)  # creates the name only where none exists: check and write in one step
    except FileExistsError:
        raise PlotError(f"{path} exists; choose another name, or --overwrite to replace it") from None
    except OSError:  # a file system without hard links (FAT, some network shares): check, then rename
        if path.exists():
            raise PlotError(f"{path} exists; choose another name, or --overwrite to replace it") from None
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def plot(groups: list[Group], path: Path, overwrite: bool = False, metrics: Iterable[str] = ()) -> Path:
    """Learning curves per group with ±std seed bands, and the 15/50/85th
    percentiles of each hidden layer's pre-activation (the BN paper's Fig. 1);
    plus a panel for each of ``metrics`` outside those (see :func:`probe_panels`).
    Returns the file written (see :func:`check_plot_file`)."""
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
    path = check_plot_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save(fig, path, overwrite)
    finally:
        plt.close(fig)
    return path
