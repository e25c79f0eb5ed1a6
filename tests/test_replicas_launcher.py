"""`bnexp sweep hydra/launcher=vectorized`: the sweep's seeds trained as stacks of
replicas leave the run dirs, summary, report, skip-done, Ctrl-C and resume
behaviour of the basic launcher's sweep, through the real CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from hydra.experimental.callback import Callback

from tests.conftest import REPO, TINY, run_cli, run_inprocess, start_cli
from tests.test_sweep import ENV, _status, _wait_for, job_dirs

# Smooth units (tanh) so that a replica's numbers match its standalone run's to
# fp32 rounding (see tests/test_replicas.py); 2 placements x 8 seeds.
SWEEP = ("norm.placement=pre,none", "seed=range(0,8)", "train.steps=30", "train.log_every=10", "train.eval_every=15",
         "train.progress=false", "model.hidden=[16,16]", "model.activation=tanh", "train.device=cpu")
VECTORIZED = "hydra/launcher=vectorized"


def bnexp(*args: str, cwd: Path):
    """``bnexp ARGS`` in this process (its worker processes are forked from it, as from the CLI's)."""
    return run_inprocess(list(args), cwd, env=ENV)


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


class JobEvents(Callback):
    """A user's Hydra callback: what on_job_start and on_job_end see of each job."""

    seen: list[tuple] = []

    def on_job_start(self, config, **kwargs) -> None:
        JobEvents.seen.append(("start", config.hydra.job.num, Path.cwd()))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        JobEvents.seen.append(("end", config.hydra.job.num, job_return.status.name, Path(job_return.hydra_cfg.hydra.runtime.output_dir).name,
                               job_return._return_value))


@pytest.mark.slow
def test_each_replica_of_a_stack_is_a_hydra_job_with_its_own_callbacks_and_result_and_a_failed_stack_fails_each(tmp_path, monkeypatch):
    JobEvents.seen.clear()
    args = ["sweep", *TINY, "train.steps=4", "seed=0,1,2", VECTORIZED, "hydra.sweep.dir=sw",
            f"+hydra.callbacks.events._target_={__name__}.JobEvents"]
    r = run_inprocess(args, tmp_path)
    assert r.returncode == 0, r.stderr
    dirs = job_dirs(tmp_path / "sw")
    assert [record(d)["replica"] for d in dirs] == [{"index": s, "of": 3} for s in range(3)]
    starts = [e for e in JobEvents.seen if e[0] == "start"]
    ends = sorted(e for e in JobEvents.seen if e[0] == "end")
    assert sorted(e[1] for e in starts) == [0, 1, 2] and all(e[2] == tmp_path for e in starts)  # hydra.job.chdir=false
    assert ends == [("end", s, "COMPLETED", dirs[s].name, record(dirs[s])["final"]["val/acc"]) for s in range(3)]

    JobEvents.seen.clear()
    monkeypatch.setattr("bnexp.hydra_app.execute_replicas", lambda jobs: 1 / 0)  # the stack's glue fails outright
    with pytest.raises(ZeroDivisionError):  # as Hydra raises a failed job's error after its batch
        run_inprocess([*args[:-2], "hydra.sweep.dir=failed", args[-1]], tmp_path)
    assert sorted((e[1], e[2], type(e[4]).__name__) for e in JobEvents.seen if e[0] == "end") == [
        (s, "FAILED", "ZeroDivisionError") for s in range(3)]


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """The same sweep through the basic launcher (basic/) and the vectorized one (vec/)."""
    cwd = tmp_path_factory.mktemp("launchers")
    basic = bnexp("sweep", *SWEEP, "hydra.sweep.dir=basic", cwd=cwd)
    vec = bnexp("sweep", *SWEEP, VECTORIZED, "hydra.sweep.dir=vec", cwd=cwd)
    assert basic.returncode == 0, basic.stderr
    assert vec.returncode == 0, vec.stderr
    return cwd, basic, vec


@pytest.mark.slow
def test_each_replica_leaves_the_run_dir_the_basic_launchers_job_leaves(two_sweeps):
    cwd, _, vec = two_sweeps
    basic_dirs, vec_dirs = job_dirs(cwd / "basic"), job_dirs(cwd / "vec")
    assert [d.name for d in vec_dirs] == [d.name for d in basic_dirs] and len(vec_dirs) == 16
    assert "Launching 16 jobs: 2 stacks of replicas (8, 8), 0 alone" in vec.stdout
    for b, v in zip(basic_dirs, vec_dirs):
        files = lambda d: sorted(str(p.relative_to(d)).replace(p.name, "events") if p.name.startswith("events.") else str(p.relative_to(d))  # noqa: E731
                                 for p in d.rglob("*") if p.is_file())
        assert files(v) == files(b)  # .hydra/*.yaml, bnexp.log, metrics.json, checkpoint.pt, one events file, the lock
        for name in ("config.yaml", "overrides.yaml"):
            assert (v / ".hydra" / name).read_text() == (b / ".hydra" / name).read_text()
        hydra_b, hydra_v = (yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())["hydra"] for d in (b, v))
        assert hydra_v["job"]["num"] == hydra_b["job"]["num"] and hydra_v["runtime"]["output_dir"].endswith(v.name)
        rb, rv = record(b), record(v)
        assert rv["status"] == rb["status"] == "completed" and rv["config_hash"] == rb["config_hash"]
        assert rv["replica"]["of"] == 8 and "replica" not in rb and rv["overrides"] == rb["overrides"]
        # Each replica's log holds its own evaluation lines, not its neighbours'.
        assert (v / "bnexp.log").read_text().count("step 15/30") == 1


