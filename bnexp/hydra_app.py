"""The Hydra side of bnexp: the task function behind ``@hydra.main`` and the
callback that checks a config before Hydra creates its run directory.

``bnexp train`` and ``bnexp sweep`` hand their arguments to Hydra's real entry
point, so every Hydra flag, override form, sweeper and launcher works.

A ``bnexp train``: :class:`ValidateCallback` validates the config, asks
:func:`bnexp.rundir.policy`, takes the run dir's lock and a
:class:`~bnexp.rundir.RunDirGuard`; Hydra writes ``.hydra/`` and its log; then
:func:`task` runs the job and, if the config is rejected after all (a problem
found while setting up), the guard takes back exactly what was written.
A sweep's job: Hydra writes ``.hydra/`` first, then :func:`task` runs it the
same way; a job that fails is recorded and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnexp.config import ConfigError, config_dir
from bnexp.io import write_json
from bnexp.rundir import (
    LOCK_FILE, METRICS, Action, Decision, RunDirGuard, RunInterrupted, RunLocked, acquire_run_lock, is_finished, policy, read_record,
    release_run_lock, run_lock,
)
from bnexp.schema import register_configs, register_resolvers, validate
from bnexp.train import train

log = logging.getLogger("bnexp")

# What Hydra writes into a run dir before the task runs (job name "bnexp": its log is bnexp.log).
HYDRA_WRITES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "bnexp.log")

# `bnexp train` run dirs whose callback has checked them and taken their lock
# and guard, waiting for the task (Hydra gives callbacks no channel to the task).
_PENDING: dict[Path, RunDirGuard] = {}


class RejectedConfig(BaseException):
    """Carries a ConfigError out of a Hydra callback or task.

    Hydra turns an ``Exception`` raised in a callback into a warning and goes
    on, and prints a line of its own for a job that raises one; a
    BaseException passes through its callback runner, ``run_job`` and its
    error printer (all catch ``Exception``) up to the CLI, which exits 2.
    """

    def __init__(self, error: ConfigError):
        super().__init__(str(error))
        self.error = error


class RunFailed(BaseException):
    """A `bnexp train` run failed (it is recorded as failed in its metrics.json); carried to the CLI, which exits 1."""

    def __init__(self, error: str, run_dir: Path):
        super().__init__(f"run failed: {error} (see {run_dir}/bnexp.log)")


class ValidateCallback(Callback):
    """Checks a `bnexp train` config before Hydra creates the run directory (``on_run_start`` runs before ``run_job``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # run.dir interpolates hydra:runtime.choices
        run_dir = Path(config.hydra.run.dir).resolve()
        cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(cfg)
            _check_run_dir(run_dir)
            decision = policy(cfg, run_dir)
            if decision.action == Action.refuse:
                raise ConfigError("hydra.run.dir", decision.reason)
            guard = RunDirGuard(run_dir, [*HYDRA_WRITES, LOCK_FILE])
            if decision.action == Action.skip:  # nothing will train, so no lock; Hydra's rewrites are undone
                _PENDING[run_dir] = guard
                return
            # Taken before Hydra writes .hydra/ and its log: a second `bnexp train`
            # into this run dir is refused with nothing touched.
            acquire_run_lock(run_dir)
            _PENDING[run_dir] = guard
            if policy(cfg, run_dir).action == Action.refuse:  # again, under the lock: another process may have trained it since
                _take_back(run_dir)
                raise ConfigError("hydra.run.dir", policy(cfg, run_dir).reason)
        except ConfigError as e:
            raise RejectedConfig(e) from None


def _check_run_dir(run_dir: Path) -> None:
    """A run dir must be a directory this process can write (else Hydra fails with a traceback)."""
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError("hydra.run.dir", f"{existing} is a file, not a directory; allowed: a directory path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("hydra.run.dir", f"{existing} is not writable by this user; allowed: a directory you can write to")


def _take_back(run_dir: Path) -> None:
    """Undo what this `bnexp train` wrote into ``run_dir``, and let go of its lock (idempotent)."""
    guard = _PENDING.pop(run_dir, None)
    if guard is not None:
        guard.undo()  # a lock file it created goes too: removed while still locked, so nobody else holds it
    release_run_lock(run_dir)


def execute(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
    """Run one job into ``run_dir``: skip it if done, resume it if unfinished, else train.

    Everything but skipping a finished run happens under the run dir's lock. A
    run dir another process holds is refused like an invalid config in a single
    run (ConfigError, exit 2) and skipped, untouched, in a sweep.
    """
    existing = read_record(run_dir)
    if is_finished(existing, cfg):  # a finished run stays finished: skipping it needs no lock and writes nothing
        return _skipped(run_dir, existing, f"{existing['status']} earlier with the same config")
    try:
        with run_lock(run_dir):  # until the job's last write, _failed() included
            return _execute_locked(cfg, run_dir, multirun, overrides)
    except RunLocked as e:
        if not multirun:
            raise
        return _skipped(run_dir, read_record(run_dir) or {}, str(e))


def _decide(cfg: DictConfig, run_dir: Path, multirun: bool) -> Decision:
    """Under the run dir's lock: the config checked, and what policy() says to do."""
    validate(cfg)
    decision = policy(cfg, run_dir)
    if decision.action == Action.refuse and not multirun:
        raise ConfigError("hydra.run.dir", decision.reason)
    return decision


def _not_trained(decision: Decision, run_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """The result of a sweep's job that policy() says not to train (None: train or resume it)."""
    if decision.action == Action.skip:  # finished by another process since execute() looked
        return _skipped(run_dir, decision.record or {}, decision.reason)
    if decision.action != Action.refuse:
        return None
    if decision.live:  # live elsewhere: leave it to that process, touch nothing
        return _skipped(run_dir, decision.record or {}, decision.reason)
    log.error("not run: %s", decision.reason)  # someone else's run lives here: report, touch nothing
    return {"status": "failed", "error": decision.reason, "steps": 0, "final": {}, "best": {}, "overrides": overrides, "run_dir": str(run_dir)}


def _execute_locked(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
    try:
        decision = _decide(cfg, run_dir, multirun)
        result = _not_trained(decision, run_dir, overrides)
        if result is not None:
            return result
        result = train(cfg, run_dir, resume=decision.action == Action.resume, extra_record={"overrides": overrides}, summary=not multirun)
        return {**result, "run_dir": str(run_dir)}
    except ConfigError as e:
        if not multirun:
            raise
        return _failed(run_dir, f"invalid config: {e}", overrides)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  a failed job must not stop a sweep
        log.error("run failed: %s\n%s", e, traceback.format_exc())
        result = _failed(run_dir, f"{type(e).__name__}: {e}", overrides)
        if not multirun:
            raise RunFailed(result["error"], run_dir) from None
        return result


def execute_replicas(jobs: list[tuple[DictConfig, Path, list[str]]]) -> list[dict[str, Any]]:
    """A sweep's jobs (config, run dir, overrides) trained as the replicas of one
    stacked model (``hydra/launcher=vectorized``, bnexp.replicas). Each job is
    decided as :func:`execute` decides it (skipped when finished or held by
    another process, failed when invalid, resumed when unfinished), under its
    own run dir's lock; those left to train or resume are trained together. A
    failure while training fails every replica still training; a job whose
    setup fails (a checkpoint that does not fit) fails alone."""
    from bnexp.replicas import ReplicaJob, current, train_replicas

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    pending: list[tuple[int, ReplicaJob]] = []
    with contextlib.ExitStack() as locks:
        for i, (cfg, run_dir, overrides) in enumerate(jobs):
            with current(run_dir):
                existing = read_record(run_dir)
                if is_finished(existing, cfg):
                    results[i] = _skipped(run_dir, existing, f"{existing['status']} earlier with the same config")
                    continue
                try:
                    locks.enter_context(run_lock(run_dir))
                    decision = _decide(cfg, run_dir, multirun=True)
                except RunLocked as e:
                    results[i] = _skipped(run_dir, read_record(run_dir) or {}, str(e))
                    continue
                except ConfigError as e:
                    results[i] = _failed(run_dir, f"invalid config: {e}", overrides)
                    continue
                results[i] = _not_trained(decision, run_dir, overrides)
                if results[i] is None:
                    pending.append((i, ReplicaJob(cfg, run_dir, decision.action == Action.resume, {"overrides": overrides})))
        if pending:
            try:
                trained: list[Any] = train_replicas([job for _, job in pending])
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001  a failed stack must not stop a sweep
                log.error("replicas failed: %s\n%s", e, traceback.format_exc())
                trained = [e] * len(pending)
            for (i, job), out in zip(pending, trained):
                if isinstance(out, dict):
                    results[i] = {**out, "run_dir": str(job.run_dir)}
                    continue
                with current(job.run_dir):
                    what = f"invalid config: {out}" if isinstance(out, ConfigError) else f"{type(out).__name__}: {out}"
                    results[i] = _failed(job.run_dir, what, job.extra_record["overrides"])
    return results  # type: ignore[return-value]


def _skipped(run_dir: Path, record: dict[str, Any], why: str) -> dict[str, Any]:
    log.info("skipping %s: %s", run_dir, why)
    return {**record, "skipped": True, "run_dir": str(run_dir)}


def _failed(run_dir: Path, error: str, overrides: list[str]) -> dict[str, Any]:
    record = read_record(run_dir) or {"writer": "bnexp", "steps": 0, "final": {}, "best": {}, "overrides": overrides}
    record.update(status="failed", error=error)
    write_json(run_dir / METRICS, record)
    return {**record, "run_dir": str(run_dir)}


def task(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        result = execute(cfg, run_dir, multirun, list(hc.overrides.task))
        if result.get("skipped"):
            _take_back(run_dir)  # `bnexp train` of a finished run: Hydra's rewrite of .hydra/ and its log undone
    except ConfigError as e:  # a single run only: a sweep records its jobs' errors
        _take_back(run_dir)
        raise RejectedConfig(e) from None
    except KeyboardInterrupt as e:
        if not (run_dir / METRICS).exists():
            _take_back(run_dir)  # stopped before training began: nothing of the run is left to resume
        if isinstance(e, RunInterrupted):
            raise
        raise RunInterrupted(run_dir, None) from None
    finally:
        _PENDING.pop(run_dir, None)  # the run stands (or was taken back): nothing more to undo
        if not multirun:
            release_run_lock(run_dir)  # the callback's lock
    return objective(result)


def objective(result: dict[str, Any]) -> float:
    """A job's return value: the objective of search sweepers (hydra/sweeper=optuna
    maximizes it with hydra.sweeper.direction=maximize); NaN marks a failed job as a failed trial."""
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
