"""``hydra/launcher=vectorized``: a sweep's jobs that differ only in ``seed``
(and in shape-free scalars, see :data:`bnexp.replicas.SCALAR_KEYS`) are trained
as one stacked model, at most ``hydra.launcher.max_replicas`` at a time
(:mod:`bnexp.replicas`); every other job runs as Hydra's basic launcher runs it.

Each replica is still one Hydra job: its config, its run dir (named as the
basic launcher names it), its ``.hydra/`` record and log file, Hydra's
``on_job_start``/``on_job_end`` callbacks and a ``JobReturn`` in the sweep's
job order. What :func:`hydra.core.utils.run_job` does before and after the
task function is done here for every job of a stack (:func:`_prepare`,
:func:`_conclude`), with the stack's training between them.

This module is imported by Hydra's plugin scan in every Hydra application of
the environment: it imports nothing heavy until a sweep uses it.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this
# module before it is in sys.modules, where dataclasses cannot resolve string annotations.
import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, env_override, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

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
        from bnexp.replicas import alone_reason, stacks_of

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
        stacks = stacks_of([None if c.hydra.job.chdir else _task_cfg(c) for c in configs], self.max_replicas)
        sizes = sorted((len(s) for s in stacks if len(s) > 1), reverse=True)
        stacked = f"{len(sizes)} stack{'' if len(sizes) == 1 else 's'} of replicas ({', '.join(map(str, sizes))})" if sizes else "no stack of replicas"
        log.info(f"Launching {len(configs)} jobs: {stacked}, {sum(len(s) == 1 for s in stacks)} alone")
        reasons: dict[str, int] = {}
        for c in configs:
            why = None if c.hydra.job.chdir else alone_reason(_task_cfg(c))
            if why is not None:
                reasons[why] = reasons.get(why, 0) + 1
        for why, n in reasons.items():
            log.info(f"{n} job{'' if n == 1 else 's'} one by one, as the basic launcher runs them ({why})")
        returns: list[JobReturn | None] = [None] * len(configs)
        for stack in stacks:
            for i in stack:
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
            if len(stack) == 1:
                returns[stack[0]] = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=configs[stack[0]],
                                            job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            else:
                for i, ret in zip(stack, self._launch_stack([configs[i] for i in stack])):
                    returns[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        assert all(r is not None for r in returns)
        return returns  # type: ignore[return-value]

    def _launch_stack(self, configs: list[DictConfig]) -> list[JobReturn]:
        from bnexp import hydra_app

        assert self.hydra_context is not None and self.task_function is not None
        orig_hydra_cfg = HydraConfig.instance().cfg
        callbacks = self.hydra_context.callbacks
        try:
            jobs = [_prepare(c) for c in configs]
            # Hydra's job logging (console + the first job's file), then a file per replica holding its own lines.
            configure_log(configs[0].hydra.job_logging, configs[0].hydra.verbose)
            extra_handlers = _replica_log_files([Path(j.hydra_cfg.hydra.runtime.output_dir) for j in jobs])
            try:
                with env_override(jobs[0].hydra_cfg.hydra.job.env_set):
                    for config in configs:
                        HydraConfig.instance().set_config(config)
                        callbacks.on_job_start(config=config, task_function=self.task_function)
                    HydraConfig.instance().set_config(configs[0])
                    try:
                        results: list[Any] = hydra_app.execute_replicas(
                            [(j.cfg, Path(j.hydra_cfg.hydra.runtime.output_dir), list(j.overrides)) for j in jobs])
                        for j, result in zip(jobs, results):
                            j.return_value, j.status = hydra_app.objective(result), JobStatus.COMPLETED
                    except Exception as e:  # noqa: BLE001  as run_job records a task's exception
                        for j in jobs:
                            j.return_value, j.status = e, JobStatus.FAILED
                for config, j in zip(configs, jobs):
                    _conclude(config, j, callbacks)
            finally:
                for h in extra_handlers:
                    logging.getLogger().removeHandler(h)
                    h.close()
            return jobs
        finally:
            HydraConfig.instance().cfg = orig_hydra_cfg


def _task_cfg(config: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])


def _prepare(config: DictConfig) -> JobReturn:
    """What run_job does before calling the task: the job's run dir, JobReturn and .hydra/ record."""
    from hydra.core.utils import _save_config  # Hydra's own writer of .hydra/*.yaml, so the files are exactly the basic launcher's

    HydraConfig.instance().set_config(config)
    output_dir = os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")), str(OmegaConf.select(config, "hydra.sweep.subdir")))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    ret = JobReturn()
    ret.cfg = task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    ret.hydra_cfg = hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)  # type: ignore[assignment]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    ret.working_dir = os.getcwd()
    if config.hydra.output_subdir is not None:
        hydra_output = Path(config.hydra.runtime.output_dir) / Path(config.hydra.output_subdir)
        _save_config(task_cfg, "config.yaml", hydra_output)
        _save_config(hydra_cfg, "hydra.yaml", hydra_output)
        _save_config(config.hydra.overrides.task, "overrides.yaml", hydra_output)
    return ret


def _conclude(config: DictConfig, ret: JobReturn, callbacks: Any) -> None:
    """What run_job does after the task: the task name, flushed logs, on_job_end."""
    from hydra.core.utils import _flush_loggers

    HydraConfig.instance().set_config(config)
    ret.task_name = JobRuntime.instance().get("name")
    _flush_loggers()
    callbacks.on_job_end(config=config, job_return=ret)


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

