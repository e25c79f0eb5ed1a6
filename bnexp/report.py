"""Comparing runs: group them by the config keys that differ (except the seed),
aggregate each group over its seeds, compare each group with a baseline group
and say in a word what the comparison shows, as tables (that fit the
terminal), CSV, JSON or Markdown, with learning curves and seed bands as a
plot.

Choices a reader should know:

- Metrics are aggregated over the group's ``completed`` runs; ``failed``,
  ``diverged``, ``interrupted`` and still-running runs count in the status
  column only (a diverged run's last finite value is no result).
- A group counts each (config, seed) once: a second run of the same config
  and seed (a ``bnexp reproduce`` copy, the same sweep found twice) is left
  out and named, so that n is the number of seeds.
- std is the sample standard deviation (ddof=1, what a paper's "mean ± std
  over seeds" means); the 95% interval of a group's mean is Student's t over
  its seeds (or a seeded percentile bootstrap, ``--ci bootstrap``; the
  interquartile mean, ``--aggregate iqm``, always bootstraps); a group of
  one run has none.
- The baseline is the no-normalization group (``norm.placement=none``) where
  there is one, else the first group; ``--baseline KEY=VALUE`` chooses. Each
  group is compared with the baseline group that has its other keys: the
  steps-to-target speed-up, and for every metric the difference with its 95%
  interval, Welch's two-sided p (unequal variances: a BN and a no-BN group
  rarely spread alike), that p adjusted over the comparisons of the metric
  (Holm by default), Hedges' g, and a verdict: "better" or "worse" (by the
  metric's direction: accuracy up, loss and steps down) where the adjusted p
  is below 0.05, else "not distinguishable at n = N" with the seeds per group
  that would detect the observed difference with 80% power.
- Groups keep the order of the sweep that made them (job number), not the
  alphabet: ``norm.placement=pre,post,none`` lists pre, post, none.
- Time per step is the median (and quartiles) of ``time/step_ms`` over the
  logging windows of the group's runs (evaluations excluded); a stack of
  replicas (``hydra/launcher=vectorized``) times one step of all of them.
- Curves are averaged over the steps that every run of a group logged.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from bnexp import stats
from bnexp.config import NON_RESULT_KEYS, is_non_result_key
from bnexp.io import atomic_write
from bnexp.runs import HEADLINE, Run, format_value, load_scalars, sweep_order
from bnexp.tables import Grid, markdown, rich_tables

# Keys that never separate two runs' results: the seed is what a group averages
# over; the rest change no recorded number.
IGNORED_KEYS = {"seed", *NON_RESULT_KEYS}
DEFAULT_METRICS = HEADLINE
CURVE_TAGS = ("train/loss", "val/loss", "train/acc", "val/acc")
PERCENTILES = ("p15", "p50", "p85")
STEPS_TO_TARGET, STEPS_PER_SEC = "steps to target", "steps/s"
STEP_MS = "time/step_ms"
NEEDS_SEEDS = "needs >= 2 seeds"
NO_SPREAD = "no spread"  # every seed of both groups gave the same value: no t-test


@dataclass(frozen=True)
class Options:
    """How groups are summarized and compared: ``bnexp report --aggregate, --ci, --correct``."""

    aggregate: str = "mean"  # mean | iqm
    ci: str = "t"  # t | bootstrap
    correct: str = "holm"  # holm | bonferroni | none
    power: float = stats.POWER
    alpha: float = stats.ALPHA

    @property
    def interval(self) -> str:
        return "bootstrap" if self.ci == "bootstrap" or self.aggregate == "iqm" else "t"

    @property
    def centre(self) -> str:
        return "IQM" if self.aggregate == "iqm" else "mean"

    def describe(self) -> str:
        """What the intervals and p-values are, for a table's title."""
        ci = ("95% intervals: Student t" if self.interval == "t"
              else f"95% intervals: percentile bootstrap, seeded (unreliable below n = {stats.BOOTSTRAP_RELIABLE_N})")
        test = "Welch's t-test" if self.aggregate == "mean" else "a permutation test of the IQM"
        return f"{ci}; p: {test}"


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int
    values: tuple[float, ...] = ()
    centre: float | None = None  # the mean, or the IQM (Options.aggregate)
    ci95: tuple[float, float] | None = None  # the centre's 95% interval, where aggregate() computed one

    @classmethod
    def of(cls, values: Iterable[float | None], aggregate: str = "mean") -> "Stat":
        xs = tuple(v for v in values if v is not None)
        if not xs:
            return cls(None, None, 0)
        if len(set(xs)) == 1:  # exactly: a sum of equal floats need not divide back to them
            return cls(xs[0], 0.0 if len(xs) > 1 else None, len(xs), xs, xs[0])
        mean, std = stats.mean(xs), stats.sd(xs)
        return cls(mean, std, len(xs), xs, stats.iqm(xs) if aggregate == "iqm" else mean)

    def interval(self, options: "Options") -> tuple[float, float] | None:
        """The 95% interval of the centre; None below 2 values."""
        if self.n < 2:
            return None
        if self.std == 0:
            return (self.centre, self.centre)
        return stats.interval(self.values, options.interval, options.aggregate)

    def text(self, digits: int = 4, of: int | None = None) -> str:
        if self.mean is None:
            return "-"
        s = number_text(self.centre, digits)
        if self.std is not None:
            s += f" ± {number_text(self.std, digits)}"
        if of is not None and self.n != of:
            s += f" ({self.n}/{of})"
        return s


