"""``hydra/launcher=vectorized``: a sweep's jobs that differ only in ``seed``
(and in shape-free scalars, see :data:`bnexp.replicas.SCALAR_KEYS`) are trained
as one stacked model, at most ``hydra.launcher.max_replicas`` at a time
(:mod:`bnexp.replicas`); every other job runs as Hydra's basic launcher runs it.

Each replica is still one Hydra job, run by Hydra's public
:func:`hydra.core.utils.run_job`: its config, its run dir (named as the basic
launcher names it), its ``.hydra/`` record and log file, Hydra's
``on_job_start``/``on_job_end`` callbacks and a ``JobReturn`` in the sweep's
job order. The jobs of a stack nest (:meth:`VectorizedLauncher._launch_stack`):
each job's task runs the next job, and the innermost trains the stack.

This module is imported by Hydra's plugin scan in every Hydra application of
the environment: it imports nothing heavy until a sweep uses it.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this
# module before it is in sys.modules, where dataclasses cannot resolve string annotations.
import copy
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.bnexp_vectorized.vectorized_launcher.VectorizedLauncher"
    # Replicas per stack; a larger group is trained as several stacks one after the other.
    max_replicas: int = 16
    # Processes training at once, each on one core (null: one per CPU the sweep may
    # use when every job trains on the CPU, else 1). A stack is split among them.
    workers: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf, provider="bnexp")


class VectorizedLauncher(Launcher):
    def __init__(self, max_replicas: int = 16, workers: Optional[int] = None) -> None:
        super().__init__()
        self.max_replicas, self.workers = max_replicas, workers
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from bnexp.config import ConfigError

        if not isinstance(self.max_replicas, int) or self.max_replicas < 1:
            raise ConfigError("hydra.launcher.max_replicas", f"got {self.max_replicas!r}; allowed: a whole number >= 1")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError("hydra.launcher.workers", f"got {self.workers!r}; allowed: null (one per CPU) or a whole number >= 1")
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        # The sweeper composes every job's config to validate it, right before launch() composes it again.
        if not isinstance(hydra_context.config_loader, _ComposedOnce):
            hydra_context.config_loader = _ComposedOnce(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bnexp.replicas import stacks_of

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
        # A job that changes into its run dir (hydra.job.chdir) cannot share a process's cwd with its replicas.
        tasks = [None if c.hydra.job.chdir else _task_cfg(c) for c in configs]
        stacks, reasons = stacks_of(tasks, self.max_replicas)
        workers = self._workers(configs, len(job_overrides))
        units = _split(stacks, workers)
        sizes = sorted((len(s) for s, stacked in units if stacked), reverse=True)
        stacked = f"{len(sizes)} stack{'' if len(sizes) == 1 else 's'} of replicas ({', '.join(map(str, sizes))})" if sizes else "no stack of replicas"
        on = f" on {min(workers, len(units))} worker processes" if min(workers, len(units)) > 1 else ""
        log.info(f"Launching {len(configs)} jobs: {stacked}, {sum(not stacked for _, stacked in units)} alone{on}")
        for why, n in reasons.items():
            log.info(f"{n} job{'' if n == 1 else 's'} one by one, as the basic launcher runs them ({why})")
        for i in (i for unit, _ in units for i in unit):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
        returns: list[JobReturn | None] = [None] * len(configs)
        for (unit, _), rets in zip(units, self._run_units([([configs[i] for i in unit], stacked) for unit, stacked in units], workers)):
            for i, ret in zip(unit, rets):
                returns[i] = ret
        assert all(r is not None for r in returns)
        return returns  # type: ignore[return-value]

    def _workers(self, configs: list[DictConfig], jobs: int) -> int:
        """How many processes train at once: hydra.launcher.workers, or one per CPU
        the sweep may use (bnexp.runtime.thread_budget) when every job trains on the
        CPU; 1 where workers cannot be forked or a job uses a GPU (CUDA does not
        survive a fork)."""
        from bnexp import workers

        if not workers.can_fork():
            return 1
        if any(str(OmegaConf.select(c, "train.device", default="auto")) != "cpu" and _cuda() for c in configs):
            if (self.workers or 1) > 1:
                log.info(f"hydra.launcher.workers={self.workers}: one process, as a job trains on a GPU")
            return 1
        if self.workers is not None:
            return self.workers
        from bnexp.runtime import thread_budget

        return max(1, min(thread_budget(), jobs))

    def _run_units(self, units: list[tuple[list[DictConfig], bool]], workers: int) -> list[list[JobReturn]]:
        """Each unit's returns: a stack's or a lone job's, in-process one after
        another, or on ``workers`` forked processes (bnexp.workers), largest first."""
        from bnexp import workers as pool

        if min(workers, len(units)) <= 1:
            return [self._run_unit(*unit) for unit in units]
        order = sorted(range(len(units)), key=lambda u: -len(units[u][0]))
        n = min(workers, len(units))
        results = pool.run([(lambda u=u: self._run_unit(*units[u])) for u in order], n, lambda w: _in_worker(w, n))
        out: list[list[JobReturn]] = [[] for _ in units]
        stops: list[KeyboardInterrupt] = []
        for u, result in zip(order, results):
            if isinstance(result, pool.Raised):
                if result.error is None:
                    raise RuntimeError(f"a worker process failed:\n{result.text}")
                if not isinstance(result.error, KeyboardInterrupt):
                    raise result.error
                stops.append(result.error)
            elif isinstance(result, pool.Lost) or result is None:
                why = "never started: the sweep was interrupted" if result is None else f"its worker process died (exit code {result.exitcode})"
                out[u] = [_failed(config, RuntimeError(why)) for config in units[u][0]]
            else:
                out[u] = result
        if stops:
            from bnexp.rundir import ReplicasInterrupted, RunInterrupted

            saved = [e for e in stops if isinstance(e, RunInterrupted) and e.step is not None]
            raise ReplicasInterrupted.joined(saved) if len(saved) == len(stops) else next(e for e in stops if e not in saved)
        return out

    def _run_unit(self, configs: list[DictConfig], stacked: bool) -> list[JobReturn]:
        """A stack's jobs (a part of one split for the workers may hold a single replica), or a job alone."""
        assert self.task_function is not None and self.config is not None
        try:
            return self._launch_stack(configs) if stacked else [self._run_job(configs[0], self.task_function)]
        finally:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    def _run_job(self, config: DictConfig, task: TaskFunction, configure_logging: bool = True) -> JobReturn:
        assert self.hydra_context is not None
        return run_job(hydra_context=self.hydra_context, task_function=task, config=config, job_dir_key="hydra.sweep.dir",
                       job_subdir_key="hydra.sweep.subdir", configure_logging=configure_logging)

    def _launch_stack(self, configs: list[DictConfig]) -> list[JobReturn]:
        """The jobs of a stack, each through Hydra's ``run_job`` (its run dir, ``.hydra/``,
        ``on_job_start``/``on_job_end``, HydraConfig and cwd restored), nested: job
        k's task runs job k+1, and the innermost task trains the whole stack; each
        job's task then returns its own replica's result (or raises the stack's error)."""
        from bnexp import hydra_app

        jobs: list[tuple[DictConfig, Path, list[str]]] = []  # what each job's task was given
        returns: list[JobReturn | None] = [None] * len(configs)  # run_job hands each one to the task above it
        outcome: dict[str, Any] = {}  # "results" (one per job), or the "error" that stopped the stack

        def task(k: int) -> TaskFunction:
            def run(cfg: DictConfig) -> Any:
                hc = HydraConfig.get()
                jobs.append((cfg, Path(hc.runtime.output_dir), list(hc.overrides.task)))
                if k + 1 < len(configs):  # Hydra's job logging is the first job's (configure_logging), for the whole stack
                    returns[k + 1] = self._run_job(configs[k + 1], task(k + 1), configure_logging=False)
                else:
                    outcome.update(self._train(jobs, hydra_app.execute_replicas))
                if "error" in outcome:
                    raise outcome["error"]
                return hydra_app.objective(outcome["results"][k])

            return run

        # Each level of nesting is two Python frames (run_job, the task); a large stack needs more than the default 1000.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 1000 + 4 * len(configs)))
        try:
            returns[0] = self._run_job(configs[0], task(0))
        finally:
            sys.setrecursionlimit(limit)
        return returns  # type: ignore[return-value]

    @staticmethod
    def _train(jobs: list[tuple[DictConfig, Path, list[str]]], execute: Any) -> dict[str, Any]:
        """The stack's training, with a log file per replica holding its own lines."""
        extra_handlers = _replica_log_files([run_dir for _, run_dir, _ in jobs])
        try:
            return {"results": execute(jobs)}
        except Exception as e:  # noqa: BLE001  every job's run_job records it, as run_job records a task's exception
            return {"error": e}
        finally:
            for h in extra_handlers:
                logging.getLogger().removeHandler(h)
                h.close()


