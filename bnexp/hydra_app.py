"""The Hydra side of bnexp: the task function behind ``@hydra.main``, the callback
that validates a config before Hydra creates its run directory, and the
resolvers that name run directories.

``bnexp train`` and ``bnexp sweep`` hand their arguments to Hydra's real entry
point, so every Hydra flag, override form, sweeper and launcher works.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnexp.config import ConfigError, config_dir, config_hash, register_configs, validate
from bnexp.io import write_json
from bnexp.record import RunLocked, acquire_run_lock, read_record, release_run_lock, run_is_alive, run_lock

log = logging.getLogger("bnexp")

# Results of the jobs run in this process (the basic launcher, `bnexp train`).
# Jobs in other processes (joblib, SLURM) are read back from their metrics.json.
RESULTS: list[dict[str, Any]] = []
# For `bnexp train`: what to undo if the config turns out to be invalid after
# Hydra wrote into the run directory (see RunDirGuard).
_GUARD: list["RunDirGuard | None"] = [None]
# For `bnexp train`: the run dir whose lock ValidateCallback took before Hydra
# wrote into it; held until the job is done (or its files are undone).
_LOCKED: list[Path | None] = [None]


def _first_non_empty(*values: Any) -> str:
    for v in values:
        if v not in (None, "", "None", "null"):
            return str(v)
    return ""


def _job_subdir(task: Any, seed: Any, params: Any, sweep_dir: str) -> str:
    from bnexp import sweep  # evaluated where the job runs (a joblib or SLURM worker too): all it needs is on disk

    return sweep.job_dir_name(task, seed, sweep.sweep_overrides(sweep_dir, params))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("bnexp.first"):
        OmegaConf.register_new_resolver("bnexp.first", _first_non_empty)
        OmegaConf.register_new_resolver("bnexp.subdir", _job_subdir)


class RejectedConfig(BaseException):
    """Carries a ConfigError out of a Hydra callback.

    Hydra turns an ``Exception`` raised in a callback into a warning and goes
    on; a BaseException passes through its callback runner and its error
    printer (both catch ``Exception``) up to the CLI, which exits 2.
    """

    def __init__(self, error: ConfigError):
        super().__init__(str(error))
        self.error = error


class RunDirGuard:
    """Lets `bnexp train` leave the file system as it found it when a config is
    rejected after Hydra has written ``.hydra/`` and its log into the run dir
    (problems only found while setting up, e.g. a batch larger than the data).

    A run dir that did not exist is removed with every parent the run created;
    in one that existed, new entries are removed and the small files Hydra
    rewrites (``.hydra/*``, the job log) get their bytes and times back.
    """

    def __init__(self, run_dir: Path, job_name: str):
        self.run_dir = run_dir
        self.root: Path | None = None  # the topmost directory this run creates
        for p in [run_dir, *run_dir.parents]:
            if p.exists():
                break
            self.root = p
        self.names: set[str] = set()
        self.files: dict[Path, bytes] = {}  # the small files Hydra rewrites
        self.times: dict[Path, tuple[int, int]] = {}  # their times and their directories'
        if self.root is not None:  # removing it again restores its parent's listing; give back its time too
            st = self.root.parent.stat()
            self.times[self.root.parent] = (st.st_atime_ns, st.st_mtime_ns)
        elif run_dir.is_dir():
            hydra_dir = run_dir / ".hydra"
            self.names = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}
            self.files = {p: p.read_bytes() for p in [*hydra_dir.glob("*"), run_dir / f"{job_name}.log"] if p.is_file()}
            for p in [*self.files, hydra_dir, run_dir]:
                if p.exists():
                    st = p.stat()
                    self.times[p] = (st.st_atime_ns, st.st_mtime_ns)

    def undo(self) -> None:
        root_logger = logging.getLogger()  # close Hydra's log file before removing or restoring it
        for h in list(root_logger.handlers):
            if isinstance(h, logging.FileHandler):
                h.close()
                root_logger.removeHandler(h)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.run_dir.is_dir():
            self._undo_inside()
        for p, ns in self.times.items():  # files first, then .hydra, then the run dir
            if p.exists():
                os.utime(p, ns=ns)

    def _undo_inside(self) -> None:
        for p in sorted(self.run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if str(p.relative_to(self.run_dir)) not in self.names:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        for p, data in self.files.items():
            p.write_bytes(data)


def undo_run_dir() -> None:
    """Undo what a rejected `bnexp train` wrote (idempotent)."""
    guard, _GUARD[0] = _GUARD[0], None
    if guard is not None:
        guard.undo()  # a lock file it created goes too: removed while still locked, so nobody else holds it
    _release_train_lock()


def _release_train_lock() -> None:
    locked, _LOCKED[0] = _LOCKED[0], None
    if locked is not None:
        release_run_lock(locked)


def existing_run_problem(run_dir: Path, cfg: DictConfig, existing: dict[str, Any] | None = None) -> str | None:
    """Why ``cfg`` must not be trained into ``run_dir`` as things stand, or None.

    Another live process trains it, or it holds a run of a different config
    (training over it would mix two runs' event files and lose the first).
    """
    existing = existing if existing is not None else read_record(run_dir)
    if existing is None or existing.get("config_hash") is None:
        return None
    if run_is_alive(existing):
        return str(RunLocked(run_dir, existing.get("process")))
    if existing["config_hash"] != config_hash(cfg):
        return (f"{run_dir} holds a run of a different config (status {existing.get('status')}); "
                "choose another directory, or delete that run to reuse its name")
    return None


class ValidateCallback(Callback):
    """Checks a config before Hydra creates the run directory (``on_run_start`` runs before ``run_job``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # run.dir interpolates hydra:runtime.choices
        _GUARD[0] = None
        _release_train_lock()
        run_dir = Path(config.hydra.run.dir).resolve()
        cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(cfg)
            problem = existing_run_problem(run_dir, cfg)
            if problem:
                raise ConfigError("hydra.run.dir", problem)
        except ConfigError as e:
            raise RejectedConfig(e) from None
        guard = RunDirGuard(run_dir, str(config.hydra.job.name))  # before the lock file: undo removes it if new
        if _finished(read_record(run_dir), cfg):
            _GUARD[0] = guard  # skipped by execute(); nothing will train, so no lock
            return
        try:
            # Taken before Hydra writes .hydra/ and its log: a second `bnexp train`
            # into this run dir is refused with nothing touched.
            acquire_run_lock(run_dir)
        except RunLocked as e:
            raise RejectedConfig(e) from None
        _LOCKED[0], _GUARD[0] = run_dir, guard
        problem = existing_run_problem(run_dir, cfg)  # again, under the lock: another process may have trained it since
        if problem:
            undo_run_dir()
            raise RejectedConfig(ConfigError("hydra.run.dir", problem))


def _finished(existing: dict[str, Any] | None, cfg: DictConfig) -> bool:
    """Whether ``existing`` (a metrics.json) is a finished run of ``cfg``: a rerun skips it."""
    if existing is None or existing.get("status") not in ("completed", "diverged"):
        return False
    try:
        return existing.get("config_hash") == config_hash(cfg)
    except Exception:  # noqa: BLE001  a config that does not resolve is not that run's; validate() says why
        return False


def _skip_finished(run_dir: Path, existing: dict[str, Any]) -> dict[str, Any]:
    log.info("skipping %s: %s earlier with the same config", run_dir, existing["status"])
    return {**existing, "skipped": True, "run_dir": str(run_dir)}


def execute(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
    """Run one job into ``run_dir``: skip it if done, resume it if unfinished, else train.

    Everything but skipping a finished run happens under the run dir's lock. A
    run dir another process holds is refused like an invalid config in a single
    run (exit 2) and skipped, untouched, in a sweep.
    """
    try:
        existing = read_record(run_dir)
        if _finished(existing, cfg):  # a finished run stays finished: skipping it needs no lock and writes nothing
            return _skip_finished(run_dir, existing)
        with run_lock(run_dir):  # until the job's last write, _failed() included
            return _execute_locked(cfg, run_dir, multirun, overrides)
    except RunLocked as e:
        if not multirun:
            return {"status": "invalid", "error": e, "run_dir": str(run_dir)}
        log.warning("skipping: %s", e)
        return {**(read_record(run_dir) or {}), "skipped": True, "run_dir": str(run_dir)}


def _execute_locked(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
    from bnexp.train import CHECKPOINT, train

    try:
        validate(cfg)
        existing = read_record(run_dir)
        same = existing is not None and existing.get("config_hash") == config_hash(cfg)
        if _finished(existing, cfg):  # finished by another process since execute() looked
            return _skip_finished(run_dir, existing)
        problem = existing_run_problem(run_dir, cfg, existing)
        if problem and same:  # live elsewhere: leave it to that process, touch nothing
            log.warning("skipping: %s", problem)
            return {**existing, "skipped": True, "run_dir": str(run_dir)}
        if problem:  # a different run lives here: report, touch nothing
            if not multirun:
                raise ConfigError("hydra.run.dir", problem)
            log.error("not run: %s", problem)
            return {"status": "failed", "error": problem, "steps": 0, "final": {}, "best": {}, "overrides": overrides, "run_dir": str(run_dir)}
        resume = same and (run_dir / CHECKPOINT).exists() and existing.get("status") in ("running", "interrupted", "failed")
        result = train(cfg, run_dir, resume=resume, extra_record={"overrides": overrides}, summary=not multirun)
        return {**result, "run_dir": str(run_dir)}
    except ConfigError as e:
        if not multirun:
            # Returned, not raised: Hydra prints a line of its own for a raising job.
            # The CLI undoes what Hydra wrote into the run dir and exits 2.
            return {"status": "invalid", "error": e, "run_dir": str(run_dir)}
        return _failed(run_dir, f"invalid config: {e}", overrides)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  a failed job must not stop a sweep
        log.error("run failed: %s\n%s", e, traceback.format_exc())
        return _failed(run_dir, f"{type(e).__name__}: {e}", overrides)


def _failed(run_dir: Path, error: str, overrides: list[str]) -> dict[str, Any]:
    record = read_record(run_dir) or {"steps": 0, "final": {}, "best": {}, "overrides": overrides}
    record.update(status="failed", error=error)
    write_json(run_dir / "metrics.json", record)
    return {**record, "run_dir": str(run_dir)}


def task(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        result = execute(cfg, run_dir, multirun=hc.mode == RunMode.MULTIRUN, overrides=list(hc.overrides.task))
    except BaseException:
        _release_train_lock()
        raise
    RESULTS.append(result)
    if result.get("status") != "invalid":
        _GUARD[0] = None  # the run stands; nothing to undo any more
        _release_train_lock()  # else undo_run_dir() releases it, after removing what it must
    # The objective of search sweepers (hydra/sweeper=optuna maximizes it with
    # hydra.sweeper.direction=maximize); NaN marks a failed job as a failed trial.
    value = (result.get("final") or {}).get("val/acc") if result.get("status") == "completed" else None
    return float("nan") if value is None else float(value)


def hydra_main(argv: list[str]) -> None:
    """Call Hydra's real entry point with ``argv`` as the command line."""
    register_configs()
    register_resolvers()
    main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)
    saved = sys.argv
    sys.argv = ["bnexp", *argv]
    try:
        main()
    finally:
        sys.argv = saved