def number_text(x: float, digits: int = 4, sign: bool = False) -> str:
    return f"{x:{'+' if sign else ''}.{digits}f}" if abs(x) < 1e4 else f"{x:{'+' if sign else ''}.4g}"


@dataclass
class Difference:
    """A group's centre minus its baseline group's: the test, the adjusted p
    over the metric's comparisons, the effect size and the verdict."""

    diff: float | None
    ci95: tuple[float, float] | None = None
    p: float | None = None
    note: str | None = None  # why ci95 and p are missing: NEEDS_SEEDS or NO_SPREAD
    test: str | None = None  # welch | permutation
    hedges_g: float | None = None
    p_adjusted: float | None = None
    correction: str | None = None
    verdict: str | None = None
    seeds_needed: float | None = None  # seeds per group for the power asked; math.inf beyond stats.MAX_SEEDS

    @classmethod
    def of(cls, a: Stat, b: Stat, options: Options) -> "Difference":
        if a.mean is None or b.mean is None:
            return cls(None)
        d = a.centre - b.centre
        if a.n < 2 or b.n < 2:
            return cls(d, note=NEEDS_SEEDS)
        if a.std == 0 and b.std == 0:
            return cls(d, (d, d), note=NO_SPREAD)
        c = stats.compare(a.values, b.values, options.interval, options.aggregate)
        return cls(c.diff, c.ci95, c.p, test=c.test, hedges_g=stats.hedges_g(a.values, b.values))


@dataclass
class Timing:
    """Milliseconds per training step over a group's runs: the median and quartiles
    of every logging window's ``time/step_ms`` (a window's clock pauses for
    evaluations and probes), or of each run's wall time over its steps where its
    events hold none. ``stacked``: replicas per stack, for groups trained as stacks."""

    median: float | None = None
    q25: float | None = None
    q75: float | None = None
    stacked: int | None = None
    stacked_runs: int = 0

    @classmethod
    def of(cls, runs: list[Run]) -> "Timing":
        windows: list[float] = []
        for r in runs:
            own = [v for _, v in scalars(r.path).get(STEP_MS, []) if math.isfinite(v)]
            if not own:
                t, steps = (r.metrics or {}).get("time") or {}, (r.metrics or {}).get("steps")
                own = [1000 * t["wall_sec"] / steps] if t.get("wall_sec") and steps else []
            windows += own
        replicas = [((r.metrics or {}).get("replica") or {}).get("of") for r in runs]
        sizes = [int(of) for of in replicas if isinstance(of, int) and of > 1]
        out = cls(stacked=max(sizes) if sizes else None, stacked_runs=len(sizes))
        if windows:
            out.median = statistics.median(windows)
            q = statistics.quantiles(windows, n=4, method="inclusive") if len(windows) > 1 else [windows[0]] * 3
            out.q25, out.q75 = q[0], q[2]
        return out

    def text(self) -> str:
        if self.median is None:
            return "-"
        return f"{ms_text(self.median)} ({ms_text(self.q25)}-{ms_text(self.q75)})"

    def stack_text(self, n: int) -> str:
        if not self.stacked:
            return "-"
        return f"×{self.stacked}" + (f" ({self.stacked_runs}/{n})" if self.stacked_runs != n else "")


