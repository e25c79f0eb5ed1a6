"""Shared test helpers: the suite's one tiny config, and running the real CLI
in this process (fast) or in a subprocess (for signals, kills and imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The suite's networks are tiny: one intra-op thread runs them fastest and keeps
# timings steady when tests share the 2 CI cores (measured: a 2x32 MLP ran 1554
# steps/s on one thread vs 329 on two on a loaded machine). Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The few tests that run two threads share the cores with the other xdist worker:
# spinning OpenMP threads then take the core the busy one needs (measured: the
# two-thread resume test 167 s with one busy competitor, 34 s with passive waits).
# Passive waiting changes how threads idle, never what they compute.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Rich sizes tables by COLUMNS when it is set (pytest-xdist's workers set it to
# 80); the tests read whole table rows, so they run at bnexp's own width
# (report.console) unless a test sets COLUMNS itself.
os.environ.pop("COLUMNS", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The suite's one tiny config: a 2x16 MLP with BN on 576 synthetic training
# examples (18 steps an epoch), on the CPU. Tests add what they are about.
TINY = ["data=synthetic", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]", "train.batch_size=32",
        "train.steps=30", "train.log_every=10", "train.eval_every=15", "train.progress=false", "train.device=cpu"]


def _cli_env(env: dict | None) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return full_env


def run_cli(args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``bnexp ARGS`` as a user would, from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "bnexp.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_cli_env(env))


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``bnexp ARGS`` in the background (to signal or kill it); text pipes for its output."""
    return subprocess.Popen([sys.executable, "-m", "bnexp.cli", *args], cwd=cwd, env=_cli_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime, to prove nothing was touched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(*overrides)``: the composed TINY config with ``overrides`` on top."""
    from bnexp.schema import compose

    return lambda *overrides: compose([*TINY, *overrides])


@pytest.fixture
def register_probe():
    """Register probes for one test through bnexp's own probe registry (the seam a
    user's probe plugs into); they are unregistered afterwards."""
    from bnexp.probes import PROBES, register

    added: list[str] = []

    def add(name: str, factory) -> None:
        added.append(name)
        register(name, None, factory)

    yield add
    for name in added:
        PROBES.pop(name, None)


def mnist_root(name: str = "mnist") -> Path:
    path = SHARED_DATA / name
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real {name} files not found at {path}")
    return path


class InProcessResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_inprocess(args: list[str], cwd: Path, env: dict | None = None) -> InProcessResult:
    """``bnexp ARGS`` through Typer's test runner in this process: the same code path
    as the console script, without a new interpreter importing torch each time."""
    from typer.testing import CliRunner

    from bnexp.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, args, env=env)
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return InProcessResult(result.exit_code, result.stdout, result.stderr)


def rich_tables(stdout: str) -> list[list[list[str]]]:
    """Every Rich table in ``stdout``, as rows of cells: its header first (a header's
    wrapped lines joined), then one row per line."""
    out, header = [], None
    for line in stdout.splitlines():
        if line.startswith("┏"):
            out.append([])
            header = None
        elif line.startswith("┃"):
            cells = [c.strip() for c in line.split("┃")[1:-1]]
            header = cells if header is None else [f"{a} {b}".strip() for a, b in zip(header, cells)]
        elif line.startswith("┡"):
            out[-1].append(header)
        elif line.startswith("│"):
            out[-1].append([c.strip() for c in line.split("│")[1:-1]])
    return out


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib figures `bnexp report --plot` saves in this process, kept
    open for a test to read their lines and bands (what a reader of the image sees)."""
    from bnexp import report

    figures = []
    save = report._save

    def keep(fig, path, overwrite):
        figures.append(fig)
        save(fig, path, overwrite)

    monkeypatch.setattr(report, "_save", keep)
    return figures


def event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run's event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def seed_mean_and_std(run_dirs: list[Path], tag: str) -> tuple[list[int], "np.ndarray", "np.ndarray"]:
    """Per step (every run has), the mean and the sample std (ddof 1) of ``tag`` over the runs, in float64 NumPy."""
    import numpy as np

    per_run = [event_scalars(d)[tag] for d in run_dirs]
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    values = np.array([[r[s] for s in steps] for r in per_run], dtype=np.float64)
    return steps, values.mean(0), values.std(0, ddof=1)


def panel(fig, title: str):
    """The axes of ``fig`` titled ``title``."""
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


class Forwards:
    """What modules computed while it was entered: every output dtype, and whether
    any forward ran inside torch.compile's tracing (torch.compiler.is_compiling)."""

    def __init__(self):
        self.dtypes: set = set()
        self.compiled = False

    def __enter__(self):
        import torch

        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                self.dtypes.add(output.dtype)
            self.compiled = self.compiled or torch.compiler.is_compiling()

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def one_line_exit_2(out, *words: str) -> str:
    """Bad input's promise: exit 2, one line on stderr naming ``words``, no traceback; returns the line."""
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in out.stdout + out.stderr, err
    for w in words:
        assert w in err, (w, err)
    return err
