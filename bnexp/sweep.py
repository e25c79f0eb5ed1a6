"""What a sweep adds on top of its runs: the summary of every job at the end,
and the TensorBoard records that describe the sweep as a whole.

Hydra runs the jobs (any sweeper, any launcher; jobs may live in other
processes or on other machines), so everything here reads the sweep directory
back from disk instead of trusting in-process results:

- the jobs of *this* sweep are the run dirs whose ``.hydra/`` Hydra rewrote
  after the sweep started (Hydra writes it for every job it launches, skipped
  ones included); a job whose metrics.json finished before the sweep started
  was skipped (completed earlier with the same config);
- at the sweep's end (:func:`finish`, called by ``bnexp sweep`` in the main
  process, also after Ctrl-C) each run dir is read once, and from that the
  sweep root gets one HParams experiment config, a custom-scalars layout, and
  one ``aggregate/<group>`` run per config group with the seed mean and
  mean ± std of the main curves; then the summary of the jobs is printed.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnexp.io import atomic_write, read_bounded
from bnexp.report import differing_keys, group_curves, group_runs, seed_band, status_text
from bnexp.runs import AGGREGATE, METRICS, OVERRIDES, STATUS_STYLE, Run, find_run_dirs, headline, headline_cells, read_run, shown_overrides


SUFFIX = ".bnexp-sweep"  # the sweep root's own event file of earlier versions (removed when the records are rewritten)
# The curves that get seed bands, the question's first: TensorBoard lists them in this order.
BAND_TAGS = ("val/acc", "test/acc", "train/loss", "val/loss", "train/acc", "test/loss", "grad_norm/total")
# Where the seed-band runs keep their tags. TensorBoard's Time Series page groups
# cards by a tag's first component, sorts the groups (an upper-case letter before
# any lower-case one: ahead of act/*) and opens the first two: the means first,
# one line per group in its own colour; the band's edges in a group of their own,
# out of the per-run cards (train/, val/, ...). Custom Scalars draws the bands from both.
# test/* is one point, at the end: Time Series draws no line through a lone point (its
# card would look empty), so its mean goes with the edges; Custom Scalars marks it.
MEAN_GROUP, EDGE_GROUP = "Mean over seeds", "seed_band"


def band_tags(tag: str) -> tuple[str, str, str]:
    """A seed-band run's tags for ``tag``: the mean over seeds, and mean - std, mean + std."""
    mean = f"{EDGE_GROUP}/{tag}/mean" if tag.startswith("test/") else f"{MEAN_GROUP}/{tag}"
    return mean, f"{EDGE_GROUP}/{tag}/mean-std", f"{EDGE_GROUP}/{tag}/mean+std"


@dataclass
class SweepStart:
    dir: Path
    started: float
    created: Path | None = None  # the topmost directory this sweep created, if any
    sweeper: str = ""  # the Hydra sweeper's class, e.g. hydra._internal.core_plugins.basic_sweeper.BasicSweeper

    @property
    def replays_its_jobs(self) -> bool:
        """Whether running the same command again launches the same jobs (not so for a search that samples them)."""
        return self.sweeper.endswith(".BasicSweeper")

    def remove_if_unused(self) -> None:
        """After a bad override stopped the sweep before any job: take back the
        directories it created (they hold only Hydra's multirun.yaml)."""
        if self.created is not None and self.dir.is_dir() and {p.name for p in self.dir.iterdir()} <= {"multirun.yaml"}:
            shutil.rmtree(self.created, ignore_errors=True)


# Sweeps started in this process (the CLI reads them after Hydra returns).
STARTED: list[SweepStart] = []


