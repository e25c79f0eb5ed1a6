"""`bnexp sweep` end to end: run dirs, skip-done, failure isolation, launchers and
sweepers, TensorBoard's own view of a sweep; `bnexp reproduce`, `runs` and `tb`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bnexp.runs import load_scalars
from bnexp.sweep import band_tags
from tests.conftest import REPO, TINY as SUITE_TINY, rich_tables, run_inprocess, start_cli

PLACEMENTS = ("pre", "post", "none")
# The suite's tiny config, 20 steps with an eval every 10: enough for curves, seed bands and a test metric.
TINY = (*SUITE_TINY, "train.steps=20", "train.eval_every=10")
ENV = {
    # One intra-op thread: these networks are too small to gain from torch's
    # thread pool, which on a small shared CPU costs several times its worth.
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "200",  # each Rich table row on one line, easy to search
}


def bnexp(*args: str, cwd: Path):
    """``bnexp ARGS`` in this process (Ctrl-C tests start a real one with start_cli)."""
    return run_inprocess(list(args), cwd, env=ENV)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))


# Deterministic on the CPU, so that `bnexp reproduce` of any job must match it exactly.
EXACT = ("train.deterministic=true", "train.device=cpu")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """norm.placement=pre,post,none x seed=0,1,2: nine tiny jobs in sw/."""
    cwd = tmp_path_factory.mktemp("sweep")
    r = bnexp("sweep", "norm.placement=pre,post,none", "seed=0,1,2", *TINY, *EXACT, "hydra.sweep.dir=sw", cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return cwd / "sw", r


@pytest.mark.slow
def test_sweep_makes_one_run_dir_per_job_named_by_its_swept_values_with_seed_last(sweep):
    sweep_dir, r = sweep
    dirs = job_dirs(sweep_dir)
    expected = {f"norm.placement={p},seed={s}" for p in PLACEMENTS for s in range(3)}  # the constant overrides: not in the names
    assert {d.name for d in dirs} == expected
    for d in dirs:
        record = json.loads((d / "metrics.json").read_text())
        assert record["status"] == "completed" and record["steps"] == 20
        assert (d / ".hydra" / "config.yaml").is_file() and list(d.glob("events.out.tfevents.*"))
    assert "9 jobs: 9 completed" in r.stdout
    assert "norm.placement=pre seed=2" in r.stdout  # the job column: what varies, seed last
    assert "comparison (mean ± std over seeds)" in r.stdout


@pytest.mark.slow
def test_a_sweep_ends_with_each_placements_verdict_against_no_normalization(sweep):
    sweep_dir, r = sweep
    tail = r.stdout[r.stdout.index("verdict: each group against the baseline norm.placement=none"):]
    header, *rows = rich_tables(tail)[0]
    assert header[:5] == ["metric", "placement", "Δ vs baseline", "95% CI of Δ", "verdict"] and "seeds needed" in header
    # Every metric, one line per placement against none: a word, and the seeds where the word is open.
    assert [row[1] for row in rows] == ["pre", "post"] * (len(rows) // 2) and len(rows) >= 6
    for row in rows:
        verdict, seeds = row[4], row[5]
        assert verdict in ("better", "worse") or verdict.startswith(("not distinguishable at n = 3", "equal in every seed")) \
            or verdict.endswith("(no spread)"), verdict
        assert (seeds != "-") == verdict.startswith("not distinguishable") or seeds == "-"
    assert f"compare: bnexp report {sweep_dir}" in tail


@pytest.mark.slow
def test_rerunning_a_sweep_into_the_same_sweep_dir_skips_every_completed_job(sweep):
    sweep_dir, _ = sweep
    before = {d.name: (d / "metrics.json").read_text() for d in job_dirs(sweep_dir)}
    r = bnexp("sweep", "norm.placement=pre,post,none", "seed=0,1,2", *TINY, *EXACT, f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent)
    assert r.returncode == 0, r.stderr
    assert "9 jobs: 9 skipped" in r.stdout
    assert {d.name: (d / "metrics.json").read_text() for d in job_dirs(sweep_dir)} == before


@pytest.mark.slow
def test_report_on_the_sweep_shows_three_placement_groups_of_three_seeds(sweep):
    sweep_dir, _ = sweep
    r = bnexp("report", str(sweep_dir), "--format", "json", cwd=sweep_dir.parent)
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)["groups"]
    assert [g["group"] for g in groups] == ["norm.placement=pre", "norm.placement=post", "norm.placement=none"]  # the sweep's order
    for g in groups:
        assert g["n"] == 3 and g["status"] == {"completed": 3}
        finals = [json.loads((Path(p) / "metrics.json").read_text())["final"]["val/acc"] for p in g["runs"]]
        assert g["metrics"]["val/acc"]["n"] == 3
        assert g["metrics"]["val/acc"]["mean"] == pytest.approx(statistics.mean(finals))
        assert g["metrics"]["val/acc"]["std"] == pytest.approx(statistics.stdev(finals))


@pytest.mark.slow
def test_aggregate_runs_hold_the_seed_mean_and_mean_plus_minus_std_per_step(sweep):
    sweep_dir, _ = sweep
    assert sorted(p.name for p in (sweep_dir / "aggregate").iterdir()) == [f"norm.placement={p}" for p in sorted(PLACEMENTS)]
    band = load_scalars(sweep_dir / "aggregate" / "norm.placement=pre")
    seeds = [dict(load_scalars(d)["val/acc"]) for d in job_dirs(sweep_dir) if "placement=pre," in d.name]
    means, lower, upper = (band[t] for t in band_tags("val/acc"))
    assert [s for s, _ in means] == [10, 20]
    for (step, mean), (_, lo), (_, hi) in zip(means, lower, upper):
        values = [s[step] for s in seeds]
        assert mean == pytest.approx(statistics.mean(values), abs=1e-6)
        assert hi - mean == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert mean - lo == pytest.approx(statistics.stdev(values), abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, route: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


@pytest.mark.slow  # a TensorBoard server in a subprocess
def test_tensorboard_started_by_bnexp_tb_lists_every_run_in_its_hparams_plugin(sweep):
    sweep_dir, _ = sweep
    jobs = {d.name: json.loads((d / "metrics.json").read_text()) for d in job_dirs(sweep_dir)}
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "bnexp.cli", "tb", str(sweep_dir), "--port", str(port)],
                              env={**os.environ, "PYTHONPATH": str(REPO), **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    statuses = ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING", "STATUS_UNKNOWN"]
    request = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 100}
    try:
        deadline, groups = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                groups = _post(port, "/data/plugin/hparams/session_groups", request).get("sessionGroups", [])
                if sum(len(g["sessions"]) for g in groups) == len(jobs):
                    break
            except OSError:
                pass
            time.sleep(0.3)
        experiment = _post(port, "/data/plugin/hparams/experiment", {"experimentName": ""})
        runs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10).read())
        layout = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout", timeout=10).read())
    finally:
        server.terminate()
        server.wait(timeout=30)

    # The sweep root's experiment config: every swept key with its values, and the metrics.
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert infos["norm.placement"]["domainDiscrete"] == ["none", "post", "pre"]
    assert infos["seed"]["domainDiscrete"] == ["0", "1", "2"]
    assert {"val/acc", "val/loss", "test/acc", "test/loss", "train/loss"} <= {m["name"]["tag"] for m in experiment["metricInfos"]}
    # Every job is one session with its hparams, status and final metrics.
    sessions = {s["name"]: (g, s) for g in groups for s in g["sessions"]}
    assert set(sessions) == set(jobs)
    assert all(g["name"] == g["sessions"][0]["name"] for g in groups)  # the Trial ID column: the job's dir name
    for name, (group, session) in sessions.items():
        assert session["status"] == "STATUS_SUCCESS"
        assert group["hparams"]["norm.placement"] == name.split(",")[0].removeprefix("norm.placement=")
        values = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        assert values["val/acc"] == pytest.approx(jobs[name]["final"]["val/acc"])
        assert values["test/acc"] == pytest.approx(jobs[name]["final"]["test/acc"])
    # No stray run: the jobs and the seed bands, nothing else (no sub-run per job, no "." for the sweep's records).
    assert set(runs) == set(jobs) | {f"aggregate/norm.placement={p}" for p in PLACEMENTS}
    charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"] if "margin" in c}
    assert charts["val/acc"]["margin"]["series"] == [
        {"value": "Mean over seeds/val/acc", "lower": "seed_band/val/acc/mean-std", "upper": "seed_band/val/acc/mean+std"}]


@pytest.mark.slow
def test_a_sweep_with_one_impossible_job_completes_the_others_reports_it_and_exits_1(tmp_path):
    # norm.groups=7 divides no hidden width (100): only the norm=group job is impossible.
    # Through the joblib launcher, so the jobs run in worker processes and the
    # summary must come from what they left on disk.
    r = bnexp("sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "norm=batch,group", "norm.groups=7", *TINY,
              "hydra.sweep.dir=sw", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    records = {d.name.split(",")[0]: json.loads((d / "metrics.json").read_text()) for d in job_dirs(tmp_path / "sw")}
    assert records["norm=batch"]["status"] == "completed"
    assert records["norm=group"]["status"] == "failed" and "norm.groups" in records["norm=group"]["error"]
    assert "2 jobs: 1 completed, 1 failed" in r.stdout
    assert "does not divide hidden layer 0's width 16" in r.stdout
    # Event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: the job
    # ran in a worker process, the sweep's records (with its seed band) were written by the main one.
    pid = lambda event_file: event_file.name.split(".")[5]  # noqa: E731
    (root,) = (tmp_path / "sw" / "aggregate").glob("*/events.out.tfevents.*")
    job_pids = {pid(f) for d in job_dirs(tmp_path / "sw") for f in d.glob("events.out.tfevents.*")}
    assert job_pids and pid(root) not in job_pids
    assert [p.name for p in (tmp_path / "sw" / "aggregate").iterdir()] == ["norm.kind=batch"]


@pytest.mark.slow
def test_optuna_sweeper_gets_val_acc_as_the_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="extra `optuna` not installed")
    r = bnexp("sweep", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
              "optim.lr=interval(0.01,0.2)", *TINY, "hydra.sweep.dir=sw", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    best = yaml.safe_load((tmp_path / "sw" / "optimization_results.yaml").read_text())["best_value"]
    accs = [json.loads((d / "metrics.json").read_text())["final"]["val/acc"] for d in job_dirs(tmp_path / "sw")]
    assert len(accs) == 2 and best == pytest.approx(max(accs))


@pytest.mark.slow
def test_reproduce_of_a_deterministic_cpu_run_gives_identical_metrics(sweep, tmp_path):
    orig = job_dirs(sweep[0])[0]
    r = bnexp("reproduce", str(orig), "--out", "again", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical: every metric matches exactly" in r.stdout
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (orig, tmp_path / "again"))
    untimed = lambda final: {k: v for k, v in final.items() if not k.startswith("time/")}  # noqa: E731
    assert untimed(b["final"]) == untimed(a["final"]) and b["best"] == a["best"]
    assert b["reproduce_of"] == str(orig.resolve()) and b["config_hash"] == a["config_hash"]
    assert (tmp_path / "again" / ".hydra" / "config.yaml").read_text() == (orig / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_reproduce_writes_next_to_runs_reproduce_by_default(sweep, tmp_path):
    orig = job_dirs(sweep[0])[0]
    r = bnexp("reproduce", str(orig), "train.steps=10", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (new,) = (tmp_path / "runs" / "reproduce").glob(f"*/{orig.name}")
    assert json.loads((new / "metrics.json").read_text())["steps"] == 10
    assert (new / ".hydra" / "overrides.yaml").read_text().rstrip().endswith("- train.steps=10")
    assert "differs" in r.stdout


@pytest.mark.slow
def test_reproduce_with_a_config_that_fails_at_setup_exits_2_and_leaves_no_directory(sweep, tmp_path):
    orig = job_dirs(sweep[0])[0]
    r = bnexp("reproduce", str(orig), "--out", "new/rp", "train.batch_size=100000", cwd=tmp_path)
    assert r.returncode == 2 and "train.batch_size" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_reproduce_logs_into_its_run_dir(sweep, tmp_path):
    orig = job_dirs(sweep[0])[0]
    r = bnexp("reproduce", str(orig), "--out", "rp", "train.steps=10", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 10/10" in (tmp_path / "rp" / "bnexp.log").read_text()


def test_reproduce_of_a_directory_that_is_not_a_run_exits_2_with_one_line(tmp_path):
    r = bnexp("reproduce", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "is not a run directory" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_runs_lists_each_run_and_shows_a_running_run_without_heartbeat_as_dead(sweep, tmp_path):
    sweep_dir, _ = sweep
    src = job_dirs(sweep_dir)[0]
    shutil.copytree(src, tmp_path / "runs" / "crashed")
    record = json.loads((src / "metrics.json").read_text())
    # Trained on another host (a shared file system): there only the heartbeat tells a live run from a dead one.
    record.update(status="running", process={"host": "another-host", "pid": 4242, "start_ticks": None})
    record["time"]["heartbeat"] = time.time() - 3600
    (tmp_path / "runs" / "crashed" / "metrics.json").write_text(json.dumps(record))
    shutil.copytree(src, tmp_path / "runs" / "live")
    record["time"]["heartbeat"] = time.time() + 600  # beats for the next ten minutes
    (tmp_path / "runs" / "live" / "metrics.json").write_text(json.dumps(record))
    shutil.copytree(src, tmp_path / "runs" / "fine")
    r = bnexp("runs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│")}
    assert "dead (no heartbeat)" in lines["crashed"]
    assert "running" in lines["live"] and "dead" not in lines["live"]
    assert "completed" in lines["fine"] and "20/20" in lines["fine"]


def test_a_bad_override_exits_2_with_the_allowed_values_and_leaves_no_sweep_directory(tmp_path):
    r = bnexp("sweep", "norm.placement=pre,bogus", *TINY, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: norm.placement: Invalid value 'bogus', expected one of [pre, post, none, preact]"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_reproduce_accepts_a_run_made_with_an_added_key_but_rejects_unknown_overrides(tmp_path):
    made = bnexp("train", "+notes_extra=hello", "train.steps=10", "train.log_every=5", "train.eval_every=5",
                 "model.hidden=[8]", "train.progress=false", "hydra.run.dir=orig", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    again = bnexp("reproduce", "orig", "--out", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "hello" in (tmp_path / "again" / ".hydra" / "config.yaml").read_text()
    typo = bnexp("reproduce", "orig", "--out", "typo", "train.stepz=5", cwd=tmp_path)
    assert typo.returncode == 2 and "train.stepz" in typo.stderr and not (tmp_path / "typo").exists()


# ---------------------------------------------------------------- Ctrl-C during a sweep

# About 3000 steps/s: a job runs long enough to be interrupted, and the sweep stays a few seconds.
QUICK = ("data=synthetic", "model.hidden=[16,16]", "train.steps=2000", "train.log_every=10", "train.eval_every=500",
         "train.progress=false")


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"bnexp ended ({proc.returncode}) or timed out before {what}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)


def _in_loop(run_dir: Path) -> bool:
    """The job's first eval is logged: it is inside its training loop (a signal
    that lands between setup and the loop is not this test's subject)."""
    log = run_dir / "bnexp.log"
    return log.is_file() and "step 500/2000" in log.read_text()


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _hparams_domains(sweep_dir: Path) -> dict[str, list]:
    """The swept keys and their values in the sweep root's HParams experiment config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(next((sweep_dir / "aggregate").iterdir())))  # every seed-band run holds it
    acc.Reload()
    data = plugin_data_pb2.HParamsPluginData()
    data.ParseFromString(acc.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    return {h.name: [v.number_value or v.string_value for v in h.domain_discrete.values] for h in data.experiment.hparam_infos}


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_summarizes_the_jobs_that_ran_and_the_printed_command_continues_it(tmp_path):
    args = [*QUICK, "optim.lr=0.05,0.1,0.2", "hydra.sweep.dir=sw"]
    job = lambda lr: next((tmp_path / "sw").glob(f"*optim.lr={lr},*"), tmp_path / "none")  # noqa: E731
    proc = start_cli(["sweep", *args], tmp_path, env=ENV)
    _wait_for(lambda: _in_loop(job(0.1)), proc, "job 2's first eval")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err
    assert _status(job(0.05)) == "completed" and _status(job(0.1)) == "interrupted"
    assert (job(0.1) / "checkpoint.pt").is_file() and not job(0.2).exists()
    # The summary of the jobs that ran; the one never started is not in it.
    assert "(interrupted: the jobs that ran)" in out
    assert "2 jobs: 1 completed, 1 interrupted" in out
    assert "comparison (mean ± std over seeds)" in out and "optim.lr=0.2" not in out
    # TensorBoard's sweep records, for what exists: one seed band (only completed runs count).
    assert [p.name for p in (tmp_path / "sw" / "aggregate").iterdir()] == ["optim.lr=0.05"]
    assert _hparams_domains(tmp_path / "sw")["optim.lr"] == [0.05, 0.1]
    # How to continue: the same command into the same sweep dir.
    steps = json.loads((job(0.1) / "metrics.json").read_text())["steps"]
    assert f"interrupted after step {steps}; checkpoint saved" in err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("to continue (skips finished jobs, resumes interrupted ones from their last checkpoint): bnexp sweep ")
    again = shlex.split(hint.split(": ", 1)[1])
    assert again[:2] == ["bnexp", "sweep"] and again[-1] == "hydra.sweep.dir=sw"

    rerun = bnexp(*again[1:], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 jobs: 2 completed, 1 skipped" in rerun.stdout
    resumed = json.loads((job(0.1) / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from"] == steps
    assert _hparams_domains(tmp_path / "sw")["optim.lr"] == [0.05, 0.1, 0.2]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_a_sweep_at_once_without_the_summary(tmp_path):
    # Runs of an earlier sweep in the same directory: reading them makes the
    # summary take long enough to be interrupted in the middle of it.
    for i in range(300):
        old = tmp_path / "sw" / f"earlier,seed={i}"
        (old / ".hydra").mkdir(parents=True)
        (old / ".hydra" / "config.yaml").write_text(f"seed: {i}\noptim:\n  lr: 0.3\n")
        (old / "metrics.json").write_text(json.dumps({"status": "completed", "steps": 1, "final": {"val/acc": 0.5}}))
    run = tmp_path / "sw" / "seed=0"  # nothing varies: the seed alone names the job
    proc = start_cli(["sweep", *QUICK, "hydra.sweep.dir=sw"], tmp_path, env=ENV)
    _wait_for(lambda: _in_loop(run), proc, "the job's first eval")
    proc.send_signal(signal.SIGINT)
    _wait_for(lambda: _status(run) == "interrupted", proc, "the job stopped after its step")
    proc.send_signal(signal.SIGINT)  # while the summary reads the sweep directory
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopped at once by a second Ctrl-C, without the summary: `bnexp report sw --tensorboard`" in err
    assert "jobs:" not in out and "comparison" not in out
    assert (run / "checkpoint.pt").is_file()
    assert err.strip().splitlines()[-1].endswith("hydra.sweep.dir=sw")


@pytest.mark.slow
def test_ctrl_c_during_the_summary_of_a_finished_sweep_exits_130_and_says_how_to_get_it(tmp_path, monkeypatch):
    from tensorboard.plugins.hparams import summary_v2

    from tests.conftest import run_inprocess

    def ctrl_c(*_a, **_k):
        raise KeyboardInterrupt

    # Called only by the sweep's end, when it writes the sweep's HParams experiment.
    monkeypatch.setattr(summary_v2, "hparams_config_pb", ctrl_c)
    r = run_inprocess(["sweep", *TINY, "model.hidden=[8]", "seed=0,1", "hydra.sweep.dir=sw"], cwd=tmp_path)
    assert r.returncode == 130
    assert "every job ended; `bnexp report" in r.stderr and "--tensorboard" in r.stderr
    assert [json.loads(p.read_text())["status"] for p in sorted((tmp_path / "sw").glob("*/metrics.json"))] == ["completed"] * 2


def test_counting_signals_needs_the_main_thread_only_to_count_them(tmp_path):
    # bnexp sweep called from another thread (a notebook's worker, a test runner) cannot set a
    # wakeup fd; every interruption then counts as the first instead of the sweep failing.
    import threading

    from bnexp.cli import _signals_received

    out = []

    def in_thread():
        with _signals_received() as received:
            out.append(received())

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert out == [1]
    with _signals_received() as received:  # the main thread: a real count
        assert received() == 0
