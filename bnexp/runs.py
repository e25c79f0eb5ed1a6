"""Finding and reading run directories: what ``bnexp runs``, ``report``,
``reproduce`` and the sweep summary all need.

A run directory is one that holds ``metrics.json`` or ``.hydra/config.yaml``.
Reading never raises for a broken run: a run that cannot be read comes back
with ``problem`` set, so a listing can show it instead of crashing on it.
"""

from __future__ import annotations

import json
import math
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bnexp.config import flatten
from bnexp.io import read_json

METRICS = "metrics.json"
CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
AGGREGATE = "aggregate"  # derived seed-band runs a sweep writes (see bnexp.sweep); not runs


@dataclass
class Run:
    path: Path
    config: dict[str, Any] | None = None  # flattened: {"norm.placement": "pre", ...}
    metrics: dict[str, Any] | None = None  # metrics.json
    overrides: list[str] = field(default_factory=list)
    problem: str | None = None  # why this run cannot be used, if it cannot

    @property
    def status(self) -> str:
        """metrics.json's status; ``dead`` for a ``running`` run whose heartbeat stopped."""
        if self.metrics is None:
            return "unreadable"
        from bnexp.rundir import run_is_alive

        status = str(self.metrics.get("status", "unknown"))
        if status == "running" and not run_is_alive(self.metrics):
            return "dead"
        return status

    def final(self, tag: str) -> float | None:
        return _number((self.metrics or {}).get("final", {}).get(tag))

    def best(self, tag: str) -> float | None:
        return _number((self.metrics or {}).get("best", {}).get(tag))

    @property
    def steps_to_target(self) -> float | None:
        return _number((self.metrics or {}).get("steps_to_target"))

    @property
    def steps_per_sec(self) -> float | None:
        return _number(((self.metrics or {}).get("time") or {}).get("steps_per_sec"))


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def is_run_dir(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / CONFIG).is_file()


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories at or under ``paths``, sorted; a run's own subfolders are not searched."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if is_run_dir(root):
            found.add(root)
            continue
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if is_run_dir(here):
                found.add(here)
                dirnames.clear()
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != AGGREGATE]
    return sorted(found)


def _read_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """.hydra/config.yaml flattened, or None with the reason added to ``problems``."""
    try:
        from omegaconf import OmegaConf

        saved = OmegaConf.load(path / CONFIG)
        try:
            container = OmegaConf.to_container(saved, resolve=True)
        except Exception:  # noqa: BLE001  an interpolation that no longer resolves
            container = OmegaConf.to_container(saved, resolve=False)
    except FileNotFoundError:
        problems.append("no .hydra/config.yaml")
        return None
    except Exception as e:  # noqa: BLE001  a half-written or hand-edited file
        problems.append(f".hydra/config.yaml is unreadable ({type(e).__name__})")
        return None
    if not isinstance(container, dict):
        problems.append(".hydra/config.yaml is not a mapping")
        return None
    return flatten(container)


def read_run(path: Path, with_config: bool = True) -> Run:
    """The run in ``path``. ``with_config=False`` skips parsing .hydra/config.yaml
    (~5 ms of OmegaConf a run) for callers that show only metrics and overrides."""
    run = Run(path=path)
    problems: list[str] = []
    if (path / METRICS).exists():
        run.metrics = read_json(path / METRICS)
        if not isinstance(run.metrics, dict):
            run.metrics = None
            problems.append("metrics.json is unreadable")
    else:
        problems.append("no metrics.json (the run never started training, or its files were lost)")
    if with_config:
        run.config = _read_config(path, problems)
    if run.metrics and isinstance(run.metrics.get("overrides"), list):
        run.overrides = [str(o) for o in run.metrics["overrides"]]
    else:
        try:
            from omegaconf import OmegaConf

            run.overrides = [str(o) for o in OmegaConf.load(path / OVERRIDES)]
        except Exception:  # noqa: BLE001
            pass
    run.problem = "; ".join(problems) or None
    return run


