"""``bnexp resume RUN_DIR`` and ``bnexp reproduce RUN_DIR``: train a run's
saved config again, into the same run dir from its checkpoint (resume) or into
a new one from scratch, comparing the metrics (reproduce).

A run directory holds everything needed: the composed config Hydra saved
(``.hydra/config.yaml``), the record (``metrics.json``) and the last checkpoint
(``checkpoint.pt``). No Hydra composition is needed: the saved config is merged
onto the typed schema (:func:`bnexp.schema.typed`) and handed to
:func:`bnexp.train.train`. Both ask :func:`bnexp.rundir.policy` what may be done,
before and again under the run dir's lock.

A reproduced run goes to ``runs/reproduce/<timestamp>/<RUN_DIR's name>``
(outside the original sweep, so a report on that sweep does not count it as one
more seed) and records ``reproduce_of`` in its metrics.json.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnexp import checkpoint as ckpt_mod
from bnexp.config import LATER_KEYS, ConfigError, config_hash, flatten, hash_matches, is_non_result_key, plain
from bnexp.io import atomic_write, read_bounded
from bnexp.rundir import (
    CHECKPOINT, LOCK_FILE, Action, RunDirGuard, RunLocked, acquire_run_lock, before_writing, policy, read_record, release_run_lock,
    run_lock, world_mismatch,
)
from bnexp.runs import CONFIG, load_yaml, read_run, resolver_calls
from bnexp.runtime import recorded_threads
from bnexp.schema import typed, validate
from bnexp.train import led, train

log = logging.getLogger("bnexp")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job_logging format


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def load_saved_config(run_dir: Path, overrides: list[str] | None = None, record: dict[str, Any] | None = None) -> DictConfig:
    """The run's saved config on the schema, with ``overrides`` (key=value) applied and validated.

    Refused (ConfigError, one line): a file that is not a whole config as bnexp
    saved it (keys missing: cut short or edited), one that does not match the
    config hash in ``record`` (metrics.json), a value that calls a resolver
    (``${oc.env:...}``, ``${hydra:...}``: a rerun resolves nothing from its own
    environment), and interpolations that do not resolve (recursive, dangling)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory (no {CONFIG}); `bnexp runs` lists run directories")
    try:
        saved = load_yaml(path)
        cfg = typed(saved)
    except Exception as e:  # noqa: BLE001  OmegaConf's validation and YAML errors
        raise ConfigError(getattr(e, "full_key", None) or str(path), f"saved config does not fit the schema: {_one_line(e)}") from None
    missing = missing_keys(saved)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConfigError(str(path), f"misses {', '.join(missing[:5])}{more}: cut short or edited (a run's saved config holds every key); "
                                     "allowed: the file as the run saved it")
    if record is not None and record.get("config_hash") is not None and not _hash_matches(record, cfg):
        raise ConfigError("RUN_DIR", f"{path} no longer matches the run in metrics.json (config hash {record['config_hash']})")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(getattr(e, "full_key", None) or " ".join(overrides or []), _one_line(e)) from None
    _check_resolvable(cfg, path)
    validate(cfg)
    return cfg


def missing_keys(saved: Any) -> list[str]:
    """Keys of the schema (for the saved model family) that ``saved`` lacks, other
    than keys added after runs were first recorded (LATER_KEYS) and keys that change
    no result (probes.*, ...): those a config saved by an earlier version lacks."""
    if not isinstance(saved, DictConfig):
        return ["(the whole config)"]
    kind = OmegaConf.select(saved, "model.kind", default="mlp")
    expected = flatten(plain(typed({"model": {"kind": kind}})))
    present = flatten(OmegaConf.to_container(saved, resolve=False))
    return [k for k in expected if k not in present and k not in LATER_KEYS and not is_non_result_key(k)]


