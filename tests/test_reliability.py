"""Reliability: nothing is lost on bad input, divergence, interruption or crash.

Every test drives ``bnexp`` in a subprocess, as a user would, with real
signals, and reads what the runs left behind: metrics.json, checkpoints and
TensorBoard event files.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bnexp.config import config_hash
from bnexp.schema import typed
from bnexp.rundir import HEARTBEAT_SEC, process_info, run_is_alive
from tests.conftest import REPO, TINY as SUITE_TINY, run_inprocess, snapshot, start_cli

# The suite's tiny config, wider and deterministic: resumed runs must match bit for bit.
TINY = [*SUITE_TINY, "model.hidden=[32,32]", "train.eval_every=50", "train.deterministic=true"]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a 2x32 MLP runs fastest on one thread, and steadily on a busy machine


def bnexp(*args: str, cwd: Path):
    """``bnexp ARGS`` in this process (signals and kills go through :func:`start`)."""
    return run_inprocess(list(args), cwd)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return start_cli(list(args), cwd, env=ONE_THREAD)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"bnexp exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run as TensorBoard reads it (all event files, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def results(run_dir: Path) -> dict:
    """What must not depend on an interruption: values, steps, status (timing tags excluded)."""
    m = metrics(run_dir)
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
    return {"status": m["status"], "steps": m["steps"], "final": untimed(m["final"]), "best": untimed(m["best"]),
            "steps_to_target": m["steps_to_target"]}


def untimed_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return {tag: points for tag, points in scalars(run_dir).items() if not tag.startswith("time/")}


def assert_no_duplicated_steps(run_dir: Path) -> None:
    for tag, points in scalars(run_dir).items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{run_dir.name}: {tag} has duplicated or unordered steps {steps}"


def fake_run(run_dir: Path, status: str = "interrupted", **record) -> Path:
    """A run directory as bnexp leaves it (saved config + metrics.json), without training."""
    cfg = typed({})
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / "metrics.json").write_text(json.dumps({"status": status, "steps": 10, "config_hash": config_hash(cfg), **record}))
    return run_dir


# ---------------------------------------------------------------- interruption and resume


def interrupt_when(proc: subprocess.Popen, ready, sig: int, rng: random.Random) -> None:
    """Send ``sig`` at a random moment once ``ready()``: the step it lands on is up to chance."""
    wait_for(ready, proc, "the run made progress")
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(sig)


@pytest.mark.slow
def test_resume_after_sigint_and_sigterm_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    args = [*TINY, "train.steps=2000", "train.checkpoint_every=100", "train.target_acc=0.3"]
    rng = random.Random()
    reference = start("train", *args, "hydra.run.dir=reference", cwd=tmp_path)  # runs alongside the victim
    run = tmp_path / "victim"
    victim = start("train", *args, f"hydra.run.dir={run}", cwd=tmp_path)
    interrupt_when(victim, lambda: (run / "checkpoint.pt").exists(), signal.SIGINT, rng)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 130, err
    assert "interrupted after step" in err and "bnexp resume" in err and "Traceback" not in err
    first = metrics(run)
    assert first["status"] == "interrupted" and 100 <= first["steps"] < 2000, first["steps"]

    # Resume, and stop the resumed run too, with SIGTERM this time, after it saved a checkpoint of its own.
    resumed = start("resume", str(run), cwd=tmp_path)
    interrupt_when(resumed, lambda: (json.loads((run / "metrics.json").read_text() or "{}").get("steps") or 0) > first["steps"],
                   signal.SIGTERM, rng)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 130, err
    second = metrics(run)
    assert second["status"] == "interrupted" and second["resumed_from"] == first["steps"] < second["steps"] < 2000

    done = bnexp("resume", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    final = metrics(run)
    assert final["resumed_from"] == second["steps"]
    assert results(run) == results(tmp_path / "reference")
    assert final["status"] == "completed" and final["steps_to_target"] is not None
    assert untimed_scalars(run) == untimed_scalars(tmp_path / "reference")
    assert_no_duplicated_steps(run)


@pytest.mark.slow
def test_sweep_rerun_after_sigkill_skips_finished_jobs_and_resumes_the_killed_one(tmp_path):
    sweep = [*TINY, "train.steps=1000", "train.checkpoint_every=50", "optim.lr=0.05,0.1,0.2", "hydra.sweep.dir=sweep"]
    job = lambda lr: Path(glob.glob(str(tmp_path / "sweep" / f"*optim.lr={lr},*"))[0])  # noqa: E731
    proc = start("sweep", *sweep, cwd=tmp_path)
    wait_for(lambda: glob.glob(str(tmp_path / "sweep" / "*optim.lr=0.1,*" / "checkpoint.pt")), proc, "job 2's first checkpoint")
    proc.kill()  # SIGKILL: no handler runs, the job's status stays `running` with a fresh heartbeat
    proc.wait()
    killed = metrics(job(0.1))
    assert metrics(job(0.05))["status"] == "completed"
    assert killed["status"] == "running" and time.time() - killed["time"]["heartbeat"] < 6 * HEARTBEAT_SEC
    assert not run_is_alive(killed)  # its process is gone: dead at once, whatever the heartbeat says
    results_of = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.suffix != ".log"}  # noqa: E731
    first_job_files = results_of(job(0.05))

    rerun = bnexp("sweep", *sweep, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert results_of(job(0.05)) == first_job_files  # skipped: only its log says so
    resumed, fresh = metrics(job(0.1)), metrics(job(0.2))
    assert resumed["status"] == fresh["status"] == "completed"
    assert resumed["resumed_from"] >= 50 and resumed["resumed_from"] % 50 == 0 and "resumed_from" not in fresh
    for lr in (0.05, 0.1, 0.2):
        assert metrics(job(lr))["steps"] == 1000
        assert [s for s, _ in scalars(job(lr))["train/loss"]] == list(range(10, 1001, 10))
        assert_no_duplicated_steps(job(lr))


@pytest.mark.slow
def test_rerun_without_a_checkpoint_starts_over_and_tensorboard_drops_the_first_attempt(tmp_path):
    args = [*TINY, "train.steps=100", "hydra.run.dir=run"]
    assert bnexp("train", *args, cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    first = untimed_scalars(run)
    # As a run that failed before its first checkpoint leaves things: events, no checkpoint.
    (run / "checkpoint.pt").unlink()
    (run / "metrics.json").write_text(json.dumps({**metrics(run), "status": "failed"}))
    again = bnexp("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    assert metrics(run)["status"] == "completed" and "resumed_from" not in metrics(run)
    assert untimed_scalars(run) == first
    assert_no_duplicated_steps(run)


@pytest.mark.parametrize("heartbeat_age, alive", [(1.0, True), (10 * HEARTBEAT_SEC, False)])
def test_a_run_on_another_host_is_alive_while_its_heartbeat_is_recent(heartbeat_age, alive):
    record = {"status": "running", "process": {"host": "some-other-host", "pid": 1}, "time": {"heartbeat": time.time() - heartbeat_age}}
    assert run_is_alive(record) is alive


def test_a_run_on_this_host_is_alive_exactly_while_its_process_is():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        info = {**process_info(), "pid": sleeper.pid}
        info["start_ticks"] = None
        record = {"status": "running", "process": info, "time": {"heartbeat": 0}}  # heartbeat long gone: pid decides
        assert run_is_alive(record)
        from bnexp.rundir import _proc_start_ticks

        if _proc_start_ticks(sleeper.pid) is not None:  # Linux: a reused pid has another start time
            assert run_is_alive({**record, "process": {**info, "start_ticks": _proc_start_ticks(sleeper.pid)}})
            assert not run_is_alive({**record, "process": {**info, "start_ticks": 1}})
        sleeper.kill()
        time.sleep(0.2)  # killed, not reaped yet: a zombie is dead too
        assert not run_is_alive(record)
        sleeper.wait()
        assert not run_is_alive(record)
        assert not run_is_alive({**record, "status": "interrupted"})
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- divergence


@pytest.mark.slow
def test_diverging_run_is_a_result_exit_0_and_the_sweep_goes_on(tmp_path):
    # No normalization and an absurd learning rate: the loss is non-finite within a few steps.
    args = [*TINY, "norm.placement=none", "train.steps=100", "hydra.sweep.dir=sweep"]
    out = bnexp("sweep", *args, "optim.lr=1e6,0.1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    diverged, healthy = (Path(glob.glob(str(tmp_path / "sweep" / f"*optim.lr={lr},*"))[0]) for lr in ("1000000.0", "0.1"))
    m = metrics(diverged)
    assert m["status"] == "diverged"
    assert 1 <= m["diverged"]["step"] <= m["diverged"]["detected_at"] == m["steps"] < 100
    assert all(math.isfinite(v) for v in m["final"].values())  # final holds the last finite values
    loss = scalars(diverged)["train/loss"]  # events flushed: the non-finite loss is the last point
    assert loss[-1][0] == m["steps"] and not math.isfinite(loss[-1][1])
    assert metrics(healthy)["status"] == "completed" and metrics(healthy)["steps"] == 100

    # A diverged run is a finished result: a rerun of the sweep skips it like a completed one.
    results_of = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.suffix != ".log"}  # noqa: E731
    before = [results_of(diverged), results_of(healthy)]
    again = bnexp("sweep", *args, "optim.lr=1e6,0.1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [results_of(diverged), results_of(healthy)] == before


# ---------------------------------------------------------------- bad input


@pytest.fixture
def cluttered(tmp_path) -> Path:
    """A working directory with an earlier run and unrelated files in it: bad input must touch none of it."""
    (tmp_path / "empty").mkdir()
    fake_run(tmp_path / "runs" / "old" / "run", status="completed")
    (tmp_path / "runs" / "old" / "run" / "notes.txt").write_text("mine")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "keep.txt").write_text("keep me")
    return tmp_path


def assert_one_line_exit_2(out: subprocess.CompletedProcess, *names: str) -> None:
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in out.stderr + out.stdout, err
    for name in names:
        assert name in err, (name, err)


BAD_TRAIN = {
    "unknown key": (["foo=1"], ["foo"]),
    "unknown group option": (["norm=bogus"], ["norm", "batch"]),
    "wrong type": (["train.steps=abc"], ["train.steps"]),
    "zero lr": (["optim.lr=0"], ["optim.lr", "> 0"]),
    "negative lr": (["optim.lr=-0.1"], ["optim.lr", "> 0"]),
    "zero batch size": (["train.batch_size=0"], ["train.batch_size"]),
    "negative batch size": (["train.batch_size=-8"], ["train.batch_size"]),
    "zero steps": (["train.steps=0"], ["train.steps"]),
    "negative steps": (["train.steps=-5"], ["train.steps"]),
    "groups not dividing width": (["norm=group", "norm.groups=7"], ["norm.groups", "divide"]),
    "ghost batch larger than batch": (["norm=ghost_batch", "norm.virtual_batch_size=128", "train.batch_size=64"], ["norm.virtual_batch_size"]),
    "empty hidden": (["model.hidden=[]"], ["model.hidden"]),
    "missing data files": (["data=mnist", "data.root=empty"], ["data.root", "empty"]),
    "batch larger than the data": (["data=synthetic", "data.n_train=40", "train.batch_size=64"], ["train.batch_size"]),
    "a _target_ to import": (["+model._target_=os.system"], ["_target_"]),
}


@pytest.mark.parametrize("args, names", BAD_TRAIN.values(), ids=BAD_TRAIN.keys())
def test_bad_input_exits_2_with_one_line_and_no_new_files(cluttered, args, names):
    before = snapshot(cluttered)
    out = bnexp("train", *args, "train.device=cpu", cwd=cluttered)
    assert_one_line_exit_2(out, *names)
    assert snapshot(cluttered) == before


@pytest.mark.parametrize("args, names", [(["optim.lr=0"], ["optim.lr"]),  # found before Hydra writes anything
                                         (["data=synthetic", "data.n_train=40", "train.batch_size=64"], ["train.batch_size"])],  # after
                         ids=["before setup", "during setup"])
def test_bad_input_into_an_existing_directory_leaves_its_files_as_they_were(cluttered, args, names):
    earlier = cluttered / "earlier"  # an earlier bnexp attempt there (its lock file) and a file of the user's
    earlier.mkdir()
    (earlier / ".bnexp.lock").write_text("")
    (earlier / "keep.txt").write_text("keep me")
    before = snapshot(cluttered)
    out = bnexp("train", *args, "hydra.run.dir=earlier", "train.device=cpu", cwd=cluttered)
    assert_one_line_exit_2(out, *names)
    assert snapshot(cluttered) == before


def test_training_into_a_run_of_another_config_is_refused(cluttered):
    before = snapshot(cluttered)
    out = bnexp("train", "optim.lr=0.5", "hydra.run.dir=runs/old/run", "train.device=cpu", cwd=cluttered)
    assert_one_line_exit_2(out, "hydra.run.dir", "different config")
    assert snapshot(cluttered) == before


def test_training_into_a_run_a_live_process_trains_is_refused(cluttered):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = fake_run(cluttered / "live", status="running", process={**process_info(), "pid": sleeper.pid, "start_ticks": None})
        before = snapshot(cluttered)
        for args in (["train", "hydra.run.dir=live", "train.device=cpu"], ["resume", str(live)]):
            out = bnexp(*args, cwd=cluttered)
            assert_one_line_exit_2(out, "being trained right now", str(sleeper.pid))
        assert snapshot(cluttered) == before
    finally:
        sleeper.kill()
        sleeper.wait()


class CodePayload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_not_a_run(cluttered: Path, case: str) -> Path:
    path = cluttered / "case"
    if case == "missing path":
        return cluttered / "no" / "such" / "dir"
    if case == "a file":
        path.write_text("x")
    elif case == "empty dir":
        path.mkdir()
    elif case == "no metrics.json":
        fake_run(path)
        (path / "metrics.json").unlink()
    elif case == "unreadable config":
        fake_run(path)
        (path / ".hydra" / "config.yaml").write_text("model: [unclosed")
    return path


@pytest.mark.parametrize("cmd", ["resume", "reproduce"])
@pytest.mark.parametrize("case", ["missing path", "a file", "empty dir", "no metrics.json", "unreadable config"])
def test_a_run_dir_that_is_not_one_exits_2(cluttered, cmd, case):
    from bnexp.cli import app

    if cmd not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip(f"`bnexp {cmd}` is not in this tree")
    if cmd == "reproduce" and case == "no metrics.json":
        pytest.skip("reproduce needs only the saved config: a run that never got to train can be reproduced")
    path = make_not_a_run(cluttered, case)
    before = snapshot(cluttered)
    out = bnexp(cmd, str(path), cwd=cluttered)
    assert_one_line_exit_2(out, path.name)
    assert snapshot(cluttered) == before


def write_checkpoint(path: Path, case: str, marker: Path) -> None:
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    elif case == "truncated":
        torch.save({"format": 1, "model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "not bnexp's":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "code payload":
        torch.save({"format": 1, "model": CodePayload(marker)}, path)


@pytest.mark.parametrize("case", ["corrupt", "truncated", "not bnexp's", "code payload"])
def test_resume_refuses_a_bad_checkpoint_and_never_runs_its_code(cluttered, case):
    run = fake_run(cluttered / "run", status="interrupted")
    marker = cluttered / "PWNED"
    write_checkpoint(run / "checkpoint.pt", case, marker)
    before = snapshot(cluttered)
    out = bnexp("resume", str(run), cwd=cluttered)
    assert_one_line_exit_2(out, "checkpoint")
    assert not marker.exists()
    assert snapshot(cluttered) == before


@pytest.mark.parametrize("status, message", [("completed", "already finished"), ("diverged", "already finished"),
                                             ("interrupted", "no checkpoint.pt")])
def test_resume_refuses_finished_runs_and_runs_without_a_checkpoint(cluttered, status, message):
    run = fake_run(cluttered / "run", status=status)
    before = snapshot(cluttered)
    out = bnexp("resume", str(run), cwd=cluttered)
    assert_one_line_exit_2(out, message)
    assert snapshot(cluttered) == before


# ---------------------------------------------------------------- one process per run dir


HOLD_LOCK = """
import sys, time
from bnexp.rundir import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock (as a training process does) until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline() == "locked\n"
    return holder