def find_runs(paths: Iterable[str | os.PathLike], with_config: bool = True) -> list[Run]:
    return [read_run(p, with_config) for p in find_run_dirs(paths)]


def load_scalars(run_dir: Path, tags: Iterable[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point of the run's event files (TensorBoard's own reader,
    ``size_guidance`` 0: all points, not its default sample of 10,000 per tag).

    Returns ``{tag: [(step, value), ...]}`` sorted by step; a step logged twice
    (a resumed run) keeps its last value. A missing or unreadable file gives {}.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    from tensorboard.util import tb_logging

    # Its directory watcher logs "No path found after <file>" at INFO for every
    # run read; under Hydra's logging setup that reaches the console.
    tb_logging.get_logger().setLevel(logging.WARNING)
    try:
        acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
        acc.Reload()
        wanted = acc.Tags().get("scalars", [])
        if tags is not None:
            keep = set(tags)
            wanted = [t for t in wanted if t in keep]
        out = {}
        for tag in wanted:
            by_step = {e.step: e.value for e in acc.Scalars(tag)}
            out[tag] = sorted(by_step.items())
        return out
    except Exception:  # noqa: BLE001  a truncated or foreign event file
        return {}


def format_value(v: Any) -> str:
    """A config value as Hydra override syntax would write it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def age(seconds_since_epoch: float | None) -> str:
    if not seconds_since_epoch:
        return ""
    s = max(0.0, time.time() - seconds_since_epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


HEADLINE = ("val/acc", "test/acc", "train/loss")
# Regression runs (train.loss=mse) have no accuracy: their losses head the tables.
LOSS_HEADLINE = ("val/loss", "test/loss", "train/loss")


def headline(runs: Iterable[Run]) -> tuple[str, ...]:
    """HEADLINE, or LOSS_HEADLINE when runs logged values but none an accuracy."""
    tags = {t for r in runs for t in ((r.metrics or {}).get("final") or {})}
    return LOSS_HEADLINE if tags and not any(t.endswith("/acc") for t in tags) else HEADLINE


# How `bnexp runs` and a sweep's job table colour a status.
STATUS_STYLE = {"failed": "red", "dead": "red", "unreadable": "red", "diverged": "yellow", "interrupted": "yellow",
                "running": "green", "skipped": "dim"}


def status_cell(status: str, shown: str | None = None) -> str:
    shown = shown or status
    return f"[{STATUS_STYLE[status]}]{shown}[/]" if status in STATUS_STYLE else shown


def headline_cells(run: Run, tags: Iterable[str] = HEADLINE) -> list[str]:
    """The run's final value of each headline metric, as table cells."""
    return [f"{run.final(t):.4f}" if run.final(t) is not None else "-" for t in tags]


def shown_overrides(run: Run) -> list[str]:
    """The run's overrides as tables show them (train.progress= changes no result and no log)."""
    return [o for o in run.overrides if not o.startswith("train.progress=")]


def runs_table(runs: list[Run], root: Path):
    """``bnexp runs``: one row per run with status, overrides and headline metrics."""
    from rich.table import Table

    table = Table(title=f"runs under {root}", show_header=True, header_style="bold")
    table.add_column("run", overflow="fold")
    table.add_column("status")
    table.add_column("steps", justify="right")
    table.add_column("overrides", overflow="fold")
    tags = headline(runs)
    for tag in tags:
        table.add_column(tag, justify="right")
    table.add_column("updated", justify="right")
    for r in runs:
        try:
            name = str(r.path.relative_to(root)) if r.path != root else r.path.name
        except ValueError:
            name = str(r.path)
        m = r.metrics or {}
        steps = f"{m.get('steps', '-')}/{m['total_steps']}" if m.get("total_steps") else str(m.get("steps", "-"))
        status = r.status
        beat = (m.get("time") or {}).get("heartbeat")
        table.add_row(name, status_cell(status, {"dead": "dead (no heartbeat)"}.get(status)), steps,
                      " ".join(shown_overrides(r)) or "-", *headline_cells(r, tags), age(beat))
    return table