def _hash_matches(record: dict[str, Any], cfg: DictConfig) -> bool:
    """Whether ``cfg`` is the config of the run ``record`` describes (hashed with the run's own number of processes)."""
    try:
        recorded = record["config_hash"]
        return recorded == config_hash(cfg, world_size=record.get("world_size") or 1) or hash_matches(recorded, cfg)
    except Exception:  # noqa: BLE001  a value that does not resolve: said by _check_resolvable
        return True


def _check_resolvable(cfg: DictConfig, path: Path) -> None:
    raw = OmegaConf.to_container(cfg, resolve=False)
    calls = resolver_calls(raw)
    if calls:
        value = flatten(raw)[calls[0]]
        raise ConfigError(calls[0], f"{value} in {path} calls a resolver, which a rerun never resolves (its value would come from "
                                    "this process's environment, not from the run); allowed: plain values and ${key} references "
                                    "(bnexp reproduce: give the value as KEY=VALUE)")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001  recursive or dangling interpolations
        key = getattr(e, "full_key", None) or str(path)
        raise ConfigError(key, f"saved config does not resolve: {_one_line(e)}") from None


def log_to(run_dir: Path) -> None:
    """Log like a Hydra job: to the console and, appended, to the run's own log file
    (replacing the handlers an earlier call in this process added)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in [h for h in root.handlers if getattr(h, "bnexp_rerun", False)]:
        h.close()
        root.removeHandler(h)
    formatter = logging.Formatter(LOG_FORMAT)
    # delay=True: the file is opened on the first record, so a resume refused while setting up leaves it alone.
    for handler in (logging.StreamHandler(), logging.FileHandler(run_dir / "bnexp.log", mode="a", delay=True)):
        handler.setFormatter(formatter)
        handler.bnexp_rerun = True  # type: ignore[attr-defined]
        root.addHandler(handler)


# --------------------------------------------------------------------------- resume


def check_resumable(run_dir: str | Path) -> tuple[DictConfig, dict[str, Any], dict[str, Any]]:
    """Everything ``bnexp resume`` checks before it touches the run: returns the
    saved config, metrics.json and the loaded checkpoint, or raises ConfigError
    saying what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a directory; allowed: a run directory (runs/<name>/<time>/...)")
    record = read_record(run_dir)
    if record is None:
        raise ConfigError("RUN_DIR", f"{run_dir} is not a bnexp run directory (no readable metrics.json); `bnexp runs` lists run directories")
    world = world_mismatch(record, run_dir)
    if world:
        raise ConfigError("RUN_DIR", world)
    cfg = load_saved_config(run_dir)  # fits the schema; data files and device still there
    if record.get("config_hash") is not None and not hash_matches(record["config_hash"], cfg):
        raise ConfigError("RUN_DIR", f"{run_dir}/.hydra/config.yaml no longer matches the run in metrics.json (config hash {record['config_hash']})")
    decision = policy(cfg, run_dir)
    if decision.action == Action.refuse:
        raise RunLocked(run_dir, record.get("process")) if decision.live else ConfigError("RUN_DIR", decision.reason)
    if decision.action == Action.skip:
        raise ConfigError("RUN_DIR", f"{run_dir} already finished (status {record.get('status')}); nothing to resume")
    if decision.action == Action.train:
        raise ConfigError("RUN_DIR", f"{run_dir} has no {CHECKPOINT} (status {record.get('status')}); nothing to resume from, train it again instead")
    checkpoint = ckpt_mod.load(run_dir / CHECKPOINT)  # readable, tensors only, bnexp's format
    return cfg, record, checkpoint


def resume(run_dir: str | Path) -> dict[str, Any]:
    """Continue ``run_dir`` from its checkpoint; returns the final metrics.json record.

    Raises ConfigError before anything is written if the run cannot be resumed
    (RunLocked if another process is training it); RunInterrupted (a
    KeyboardInterrupt) if it is interrupted again.
    """
    run_dir = Path(run_dir).resolve()
    return led(lambda: _resume(run_dir))  # in a data-parallel run: rank 0 checks, every rank trains


