"""Cluster sweeps through Hydra's submitit launcher, tested with
``hydra/launcher=submitit_local``: the plugin and the code path of
``submitit_slurm`` (pickled task, a job process per job, submitit's signal
handling and requeue), with local processes instead of Slurm jobs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from bnexp.runs import load_scalars
from tests.conftest import run_inprocess, start_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

# ~1500 steps of a 2x16 MLP: a few seconds a job, long enough to be preempted after a checkpoint.
JOB = ["hydra/launcher=submitit_local", "data=synthetic", "model.hidden=[16,16]", "train.steps=1500", "train.log_every=50",
       "train.eval_every=250", "train.checkpoint_every=100", "train.deterministic=true", "train.device=cpu", "train.progress=false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/metrics.json"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("submitit")
    # The sweep's own process is this one (submitit still starts a process per job):
    # a second interpreter importing torch would add nothing the jobs' pids don't show.
    out = run_inprocess(["sweep", *JOB, "seed=0,1", "hydra.sweep.dir=sweep"], cwd, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "sweep", out.stdout


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_every_job_in_its_own_process_and_prints_the_summary(sweep):
    sweep_dir, stdout = sweep
    assert "2 jobs: 2 completed" in stdout and "comparison (mean ± std over seeds)" in stdout
    runs = job_dirs(sweep_dir)
    assert [r.name.rsplit(",", 1)[-1] for r in runs] == ["seed=0", "seed=1"]
    pids = {metrics(r)["process"]["pid"] for r in runs}
    assert len(pids) == 2 and os.getpid() not in pids and all(metrics(r)["status"] == "completed" for r in runs)
    assert list(sweep_dir.glob(".submitit/*/*_result.pkl"))  # submitit's own record of the jobs


@pytest.mark.slow
def test_a_rerun_of_a_submitit_sweep_skips_its_finished_jobs_and_report_compares_them(sweep):
    sweep_dir, _ = sweep
    before = {p: p.stat().st_mtime_ns for r in job_dirs(sweep_dir) for p in (r / "metrics.json", r / "checkpoint.pt")}
    out = run_inprocess(["sweep", *JOB, "seed=0,1", "hydra.sweep.dir=sweep"], sweep_dir.parent, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 jobs: 2 skipped" in out.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    report = run_inprocess(["report", str(sweep_dir), "--format", "json"], sweep_dir.parent, env=ONE_THREAD)
    assert report.returncode == 0, report.stderr
    groups = json.loads(report.stdout)["groups"]
    assert len(groups) == 1 and groups[0]["n"] == 2


@pytest.mark.slow
def test_a_preempted_submitit_job_saves_a_checkpoint_is_requeued_and_resumes_to_the_uninterrupted_result(sweep, tmp_path):
    reference = [r for r in job_dirs(sweep[0]) if r.name.endswith("seed=0")][0]
    proc = start_cli(["sweep", *JOB, "seed=0", "hydra.sweep.dir=preempted"], tmp_path, env=ONE_THREAD)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("preempted/*/checkpoint.pt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)
    run_dir = next(tmp_path.glob("preempted/*/checkpoint.pt")).parent
    first = metrics(run_dir)["process"]["pid"]
    # what Slurm (submitit's --signal=USR2@...) sends ahead of preemption or the time limit
    os.kill(first, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "1 jobs: 1 completed" in out
    m = metrics(run_dir)
    assert m["status"] == "completed" and m["process"]["pid"] != first and 100 <= m["resumed_from"] < 1500
    logs = "".join(p.read_text() for p in tmp_path.glob("preempted/.submitit/*/*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs and "interrupted after step" in logs
    want = metrics(reference)
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
    assert untimed(m["final"]) == untimed(want["final"]) and untimed(m["best"]) == untimed(want["best"])
    got, ref = load_scalars(run_dir), load_scalars(reference)
    assert {t: v for t, v in got.items() if not t.startswith("time/")} == {t: v for t, v in ref.items() if not t.startswith("time/")}