@pytest.mark.slow
def test_an_8_seed_vectorized_sweeps_report_equals_the_basic_launchers_in_groups_n_and_metrics(two_sweeps):
    cwd, basic, vec = two_sweeps
    reports = []
    for name in ("basic", "vec"):
        r = bnexp("report", name, "--format", "json", "--metric", "val/acc", "--metric", "train/loss", "--metric", "test/loss", cwd=cwd)
        assert r.returncode == 0, r.stderr
        reports.append(json.loads(r.stdout))
    groups = [{g["group"]: g for g in rep["groups"]} for rep in reports]
    assert groups[0].keys() == groups[1].keys() == {"norm.placement=pre", "norm.placement=none"}
    for label, g in groups[0].items():
        h = groups[1][label]
        assert h["n"] == g["n"] == 8 and h["status"] == g["status"] == {"completed": 8}
        columns = [c for c in g["metrics"] if c != "steps/s"]
        assert columns == [c for c in h["metrics"] if c != "steps/s"] and len(columns) >= 3
        for c in columns:
            assert h["metrics"][c]["n"] == g["metrics"][c]["n"] == 8
            for stat in ("mean", "std"):
                assert h["metrics"][c][stat] == pytest.approx(g["metrics"][c][stat], abs=1e-5), (label, c, stat)
    assert "16 jobs: 16 completed" in vec.stdout and "comparison (mean ± std over seeds)" in vec.stdout


