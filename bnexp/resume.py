"""``bnexp resume RUN_DIR``: continue an interrupted or killed run from its checkpoint.

A run directory holds everything needed to continue it: the config Hydra saved
(``.hydra/config.yaml``), the record (``metrics.json``) and the last checkpoint
(``checkpoint.pt``). Resuming needs no Hydra composition: the saved config is
merged onto the typed schema (as ``bnexp reproduce`` does) and handed to
:func:`bnexp.train.train` with ``resume=True`` and the checkpoint, which is
read once, by the checks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bnexp.config import ConfigError, config_hash
from bnexp.record import RunLocked, read_record, run_is_alive, run_lock

log = logging.getLogger("bnexp")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job_logging format


def check_resumable(run_dir: str | Path) -> tuple[DictConfig, dict[str, Any], dict[str, Any]]:
    """Everything ``bnexp resume`` checks before it touches the run: returns the
    saved config, metrics.json and the loaded checkpoint, or raises ConfigError
    saying what is wrong."""
    from bnexp.reproduce import load_saved_config
    from bnexp.record import CHECKPOINT
    from bnexp.train import load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a directory; allowed: a run directory (runs/<name>/<time>/...)")
    record = read_record(run_dir)
    if not isinstance(record, dict):
        raise ConfigError("RUN_DIR", f"{run_dir} is not a bnexp run directory (no readable metrics.json); `bnexp runs` lists run directories")
    status = record.get("status")
    if status in ("completed", "diverged"):
        raise ConfigError("RUN_DIR", f"{run_dir} already finished (status {status}); nothing to resume")
    if run_is_alive(record):  # the same line as when its lock is held (see resume())
        raise RunLocked(run_dir, record.get("process"))
    cfg = load_saved_config(run_dir)  # fits the schema; data files and device still there
    if record.get("config_hash") not in (None, config_hash(cfg)):
        raise ConfigError("RUN_DIR", f"{run_dir}/.hydra/config.yaml no longer matches the run in metrics.json (config hash {record['config_hash']})")
    if not (run_dir / CHECKPOINT).is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} has no {CHECKPOINT} (status {status}); nothing to resume from, train it again instead")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)  # readable, tensors only, bnexp's format
    return cfg, record, checkpoint


def log_to(run_dir: Path) -> None:
    """Log like a Hydra job: to the console and, appended, to the run's own log file."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT)
    # delay=True: the file is opened on the first record, so a resume refused while setting up leaves it alone.
    for handler in (logging.StreamHandler(), logging.FileHandler(run_dir / "bnexp.log", mode="a", delay=True)):
        handler.setFormatter(formatter)
        root.addHandler(handler)


def resume(run_dir: str | Path) -> dict[str, Any]:
    """Continue ``run_dir`` from its checkpoint; returns the final metrics.json record.

    Raises ConfigError before anything is written if the run cannot be resumed
    (RunLocked if another process is training it); RunInterrupted (a
    KeyboardInterrupt) if it is interrupted again.
    """
    from bnexp.runtime import recorded_threads
    from bnexp.train import train

    run_dir = Path(run_dir).resolve()
    cfg, record, checkpoint = check_resumable(run_dir)
    with run_lock(run_dir):  # refused if another process trains here; held until train() is done
        if read_record(run_dir) != record:
            # Another process trained the run between the checks and the lock
            # (perhaps finished it): check again what it left.
            cfg, record, checkpoint = check_resumable(run_dir)
        log_to(run_dir)
        with recorded_threads(cfg, record):  # results depend on the thread count
            return train(cfg, run_dir, resume=True, extra_record={"overrides": record.get("overrides", [])}, checkpoint=checkpoint)
