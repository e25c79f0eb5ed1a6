"""The Hydra side of bnexp: the task function behind ``@hydra.main``, the callback
that validates a config before Hydra creates its run directory, and the
resolvers that name run directories.

``bnexp train`` and ``bnexp sweep`` hand their arguments to Hydra's real entry
point, so every Hydra flag, override form, sweeper and launcher works.
"""

from __future__ import annotations

import logging
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
from bnexp.tracking import read_record, run_is_alive

log = logging.getLogger("bnexp")

# Results of the jobs run in this process (the basic launcher, `bnexp train`).
# Jobs in other processes (joblib, SLURM) are read back from their metrics.json.
RESULTS: list[dict[str, Any]] = []
# The sweep directories of multiruns started in this process.
SWEEP_DIRS: list[Path] = []
# For `bnexp train`: the topmost directory the run created, removed again if the
# config turns out to be invalid (nothing that existed before is touched).
_CREATED_ROOT: list[Path | None] = [None]


def _first_non_empty(*values: Any) -> str:
    for v in values:
        if v not in (None, "", "None", "null"):
            return str(v)
    return ""


def _job_subdir(override_dirname: str, seed: Any) -> str:
    # Hydra sorts overrides alphabetically in override_dirname; seed is excluded
    # there and appended last so that one config's seeds sit next to each other.
    return f"{override_dirname},seed={seed}" if override_dirname else f"seed={seed}"


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


class ValidateCallback(Callback):
    """Checks a config before Hydra creates the run directory (``on_run_start`` runs before ``run_job``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # run.dir interpolates hydra:runtime.choices
        run_dir = Path(config.hydra.run.dir).resolve()
        root: Path | None = None
        for p in [run_dir, *run_dir.parents]:
            if p.exists():
                break
            root = p
        _CREATED_ROOT[0] = root
        cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(cfg)
        except ConfigError as e:
            raise RejectedConfig(e) from None


    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # hydra.sweep.dir interpolates hydra:runtime.choices, which needs HydraConfig set.
        HydraConfig.instance().set_config(config)
        SWEEP_DIRS.append(Path(config.hydra.sweep.dir).resolve())


def _remove_created_run_dir() -> None:
    root = _CREATED_ROOT[0]
    if root is not None and root.exists():
        logging.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def execute(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: list[str]) -> dict[str, Any]:
    """Run one job into ``run_dir``: skip it if done, resume it if unfinished, else train."""
    from bnexp.train import CHECKPOINT, train

    try:
        validate(cfg)
        existing = read_record(run_dir)
        same = existing is not None and existing.get("config_hash") == config_hash(cfg)
        if same and existing.get("status") == "completed":
            log.info("skipping %s: completed earlier with the same config", run_dir)
            return {**existing, "skipped": True, "run_dir": str(run_dir)}
        if same and run_is_alive(existing):
            raise ConfigError("hydra.run.dir", f"{run_dir} is being trained by another live process (heartbeat is recent)")
        resume = same and (run_dir / CHECKPOINT).exists() and existing.get("status") in ("running", "interrupted", "failed")
        result = train(cfg, run_dir, resume=resume, extra_record={"overrides": overrides})
        return {**result, "run_dir": str(run_dir)}
    except ConfigError as e:
        if not multirun:
            # Returned, not raised: Hydra prints a line of its own for a raising job.
            _remove_created_run_dir()
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
    result = execute(cfg, run_dir, multirun=hc.mode == RunMode.MULTIRUN, overrides=list(hc.overrides.task))
    RESULTS.append(result)
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