def _resume(run_dir: Path) -> dict[str, Any]:
    cfg, record, checkpoint = check_resumable(run_dir)
    with run_lock(run_dir):  # refused if another process trains here; held until train() is done
        if read_record(run_dir) != record:
            # Another process trained the run between the checks and the lock
            # (perhaps finished it): check again what it left.
            cfg, record, checkpoint = check_resumable(run_dir)
        log_to(run_dir)
        with recorded_threads(cfg, record):  # results depend on the thread count
            return _train(cfg, run_dir, record, resume=True, extra_record={"overrides": record.get("overrides", [])}, checkpoint=checkpoint)


def caveat(record: dict[str, Any]) -> str | None:
    """Why rerunning the run of ``record`` (its metrics.json) alone cannot give its
    numbers exactly, in words (None: no reason known)."""
    if not record.get("replica"):
        return None
    from bnexp.replicas import replica_caveat

    return replica_caveat(record)


def _train(cfg: DictConfig, run_dir: Path, record: dict[str, Any], resume: bool = False, extra_record: dict[str, Any] | None = None,
           checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """train() for a run trained alone; a replica of a stack (its ``record`` says
    so) as a stack of one, which computes it as its stack did."""
    if not record.get("replica"):
        return train(cfg, run_dir, resume=resume, extra_record=extra_record, checkpoint=checkpoint)
    from bnexp.replicas import train_alone

    why = caveat(record)
    if why:
        log.warning("trained alone, %s will not give its stack's numbers exactly: %s", run_dir, why)
    return train_alone(cfg, run_dir, resume, extra_record)


# --------------------------------------------------------------------------- reproduce


def default_out_dir(run_dir: Path) -> Path:
    return Path("runs") / "reproduce" / time.strftime("%Y-%m-%d_%H-%M-%S") / run_dir.resolve().name


HYDRA_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")


def reproduce(run_dir: Path, out_dir: Path | None = None, overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train ``run_dir``'s config into a new run dir; returns (new dir, its metrics.json record).

    A config that fails while setting up (e.g. a batch larger than the data)
    leaves nothing behind of what this call wrote (see RunDirGuard). In a
    data-parallel run the other ranks train rank 0's copy and return its record."""
    return led(lambda: _reproduce(run_dir, out_dir, overrides))


def _reproduce(run_dir: Path, out_dir: Path | None, overrides: list[str] | None) -> tuple[Path, dict[str, Any]]:
    # Everything read from RUN_DIR is read and checked before --out is touched.
    cfg = load_saved_config(run_dir, overrides, record=read_record(run_dir))
    original = read_run(run_dir, with_config=False)
    saved_overrides = _saved_overrides(run_dir)  # a record only, but a file PyYAML refuses is refused here, not halfway
    records = _hydra_records(run_dir)
    out = out_dir or default_out_dir(run_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory; allowed: a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; allowed: a new directory")
    before = before_writing(out, (LOCK_FILE,))
    try:
        acquire_run_lock(out)  # refused (RunLocked, nothing touched) if another process took it since the check
    except OSError as e:
        RunDirGuard(out, [], before).undo()
        raise ConfigError("--out", f"cannot write into {out}: {e.strerror}; allowed: a directory you can write to") from None
    try:
        guard = RunDirGuard(out, [*HYDRA_FILES, "bnexp.log"], before)  # under the lock
        try:
            if policy(cfg, out).action != Action.train or any(p.name != LOCK_FILE for p in out.iterdir()):
                raise ConfigError("--out", f"{out} was written to by another process meanwhile; allowed: a new directory")
            (out / ".hydra").mkdir(parents=True, exist_ok=True)
            for name, content in records.items():
                (out / name).write_bytes(content)
                shutil.copystat(run_dir / name, out / name)
            if overrides:  # the config that actually ran, and how it came to differ
                atomic_write(out / ".hydra" / "config.yaml", lambda f: OmegaConf.save(cfg, f))
                atomic_write(out / ".hydra" / "overrides.yaml", lambda f: OmegaConf.save(OmegaConf.create([*saved_overrides, *overrides]), f))
            log_to(out)
            with recorded_threads(cfg, original.metrics):  # results depend on the thread count
                record = _train(cfg, out, original.metrics or {},
                                extra_record={"overrides": original.overrides + list(overrides or []), "reproduce_of": str(run_dir.resolve())})
        except BaseException as e:
            if isinstance(e, ConfigError) or read_record(out) is None:  # training never began: nothing of the new run to keep
                guard.undo()
            raise
    finally:
        release_run_lock(out)
    return out, record


def _hydra_records(run_dir: Path) -> dict[str, bytes]:
    """RUN_DIR's .hydra/*.yaml, which the new run dir gets copies of: regular files
    of at most 1 MiB (a FIFO there would block a copy forever), or a ConfigError."""
    out = {}
    for name in HYDRA_FILES:
        if os.path.lexists(run_dir / name):
            try:
                out[name] = read_bounded(run_dir / name, 1 << 20)
            except OSError as e:
                raise ConfigError(str(run_dir / name), f"cannot be copied: {e.strerror or e}; allowed: the file Hydra saved") from None
    return out


def _saved_overrides(run_dir: Path) -> list[str]:
    """RUN_DIR's .hydra/overrides.yaml: a list of strings, or a ConfigError."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        saved = OmegaConf.to_container(load_yaml(path), resolve=False)
    except Exception as e:  # noqa: BLE001  YAML errors, tags PyYAML's safe loader refuses
        raise ConfigError(str(path), f"is not readable: {_one_line(e)}; allowed: the list of overrides Hydra saved") from None
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise ConfigError(str(path), "is not a list of override strings; allowed: the list of overrides Hydra saved")
    return saved


def differences(original: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any, float | None]]:
    """(metric, original, reproduced, difference) for status, steps and every final value
    except timing (time/*), which no two runs share."""
    rows: list[tuple[str, Any, Any, float | None]] = [
        ("status", original.get("status"), new.get("status"), None),
        ("steps", original.get("steps"), new.get("steps"), None),
    ]
    a, b = original.get("final") or {}, new.get("final") or {}
    for tag in sorted(set(a) | set(b), key=lambda t: (t.split("/")[0] not in ("train", "val", "test"), t)):
        if tag.startswith("time/"):
            continue
        x, y = a.get(tag), b.get(tag)
        diff = y - x if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None
        rows.append((tag, x, y, diff))
    if original.get("steps_to_target") is not None or new.get("steps_to_target") is not None:
        rows.append(("steps to target", original.get("steps_to_target"), new.get("steps_to_target"), None))
    return rows


def identical(rows: list[tuple[str, Any, Any, float | None]]) -> bool:
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return x == y

    return all(same(x, y) for _, x, y, _ in rows)


def differences_table(rows: list[tuple[str, Any, Any, float | None]], title: str):
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    for name, justify in (("metric", "left"), ("original", "right"), ("reproduced", "right"), ("difference", "right")):
        table.add_column(name, justify=justify)
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    hidden: list[str] = []
    for tag, x, y, diff in rows:
        headline = "/" not in tag or tag.split("/")[0] in ("train", "val", "test")
        if not headline and x == y:
            hidden.append(tag)  # probes and norms: listed only when they differ
            continue
        mark = "" if x == y else "[yellow]"
        same = "0" if isinstance(x, (int, float)) else "same"
        table.add_row(tag, fmt(x), fmt(y), mark + (same if x == y else (f"{diff:+.3g}" if diff is not None else "differs")))
    if hidden:
        families = Counter(t.split("/")[0] for t in hidden)
        what = ", ".join(hidden) if len(hidden) <= 3 else ", ".join(f"{f}/* {n}" for f, n in families.items())
        table.caption = f"identical, not listed: {len(hidden)} more ({what})"
    return table
