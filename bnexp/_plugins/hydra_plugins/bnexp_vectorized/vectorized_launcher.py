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
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.bnexp_vectorized.vectorized_launcher.VectorizedLauncher"
    # Replicas per stack; a larger group is trained as several stacks one after the other.
    max_replicas: int = 16


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf, provider="bnexp")


class VectorizedLauncher(Launcher):
    def __init__(self, max_replicas: int = 16) -> None:
        super().__init__()
        self.max_replicas = max_replicas
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        if not isinstance(self.max_replicas, int) or self.max_replicas < 1:
            from bnexp.config import ConfigError

            raise ConfigError("hydra.launcher.max_replicas", f"got {self.max_replicas!r}; allowed: a whole number >= 1")
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

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
        stacks, reasons = stacks_of([None if c.hydra.job.chdir else _task_cfg(c) for c in configs], self.max_replicas)
        sizes = sorted((len(s) for s in stacks if len(s) > 1), reverse=True)
        stacked = f"{len(sizes)} stack{'' if len(sizes) == 1 else 's'} of replicas ({', '.join(map(str, sizes))})" if sizes else "no stack of replicas"
        log.info(f"Launching {len(configs)} jobs: {stacked}, {sum(len(s) == 1 for s in stacks)} alone")
        for why, n in reasons.items():
            log.info(f"{n} job{'' if n == 1 else 's'} one by one, as the basic launcher runs them ({why})")
        returns: list[JobReturn | None] = [None] * len(configs)
        for stack in stacks:
            for i in stack:
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
            if len(stack) == 1:
                returns[stack[0]] = self._run_job(configs[stack[0]], self.task_function)
            else:
                for i, ret in zip(stack, self._launch_stack([configs[i] for i in stack])):
                    returns[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        assert all(r is not None for r in returns)
        return returns  # type: ignore[return-value]

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


def _task_cfg(config: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


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