def ms_text(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:#.3g}"


@dataclass
class Group:
    key: dict[str, Any]  # the grouping keys' values
    runs: list[Run] = field(default_factory=list)
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (left out, the run of that config and seed counted)
    columns: dict[str, Stat] = field(default_factory=dict)
    reference: "Group | None" = None  # the baseline group this one is compared with
    differences: dict[str, Difference] = field(default_factory=dict)
    speedup: float | None = None
    timing: Timing = field(default_factory=Timing)

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


def _compare_arms(groups: list[Group]) -> None:
    """Arms: groups that match the baseline's keys but differ from it in others
    (``model.init=fixup`` and ``optim.clip=agc`` with ``norm.placement=none``),
    which no group is compared with. Where every other comparison is with one
    baseline group, each arm is compared with that group too: each alternative
    against the same "no normalization". Where there are several, arms stay as
    they are (which one would be meant is not for bnexp to guess)."""
    used = {id(g.reference): g.reference for g in groups if g.reference is not None and g.reference is not g}
    if len(used) != 1:
        return
    (only,) = used.values()
    for g in groups:
        if g.reference is g and g is not only:
            g.reference = only


def compared_columns(g: Group) -> list[str]:
    """The columns that get confidence intervals and differences: every result, not the timing."""
    return [c for c in g.columns if c != STEPS_PER_SEC]


def aggregate(groups: list[Group], metrics: Iterable[str] = DEFAULT_METRICS, baseline: Baseline | None = None,
              options: Options = Options()) -> list[Group]:
    """Fill each group's columns (centre ± std over its completed runs, with 95%
    intervals), its time per step and, with a ``baseline``, its reference group,
    steps-to-target speed-up and its differences from it, judged (:func:`judge`)."""
    metrics = list(metrics)
    for g in groups:
        done = g.completed
        for m in metrics:
            g.columns[m] = Stat.of((r.final(m) for r in done), options.aggregate)
            if has_best(m):
                g.columns[f"best {m}"] = Stat.of((r.best(m) for r in done), options.aggregate)
        g.columns[STEPS_TO_TARGET] = Stat.of((r.steps_to_target for r in done), options.aggregate)
        g.columns[STEPS_PER_SEC] = Stat.of(r.steps_per_sec for r in done)
        for c in compared_columns(g):
            g.columns[c].ci95 = g.columns[c].interval(options)
        g.timing = Timing.of(done)
    if baseline is None:
        return groups
    for g in groups:
        g.reference = _reference(g, groups, baseline)
    _compare_arms(groups)
    for g in groups:
        ref = g.reference
        if ref is None:
            continue
        if ref is not g:
            g.differences = {c: Difference.of(g.columns[c], ref.columns[c], options) for c in compared_columns(g)}
        ours, theirs = g.columns[STEPS_TO_TARGET].mean, ref.columns[STEPS_TO_TARGET].mean
        g.speedup = theirs / ours if ours and theirs else None
    judge(groups, options)
    return groups


def direction(column: str) -> int:
    """+1 where higher is better (accuracy), -1 where lower is (loss, steps to target), 0 where neither is known."""
    name = column.removeprefix("best ")
    if column == STEPS_TO_TARGET or name.endswith("/loss"):
        return -1
    return 1 if name.endswith("/acc") else 0


def _word(diff: float, sign: int) -> str:
    if sign == 0:
        return "higher" if diff > 0 else "lower"
    return "better" if diff * sign > 0 else "worse"


def judge(groups: list[Group], options: Options) -> None:
    """Per column, over the groups' comparisons that have a p-value: the adjusted
    p-values (``options.correct``), then each comparison's verdict, and for each
    "not distinguishable" one the seeds per group that would detect its
    difference (``options.power`` at ``options.alpha``, from the two groups'
    pooled std)."""
    columns = list(dict.fromkeys(c for g in groups for c in g.differences))
    for c in columns:
        family = [(g, g.differences[c]) for g in groups if c in g.differences and g.differences[c].p is not None]
        for (g, d), adjusted in zip(family, stats.adjust([d.p for _, d in family], options.correct)):
            d.p_adjusted, d.correction = adjusted, options.correct
        for g in groups:
            d = g.differences.get(c)
            if d is None or d.diff is None:
                continue
            a, b = g.columns[c], g.reference.columns[c]
            sign = direction(c)
            if d.note == NEEDS_SEEDS:
                d.verdict = NEEDS_SEEDS
            elif d.note == NO_SPREAD:
                d.verdict = "equal in every seed" if d.diff == 0 else f"{_word(d.diff, sign)} (no spread)"
            elif d.p_adjusted < options.alpha:
                d.verdict = _word(d.diff, sign)
            else:
                d.verdict = f"not distinguishable at n = {a.n}" + (f" and {b.n}" if a.n != b.n else "")
                # For the t-test on means, also under --aggregate iqm (the power of a permutation test has no formula).
                d.seeds_needed = stats.seeds_needed(a.mean - b.mean, stats.pooled_sd(a.values, b.values), options.power, options.alpha)


def available_metrics(runs: list[Run]) -> list[str]:
    return sorted({t for r in runs for t in ((r.metrics or {}).get("final") or {}) if not t.startswith(("time/", "act/"))})


def target_of(runs: Iterable[Run]) -> tuple[str, float] | None:
    """The metric and value that steps-to-target counts to, where every run has the same."""
    targets = {r.config.get("train.target_acc") for r in runs if r.config is not None}
    targets.discard(None)
    return ("val/acc", float(targets.pop())) if len(targets) == 1 else None


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """Groups aggregated and compared, and what the outputs need to say about them."""

    groups: list[Group]
    metrics: list[str]
    baseline: Baseline | None = None
    options: Options = Options()
    unreadable: list[Run] = field(default_factory=list)

    @classmethod
    def build(cls, groups: list[Group], metrics: Iterable[str], baseline: Baseline | None = None,
              options: Options = Options(), unreadable: list[Run] | None = None) -> "Report":
        metrics = list(metrics)
        return cls(aggregate(groups, metrics, baseline, options), metrics, baseline, options, unreadable or [])

    @property
    def keys(self) -> list[str]:
        return list(self.groups[0].key) if self.groups else []

    @cached_property
    def target(self) -> tuple[str, float] | None:
        return target_of(r for g in self.groups for r in g.runs)

    def column_title(self, column: str) -> str:
        if column == STEPS_TO_TARGET and self.target:
            return f"steps to {self.target[0]} ≥ {self.target[1]:g}"
        return column

    def columns(self, best: bool = True) -> list[str]:
        """The result columns shown: each metric (and its best), steps to target where a run reached it."""
        cols = column_names(self.metrics, best)
        if any(g.columns[STEPS_TO_TARGET].n for g in self.groups):
            cols.append(STEPS_TO_TARGET)
        return cols

    @property
    def compared(self) -> bool:
        return any(g.reference is not None for g in self.groups)

    def comparisons(self, column: str) -> int:
        return sum(1 for g in self.groups if (d := g.differences.get(column)) is not None and d.p is not None)

    @cached_property
    def factorials(self) -> dict[str, stats.Factorial]:
        """Per metric, the main effects and interactions where the groups form a
        full grid of two or more keys (each with two or more values)."""
        keys = self.keys
        levels = {k: list(dict.fromkeys(format_value(g.key[k]) for g in self.groups)) for k in keys}
        if len(keys) < 2 or any(len(v) < 2 for v in levels.values()) or len(self.groups) != math.prod(map(len, levels.values())):
            return {}
        out = {}
        for m in self.metrics:
            cells = {tuple(format_value(g.key[k]) for k in keys): g.columns[m].values for g in self.groups}
            if all(cells.values()) and (f := stats.factorial(cells, keys)) is not None:
                out[m] = f
        return out


# --------------------------------------------------------------------------- tables


def status_text(status: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(status.items(), key=lambda kv: -kv[1]))


def _digits(column: str) -> int:
    return {STEPS_TO_TARGET: 0, STEPS_PER_SEC: 1}.get(column, 4)


def short_keys(keys: list[str]) -> list[str]:
    """Each key's shortest dotted ending that no other key shares: norm.placement ->
    placement, but optim.momentum and norm.momentum stay whole."""
    out = []
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts) - 1, -1, -1):
            end = ".".join(parts[i:])
            if sum(other == end or other.endswith("." + end) for other in keys) == 1:
                out.append(end)
                break
        else:
            out.append(k)
    return out


