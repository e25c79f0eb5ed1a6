"""Data-parallel runs as a user starts them: ``torchrun --nproc_per_node=2 -m
bnexp ...`` with two gloo processes on the CPU, read back from what they leave
(metrics.json, the checkpoint, event files), against one process training on
the global batch."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bnexp.config import ConfigError, config_hash
from bnexp.runs import load_scalars
from bnexp.schema import compose, validate
from bnexp.train import train
from tests.conftest import REPO, run_inprocess

# 20 steps of a 2x16 MLP on synthetic clusters, global batch 32 (16 per process),
# the loss and every layer's gradient norm logged at every step.
EQUIVALENCE = ["data=synthetic", "data.n_train=640", "model.hidden=[16,16]", "train.batch_size=32", "train.steps=20",
               "train.log_every=1", "train.eval_every=10", "probes.param_norms.every=1", "probes.activations.every=0",
               "train.deterministic=true", "train.device=cpu", "train.progress=false"]
# Long enough to be interrupted after its first checkpoint (125 steps later it would
# end: ~1 s on an idle machine, where the test signals within 20 ms), with few collectives a step.
LONG = [*EQUIVALENCE[:4], "train.steps=150", "train.log_every=25", "train.eval_every=100", "train.checkpoint_every=25",
        "train.deterministic=true", "train.device=cpu", "train.progress=false", "norm.sync=true"]


def torchrun(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bnexp", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run2(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(*args, cwd=cwd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def start2(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(torchrun(*args, cwd=cwd), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def one_process(run_dir: Path, overrides: list[str]) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        train(compose(overrides), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One torchrun sweep of two data-parallel jobs: norm.sync=true and false."""
    cwd = tmp_path_factory.mktemp("ddp")
    out = run2("sweep", *EQUIVALENCE, "norm.sync=true,false", "hydra.sweep.dir=sweep", "hydra.sweep.subdir=sync_${norm.sync}", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 jobs: 2 completed" in out.stdout, out.stdout[-3000:]
    return cwd / "sweep"


def assert_same_training(ddp: Path, single: Path) -> None:
    got, want = load_scalars(ddp), load_scalars(single)
    tags = [t for t in want if t == "train/loss" or t.startswith("grad_norm/")]
    assert len(tags) >= 6 and "grad_norm/hidden0.linear" in tags
    for tag in tags:
        steps = [s for s, _ in want[tag]]
        assert [s for s, _ in got[tag]] == steps == list(range(1, 21)), tag
        torch.testing.assert_close(torch.tensor([v for _, v in got[tag]]), torch.tensor([v for _, v in want[tag]]), rtol=1e-5, atol=1e-6, msg=tag)
    a, b = weights(ddp), weights(single)
    common = a.keys() & b.keys()  # ghost BN has no num_batches_tracked
    assert {k for k in common if "norm" in k} >= {"hidden0.norm.weight", "hidden0.norm.running_mean", "hidden1.norm.running_var"}
    for k in common:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_two_processes_with_synchronized_bn_train_as_one_process_on_the_global_batch(sweep, tmp_path):
    single = one_process(tmp_path / "one", EQUIVALENCE)  # batch 32 in one process: plain BN over all of it
    assert_same_training(sweep / "sync_True", single)


@pytest.mark.slow
def test_two_processes_with_per_device_bn_train_as_one_process_with_ghost_bn_of_the_per_device_batch(sweep, tmp_path):
    single = one_process(tmp_path / "ghost", [*EQUIVALENCE, "norm=ghost_batch", "norm.virtual_batch_size=16"])
    assert_same_training(sweep / "sync_False", single)
    # and not as plain BN over the global batch, which the synchronized run matches
    plain_bn = load_scalars(sweep / "sync_True")["train/loss"]
    assert load_scalars(sweep / "sync_False")["train/loss"][-1][1] != pytest.approx(plain_bn[-1][1], rel=1e-4)


@pytest.mark.slow
def test_a_data_parallel_run_writes_one_run_dir_with_one_event_file_and_records_its_world(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.startswith("sync")) == ["sync_False", "sync_True"]
    for run_dir in (sweep / "sync_True", sweep / "sync_False"):
        m = metrics(run_dir)
        assert m["status"] == "completed" and m["steps"] == 20
        assert m["world_size"] == 2 and m["backend"] == "gloo"
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        lock = json.loads((run_dir / ".bnexp.lock").read_text())
        assert lock["pid"] == m["process"]["pid"]  # rank 0 took the lock and wrote the record
    # the world size is part of the config hash: a single process does not take this run for its own
    cfg = compose([*EQUIVALENCE, "norm.sync=true"])
    assert metrics(sweep / "sync_True")["config_hash"] == config_hash(cfg, world_size=2) != config_hash(cfg)


@pytest.mark.slow
def test_a_rerun_of_the_data_parallel_sweep_skips_its_finished_jobs(sweep):
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.name in ("metrics.json", "checkpoint.pt")}
    out = run2("sweep", *EQUIVALENCE, "norm.sync=true,false", "hydra.sweep.dir=sweep", "hydra.sweep.subdir=sync_${norm.sync}", cwd=sweep.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 jobs: 2 skipped" in out.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_data_parallel_run_interrupted_by_ctrl_c_resumes_to_the_uninterrupted_result(tmp_path):
    reference = start2("train", *LONG, "hydra.run.dir=reference", cwd=tmp_path)
    victim_dir = tmp_path / "victim"
    victim = start2("train", *LONG, f"hydra.run.dir={victim_dir}", cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not (victim_dir / "checkpoint.pt").exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGINT)  # Ctrl-C reaches torchrun, which passes it to every rank
    _, err = victim.communicate(timeout=120)
    m = metrics(victim_dir)
    assert m["status"] == "interrupted" and 25 <= m["steps"] < 150, err[-3000:]
    assert f"torchrun --nproc_per_node=2 -m bnexp resume {victim_dir}" in err
    assert err.count("interrupted after step") == 1  # said once, by rank 0
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]

    refused = run_inprocess(["resume", str(victim_dir)], tmp_path)  # a single process: this one
    assert refused.returncode == 2 and "trained by 2 process(es)" in refused.stderr and "Traceback" not in refused.stderr
    resumed = run2("resume", str(victim_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m, want = metrics(victim_dir), metrics(tmp_path / "reference")
    assert m["status"] == "completed" and m["resumed_from"] >= 25
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith("time/")}  # noqa: E731
    assert untimed(m["final"]) == untimed(want["final"]) and untimed(m["best"]) == untimed(want["best"])
    got, ref = load_scalars(victim_dir), load_scalars(tmp_path / "reference")
    assert {t: v for t, v in got.items() if not t.startswith("time/")} == {t: v for t, v in ref.items() if not t.startswith("time/")}
    assert torch.equal(torch.cat([v.flatten() for v in weights(victim_dir).values()]),
                       torch.cat([v.flatten() for v in weights(tmp_path / "reference").values()]))


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"^train.batch_size: 30 does not split evenly over 4 processes"):
        validate(compose(["data=synthetic", "train.batch_size=30"]))
    with pytest.raises(ConfigError, match=r"^norm.virtual_batch_size: 16 does not divide the per-device batch 8"):
        validate(compose(["data=synthetic", "train.batch_size=32", "norm=ghost_batch", "norm.virtual_batch_size=16"]))
    validate(compose(["data=synthetic", "train.batch_size=32", "norm=ghost_batch", "norm.virtual_batch_size=16", "norm.sync=true"]))
    with pytest.raises(ConfigError, match=r"^train.device: cuda:1, but in a data-parallel run"):
        from bnexp.schema import _check_world

        _check_world(compose(["data=synthetic", "train.device=cuda:1"]), 4)


