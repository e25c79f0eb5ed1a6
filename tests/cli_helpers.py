"""Run the ``bnexp`` command as a user does (a subprocess) on tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# 20 steps with an eval every 10: enough for curves, seed bands and a test metric.
TINY = ("train.steps=20", "train.eval_every=10", "train.log_every=10", "train.progress=false")

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    # One intra-op thread: these networks are too small to gain from torch's
    # thread pool, which on a small shared CPU costs several times its worth.
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "200",  # Rich tables on one line each, easy to search
}


def bnexp(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnexp.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
