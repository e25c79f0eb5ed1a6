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
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

# The data-parallel machinery (bnexp.distributed, and with it torch.distributed)
# is imported only under torchrun; bnexp.runtime and bnexp.train when a job runs.
from bnexp.config import ConfigError, config_dir, launch_world_size
from bnexp.io import NoSpace, write_json
from bnexp.rundir import (
    LOCK_FILE, METRICS, Action, Decision, RunDirGuard, RunInterrupted, RunLocked, acquire_run_lock, is_finished, before_writing,
    policy, read_record, release_run_lock, run_lock,
)
from bnexp.schema import register_configs, register_resolvers, validate

log = logging.getLogger("bnexp")

# `bnexp train` run dirs whose callback has checked them and taken their lock
# and guard, waiting for the task (Hydra gives callbacks no channel to the task).
_PENDING: dict[Path, RunDirGuard] = {}
# Sweep jobs this process refused to touch (another config's run, another run's
# checkpoint): their run dirs keep what they held, so only this says they did not
# run; `bnexp sweep` names them after its summary and exits 1.
REFUSED: list[tuple[Path, str]] = []


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


def one_line(e: BaseException) -> str:
    """An exception as one line: its own words for a full disk, else its type and words."""
    text = str(e) if isinstance(e, NoSpace) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


class RunFailed(BaseException):
    """A `bnexp train` run failed (it is recorded as failed in its metrics.json); carried to the CLI, which exits 1."""

    def __init__(self, error: str, run_dir: Path):
        super().__init__(f"run failed: {error} (see {run_dir}/bnexp.log)")


