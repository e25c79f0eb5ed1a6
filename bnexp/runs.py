"""Finding and reading run directories: what ``bnexp runs``, ``report``,
``reproduce`` and the sweep summary all need.

A run directory is one that holds ``metrics.json`` or ``.hydra/config.yaml``.
Reading never raises for a broken run: a run that cannot be read comes back
with ``problem`` set, so a listing can show it instead of crashing on it.
"""

from __future__ import annotations

import io
import json
import math
import logging
import os
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from bnexp.config import flatten, normalized
from bnexp.io import Unreadable, read_bounded, read_json

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
    starting: bool = False  # no metrics.json yet, and a live process holds its lock (setting it up)

    @cached_property
    def job_num(self) -> int:
        """Hydra's job number of a sweep's run (``.hydra/hydra.yaml``); a large number where there is none."""
        return _read_job_num(self.path)

    @property
    def status(self) -> str:
        """metrics.json's status; ``dead`` for a ``running`` run whose heartbeat stopped."""
        if self.metrics is None:
            return "running" if self.starting else "unreadable"
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, dict) and all(_is_number(x) or x is None for x in v.values())


# What the readers of metrics.json (listings, reports, liveness checks) rely
# on, as JSON types. A dozen checks written out: a schema library would be a
# new dependency of `bnexp runs` for less than this.
RECORD_SHAPE: dict[str, tuple[Any, str]] = {
    "status": (lambda v: isinstance(v, str), "a string"),
    "steps": (_is_int, "an integer"),
    "total_steps": (_is_int, "an integer"),
    "final": (_numbers, "an object of numbers"),
    "best": (_numbers, "an object of numbers"),
    "steps_to_target": (lambda v: v is None or _is_number(v), "a number or null"),
    "time": (_numbers, "an object of numbers"),
    "overrides": (lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), "a list of strings"),
    "process": (lambda v: isinstance(v, dict) and isinstance(v.get("host", ""), str)
                and all(v.get(k) is None or _is_int(v[k]) for k in ("pid", "start_ticks")), "an object with host, pid"),
    "error": (lambda v: isinstance(v, str), "a string"),
    "reproduce_of": (lambda v: isinstance(v, str), "a string"),
    "config_hash": (lambda v: isinstance(v, str), "a string"),
}


def _json_kind(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    return {str: "a string", list: "a list", dict: "an object"}.get(type(v), "a number")


def record_problem(record: Any) -> str | None:
    """Why a parsed metrics.json cannot be used as a run's record, or None."""
    if not isinstance(record, dict):
        return f"metrics.json holds {_json_kind(record)}, not an object"
    for key, (ok, expected) in RECORD_SHAPE.items():
        if key in record and not ok(record[key]):
            return f"metrics.json: {key} is {_json_kind(record[key])}, expected {expected}"
    return None


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


# ${name:...}: a call of a resolver (oc.env, hydra, now, ...); ${a.b} refers to another key.
_RESOLVER_CALL = re.compile(r"\$\{\s*[A-Za-z_][\w.\-]*\s*:")


def resolver_calls(container: Any) -> list[str]:
    """The dotted keys of a saved config (as a container, unresolved) whose values
    call a resolver: what they give depends on the environment or Hydra's runtime
    of the process reading them, not on the run (and ${oc.env:...} may be a secret)."""
    return [k for k, v in flatten(container).items() if _RESOLVER_CALL.search(str(v))] if isinstance(container, dict) else []


def load_yaml(path: Path, limit: int = 1 << 20) -> Any:
    """A record of a run dir (.hydra/*.yaml) through OmegaConf: read with
    :func:`bnexp.io.read_bounded` (never blocks, at most ``limit`` bytes), and
    refused when it uses YAML aliases, which Hydra never writes and which can
    expand a small file into a huge tree (a "billion laughs")."""
    import yaml
    from omegaconf import OmegaConf

    text = read_bounded(path, limit).decode("utf-8")
    if "*" in text:  # an alias needs one; a full parse only then
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=loader)):
            raise ValueError(f"{path} uses YAML aliases (*name), which no saved record holds")
    return OmegaConf.load(io.StringIO(text))


def _unreadable(path: Path) -> str:
    """Why :func:`bnexp.io.read_json` gave nothing for ``path``."""
    try:
        read_bounded(path)
    except OSError as e:
        return f"{path.name} is unreadable ({e.strerror or e})"
    return f"{path.name} is unreadable"


