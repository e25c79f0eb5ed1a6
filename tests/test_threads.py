"""Intra-op threads: train.threads, its auto policy, and resume / reproduce keeping a run's count.

Results depend on the thread count (matmul and BN reductions split their work
by it), so a run resumed or reproduced with another count would not end where
the original does. The CLI tests set OMP_NUM_THREADS to give each process the
thread budget a user's shell or a launcher would.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest
import torch

from bnexp.config import ConfigError
from bnexp.schema import compose, validate
from tests.conftest import run_cli, run_inprocess, start_cli

# A 2x32 MLP on synthetic clusters: far below auto's threshold, bit-reproducible on CPU.
TINY = ["data=synthetic", "model.hidden=[32,32]", "train.log_every=10", "train.eval_every=50",
        "train.deterministic=true", "train.device=cpu", "train.progress=false"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def results(run_dir: Path) -> dict:
    m = metrics(run_dir)
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
    return {"status": m["status"], "steps": m["steps"], "final": untimed(m["final"]), "best": untimed(m["best"])}


def threads_env(n: int) -> dict:
    return {"OMP_NUM_THREADS": str(n)}


@pytest.mark.parametrize("model, data_shape", [
    (["model.hidden=[100,100,100]"], (1, 28, 28)),
    (["model=cnn", "model.hidden=[4,6]"], (1, 40)),
    (["model=cnn", "model.hidden=[4,6]"], (3, 16, 16)),
    (["model=resnet", "model.depth=8", "model.width=0.25", "model.shortcut=projection"], (3, 16, 16)),
    (["model=vgg", "model.width=0.0625"], (3, 32, 32)),
])
def test_auto_counts_a_steps_flops_as_torchs_flop_counter_does(model, data_shape):
    from torch.utils.flop_counter import FlopCounterMode

    from bnexp.models import build_model
    from bnexp.runtime import step_flops

    cfg = compose(model)
    net = build_model(cfg.model, cfg.norm, data_shape, 10)
    x = torch.randn(1, *data_shape)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net.eval()(torch.cat([x, x]))
    net.train()
    assert step_flops(net, x, 64) == 3.0 * 64 * counter.get_total_flops() / 2 > 0
    assert net.training  # given back in its mode


@pytest.mark.slow  # a fresh process: the thread budget is read when torch loads
def test_auto_gives_a_small_step_one_thread_though_the_process_may_use_two(tmp_path):
    out = run_cli(["train", *TINY, "train.steps=20", "hydra.run.dir=run"], tmp_path, env=threads_env(2))
    assert out.returncode == 0, out.stderr
    assert metrics(tmp_path / "run")["env"]["threads"] == 1
    assert "torch threads: 1 (auto: " in out.stdout + out.stderr and "MFLOP a step, under" in out.stdout + out.stderr


@pytest.mark.slow
def test_train_threads_n_sets_the_count_and_anything_else_is_refused():
    for bad in ("0", "-1", "two", "1.5", "true"):
        with pytest.raises(ConfigError) as e:
            validate(compose([*TINY, f"train.threads={bad}"]))
        assert str(e.value).startswith("train.threads: got ") and "allowed: auto or a positive number of threads" in str(e.value)
    validate(compose([*TINY, "train.threads=3"]))


def test_a_retrained_run_keeps_its_recorded_count_and_the_process_gets_its_own_back(tmp_path, caplog):
    from bnexp.runtime import recorded_threads
    from bnexp.train import train

    cfg = compose([*TINY, "train.steps=10", "train.log_every=5"])
    before = torch.get_num_threads()  # the suite's budget: OMP_NUM_THREADS=1 (tests/conftest.py)
    with caplog.at_level(logging.WARNING, logger="bnexp"), recorded_threads(cfg, {"env": {"threads": 2}}):
        pinned = train(cfg, tmp_path / "pinned", summary=False)
    assert pinned["env"]["threads"] == 2 and torch.get_num_threads() == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["the run was trained with 2 threads: retrained with as many for the same results, above this "
                        "process's budget of 1 (OMP_NUM_THREADS, CPUs), so slower"]
    assert train(cfg, tmp_path / "own", summary=False)["env"]["threads"] == 1  # auto again once the retraining is over
    explicit = compose([*TINY, "train.steps=10", "train.log_every=5", "train.threads=1"])
    with recorded_threads(explicit, {"env": {"threads": 2}}):  # an explicit train.threads=N wins over the record
        assert train(explicit, tmp_path / "explicit", summary=False)["env"]["threads"] == 1


@pytest.mark.slow
def test_resume_and_reproduce_under_another_thread_setting_end_where_the_two_thread_run_does(tmp_path):
    # Short, one process at a time: two threads on a busy 2-core machine can run
    # 50x slower than one (the collapse that docs/performance.md measures).
    args = [*TINY, "train.steps=300", "train.checkpoint_every=10", "train.eval_every=100", "train.threads=2"]
    two = threads_env(2)
    assert torch.get_num_threads() == 1  # the budget of this process, which resumes and reproduces the run
    assert run_cli(["train", *args, "hydra.run.dir=reference"], tmp_path, env=two, timeout=300).returncode == 0
    run = tmp_path / "victim"
    victim = start_cli(["train", *args, f"hydra.run.dir={run}"], tmp_path, env=two)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    assert metrics(run)["status"] == "interrupted" and metrics(run)["steps"] < 300

    # Resumed in a process whose own budget is 1 thread (this one's: tests/conftest.py): it trains on with the run's 2.
    resumed = run_inprocess(["resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert results(run) == results(tmp_path / "reference")
    assert metrics(run)["env"]["threads"] == 2 and metrics(run)["resumed_from"] > 0

    # Reproduced with auto (an explicit request to choose): auto is the recorded count, said in one line.
    again = run_inprocess(["reproduce", str(tmp_path / "reference"), "--out", "again", "train.threads=auto"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "identical: every metric matches exactly" in again.stdout
    assert metrics(tmp_path / "again")["env"]["threads"] == 2
    assert again.stderr.count("the run was trained with 2 threads") == 1


def test_a_thread_count_above_the_machines_cpus_is_capped_with_a_warning(tmp_path, caplog, monkeypatch):
    from bnexp import runtime
    from bnexp.train import train

    monkeypatch.setattr(runtime, "machine_cpus", lambda: 2)
    cfg = compose([*TINY, "train.steps=5", "train.log_every=5", "train.threads=100000"])  # OpenMP segfaulted on this
    with caplog.at_level(logging.WARNING, logger="bnexp"):
        record = train(cfg, tmp_path / "run", summary=False)
    assert record["status"] == "completed" and record["env"]["threads"] == 2
    assert "train.threads=100000 is more than this machine's 2 CPUs: capped at 2" in caplog.text


def test_a_recorded_thread_count_no_run_had_is_ignored():
    from bnexp.runtime import recorded_threads

    cfg = compose(TINY)
    before = torch.get_num_threads()
    with recorded_threads(cfg, {"env": {"threads": 100000}}):  # a hostile or damaged metrics.json
        assert torch.get_num_threads() == before