class SweepCallback(Callback):
    """Registered in configs/config.yaml; runs in the process that launched the sweep.

    It only records where and when the sweep started. The sweep's end is
    :func:`finish`, called by the CLI: Hydra skips ``on_multirun_end`` when
    Ctrl-C stops the sweep, and an interrupted sweep gets its summary too.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # the sweep dir interpolates hydra:runtime.choices
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        missing = [p for p in (sweep_dir, *sweep_dir.parents) if not p.exists()]
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
        STARTED.append(SweepStart(sweep_dir, time.time(), missing[-1] if missing else None, sweeper))
        # The sweep's own overrides, for naming its jobs (sweep_overrides()), wherever they run.
        # Hydra's basic sweeper writes the same file before its first job; other sweepers
        # (Optuna) write none, and a stale one from an earlier sweep here would misname them.
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(sweep_dir / MULTIRUN, lambda f: f.write(OmegaConf.to_yaml(config)))


# --------------------------------------------------------------------------- job directory names

MULTIRUN = "multirun.yaml"  # the sweep's composed config, with its raw overrides in hydra.overrides.task
# Well under the 255 bytes that ext4, XFS, APFS and NTFS allow per name (and
# eCryptfs' 143): a name also has to read well in TensorBoard's run list.
MAX_NAME_BYTES = 128
UNNAMED_KEYS = ("seed", "name", "train.progress")  # seed goes last; name names the sweep folder; progress changes nothing


def _parse(overrides: Iterable[str]) -> list:
    # Hydra's own parser: quoted commas, lists ([16,16] is one value), choice(),
    # range(), glob(), interval() all mean what they mean to the sweeper.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(o) for o in overrides])


def varying_keys(sweep_overrides: Iterable[str]) -> frozenset[str]:
    """The keys to which a sweep gives more than one value. ``sweep_overrides``: what
    its sweeper expands, hydra.sweeper.params as key=value first, then the command
    line's; a key's last override wins, as in Hydra's BasicSweeper."""
    return _varying_keys(tuple(map(str, sweep_overrides)))


@lru_cache(maxsize=8)  # every job of a sweep in one process asks the same (parsing costs ~3 ms an override)
def _varying_keys(sweep_overrides: tuple[str, ...]) -> frozenset[str]:
    last = {o.get_key_element(): o for o in _parse(sweep_overrides)}
    out = set()
    for key, o in last.items():
        if not o.is_sweep_override():
            continue
        try:
            if len(set(o.sweep_string_iterator())) < 2:
                continue
        except Exception:  # noqa: BLE001  glob() needs the config groups' options, interval() has no list: both vary
            pass
        out.add(key)
    return frozenset(out)