def _key_cells(report: Report, g: Group) -> list[str]:
    return [format_value(g.key[k]) for k in report.keys] or [g.label]


def _key_header(report: Report) -> list[str]:
    return short_keys(report.keys) or ["group"]


def by_text(report: Report) -> str:
    return f" by {', '.join(report.keys)}" if report.keys else ""


def groups_grid(report: Report, compact: bool = False, title: str | None = None) -> Grid:
    """One row per group: n, status, each result's centre ± std, steps to target,
    time per step, stacks, speed-up. ``compact`` (the sweep's closing table) leaves
    out best-of-run columns, and the status column when every run completed."""
    groups = report.groups
    cols = report.columns(best=not compact)
    show_status = not compact or any(set(g.status) != {"completed"} for g in groups)
    show_speedup = any(g.speedup for g in groups)
    show_stack = any(g.timing.stacked for g in groups)
    header = [*_key_header(report), "n", *(["status"] if show_status else []), *map(report.column_title, cols),
              "ms/step (median, IQR)", *(["stacked"] if show_stack else []), *(["speed-up"] if show_speedup else [])]
    rows = []
    for g in groups:
        n = len(g.completed)
        row = [*_key_cells(report, g), str(len(g.runs)), *([status_text(g.status)] if show_status else [])]
        for c in cols:
            stat = g.columns[c]
            cell = stat.text(digits=_digits(c), of=n if c != STEPS_TO_TARGET else None)
            if c == STEPS_TO_TARGET and stat.n and stat.n != n:
                cell += f" ({stat.n}/{n} reached)"
            row.append(cell)
        row.append(g.timing.text())
        if show_stack:
            row.append(g.timing.stack_text(n))
        if show_speedup:
            row.append(f"{g.speedup:.2f}x" if g.speedup else "-")
        rows.append(row)
    notes = []
    if show_speedup and report.baseline:
        notes.append(f"speed-up: steps to target of the baseline over the group's; {report.baseline.text(groups)}")
    notes.append("ms/step: median (interquartile range) over the logging windows of the group's runs"
                 + ("; a stack (×R) times one step of all R replicas at once: compare groups trained alike" if show_stack else ""))
    return Grid(header, rows, keys=max(1, len(report.keys)), title=title, caption="\n".join(notes))


def _interval_text(ci: tuple[float, float] | None, digits: int, sign: bool = False) -> str:
    return NEEDS_SEEDS if ci is None else f"[{number_text(ci[0], digits, sign)}, {number_text(ci[1], digits, sign)}]"