class _ComposedOnce(ConfigLoader):
    """Hydra's config loader, composing each job's config once per sweep.

    Hydra's sweepers validate a batch by composing every job's config
    (``Sweeper.validate_batch_is_legal``) and drop the result; the launcher then
    composes each again: 0.27-0.31 s a job on a 2-core CPU, twice. This loader
    keeps the first composition of (master config, overrides) and hands the
    launcher that config; the validator gets a copy (~15 ms: Hydra's own
    composition, unchanged, deep-copied). Installed on the HydraContext that the
    sweeper and this launcher share (a public field), so every sweeper's
    validation gains. Hydra's basic launcher has no such hook: its sweeps compose
    twice."""

    def __init__(self, loader: ConfigLoader):
        self.loader = loader
        self.composed: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key in self.composed:
            return self.composed.pop(key)
        config = self.loader.load_sweep_config(master_config, sweep_overrides)
        self.composed[key] = config
        return copy.deepcopy(config)

    def load_configuration(self, config_name: Optional[str], overrides: List[str], run_mode: RunMode,
                           from_shell: bool = True, validate_sweep_overrides: bool = True) -> DictConfig:
        return self.loader.load_configuration(config_name, overrides, run_mode, from_shell=from_shell,
                                              validate_sweep_overrides=validate_sweep_overrides)

    def get_search_path(self) -> Any:
        return self.loader.get_search_path()

    def get_sources(self) -> List[Any]:
        return self.loader.get_sources()

    def list_groups(self, parent_name: str) -> List[str]:
        return self.loader.list_groups(parent_name)

    def get_group_options(self, group_name: str, results_filter: Optional[ObjectType] = ObjectType.CONFIG,
                          config_name: Optional[str] = None, overrides: Optional[List[str]] = None) -> List[str]:
        return self.loader.get_group_options(group_name, results_filter, config_name, overrides)

    def compute_defaults_list(self, config_name: Optional[str], overrides: List[str], run_mode: RunMode) -> Any:
        return self.loader.compute_defaults_list(config_name, overrides, run_mode)