def _read_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """.hydra/config.yaml flattened, or None with the reason added to ``problems``.
    References between keys are resolved; resolver calls are shown as written,
    never resolved in this process (an ${oc.env:...} would print its value)."""
    try:
        from omegaconf import OmegaConf

        saved = load_yaml(path / CONFIG)
        container = OmegaConf.to_container(saved, resolve=False)
        if not resolver_calls(container):
            try:
                container = OmegaConf.to_container(saved, resolve=True)
            except Exception:  # noqa: BLE001  an interpolation that no longer resolves
                pass
    except FileNotFoundError:
        problems.append("no .hydra/config.yaml")
        return None
    except Unreadable as e:
        problems.append(f".hydra/config.yaml is unreadable ({e.strerror})")
        return None
    except Exception as e:  # noqa: BLE001  a half-written or hand-edited file
        problems.append(f".hydra/config.yaml is unreadable ({type(e).__name__})")
        return None
    if not isinstance(container, dict):
        problems.append(".hydra/config.yaml is not a mapping")
        return None
    return normalized(flatten(container))


def read_run(path: Path, with_config: bool = True) -> Run:
    """The run in ``path``. ``with_config=False`` skips parsing .hydra/config.yaml
    (~5 ms of OmegaConf a run) for callers that show only metrics and overrides."""
    run = Run(path=path)
    problems: list[str] = []
    if (path / METRICS).exists():
        run.metrics = read_json(path / METRICS)
        shape = _unreadable(path / METRICS) if run.metrics is None else record_problem(run.metrics)
        if shape:  # valid JSON of another shape is as unusable as a torn file: listed, never a crash
            run.metrics = None
            problems.append(shape)
    else:
        from bnexp.rundir import live_holder

        holder = live_holder(path)
        run.starting = holder is not None
        problems.append(f"no metrics.json yet: pid {holder['pid']} holds it, setting it up" if holder
                        else "no metrics.json (the run never started training, or its files were lost)")
    if with_config:
        run.config = _read_config(path, problems)
    if run.metrics and isinstance(run.metrics.get("overrides"), list):
        run.overrides = [str(o) for o in run.metrics["overrides"]]
    else:
        try:
            from omegaconf import OmegaConf

            run.overrides = [str(o) for o in load_yaml(path / OVERRIDES)]
        except Exception:  # noqa: BLE001
            pass
    run.problem = "; ".join(problems) or None
    return run


def _read_job_num(run_dir: Path) -> int:
    import yaml

    try:
        text = read_bounded(run_dir / ".hydra" / "hydra.yaml", 1 << 20)
        # libyaml's loader where PyYAML has it: ~10x faster on Hydra's long record (~4 ms a job otherwise).
        return int(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["hydra"]["job"]["num"])
    except Exception:  # noqa: BLE001
        return 1 << 30


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
        if any(not p.is_file() for p in run_dir.glob("events.out.tfevents.*")):
            return {}  # a FIFO or device there: TensorBoard's reader would wait on it forever
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


def sweep_order(runs: list[Run]) -> list[Run]:
    """Runs in the order their sweeps launched them: by directory, then Hydra's job number."""
    return sorted(runs, key=lambda r: (str(r.path.parent), r.job_num, str(r.path)))


def _cut(text: str):
    from rich.text import Text

    return Text(text, no_wrap=True, overflow="ellipsis")  # one line per run at any width: cut, never wrapped


def runs_tables(runs: list[Run]) -> list[tuple[str, Any]]:
    """``bnexp runs``: per directory of runs (a sweep, runs/default), its path and a
    table with one row per run: its name, status, steps, the overrides that tell
    it from the others there (and are not in its name already: a sweep job's
    name is its swept values), headline metrics, and when it last wrote. The
    overrides every run there shares go into the caption."""
    from rich.table import Table

    by_dir: dict[Path, list[Run]] = {}
    for r in sweep_order(runs):
        by_dir.setdefault(r.path.parent, []).append(r)
    out = []
    for folder, group in by_dir.items():
        lists = [shown_overrides(r) for r in group]
        common = [o for o in lists[0] if all(o in other for other in lists[1:])] if len(group) > 1 else []
        own = [[o for o in os if o not in common and f",{o.replace('/', '_')}," not in f",{r.path.name},"]
               for r, os in zip(group, lists)]
        table = Table(caption=f"every run: {' '.join(common)}" if common else None, show_header=True, header_style="bold")
        table.add_column("run")
        table.add_column("status", no_wrap=True)
        table.add_column("steps", justify="right", no_wrap=True)
        if any(own):
            table.add_column("overrides")
        tags = headline(group)
        for tag in tags:
            table.add_column(tag, justify="right", no_wrap=True)
        table.add_column("updated", justify="right", no_wrap=True)
        for r, overrides in zip(group, own):
            m = r.metrics or {}
            steps = f"{m.get('steps', '-')}/{m['total_steps']}" if m.get("total_steps") else str(m.get("steps", "-"))
            status = r.status
            cells = [_cut(r.path.name), status_cell(status, {"dead": "dead (no heartbeat)"}.get(status)), steps]
            if any(own):
                cells.append(_cut(" ".join(overrides) or "-"))
            table.add_row(*cells, *headline_cells(r, tags), age((m.get("time") or {}).get("heartbeat")))
        out.append((str(folder), table))
    return out