def p_text(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def g_text(g: float | None) -> str:
    return "-" if g is None else f"{g:+.2f}"


def seeds_text(n: float | None) -> str:
    if n is None:
        return "-"
    return f"> {stats.MAX_SEEDS}" if math.isinf(n) else str(int(n))


def metric_cell(report: Report, column: str) -> str:
    # The arrow first: a name that wraps at its spaces never leaves the arrow alone on a line.
    arrow = {1: "↑ ", -1: "↓ "}.get(direction(column), "")
    return arrow + report.column_title(column)


def _sections(report: Report, columns: list[str], cells) -> tuple[list[list[str]], set[int]]:
    """Rows of ``cells(column, group)`` (None: no row) for each column, the column's name
    in the first row of its section only; and the sections' last rows."""
    rows, sections = [], set()
    for c in columns:
        first = True
        for g in report.groups:
            row = cells(c, g)
            if row is None:
                continue
            rows.append([metric_cell(report, c) if first else "", *_key_cells(report, g), *row])
            first = False
        if rows:
            sections.add(len(rows) - 1)
    return rows, sections


def intervals_grid(report: Report) -> Grid:
    """Per result column, one row per group: n, the centre and its 95% interval."""
    def cells(c: str, g: Group) -> list[str]:
        stat, digits = g.columns[c], _digits(c)
        if stat.mean is None:
            return [str(stat.n), "-", "-"]
        return [str(stat.n), number_text(stat.centre, digits), _interval_text(stat.ci95, digits)]

    rows, sections = _sections(report, report.columns(), cells)
    title = f"95% intervals of the {report.options.centre} over seeds" + (
        f" ({report.options.describe().split('; ')[0].split(': ', 1)[1]})")
    return Grid(["metric", *_key_header(report), "n", report.options.centre, "95% CI"], rows,
                keys=1 + max(1, len(report.keys)), title=title, sections=sections, wrap={0})


def verdict_grid(report: Report, compact: bool = False) -> Grid:
    """Per result column, one row per group against its baseline group: the
    difference with its 95% interval, the verdict, the seeds that would settle a
    "not distinguishable", p, the adjusted p and Hedges' g. ``compact`` (the
    sweep's closing output) leaves out best-of-run columns."""
    o = report.options
    corrected = {"holm": "p (Holm)", "bonferroni": "p (Bonferroni)"}.get(o.correct)
    test = "p (Welch)" if o.aggregate == "mean" else "p (perm.)"
    header = ["metric", *_key_header(report), "Δ vs baseline", "95% CI of Δ", "verdict", "seeds needed", test,
              *([corrected] if corrected else []), "g"]

    def cells(c: str, g: Group) -> list[str] | None:
        d = g.differences.get(c)
        return None if d is None or d.diff is None else _difference_cells(d, _digits(c), bool(corrected))

    rows, sections = _sections(report, report.columns(best=not compact), cells)
    title = f"verdict: each group against the {report.baseline.text(report.groups)}" if report.baseline else "verdict"
    family = {"holm": "Holm", "bonferroni": "Bonferroni"}.get(o.correct)
    caption = "; ".join([
        o.describe(),
        f"{corrected}: adjusted ({family}) over each metric's comparisons" if corrected else "p not adjusted for the number of comparisons",
        "g: Hedges' g", "↑ higher is better, ↓ lower is better",
        f"seeds needed: per group, to detect the observed Δ with {o.power:.0%} power at alpha {o.alpha:g} "
        "(two-sample t-test, pooled std; bnexp seeds PATH --effect D for a difference of your choosing)"])
    # The metric's name may wrap at its spaces ("steps to val/acc ≥ 0.6"): the numbers stay whole.
    return Grid(header, rows, keys=1 + max(1, len(report.keys)), title=title, caption=caption, sections=sections, wrap={0})


def _difference_cells(d: Difference, digits: int, corrected: bool) -> list[str]:
    p = d.note if d.note and d.p is None else p_text(d.p)
    return [number_text(d.diff, digits, sign=True), _interval_text(d.ci95, digits, sign=True), d.verdict or "-",
            seeds_text(d.seeds_needed), p, *([p_text(d.p_adjusted)] if corrected else []), g_text(d.hedges_g)]


def factorial_grids(report: Report) -> list[Grid]:
    """Per metric of a full grid: each key's marginal means with 95% intervals, and
    the F tests of the main effects and of each two-way interaction."""
    out = []
    for m, f in report.factorials.items():
        digits = _digits(m)
        rows, sections = [], set()
        for key in f.keys:
            for i, lv in enumerate(f.levels[key]):
                rows.append([key if i == 0 else "", str(lv.value), str(lv.n), number_text(lv.mean, digits), _interval_text(lv.ci95, digits)])
            sections.add(len(rows) - 1)
        title = (f"main effects on {m}: marginal means (the mean of the group means at each value), 95% intervals from "
                 f"the pooled within-group spread (df = {f.df_error})")
        out.append(Grid(["key", "value", "n", "mean", "95% CI"], rows, keys=2, title=title, sections=sections))
        tests = [[" × ".join(t.keys), f"{t.f:.3g}" if t.f < 1000 else f"{t.f:.0f}", f"{t.df1}, {t.df2}", p_text(t.p)]
                 for t in (*f.main, *f.interactions)]
        out.append(Grid(["effect", "F", "df", "p"], tests, keys=1,
                        title=f"{m}: F tests (nested least-squares fits; error: the within-group spread)"))
    return out


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


def print_grid(out, grid: Grid) -> None:
    """``grid`` as Rich tables that fit ``out``'s width, its title above them and its
    caption below, each wrapped at the console's width (a table's own title would
    wrap at the table's)."""
    if grid.title:
        out.print(grid.title, style="bold", highlight=False)
    for table in rich_tables(grid, out.width):
        out.print(table)
    if grid.caption:
        out.print(grid.caption, style="dim", highlight=False)


def print_report(out, report: Report, compact: bool = False, groups_title: str | None = None) -> None:
    """The groups' table, the verdicts and, for a factorial grid, its main effects."""
    print_grid(out, groups_grid(report, compact, groups_title))
    if not compact:
        print_grid(out, intervals_grid(report))
    verdicts = verdict_grid(report, compact)
    if verdicts.rows:  # none where no group and its baseline both have a completed run
        print_grid(out, verdicts)
    if not compact:
        for grid in factorial_grids(report):
            print_grid(out, grid)


def seed_counts(report: Report, column: str, effect: float | None = None) -> list[dict[str, Any]]:
    """Per group against its baseline group (``bnexp seeds``): the pooled std of the
    two, the difference to detect (``effect``, else the observed one), the power the
    seeds run so far give (at the smaller group's n) and the seeds per group that
    would give ``report.options.power``. Without a baseline (one group): a comparison
    of two groups that each spread like it."""
    o, out = report.options, []
    pairs = [(g, g.reference) for g in report.groups if g.reference is not None and g.reference is not g]
    if report.baseline is None:
        pairs = [(g, g) for g in report.groups]
    for g, ref in pairs:
        a, b = g.columns[column], ref.columns[column]
        row: dict[str, Any] = {"group": g.label, "baseline": ref.label if ref is not g else None, "n": a.n, "n_baseline": b.n,
                               "pooled_std": None, "effect": effect, "power_now": None, "seeds_needed": None, "note": None}
        d = effect if effect is not None else (a.centre - b.centre if a.mean is not None and b.mean is not None else None)
        row["effect"] = d
        if a.n < 2 or b.n < 2:
            row["note"] = NEEDS_SEEDS
        elif (s := stats.pooled_sd(a.values, b.values)) == 0:
            row.update(pooled_std=0.0, note=NO_SPREAD)
        elif not d:
            row.update(pooled_std=s, note="no difference to detect: give --effect")
        else:
            row.update(pooled_std=s, power_now=stats.power(min(a.n, b.n), d, s, o.alpha),
                       seeds_needed=_seeds_record(stats.seeds_needed(d, s, o.power, o.alpha)))
        out.append(row)
    return out


def seeds_grid(report: Report, column: str, effect: float | None, rows: list[dict[str, Any]]) -> Grid:
    o = report.options
    digits = _digits(column)
    by_label = {g.label: g for g in report.groups}
    cells = []
    for row in rows:
        g = by_label[row["group"]]
        cells.append([*_key_cells(report, g), f"{row['n']}" + (f" and {row['n_baseline']}" if row["n_baseline"] != row["n"] else ""),
                      "-" if row["pooled_std"] is None else number_text(row["pooled_std"], digits),
                      "-" if row["effect"] is None else number_text(row["effect"], digits, sign=True),
                      "-" if row["power_now"] is None else f"{row['power_now']:.0%}",
                      row["note"] or str(row["seeds_needed"] if row["seeds_needed"] is not None else "-")])
    against = f"against the {report.baseline.text(report.groups)}" if report.baseline else "two groups that spread like each"
    what = f"a difference of {number_text(effect, digits, sign=True)}" if effect is not None else "the observed difference (Δ)"
    title = (f"seeds per group to detect {what} in {report.column_title(column)}, {against}: two-sided two-sample t-test "
             f"at alpha {o.alpha:g} with {o.power:.0%} power (noncentral t, from the pooled std of the two groups)")
    header = [*_key_header(report), "n", "pooled std", "Δ" if effect is None else "effect", "power now", "seeds needed"]
    return Grid(header, cells, keys=max(1, len(report.keys)), title=title)


def to_markdown(report: Report) -> str:
    groups = groups_grid(report)
    lines = markdown(groups)
    lines += ["", *(f"{line}." for line in groups.caption.splitlines())]
    for grid in (intervals_grid(report), *(g for g in [verdict_grid(report)] if g.rows)):
        lines += ["", f"{grid.title}:", "", *markdown(grid)]
        if grid.caption:
            lines += ["", f"{grid.caption}."]
    for grid in factorial_grids(report):
        lines += ["", f"{grid.title}:", "", *markdown(grid)]
    return "\n".join(lines)


def _interval_record(ci: tuple[float, float] | None) -> list[float] | str:
    return NEEDS_SEEDS if ci is None else [ci[0], ci[1]]


def _seeds_record(n: float | None) -> int | str | None:
    return None if n is None else (f"> {stats.MAX_SEEDS}" if math.isinf(n) else int(n))


def _difference_record(g: Group, c: str) -> dict[str, Any] | None:
    d = g.differences.get(c)
    if d is None or d.diff is None:
        return None
    return {"diff": d.diff, "ci95": _interval_record(d.ci95), "p": d.p if d.p is not None else d.note,
            "test": d.test, "p_adjusted": d.p_adjusted, "correction": d.correction, "hedges_g": d.hedges_g,
            "verdict": d.verdict, "seeds_needed": _seeds_record(d.seeds_needed)}


def _timing_record(t: Timing) -> dict[str, Any]:
    return {"ms_per_step": t.median, "ms_per_step_iqr": None if t.median is None else [t.q25, t.q75],
            "stacked": t.stacked}


def to_records(report: Report) -> list[dict[str, Any]]:
    """One plain dict per group: what JSON and CSV carry (numbers, not formatted text)."""
    cols = [*report.columns(), STEPS_PER_SEC]
    out = []
    for g in report.groups:
        rec: dict[str, Any] = {"group": g.label, "keys": g.key, "n": len(g.runs), "status": g.status}
        rec["metrics"] = {}
        for c in cols:
            stat = g.columns[c]
            rec["metrics"][c] = {"mean": stat.mean, "std": stat.std, "n": stat.n}
            if c != STEPS_PER_SEC:
                if report.options.aggregate == "iqm":
                    rec["metrics"][c]["iqm"] = stat.centre
                rec["metrics"][c]["ci95"] = _interval_record(stat.ci95) if stat.mean is not None else None
                rec["metrics"][c]["vs_baseline"] = _difference_record(g, c)
        rec["time"] = _timing_record(g.timing)
        rec["speedup"] = g.speedup
        rec["baseline"] = g.reference.label if g.reference is not None else None
        rec["runs"] = [str(r.path) for r in g.runs]
        rec["duplicates"] = [{"path": str(r.path), "same_as": str(kept.path)} for r, kept in g.duplicates]
        out.append(rec)
    return out


def _factorial_record(f: stats.Factorial) -> dict[str, Any]:
    return {"keys": f.keys, "df_error": f.df_error,
            "main_effects": {k: [{"value": lv.value, "mean": lv.mean, "ci95": list(lv.ci95), "n": lv.n} for lv in levels]
                             for k, levels in f.levels.items()},
            "tests": [{"effect": list(t.keys), "F": t.f, "df": [t.df1, t.df2], "p": t.p} for t in (*f.main, *f.interactions)]}


def to_json(report: Report) -> str:
    o, b = report.options, report.baseline
    doc = {"groups": to_records(report),
           "baseline": {"keys": b.keys, "chosen": b.chosen} if b else None,
           "statistics": {"aggregate": o.aggregate, "ci": o.interval, "correction": o.correct, "alpha": o.alpha, "power": o.power},
           "steps_to_target": {"metric": report.target[0], "target": report.target[1]} if report.target else None,
           "factorial": {m: _factorial_record(f) for m, f in report.factorials.items()} or None,
           "unreadable": [{"path": str(r.path), "problem": r.problem} for r in report.unreadable]}
    return json.dumps(doc, indent=2, default=str)


def to_csv(report: Report) -> str:
    records = to_records(report)
    keys = report.keys
    cols = [*report.columns(), STEPS_PER_SEC]
    header = ["group", *keys, "n", "status"]
    for c in cols:
        header += [f"{c} mean", f"{c} std", f"{c} n"]
        if c != STEPS_PER_SEC:
            header += [f"{c} ci95 low", f"{c} ci95 high"]
            if report.compared:
                header += [f"{c} {k}" for k in ("diff", "diff ci95 low", "diff ci95 high", "p", "p adjusted", "hedges g", "verdict", "seeds needed")]
    header += ["ms/step median", "ms/step q25", "ms/step q75", "stacked", "speedup", "baseline"]
    blank = lambda v: "" if v is None else v  # noqa: E731
    bounds = lambda ci: ["", ""] if ci is None else ([ci, ci] if isinstance(ci, str) else ci)  # noqa: E731
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for rec, g in zip(records, report.groups):
        row = [rec["group"], *(format_value(rec["keys"][k]) for k in keys), rec["n"], status_text(rec["status"])]
        for c in cols:
            m = rec["metrics"][c]
            row += [blank(m["mean"]), blank(m["std"]), m["n"]]
            if c != STEPS_PER_SEC:
                row += bounds(m["ci95"])
                if report.compared:
                    d = m["vs_baseline"] or {}
                    row += [blank(d.get("diff")), *bounds(d.get("ci95")), blank(d.get("p")), blank(d.get("p_adjusted")),
                            blank(d.get("hedges_g")), blank(d.get("verdict")), blank(d.get("seeds_needed"))]
        t = g.timing
        row += [blank(t.median), blank(t.q25), blank(t.q75), blank(t.stacked), blank(rec["speedup"]), blank(rec["baseline"])]
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


_SCALARS: dict[tuple, dict[str, list[tuple[int, float]]]] = {}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files (:func:`bnexp.runs.load_scalars`), read
    once per report: the time per step, the plot, the page and the sweep's seed
    bands all use them. Keyed by the event files' names, sizes and times, so a run
    that logged more since is read again."""
    try:
        files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(run_dir)
                             if e.name.startswith("events.out.tfevents.")))
    except OSError:
        return {}
    key = (str(run_dir), files)
    if key not in _SCALARS:
        if len(_SCALARS) > 4096:  # a long-lived process (the test suite) reading many runs
            _SCALARS.clear()
        _SCALARS[key] = load_scalars(run_dir) if files else {}
    return _SCALARS[key]


def group_curves(g: Group, tags: Iterable[str] | None = None) -> dict[str, list[list[tuple[int, float]]]]:
    """{tag: [curve of each completed run]} for the group."""
    out: dict[str, list[list[tuple[int, float]]]] = {}
    keep = None if tags is None else set(tags)
    for r in g.completed:
        curves = scalars(r.path)
        if not curves:
            print(f"{r.path}: no readable TensorBoard events; left out of the curves", file=sys.stderr)
        for tag, points in curves.items():
            if keep is None or tag in keep:
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
    refuse_taken(path, overwrite, "an image file name")
    return path


def refuse_taken(path: Path, overwrite: bool, allowed: str) -> None:
    """PlotError where ``path`` is a directory, or a file and ``overwrite`` is off."""
    if path.is_dir():
        raise PlotError(f"{path} is a directory; allowed: {allowed}")
    if path.exists() and not overwrite:
        raise PlotError(f"{path} exists; choose another name, or --overwrite to replace it")


def write_new(path: Path, write, overwrite: bool, mode: str = "wb") -> None:
    """``write(f)`` into ``path`` atomically: a viewer never shows half a file, and
    without ``overwrite`` a file that appeared in the meantime is not replaced either."""
    if overwrite:
        atomic_write(path, write, mode=mode)
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write(staging, write, mode=mode)
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


def _save(fig, path: Path, overwrite: bool) -> None:
    write_new(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower(), dpi=110), overwrite)


def plot(groups: list[Group], path: Path, overwrite: bool = False, metrics: Iterable[str] = ()) -> Path:
    """Learning curves per group with ±std seed bands, and the 15/50/85th
    percentiles of each hidden layer's pre-activation (the BN paper's Fig. 1);
    plus a panel for each of ``metrics`` outside those (see :func:`probe_panels`).
    Returns the file written (see :func:`check_plot_file`)."""
    import matplotlib.pyplot as plt

    curves = {g.label: group_curves(g) for g in groups}
    curve_tags = [t for t in CURVE_TAGS if any(t in c for c in curves.values())]
    layers = sorted({t.split("/")[1] for c in curves.values() for t in c if t.startswith("act/") and t.count("/") == 2})
    panels = [("curve", t) for t in curve_tags] + [("act", layer) for layer in layers] + probe_panels(metrics)
    if not panels:
        raise ValueError("no event files with curves in these runs")
    fig = figure(groups, curves, panels)
    path = check_plot_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save(fig, path, overwrite)
    finally:
        plt.close(fig)
    return path


def figure(groups: list[Group], curves: dict[str, dict[str, list]], panels: list[tuple[str, str]], ncols: int = 4,
           labels: dict[str, str] | None = None):
    """A matplotlib figure of ``panels`` (see :func:`plot`), one colour per group,
    the legend under them; ``labels``: a shorter name per group label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, name) in zip(axes.flat, panels):
        for i, g in enumerate(groups):
            color = colors[i % len(colors)]
            c = curves[g.label]
            label = (labels or {}).get(g.label, g.label)
            if kind == "band":
                draw_band(ax, c, name, color, label)
            elif kind == "curve":
                steps, mean, std = seed_band(c.get(name, []))
                if not steps:
                    continue
                ax.plot(steps, mean, color=color, label=f"{label} (n={len(c[name])})")
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.2, lw=0)
            else:
                bands = [seed_band(c.get(f"act/{name}/{p}", [])) for p in PERCENTILES]
                if not bands[1][0]:
                    continue
                ax.plot(bands[1][0], bands[1][1], color=color, label=label)
                for b in (bands[0], bands[2]):
                    ax.plot(b[0], b[1], color=color, lw=0.8, ls="--")
        ax.set_title({"curve": name, "band": f"{name}: min..max band"}.get(kind, f"act/{name}: p15, p50, p85 (mean over seeds)"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    per_row = min(3, ncols, len(names)) or 1  # a one-panel figure stacks its legend: three side by side overflow it
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=per_row, fontsize="small", bbox_to_anchor=(0.5, 0))
    legend_inches = 0.15 + 0.22 * math.ceil(len(names) / per_row)  # small font: ~0.22 in a row
    fig.tight_layout(rect=(0, legend_inches / (3.3 * nrows), 1, 1))
    return fig