def fit_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` if it fits in ``limit`` UTF-8 bytes, else its head and a hash of all of it (still unique, still stable)."""
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[: limit - len(digest) - 1].decode("utf-8", errors="ignore") + "~" + digest


def job_dir_name(job_overrides: Iterable[str], seed: Any, sweep_overrides: Iterable[str] | None) -> str:
    """A sweep job's directory name: the job's own values of the keys the sweep
    varies (:func:`varying_keys`; constant keys and ``experiment=NAME`` are the
    sweep folder's business), sorted, then ``seed=N`` last so that one config's
    seeds sit side by side; "/" becomes "_" (a path in a value must not nest the
    directory); at most MAX_NAME_BYTES bytes. The same command names the same
    jobs again, so a rerun into the same sweep dir finds them. ``sweep_overrides``
    None (not known): every override of the job is named."""
    varying = None if sweep_overrides is None else varying_keys(sweep_overrides)
    parts = sorted(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in _parse(job_overrides)
                   if o.get_key_element() not in UNNAMED_KEYS and (varying is None or o.get_key_element() in varying))
    last = f"seed={seed}"
    name = ",".join(parts).replace("/", "_")
    return f"{fit_name(name, MAX_NAME_BYTES - len(last) - 1)},{last}" if name else last


def sweep_overrides(sweep_dir: str | os.PathLike, params: Mapping[str, Any] | None) -> list[str] | None:
    """What the sweeper of ``sweep_dir`` expanded into jobs: ``params``
    (hydra.sweeper.params) as key=value, then the command line's overrides as
    the sweep dir's multirun.yaml records them; None where there is no record."""
    import yaml

    try:
        text = read_bounded(Path(sweep_dir) / MULTIRUN, 1 << 20)  # never blocks on a FIFO there
        recorded = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["hydra"]["overrides"]["task"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else (params or {})
    return [f"{k}={v}" for k, v in params.items()] + [str(o) for o in recorded or []]


# --------------------------------------------------------------------------- the jobs of a sweep


@dataclass
class Job:
    run: Run
    num: int
    skipped: bool

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else self.run.status


def read_sweep(sweep_dir: Path) -> list[Run]:
    """Every run dir under ``sweep_dir``, read (metrics.json, config, overrides)."""
    return [read_run(p) for p in find_run_dirs([sweep_dir])]


def _launched(run_dir: Path, started: float) -> bool:
    # .hydra/ is rewritten for every launched job; metrics.json stands in
    # when hydra.output_subdir=null leaves no .hydra/ behind.
    return any(f.exists() and f.stat().st_mtime >= started for f in (run_dir / OVERRIDES, run_dir / METRICS))


def sweep_jobs(runs: list[Run], started: float) -> list[Job]:
    """Of ``runs`` (a sweep dir as :func:`read_sweep` read it), the jobs Hydra
    launched since ``started`` (seconds since the epoch)."""
    jobs = []
    for run in runs:
        if not _launched(run.path, started):
            continue
        finished = ((run.metrics or {}).get("time") or {}).get("finished_at") or math.inf
        skipped = run.status == "completed" and finished < started
        jobs.append(Job(run, run.job_num, skipped))
    return sorted(jobs, key=lambda j: (j.num, str(j.run.path)))


def _shown_overrides(jobs: list[Job]) -> tuple[list[list[str]], list[str]]:
    """Per job, the overrides that vary across the jobs (seed last); and those every job shares."""
    lists = [shown_overrides(j.run) for j in jobs]
    common = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    seed_last = lambda os: sorted((o for o in os if o not in common), key=lambda o: o.startswith("seed="))  # noqa: E731
    return [seed_last(os) for os in lists], [o for o in (lists[0] if lists else []) if o in common]


def jobs_heading(sweep_dir: Path, interrupted: bool = False) -> str:
    return f"sweep {sweep_dir}" + (" (interrupted: the jobs that ran)" if interrupted else "")


def jobs_table(jobs: list[Job]):
    """One row per job (its heading, :func:`jobs_heading`, is printed above it whole),
    as a :class:`bnexp.tables.Grid`: ms/step is the median over the job's logging
    windows, and "stack" says which replica of how many a stacked job was."""
    from rich.text import Text

    from bnexp.report import Timing, ms_text
    from bnexp.tables import Grid

    shown, common = _shown_overrides(jobs)
    tags = headline(j.run for j in jobs)
    replicas = [(j.run.metrics or {}).get("replica") or {} for j in jobs]
    stacked = any(r.get("of", 1) > 1 for r in replicas if isinstance(r.get("of"), int))
    header = ["#", "job", "status", *tags, "ms/step", *(["stack"] if stacked else [])]
    rows = []
    for j, overrides, replica in zip(jobs, shown, replicas):
        r = j.run
        t = Timing.of([r]) if not j.skipped else Timing()
        style = STATUS_STYLE.get(j.status)
        rows.append([str(j.num), " ".join(overrides) or r.path.name, Text(j.status, style=style or ""), *headline_cells(r, tags),
                     ms_text(t.median) if t.median is not None else "-",
                     *([f"{replica['index'] + 1}/{replica['of']}" if "of" in replica else "-"] if stacked else [])])
    return Grid(header, rows, keys=2, caption=f"every job: {' '.join(common)}" if common else None, wrap={1})


def count_text(jobs: list[Job]) -> str:
    return f"{len(jobs)} jobs: " + status_text(Counter(j.status for j in jobs))


# --------------------------------------------------------------------------- TensorBoard extras


def _hparam_domain(name: str, values: list[Any]):
    """A discrete HParams domain of the values seen, in the types the runs' session records use."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    from bnexp.tracking import hparam_value

    vals = sorted({hparam_value(name, v) for v in values}, key=lambda v: (str(type(v)), v))
    if all(isinstance(v, bool) for v in vals):
        return hp.HParam(name, hp.Discrete(vals, dtype=bool))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return hp.HParam(name, hp.Discrete([float(v) for v in vals], dtype=float))
    if all(isinstance(v, str) for v in vals):
        return hp.HParam(name, hp.Discrete(vals, dtype=str))
    return hp.HParam(name)


def swept_keys(runs: list[Run]) -> list[str]:
    """Keys that differ across the runs, plus every config key a job's overrides set."""
    keys = set(differing_keys(runs, ignore={"train.progress"}))
    known = {k for r in runs if r.config for k in r.config}
    for r in runs:
        for o in r.overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if key in known and key != "train.progress":
                keys.add(key)
    return sorted(keys)


def _safe_name(label: str) -> str:
    return re.sub(r"[/\\]", "_", label) if label != "all runs" else "all"


def write_tensorboard_extras(sweep_dir: Path, runs: list[Run]) -> dict[str, Any]:
    """(Re)write the sweep root's HParams experiment config and custom-scalars
    layout, and the ``aggregate/`` seed-band runs, from ``runs``: the runs in
    ``sweep_dir`` as :func:`read_sweep` (or `bnexp report`) read them."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard import SummaryWriter

    from bnexp.tracking import HPARAM_METRICS

    runs = [r for r in runs if r.config is not None]
    if not runs:
        return {}
    keys = swept_keys(runs)
    hparams = [_hparam_domain(k, [r.config.get(k) for r in runs]) for k in keys]
    metrics = [hp.Metric(tag, display_name=tag) for tag in HPARAM_METRICS]

    shutil.rmtree(sweep_dir / AGGREGATE, ignore_errors=True)
    for old in sweep_dir.glob(f"events.out.tfevents.*{SUFFIX}"):  # where earlier versions kept the sweep's records
        old.unlink(missing_ok=True)
    groups = [g for g in group_runs(runs) if g.completed]
    bands = {g.label: curves for g in groups if (curves := group_curves(g, BAND_TAGS))}
    tags = [t for t in BAND_TAGS if any(t in c for c in bands.values())]
    layout = {
        "seed bands: mean ± std over seeds, one colour per group": {
            tag: ["Margin", list(band_tags(tag))] for tag in tags},
        "every run": {tag: ["Multiline", [f"^{re.escape(tag)}$"]] for tag in tags or HPARAM_METRICS},
    }
    # The sweep's HParams experiment and chart layout go into each seed-band run
    # (TensorBoard reads the first experiment it finds and merges equal layouts):
    # an event file of their own would be one more run, named after its folder.
    for label, curves in bands.items():
        with SummaryWriter(log_dir=str(sweep_dir / AGGREGATE / fit_name(_safe_name(label)))) as w:
            w.file_writer.add_summary(hp.hparams_config_pb(hparams=hparams, metrics=metrics, time_created_secs=time.time()))
            w.add_custom_scalars(layout)
            for tag in tags:
                for step, mean, std in zip(*seed_band(curves.get(tag, []))):
                    names = band_tags(tag)
                    w.file_writer.add_summary(Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in
                                                             zip(names, (mean, mean - std, mean + std))]), step)
    return {"hparams": keys, "groups": list(bands)}


def finish(start: SweepStart, interrupted: bool = False) -> list[Job]:
    """The end of ``bnexp sweep``, also after Ctrl-C: read every run dir of the
    sweep once, (re)write the TensorBoard records from it and print the summary.

    ``interrupted``: a job that Ctrl-C stopped before its training began left
    only Hydra's ``.hydra/`` behind; it did not run, and is left out.
    """
    runs = read_sweep(start.dir)
    if interrupted:
        runs = [r for r in runs if (r.path / METRICS).exists() or not _launched(r.path, start.started)]
    write_tensorboard_extras(start.dir, runs)
    return print_summary(start, runs, interrupted)


def print_summary(start: SweepStart, runs: list[Run], interrupted: bool = False) -> list[Job]:
    """Every job, the failures, the seed-aggregated comparison and the verdicts
    (``runs``: as in :func:`sweep_jobs`)."""
    from bnexp.report import Report, choose_baseline, console as make_console, print_grid, print_report

    console = make_console()
    jobs = sweep_jobs(runs, start.started)
    if not jobs:
        console.print(f"sweep {start.dir}: no job of this sweep began training", highlight=False, soft_wrap=True)
        return jobs
    console.print(jobs_heading(start.dir, interrupted), soft_wrap=True, highlight=False, style="bold")
    print_grid(console, jobs_table(jobs))
    for j in jobs:
        if j.status in ("failed", "dead", "unreadable"):
            error = (j.run.metrics or {}).get("error") or j.run.problem or "no error recorded"
            console.print(f"[red]{j.status}[/]: {j.run.path.name}: {error}", highlight=False)
    console.print(count_text(jobs), highlight=False)
    runs = [j.run for j in jobs]
    groups = group_runs(runs)
    if len(jobs) > 1 and any(g.completed for g in groups):
        report = Report.build(groups, headline(runs), choose_baseline(groups))
        print_report(console, report, compact=True, groups_title="comparison (mean ± std over seeds)")
        if report.factorials:
            console.print(f"main effects and interactions of the {' x '.join(report.keys)} grid: bnexp report {start.dir}",
                          highlight=False, soft_wrap=True)
    console.print(f"compare: bnexp report {start.dir} [--html report.html]    dashboards: bnexp tb {start.dir} "
                  "(seed bands: the Custom Scalars tab)", highlight=False, soft_wrap=True, markup=False)
    return jobs