def test_norm_sync_for_a_norm_without_batch_statistics_exits_2_with_one_line_and_no_run_dir(tmp_path):
    out = run_inprocess(["train", "data=synthetic", "norm=layer", "norm.sync=true", "train.device=cpu"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: norm.sync: true, but norm=layer normalizes each example by itself: there "
                                               "are no batch statistics to synchronize; allowed: false (true for batch, ghost_batch, batch_renorm, evonorm_b0)"]
    assert list(tmp_path.iterdir()) == []


def test_sync_bn_ablation_sweeps_per_device_batches_2_to_32_with_and_without_sync_on_2_processes(monkeypatch):
    from tests.test_presets import grid

    monkeypatch.setenv("WORLD_SIZE", "2")
    points = grid("sync_bn_ablation")  # the grid without its 3 seeds
    assert len(points) == 10
    assert sorted({int(p[0].removeprefix("train.batch_size=")) // 2 for p in points}) == [2, 4, 8, 16, 32]
    assert {p[1] for p in points} == {"norm.sync=false", "norm.sync=true"}
    for point in (points[0], points[-1]):  # per-device batch 2 without sync, 32 with
        validate(compose(["experiment=sync_bn_ablation", *point]))


def test_single_process_runs_keep_the_config_hash_they_had_before_world_size_and_norm_sync_existed():
    # computed by bnexp at 77b4f55, before either existed
    assert config_hash(compose(["data=synthetic"])) == "cc1df50f7b333183"
    assert config_hash(compose(["data=synthetic", "norm=ghost_batch", "train.batch_size=32"])) == "9adace646f990c1c"
    cfg = compose(["data=synthetic"])
    assert len({config_hash(cfg), config_hash(cfg, world_size=2), config_hash(compose(["data=synthetic", "norm.sync=true"]))}) == 3


def test_a_sweep_under_torchrun_refuses_a_launcher_whose_workers_would_inherit_its_rank(monkeypatch, tmp_path):
    from bnexp import distributed

    monkeypatch.setattr(distributed, "_RANKS", distributed.Ranks(world_size=2, rank=0))  # rank 0 of two, as torchrun starts it
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's word for it, which bnexp reads before it loads torch.distributed
    out = run_inprocess(["sweep", "hydra/launcher=joblib", "data=synthetic", "seed=0,1"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: hydra/launcher: JoblibLauncher under torchrun; allowed: basic (every job of "
                                               "the sweep runs on all the processes, one job after another)"]
    assert not (tmp_path / "runs").exists()


def _vote_rank(rank: int, port: int, out: str) -> None:
    """Rank 0 casts its last stop vote 0.5 s late; rank 1 leaves its loop at once."""
    from bnexp import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    vote = distributed.Ranks(2, rank).stop_vote()
    for step in range(3):
        if rank == 0 and step == 2:
            time.sleep(0.5)
        vote(False)
    in_flight = [work for work, _ in vote.pending]
    t0 = time.perf_counter()
    vote.settle()  # train() calls it when its loop ends
    waited = time.perf_counter() - t0
    Path(out, f"rank{rank}.json").write_text(json.dumps({"in_flight": len(in_flight), "waited": waited,
                                                         "completed": all(w.is_completed() for w in in_flight),
                                                         "left": len(vote.pending)}))
    dist.destroy_process_group()


def test_a_rank_leaving_its_loop_first_waits_for_the_last_stop_vote_so_no_collective_outlives_it(tmp_path):
    # A vote still in flight at interpreter exit completes on a gloo worker thread,
    # which then needs the GIL of a finalizing interpreter: SIGABRT, "terminate called
    # without an active exception" (seen in 3 of 12 torchrun resumes before this).
    import torch.multiprocessing as mp

    from tests.test_distributed_norms import free_port

    mp.start_processes(_vote_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    fast = json.loads((tmp_path / "rank1.json").read_text())
    assert fast["in_flight"] == 1 and fast["completed"] and fast["left"] == 0
    assert fast["waited"] > 0.3  # it waited for rank 0's late vote instead of exiting with it in flight


@pytest.mark.slow
def test_a_stopped_rank_fails_the_run_after_train_dist_timeout_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "stuck"
    victim = start2("train", *LONG, "train.steps=200", "train.deterministic=false", "train.dist_timeout=3",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint.pt").exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)
    ranks = sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True, text=True).stdout.split())
    os.kill(ranks[1], signal.SIGSTOP)  # rank 1 hangs (a stuck device, a debugger): rank 0 waits in its next collective
    stopped = time.monotonic()
    try:
        while metrics(run_dir)["status"] != "failed":
            assert time.monotonic() - stopped < 60, "rank 0 still waits for the stopped rank"
            time.sleep(0.1)
        assert time.monotonic() - stopped >= 2.5  # not before train.dist_timeout
    finally:
        os.kill(ranks[1], signal.SIGCONT)  # torchrun's SIGTERM then reaches it
    victim.communicate(timeout=120)
    assert victim.returncode == 1
    m = metrics(run_dir)
    # gloo words it "Timed out waiting 3000ms for recv ..." or "Application timeout caused pair closure"
    assert re.search("timed out|timeout", m["error"], re.IGNORECASE) and 25 <= m["steps"] < 200, m["error"]
    resumed = run2("resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir)["status"] == "completed" and metrics(run_dir)["steps"] == 200