def _task_cfg(config: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _split(stacks: list[list[int]], workers: int) -> list[tuple[list[int], bool]]:
    """The units of work, each with whether it is a stack: ``stacks``, the largest
    split in halves while there are fewer units than ``workers`` (so that none
    idles at the start); a part of a stack is a stack, even of one. A replica's
    numbers do not depend on the stack it trains in (bnexp.replicas), so splitting
    changes only the speed."""
    units = [(list(s), len(s) > 1) for s in stacks]
    while len(units) < workers:
        largest = max(units, key=lambda u: len(u[0]), default=([], False))
        if len(largest[0]) < 2:
            break
        units.remove(largest)
        half = (len(largest[0]) + 1) // 2
        units += [(largest[0][:half], True), (largest[0][half:], True)]
    return sorted(units, key=lambda u: u[0][0])


def _in_worker(w: int, workers: int) -> None:
    """A worker process shares the CPUs with the others (train.threads=auto's budget
    is its share); only the first shows progress bars."""
    from bnexp import runtime, tracking

    runtime.share_cores(workers)
    tracking.PROGRESS_BARS = w == 0


def _failed(config: DictConfig, error: BaseException) -> JobReturn:
    return JobReturn(overrides=list(config.hydra.overrides.task), cfg=_task_cfg(config), hydra_cfg=config, working_dir=os.getcwd(),
                     task_name=str(config.hydra.job.name), status=JobStatus.FAILED, _return_value=error)


class _OwnLines(logging.Filter):
    """Passes the stack's lines and those of one replica (bnexp.replicas.CURRENT_RUN)."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def filter(self, record: logging.LogRecord) -> bool:
        from bnexp.replicas import CURRENT_RUN

        current = CURRENT_RUN.get()
        return current is None or current == self.run_dir


def _replica_log_files(run_dirs: list[Path]) -> list[logging.Handler]:
    """Hydra's job logging writes to the first job's file; every other replica
    gets a file handler like it in its own run dir. Returns the added handlers."""
    root, added = logging.getLogger(), []
    first = run_dirs[0].resolve()
    for h in list(root.handlers):
        if not isinstance(h, logging.FileHandler) or Path(h.baseFilename).parent != first:
            continue
        h.addFilter(_OwnLines(first))
        for run_dir in run_dirs[1:]:
            twin = logging.FileHandler(run_dir / Path(h.baseFilename).name, mode=h.mode, encoding=h.encoding)
            twin.setLevel(h.level)
            twin.setFormatter(h.formatter)
            twin.addFilter(_OwnLines(run_dir.resolve()))
            root.addHandler(twin)
            added.append(twin)
    return added