class RanksCallback(Callback):
    """In a data-parallel run (torchrun), rank 0 alone writes run dirs: on the
    other ranks, Hydra's own output (.hydra/, the job log) of the run or of
    every job of a sweep goes to a scratch dir, and their console shows
    warnings only. (Registered first in configs/config.yaml.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._redirect(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launch_world_size() == 1:
            return
        from bnexp import distributed

        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if distributed.current().world_size > 1 and not launcher.endswith(".BasicLauncher"):
            # Its workers or cluster jobs would each inherit this process's rank.
            raise RejectedConfig(ConfigError("hydra/launcher", f"{launcher.rsplit('.', 1)[-1]} under torchrun; allowed: basic "
                                                               "(every job of the sweep runs on all the processes, one job after another)"))
        self._redirect(config, "hydra.sweep.dir")

    @staticmethod
    def _redirect(config: DictConfig, key: str) -> None:
        if launch_world_size() == 1:
            return
        from bnexp import distributed

        if distributed.current().is_master:
            return
        changes = {key: distributed.scratch_dir(), "hydra.job_logging.root.level": "WARNING", "hydra.hydra_logging.root.level": "WARNING"}
        with read_write(config.hydra), open_dict(config.hydra):
            for k, v in changes.items():
                OmegaConf.update(config, k, v)
                config.hydra.overrides.hydra.append(f"{k}={v}")  # a sweep composes each job's config from these


class ValidateCallback(Callback):
    """Checks a `bnexp train` config before Hydra creates the run directory (``on_run_start`` runs before ``run_job``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # run.dir interpolates hydra:runtime.choices
        run_dir = Path(config.hydra.run.dir).resolve()
        cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        writes = hydra_writes(config)
        try:
            _lead(lambda: self._check(cfg, run_dir, writes))  # other ranks of a data-parallel run learn rank 0's verdict
        except ConfigError as e:
            raise RejectedConfig(e) from None

    @staticmethod
    def _check(cfg: DictConfig, run_dir: Path, writes: list[str]) -> None:
        validate(cfg)
        decision = policy(cfg, run_dir)
        if decision.action == Action.refuse:
            raise ConfigError("hydra.run.dir", decision.reason)
        if decision.action == Action.skip:  # nothing will train, so no lock; Hydra's rewrites are undone
            _PENDING[run_dir] = RunDirGuard(run_dir, writes)
            return
        _check_run_dir(run_dir)
        if decision.record is None:
            _check_not_foreign(run_dir)
        before = before_writing(run_dir, (LOCK_FILE,))
        try:
            # Taken before Hydra writes .hydra/ and its log: a second `bnexp train`
            # into this run dir is refused with nothing touched.
            acquire_run_lock(run_dir)
        except OSError as e:  # the directory cannot be made or written (a read-only or full file system)
            RunDirGuard(run_dir, [], before).undo()
            raise ConfigError("hydra.run.dir", f"cannot write into {run_dir}: {e.strerror}; allowed: a directory you can write to") from None
        try:
            guard = RunDirGuard(run_dir, writes, before)  # under the lock: what is there now is this run's to restore
            decision = policy(cfg, run_dir)  # again, under the lock: another process may have trained it since
            if decision.action == Action.refuse:
                guard.undo()
                raise ConfigError("hydra.run.dir", decision.reason)
        except BaseException:
            release_run_lock(run_dir)
            raise
        if decision.action == Action.skip:
            release_run_lock(run_dir)
        _PENDING[run_dir] = guard


def _lead(fn: Callable[[], Any]) -> Any:
    """``fn()`` under :func:`bnexp.distributed.lead` (rank 0 decides for all);
    a single process calls it without loading torch.distributed."""
    if launch_world_size() == 1:
        return fn()
    from bnexp import distributed

    return distributed.lead(fn)


def hydra_writes(config: DictConfig) -> list[str]:
    """What Hydra writes into a run dir before the task runs: its job log and, unless
    ``hydra.output_subdir`` is null, the three yaml records of the run."""
    files = [f"{config.hydra.job.name}.log"]
    sub = config.hydra.output_subdir
    if sub is not None:
        files += [f"{sub}/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    return files


def _check_run_dir(run_dir: Path) -> None:
    """A run dir must be a directory this process can write (else Hydra fails with a traceback)."""
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError("hydra.run.dir", f"{existing} is a file, not a directory; allowed: a directory path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("hydra.run.dir", f"{existing} is not writable by this user; allowed: a directory you can write to")


def _check_not_foreign(run_dir: Path) -> None:
    """A folder that holds files but no bnexp run (no record, no lock file: another
    Hydra application's outputs, a project folder) is not trained into: Hydra would
    overwrite its .hydra/*.yaml and log, and the run's files would mix with its own."""
    try:
        names = sorted(os.listdir(run_dir))
    except (FileNotFoundError, NotADirectoryError):
        return
    if names and LOCK_FILE not in names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ConfigError("hydra.run.dir", f"{run_dir} is not empty ({shown}) and was not made by bnexp; bnexp trains only "
                                           "into a new or empty directory or one of its own runs; allowed: another directory")


def take_back_pending() -> None:
    """Undo every `bnexp train` this process checked but whose task never ran
    (Hydra failed in between, e.g. writing .hydra/ on a full disk)."""
    for run_dir in list(_PENDING):
        _take_back(run_dir)


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
    run (ConfigError, exit 2) and skipped, untouched, in a sweep. In a
    data-parallel run rank 0 decides, and the other ranks follow (train.led).
    """
    # Here, not at the top: a config refused before this point is said without loading TensorBoard.
    from bnexp.train import led

    return led(lambda: _execute(cfg, run_dir, multirun, overrides))


def _execute(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
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
    REFUSED.append((run_dir, decision.reason))
    return {"status": "failed", "error": decision.reason, "steps": 0, "final": {}, "best": {}, "overrides": overrides, "run_dir": str(run_dir)}


def _execute_locked(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
    # Here, not at the top: a config refused before this point is said without loading torch or TensorBoard.
    from bnexp.runtime import recorded_threads
    from bnexp.train import train

    try:
        decision = _decide(cfg, run_dir, multirun)
        result = _not_trained(decision, run_dir, overrides)
        if result is not None:
            return result
        # A resumed job keeps the thread count it was trained with (results depend on it).
        with recorded_threads(cfg, decision.record if decision.action == Action.resume else None):
            result = train(cfg, run_dir, resume=decision.action == Action.resume, extra_record={"overrides": overrides}, summary=not multirun)
        return {**result, "run_dir": str(run_dir)}
    except ConfigError as e:
        if not multirun:
            raise
        return _failed(run_dir, f"invalid config: {e}", overrides)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  a failed job must not stop a sweep
        error = one_line(e)
        if isinstance(e, NoSpace):  # nothing to debug, and the log file is on the full disk too
            log.error("run failed: %s", error)
        else:
            log.error("run failed: %s\n%s", error, traceback.format_exc())
        result = _failed(run_dir, error, overrides)
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
                    pending.append((i, ReplicaJob(cfg, run_dir, decision.action == Action.resume, {"overrides": overrides}, decision.record)))
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
    try:
        write_json(run_dir / METRICS, record)
    except OSError as e:  # a full disk: the job is failed all the same, and the sweep goes on
        log.error("could not record the failure in %s: %s", run_dir / METRICS, e)
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
            _hand_preemption_on(e)
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


def _hand_preemption_on(e: RunInterrupted) -> None:
    """A run that a cluster's preemption signal stopped has saved its checkpoint:
    now the handler that the launcher had for that signal runs. Under Hydra's
    submitit launcher that is submitit's: it requeues this very job, which
    resumes from the checkpoint (bnexp.rundir.policy), and exits."""
    from bnexp.runtime import PREEMPT_SIGNAL

    handler = signal.getsignal(e.signum) if e.signum is not None and e.signum == PREEMPT_SIGNAL else None
    if callable(handler):
        log.warning("%s; handing the preemption signal on to the launcher (submitit requeues the job)", e)
        handler(e.signum, None)


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
