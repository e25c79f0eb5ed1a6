"""What a run leaves behind and shows: TensorBoard events, HParams records,
metrics.json (status, heartbeat, final/best values, env) and console progress.
"""

from __future__ import annotations

import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

import bnexp
from bnexp.rundir import RunRecord

log = logging.getLogger("bnexp")

HPARAM_METRICS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", "train/acc")


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "bnexp": bnexp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        # Only a source checkout of bnexp has a commit: for an installed wheel the
        # parent is site-packages, and git would report whatever repo holds the venv.
        repo = Path(bnexp.__file__).resolve().parent.parent
        if not (repo / ".git").exists():
            return info
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def hparam_value(key: str, v: Any) -> bool | int | float | str:
    """A config value as the HParams records hold it (a run's session and a sweep's domains alike)."""
    if key == "seed":
        # An identifier, not a quantity: as text, so that the HParams table shows 2, not
        # the 2.0000 it prints for every number. Integer quantities (batch size, steps)
        # stay numbers: the parallel-coordinates and scatter views give them numeric axes.
        return str(v)
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # lists (model.hidden), None


def hparams_session_start(hparams: dict[str, Any], start_time: float):
    # tensorboard's summary_v2.hparams_pb builds the session-start record
    # without TensorFlow; SummaryWriter.add_hparams would write a stray sub-run.
    # trial_id "": no group name, so the HParams plugin names the trial by its run
    # (list_session_groups: `start_info.group_name or session.name`), the run dir
    # relative to the logdir (a sweep's: the job's dir name), not by a hash of the values.
    from tensorboard.plugins.hparams import summary_v2

    return summary_v2.hparams_pb({k: hparam_value(k, v) for k, v in hparams.items()}, trial_id="", start_time_secs=start_time)


def hparams_session_end(status: str, end_time: float):
    # tensorboard.plugins.hparams.summary.session_end_pb imports TensorFlow at
    # module load; this is the same proto built from the TF-free parts.
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    code = {"completed": api_pb2.STATUS_SUCCESS, "diverged": api_pb2.STATUS_SUCCESS, "running": api_pb2.STATUS_RUNNING}.get(status, api_pb2.STATUS_FAILURE)
    data = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=end_time))
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


# False in the vectorized launcher's worker processes but the first: one live
# progress display per terminal (two processes' bars would overwrite each other).
PROGRESS_BARS = True


class Console_:
    """Rich progress when stdout is a terminal; a plain line per eval otherwise."""

    def __init__(self, total: int, enabled: bool, title: str):
        self.console = Console()
        self.rich = enabled and PROGRESS_BARS and self.console.is_terminal
        self.total, self.title = total, title
        self.progress: Progress | None = None
        self.task = None

    def start(self, step: int) -> None:
        if self.rich:
            # The metrics last and cut to what is left of the line: on an 80-column
            # terminal Rich otherwise squeezes the bar to nothing and drops the ETA.
            name, bar, count = 24, 12, 2 * len(str(self.total)) + 1
            left = max(1, self.console.width - (name + bar + count + 7 + 4))  # 7: the ETA; 4: the spaces between columns
            self.progress = Progress(
                TextColumn("[bold]{task.description}", table_column=Column(max_width=name, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=bar), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", table_column=Column(max_width=left, no_wrap=True, overflow="ellipsis")),
                console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.title, total=self.total, completed=step, info="")

    def update(self, step: int, scalars: dict[str, float], is_eval: bool) -> None:
        parts = [f"{k}={scalars[k]:.4g}" for k in ("train/loss", "train/acc", "val/acc") if k in scalars]
        if "time/steps_per_sec" in scalars:
            parts.append(f"{scalars['time/steps_per_sec']:.0f} steps/s")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info="  ".join(parts))
        elif is_eval and parts:
            # A sweep job's dir is named by its values (seed=1): the tag tells apart the
            # lines of jobs that log side by side (a stack of replicas, joblib workers).
            tag = f"[{self.title}] " if "=" in self.title else ""
            log.info("%sstep %d/%d  %s", tag, step, self.total, "  ".join(parts))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary_table(title: str | None, record: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    final, best = record.get("final", {}), record.get("best", {})
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        if tag in final:
            table.add_row(tag, f"{final[tag]:.4f}", f"{best[tag]:.4f}" if tag in best else "")
    t = record.get("time", {})
    table.add_row("status", str(record.get("status")), "")
    table.add_row("steps", str(record.get("steps")), "")
    if record.get("steps_to_target") is not None:
        table.add_row("steps to target", str(record["steps_to_target"]), "")
    if "steps_per_sec" in t:
        table.add_row("steps/s", f"{t['steps_per_sec']:.1f}", "")
    return table


class Tracker:
    """Everything a training run writes: ``scalars`` (events, final/best values, console),
    ``record`` (metrics.json) and ``close``."""

    def __init__(self, run_dir: Path, hparams: dict[str, Any], total_steps: int, progress: bool,
                 base_record: dict[str, Any], purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step, flush_secs=30)
        self.record = RunRecord(run_dir, base_record)
        self.final: dict[str, float] = dict(base_record.get("final", {}))
        self.best: dict[str, float] = dict(base_record.get("best", {}))
        self.console = Console_(total_steps, progress, title=run_dir.name)
        if not purge_step:  # None: a new run; 0: a restart from scratch (a resume continues the session)
            self.writer.file_writer.add_summary(hparams_session_start(hparams, time.time()))

    def scalars(self, step: int, values: dict[str, float], is_eval: bool = False) -> None:
        # One event holding every value of the step, not add_scalar's event per
        # tag: a logging step's ~20 tags cost ~0.5 ms through add_scalar and
        # ~0.08 ms this way (1% of a small MLP's time at log_every=50 on CPU).
        # TensorBoard reads both forms alike.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self.writer.file_writer.add_summary(summary, step)
        for tag, v in values.items():
            if not math.isfinite(v):
                continue
            self.final[tag] = v
            if tag.endswith("/acc"):
                self.best[tag] = max(v, self.best.get(tag, -math.inf))
            elif tag.endswith("/loss"):
                self.best[tag] = min(v, self.best.get(tag, math.inf))
        self.console.update(step, values, is_eval)

    def close(self, status: str) -> None:
        self.console.stop()
        self.writer.file_writer.add_summary(hparams_session_end(status, time.time()))
        self.writer.flush()
        self.writer.close()


def print_summary(record: dict[str, Any], run_dir: Path) -> None:
    from bnexp.report import print_titled

    print_titled(Console(file=sys.stdout), str(run_dir), summary_table(None, record))
