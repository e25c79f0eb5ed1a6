"""`bnexp --help` stays fast: the CLI module imports no heavy library; commands import
what they need when they run. (No timing is asserted; docs/performance.md has the figures.)"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "tensorboard", "matplotlib", "hydra", "omegaconf", "numpy")


def modules_loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return out.stderr.split()


def test_importing_the_cli_imports_no_heavy_library():
    assert modules_loaded_after("import bnexp.cli") == []


def test_top_level_help_imports_no_heavy_library():
    code = ("from bnexp.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    assert modules_loaded_after(code) == []


def test_listing_and_reporting_runs_import_no_torch():
    # `bnexp runs` and `bnexp report` read metrics.json and decide liveness (bnexp.record),
    # which needs no torch; tensorboard is imported only when event files are read.
    loaded = modules_loaded_after("import bnexp.runs, bnexp.report\nfrom bnexp.rundir import run_is_alive")
    assert "torch" not in loaded and "tensorboard" not in loaded