def locked_line(run_dir: Path, pid: int) -> str:
    return f"{run_dir.resolve()} is being trained right now by pid {pid} on host {socket.gethostname()}; wait for it or stop it first"


def resumable_run(tmp_path: Path, *args: str) -> Path:
    """A finished tiny run marked interrupted: as far as resume's checks go, one to continue."""
    assert bnexp("train", *TINY, "train.steps=40", *args, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    (run / "metrics.json").write_text(json.dumps({**metrics(run), "status": "interrupted"}))
    return run


@pytest.mark.slow
def test_a_run_dir_another_process_trains_is_refused_untouched_until_that_process_dies(tmp_path):
    run = resumable_run(tmp_path)
    holder = hold_lock(run)
    try:
        before = snapshot(tmp_path)
        # Its metrics.json says nobody trains it: only the lock tells.
        for args in (["resume", str(run)], ["train", *TINY, "train.steps=40", "hydra.run.dir=run"]):
            out = bnexp(*args, cwd=tmp_path)
            assert_one_line_exit_2(out, locked_line(run, holder.pid))
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()  # SIGKILL: no handler runs, yet the kernel drops its lock
        holder.wait()
    done = bnexp("resume", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert metrics(run)["status"] == "completed" and metrics(run)["resumed_from"] == 40


@pytest.mark.slow
def test_a_sweep_skips_a_job_another_process_trains_and_runs_the_others(tmp_path):
    sweep = [*TINY, "train.steps=40", "optim.lr=0.05,0.1", "hydra.sweep.dir=sweep"]
    job = lambda lr: Path(glob.glob(str(tmp_path / "sweep" / f"*optim.lr={lr},*"))[0])  # noqa: E731
    assert bnexp("sweep", *sweep, cwd=tmp_path).returncode == 0
    locked, other = job(0.1), job(0.05)
    (locked / "metrics.json").write_text(json.dumps({**metrics(locked), "status": "interrupted"}))
    shutil.rmtree(other)  # to be trained again by the rerun
    # Hydra rewrites a launched job's .hydra/ and appends to its log before bnexp sees the job.
    results_of = lambda d: {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file() and p.suffix != ".log"}  # noqa: E731
    holder = hold_lock(locked)
    before = results_of(locked)
    try:
        rerun = bnexp("sweep", *sweep, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert rerun.returncode == 0, rerun.stderr
    assert locked_line(locked, holder.pid) in rerun.stdout + rerun.stderr
    assert results_of(locked) == before and metrics(locked)["status"] == "interrupted"
    assert metrics(other)["status"] == "completed" and metrics(other)["steps"] == 40


@pytest.mark.slow
def test_two_resumes_started_together_train_the_run_once(tmp_path):
    args = [*TINY, "train.steps=3000", "train.checkpoint_every=100", "hydra.run.dir=run"]
    run = tmp_path / "run"
    first = start("train", *args, cwd=tmp_path)
    wait_for(lambda: (run / "checkpoint.pt").exists(), first, "the first checkpoint")
    first.kill()  # SIGKILL: `running`, dead, resumable
    first.wait()
    # Both see a dead run and pass every check before either writes a thing: the lock decides.
    twins = [start("resume", str(run), cwd=tmp_path) for _ in range(2)]
    outs = [(p.wait(timeout=120), p.stderr.read()) for p in twins]
    assert sorted(code for code, _ in outs) == [0, 2], outs
    winner = twins[[code for code, _ in outs].index(0)]
    refused = next(err for code, err in outs if code == 2).strip()
    assert refused == f"error: {locked_line(run, winner.pid)}"
    final = metrics(run)
    assert final["status"] == "completed" and final["steps"] == 3000 and final["resumed_from"] >= 100
    assert_no_duplicated_steps(run)
    assert [s for s, _ in scalars(run)["train/loss"]] == list(range(10, 3001, 10))


COUNT_CHECKPOINT_LOADS = """
import sys, torch
loads, load = [], torch.load
torch.load = lambda f, *a, **k: (loads.append(str(f)), load(f, *a, **k))[1]
from bnexp.cli import app
try:
    app(["resume", sys.argv[1]])
except SystemExit as e:
    print(e.code, sum(f.endswith("checkpoint.pt") for f in loads))
"""


@pytest.mark.slow
def test_resume_reads_the_checkpoint_once(tmp_path):
    run = resumable_run(tmp_path)
    out = subprocess.run([sys.executable, "-c", COUNT_CHECKPOINT_LOADS, str(run)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.stdout.split()[-2:] == ["0", "1"], out.stdout + out.stderr
    assert metrics(run)["status"] == "completed"


@pytest.mark.slow
def test_a_ctrl_c_before_the_first_step_leaves_status_interrupted_not_running(tmp_path, monkeypatch):
    # Once metrics.json says "running", however the run ends is written down:
    # a KeyboardInterrupt between that record and the loop must not leave a "running" run behind.
    import gc
    import io
    from contextlib import redirect_stdout

    from bnexp.schema import compose
    from bnexp.train import train

    def ctrl_c(*_a):  # the loop's first call, just before its first step (see bnexp.runtime.frozen_gc)
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "collect", ctrl_c)
    with pytest.raises(KeyboardInterrupt), redirect_stdout(io.StringIO()):
        train(compose(["train.steps=5", "train.progress=false", "model.hidden=[8]"]), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["steps"] == 0
    assert gc.get_freeze_count() == 0