@pytest.mark.slow
def test_rerunning_a_vectorized_sweep_skips_every_finished_replica(two_sweeps):
    cwd, _, _ = two_sweeps
    before = {d: (d / "checkpoint.pt").stat().st_mtime_ns for d in job_dirs(cwd / "vec")}
    r = bnexp("sweep", *SWEEP, VECTORIZED, "hydra.sweep.dir=vec", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "16 jobs: 16 skipped" in r.stdout
    assert {d: (d / "checkpoint.pt").stat().st_mtime_ns for d in job_dirs(cwd / "vec")} == before


@pytest.mark.slow
def test_a_mixed_sweep_stacks_what_it_can_runs_the_rest_alone_and_a_stack_trains_on_one_thread(tmp_path):
    # norm.noise=true: noisy BN draws its noise in the forward pass, a part the stacked model has no fold rule for
    # (found by folding it), so those 3 jobs run as the basic launcher runs them; the other 3 are split by
    # max_replicas=2 into a stack and a lone job. Each replica's step is 131 MFLOP, under the 200 MFLOP up to
    # which a CPU stack pays and under train.threads=auto's line: one thread each, the stack's too.
    r = bnexp("sweep", "seed=0,1,2", "norm.noise=false,true", "train.steps=8", "train.log_every=4", "train.eval_every=8",
              "train.batch_size=32", "train.progress=false", "model.hidden=[800,800]", VECTORIZED, "hydra.launcher.max_replicas=2",
              "hydra.sweep.dir=sw", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Launching 6 jobs: 1 stack of replicas (2), 4 alone" in r.stdout and "6 jobs: 6 completed" in r.stdout
    assert ("3 jobs one by one, as the basic launcher runs them (the stacked model has no fold rule for hidden0.noise (BatchNoise))"
            in r.stdout)
    dirs = job_dirs(tmp_path / "sw")
    replicas = {(record(d)["overrides"][1].lower(), record(d)["overrides"][0]): record(d).get("replica") for d in dirs}
    assert replicas == {("norm.noise=false", "seed=0"): {"index": 0, "of": 2}, ("norm.noise=false", "seed=1"): {"index": 1, "of": 2},
                        ("norm.noise=false", "seed=2"): None, **{("norm.noise=true", f"seed={s}"): None for s in range(3)}}
    for d in dirs:
        log = (d / "bnexp.log").read_text()
        if record(d).get("replica"):
            assert "torch threads: 1 (auto: a stack of replicas, one thread" in log and record(d)["env"]["threads"] == 1
        else:
            assert "torch threads: 1 (auto: 131 MFLOP a step, under 200)" in log and record(d)["env"]["threads"] == 1


def test_a_cnn_whose_step_is_too_large_to_gain_from_stacking_on_the_cpu_trains_job_by_job(tmp_path):
    r = run_inprocess(["sweep", *TINY, "train.steps=2", "model=cnn", "model.hidden=[32,64]", "data.shape=[1,28,28]",
                       "train.batch_size=64", "seed=0,1", VECTORIZED, "hydra.sweep.dir=sw"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Launching 2 jobs: no stack of replicas, 2 alone" in r.stdout
    assert "2 jobs one by one, as the basic launcher runs them (a step of " in r.stdout and "stacking gains nothing above 200" in r.stdout
    assert all("replica" not in record(d) for d in job_dirs(tmp_path / "sw"))


@pytest.mark.slow
def test_a_bad_max_replicas_exits_2_naming_the_key_and_leaves_no_sweep_dir(tmp_path):
    r = bnexp("sweep", "seed=0,1", VECTORIZED, "hydra.launcher.max_replicas=0", "hydra.sweep.dir=sw", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: hydra.launcher.max_replicas: got 0; allowed: a whole number >= 1"]
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_ctrl_c_checkpoints_every_replica_exits_130_and_rerun_or_bnexp_resume_continues_them(tmp_path):
    args = ["seed=0,1,2", "data=synthetic", "model.hidden=[16,16]", "train.steps=3000", "train.log_every=10",
            "train.eval_every=500", "train.progress=false", VECTORIZED, "hydra.sweep.dir=sw"]
    proc = start_cli(["sweep", *args], tmp_path, env=ENV)
    dirs = lambda: sorted((tmp_path / "sw").glob("*seed=*"))  # noqa: E731
    evaluated = lambda d: (d / "bnexp.log").is_file() and "step 500/3000" in (d / "bnexp.log").read_text()  # noqa: E731
    _wait_for(lambda: len(dirs()) == 3 and all(evaluated(d) for d in dirs()), proc, "every replica's first eval", timeout=180)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    steps = {record(d)["steps"] for d in dirs()}
    assert [_status(d) for d in dirs()] == ["interrupted"] * 3 and len(steps) == 1  # one stack: one step for all
    assert all((d / "checkpoint.pt").is_file() for d in dirs())
    assert f"3 replicas ({dirs()[0]} ...) interrupted after step {steps.pop()}; checkpoints saved" in err
    assert "3 jobs: 3 interrupted" in out and "resumes interrupted ones from their last checkpoint" in err

    # One replica alone, by bnexp resume: its checkpoint is a standalone run's.
    alone = bnexp("resume", str(dirs()[0]), cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert _status(dirs()[0]) == "completed" and record(dirs()[0])["steps"] == 3000
    # The others, by rerunning the sweep: the finished one is skipped, the two resumed as one stack.
    rerun = bnexp("sweep", *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 jobs: 2 completed, 1 skipped" in rerun.stdout
    for d in dirs()[1:]:
        rec = record(d)
        assert rec["status"] == "completed" and rec["resumed_from"] > 0 and rec["replica"] == {"index": dirs()[1:].index(d), "of": 2}


@pytest.mark.slow
def test_a_built_wheel_installs_the_plugin_where_hydra_finds_it(tmp_path):
    """`pip install .`: the wheel puts the plugin at hydra_plugins/bnexp_vectorized
    (not under bnexp/), and Hydra's plugin scan finds it there with no source tree."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "hatchling" in build.stderr and ("connection" in build.stderr.lower() or "resolve" in build.stderr.lower()):
        pytest.skip("no package index to fetch the build backend from")
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("bnexp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hydra_plugins/bnexp_vectorized/vectorized_launcher.py" in names
    assert not any(n.startswith("bnexp/_plugins") for n in names) and "bnexp/configs/config.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, timeout=300)
    probe = ("import bnexp, hydra_plugins.bnexp_vectorized.vectorized_launcher as v; from hydra.core.plugins import Plugins; "
             "from hydra.plugins.launcher import Launcher; "
             "print(bnexp.__file__, v.__file__, any(c.__name__ == 'VectorizedLauncher' for c in Plugins.instance().discover(Launcher)))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={**ENV, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)})
    assert found.returncode == 0, found.stderr
    bnexp_file, plugin_file, discovered = found.stdout.split()
    assert bnexp_file.startswith(str(site)) and plugin_file.startswith(str(site / "hydra_plugins")) and discovered == "True"
    shutil.rmtree(site)


@pytest.mark.parametrize("family", [[], ["model=cnn", "model.hidden=[8,8]", "data.shape=[3,8,8]"]], ids=["mlp", "cnn"])
def test_bnexp_reproduce_of_a_stacked_replica_gives_its_numbers_exactly_on_cpu(tmp_path, family):
    # ReLU: a replica that a stack of one computed otherwise than its stack would drift visibly.
    sweep = ["sweep", *TINY, "train.steps=20", *family, "model.activation=relu", "train.deterministic=true", "seed=0,1,2",
             VECTORIZED, "hydra.sweep.dir=sw"]
    assert run_inprocess(sweep, tmp_path).returncode == 0
    replica = job_dirs(tmp_path / "sw")[1]
    assert record(replica)["replica"] == {"index": 1, "of": 3}
    r = run_inprocess(["reproduce", str(replica), "--out", "again"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "identical: every metric matches exactly" in r.stdout
    final = lambda d: {k: v for k, v in record(d)["final"].items() if not k.startswith("time/")}  # noqa: E731
    assert final(tmp_path / "again") == final(replica) and len(final(replica)) > 10


def test_a_sweep_on_two_worker_processes_gives_each_job_the_numbers_of_the_sweep_in_one_process(tmp_path):
    # Two groups of 3 seeds and a third of 3 (one stack each in one process); on two workers the third
    # group's stack waits for the first free worker. Then one group alone: split into stacks of 2 and 1.
    sweep = ["sweep", *TINY, "train.steps=20", "model.activation=relu", "train.deterministic=true", "seed=0,1,2", VECTORIZED]
    placements = "norm.placement=pre,post,none"
    one = bnexp(*sweep, placements, "hydra.launcher.workers=1", "hydra.sweep.dir=one", cwd=tmp_path)
    two = bnexp(*sweep, placements, "hydra.launcher.workers=2", "hydra.sweep.dir=two", cwd=tmp_path)
    split = bnexp(*sweep, "norm.placement=post", "hydra.launcher.workers=2", "hydra.sweep.dir=split", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0 and split.returncode == 0, two.stderr + split.stderr
    assert "Launching 9 jobs: 3 stacks of replicas (3, 3, 3), 0 alone" in one.stdout
    assert "Launching 9 jobs: 3 stacks of replicas (3, 3, 3), 0 alone on 2 worker processes" in two.stdout
    assert "Launching 3 jobs: 2 stacks of replicas (2, 1), 0 alone on 2 worker processes" in split.stdout
    assert "9 jobs: 9 completed" in two.stdout and "3 jobs: 3 completed" in split.stdout
    final = lambda d: {k: v for k, v in record(d)["final"].items() if not k.startswith("time/")}  # noqa: E731
    pids = set()
    for a, b in zip(job_dirs(tmp_path / "one"), job_dirs(tmp_path / "two")):
        assert a.name == b.name and final(b) == final(a) and record(b)["env"]["threads"] == 1
        pids.add(record(b)["process"]["pid"])
    assert len(pids) == 2  # two worker processes
    post = [d for d in job_dirs(tmp_path / "one") if "placement=post" in d.name]
    for a, b in zip(post, job_dirs(tmp_path / "split")):
        assert a.name.endswith(b.name) and final(b) == final(a) and record(b)["replica"]["of"] in (1, 2)


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_on_two_workers_saves_every_replica_and_the_rerun_ends_where_an_uninterrupted_sweep_does(tmp_path):
    args = ["seed=0,1,2,3", "data=synthetic", "model.hidden=[16,16]", "train.steps=3000", "train.log_every=10", "model.activation=relu",
            "train.eval_every=500", "train.progress=false", "train.deterministic=true", VECTORIZED, "hydra.launcher.workers=2"]
    proc = start_cli(["sweep", *args, "hydra.sweep.dir=sw"], tmp_path, env=ENV)
    dirs = lambda: sorted((tmp_path / "sw").glob("*seed=*"))  # noqa: E731
    evaluated = lambda d: (d / "bnexp.log").is_file() and "step 500/3000" in (d / "bnexp.log").read_text()  # noqa: E731
    _wait_for(lambda: len(dirs()) == 4 and all(evaluated(d) for d in dirs()), proc, "every replica's first eval", timeout=240)
    proc.send_signal(signal.SIGINT)  # the parent alone, as `kill -INT` does: it hands the signal on to its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "4 jobs (" in err and "checkpoints saved" in err
    for d in dirs():
        rec = record(d)
        assert rec["status"] == "interrupted" and torch_step(d) == rec["steps"] > 500
    rerun = bnexp("sweep", *args, "hydra.sweep.dir=sw", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    whole = bnexp("sweep", *args, "hydra.sweep.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    final = lambda d: {k: v for k, v in record(d)["final"].items() if not k.startswith("time/")}  # noqa: E731
    for a, b in zip(dirs(), job_dirs(tmp_path / "whole")):
        assert record(a)["status"] == "completed" and final(a) == final(b), a.name


def torch_step(run_dir: Path) -> int:
    """The step a checkpoint holds, read as bnexp resume reads it."""
    import torch

    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["state"]["step"]


def test_the_vectorized_launcher_composes_each_jobs_config_once_and_it_equals_hydras_own(tmp_path, monkeypatch):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.types import RunMode

    composed = []
    load = ConfigLoaderImpl.load_configuration

    def counting(self, config_name, overrides, run_mode, *args, **kwargs):
        composed.append(run_mode)
        return load(self, config_name, overrides, run_mode, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counting)
    sweep = ["sweep", *TINY, "train.steps=2", "seed=0,1,2", "norm.placement=pre,none"]
    assert run_inprocess([*sweep, VECTORIZED, "hydra.sweep.dir=vec"], tmp_path).returncode == 0
    assert composed.count(RunMode.RUN) == 6  # one per job (the sweeper's validation and the launch share it)
    assert run_inprocess([*sweep, "hydra.sweep.dir=basic"], tmp_path).returncode == 0
    for b, v in zip(job_dirs(tmp_path / "basic"), job_dirs(tmp_path / "vec")):
        for name in ("config.yaml", "overrides.yaml"):
            assert (v / ".hydra" / name).read_text() == (b / ".hydra" / name).read_text()
        hb, hv = (yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())["hydra"] for d in (b, v))
        for h in (hb, hv):
            h.pop("launcher"), h.pop("runtime"), h["job"].pop("id")
            h["overrides"]["hydra"] = [o for o in h["overrides"]["hydra"] if "launcher" not in o and "sweep.dir" not in o]
            h["sweep"].pop("dir")
        assert hv == hb


def test_a_job_another_sweep_is_setting_up_is_left_to_it_and_does_not_fail_the_sweep(tmp_path):
    # Another process (a second sweep into the same dir) holds seed=1's lock and has not written its metrics.json yet.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bnexp.rundir import acquire_run_lock; "
                               "acquire_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp_path / "sw" / "seed=1")],
                              stdout=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_inprocess(["sweep", *TINY, "train.steps=4", "seed=0,1,2", VECTORIZED, "hydra.sweep.dir=sw"], tmp_path)
        assert r.returncode == 0, r.stdout
        assert "3 jobs: 2 completed, 1 running" in r.stdout and "unreadable" not in r.stdout
        assert not (tmp_path / "sw" / "seed=1" / "metrics.json").exists()  # left to its holder
    finally:
        holder.kill()
        holder.wait()
