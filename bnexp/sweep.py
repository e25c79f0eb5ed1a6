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

import math
import re
from collections import Counter
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bnexp.report import CURVE_TAGS, differing_keys, group_curves, group_runs, seed_band, status_text
from bnexp.runs import AGGREGATE, METRICS, OVERRIDES, Run, find_run_dirs, headline, headline_cells, read_run, shown_overrides, status_cell


SUFFIX = ".bnexp-sweep"  # marks the sweep root's own event file, rewritten at each sweep end
BAND_TAGS = (*CURVE_TAGS, "test/loss", "test/acc")


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


# --------------------------------------------------------------------------- the jobs of a sweep


@dataclass
class Job:
    run: Run
    num: int
    skipped: bool

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else self.run.status


def _job_num(run_dir: Path) -> int:
    import yaml

    try:
        with open(run_dir / ".hydra" / "hydra.yaml") as f:
            # libyaml's loader where PyYAML has it: ~10x faster on Hydra's long record (~4 ms a job otherwise).
            return int(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["hydra"]["job"]["num"])
    except Exception:  # noqa: BLE001
        return 1 << 30


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
        jobs.append(Job(run, _job_num(run.path), skipped))
    return sorted(jobs, key=lambda j: (j.num, str(j.run.path)))


def _shown_overrides(jobs: list[Job]) -> tuple[list[list[str]], list[str]]:
    """Per job, the overrides that vary across the jobs (seed last); and those every job shares."""
    lists = [shown_overrides(j.run) for j in jobs]
    common = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    seed_last = lambda os: sorted((o for o in os if o not in common), key=lambda o: o.startswith("seed="))  # noqa: E731
    return [seed_last(os) for os in lists], [o for o in (lists[0] if lists else []) if o in common]


def jobs_table(jobs: list[Job], sweep_dir: Path, interrupted: bool = False):
    from rich.table import Table

    shown, common = _shown_overrides(jobs)
    caption = f"every job: {' '.join(common)}" if common else None
    title = f"sweep {sweep_dir}" + (" (interrupted: the jobs that ran)" if interrupted else "")
    table = Table(title=title, caption=caption, show_header=True, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("job", overflow="fold")
    table.add_column("status")
    tags = headline(j.run for j in jobs)
    for tag in tags:
        table.add_column(tag, justify="right")
    table.add_column("steps/s", justify="right")
    for j, overrides in zip(jobs, shown):
        r = j.run
        sps = f"{r.steps_per_sec:.0f}" if r.steps_per_sec is not None and not j.skipped else "-"
        table.add_row(str(j.num), " ".join(overrides) or r.path.name, status_cell(j.status), *headline_cells(r, tags), sps)
    return table


def count_text(jobs: list[Job]) -> str:
    return f"{len(jobs)} jobs: " + status_text(Counter(j.status for j in jobs))


# --------------------------------------------------------------------------- TensorBoard extras


def _hparam_domain(name: str, values: list[Any]):
    """A discrete HParams domain of the values seen, in the types the runs' session records use."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    from bnexp.tracking import _hparam_value

    vals = sorted({_hparam_value(v) for v in values}, key=lambda v: (str(type(v)), v))
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
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard import SummaryWriter

    from bnexp.tracking import HPARAM_METRICS

    runs = [r for r in runs if r.config is not None]
    if not runs:
        return {}
    keys = swept_keys(runs)
    hparams = [_hparam_domain(k, [r.config.get(k) for r in runs]) for k in keys]
    metrics = [hp.Metric(tag, display_name=tag) for tag in HPARAM_METRICS]

    # Seed bands: the mean under the run's own tag (so `aggregate/*` lines sit
    # beside the seeds in TensorBoard's scalar charts), the band as <tag>/mean±std.
    shutil.rmtree(sweep_dir / AGGREGATE, ignore_errors=True)
    groups = [g for g in group_runs(runs) if g.completed]
    band_tags: set[str] = set()
    for g in groups:
        curves = group_curves(g, BAND_TAGS)
        if not curves:
            continue
        with SummaryWriter(log_dir=str(sweep_dir / AGGREGATE / _safe_name(g.label))) as w:
            for tag, per_run in curves.items():
                for step, mean, std in zip(*seed_band(per_run)):
                    w.add_scalar(tag, mean, step)
                    w.add_scalar(f"{tag}/mean-std", mean - std, step)
                    w.add_scalar(f"{tag}/mean+std", mean + std, step)
                band_tags.add(tag)

    tags = [t for t in BAND_TAGS if t in band_tags] or list(HPARAM_METRICS)
    layout = {
        "all runs": {tag: ["Multiline", [f"^{re.escape(tag)}$"]] for tag in tags},
        "seed bands (mean ± std over seeds)": {tag: ["Margin", [tag, f"{tag}/mean-std", f"{tag}/mean+std"]] for tag in tags if tag in band_tags},
    }
    for old in sweep_dir.glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink(missing_ok=True)
    with SummaryWriter(log_dir=str(sweep_dir), filename_suffix=SUFFIX) as w:
        w.file_writer.add_summary(hp.hparams_config_pb(hparams=hparams, metrics=metrics, time_created_secs=time.time()))
        w.add_custom_scalars(layout)
    return {"hparams": keys, "groups": [g.label for g in groups]}


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
    """Every job, the failures, and the seed-aggregated comparison (``runs``: as in :func:`sweep_jobs`)."""
    from bnexp.report import aggregate, console as make_console, to_rich

    console = make_console()
    jobs = sweep_jobs(runs, start.started)
    if not jobs:
        console.print(f"sweep {start.dir}: no job of this sweep began training", highlight=False, soft_wrap=True)
        return jobs
    console.print(jobs_table(jobs, start.dir, interrupted))
    for j in jobs:
        if j.status in ("failed", "dead", "unreadable"):
            error = (j.run.metrics or {}).get("error") or j.run.problem or "no error recorded"
            console.print(f"[red]{j.status}[/]: {j.run.path.name}: {error}", highlight=False)
    console.print(count_text(jobs), highlight=False)
    runs = [j.run for j in jobs]
    groups = group_runs(runs)
    if len(jobs) > 1 and any(g.completed for g in groups):
        metrics = list(headline(runs))
        console.print(to_rich(aggregate(groups, metrics), metrics, title="comparison (mean ± std over seeds)", compact=True))
    console.print(f"compare: bnexp report {start.dir}    dashboards: bnexp tb {start.dir}", highlight=False, soft_wrap=True)
    return jobs
