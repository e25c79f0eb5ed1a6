"""What bnexp writes into a run directory, and what it never touches: files of
other processes and of other programs, symlinks, permissions, temp files of a
killed writer, a full disk (issue 16, items 1-5 and 12)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from bnexp.rundir import LOCK_FILE, RunDirGuard, before_writing
from tests.conftest import TINY, run_cli, run_inprocess, snapshot

ONE_LINE_EXIT_2 = 2


def train(cwd: Path, *args: str):
    return run_inprocess(["train", *TINY, "data=synthetic", "train.device=cpu", *args], cwd=cwd)


def assert_one_line(out, code: int, *names: str) -> None:
    err = out.stderr.strip()
    assert out.returncode == code, (out.returncode, out.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in out.stderr + out.stdout, err
    for name in names:
        assert name in err, (name, err)


# ---------------------------------------------------------------- 1. undo only what this process wrote


def test_a_rejected_run_takes_back_its_own_files_and_leaves_a_sibling_run_made_meanwhile(tmp_path):
    # `bnexp train name=newexp ... &` rejected during setup while another `bnexp train name=newexp`
    # started a second later: the first created runs/newexp/, the second wrote its run dir into it.
    mine = tmp_path / "runs" / "newexp" / "2026-12-01_10-00-00"
    before = before_writing(mine, (LOCK_FILE,))  # taken before the lock makes the run dir and the lock file
    (mine).mkdir(parents=True)
    (mine / LOCK_FILE).write_text("{}")
    guard = RunDirGuard(mine, [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "bnexp.log"], before)
    (mine / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (mine / ".hydra" / name).write_text("written by this process")
    (mine / "bnexp.log").write_text("log")
    theirs = tmp_path / "runs" / "newexp" / "2026-12-01_10-00-01"
    (theirs / ".hydra").mkdir(parents=True)
    (theirs / ".hydra" / "config.yaml").write_text("the other run's")
    (theirs / LOCK_FILE).write_text("held")
    (theirs / "bnexp.log").write_text("the other run's log")
    before = snapshot(theirs)
    guard.undo()
    assert not mine.exists()
    assert snapshot(theirs) == before and (theirs / LOCK_FILE).read_text() == "held"


def test_a_rejected_run_in_an_existing_dir_keeps_files_another_process_added_and_restores_its_own(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("before")
    guard = RunDirGuard(run, [".hydra/config.yaml", "bnexp.log"])
    (run / ".hydra" / "config.yaml").write_text("rewritten by Hydra")
    (run / "bnexp.log").write_text("new log")
    (run / "someone_elses.txt").write_text("keep")
    guard.undo()
    assert (run / ".hydra" / "config.yaml").read_text() == "before"
    assert not (run / "bnexp.log").exists() and (run / "someone_elses.txt").read_text() == "keep"


# ---------------------------------------------------------------- 2. a symlinked lock file


def test_a_lock_file_replaced_by_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    assert train(tmp_path, "hydra.run.dir=run").returncode == 0
    run = tmp_path / "run"
    (run / "metrics.json").write_text(json.dumps({**json.loads((run / "metrics.json").read_text()), "status": "interrupted"}))
    target = tmp_path / "precious.txt"
    target.write_text("do not overwrite me")
    (run / LOCK_FILE).unlink()
    (run / LOCK_FILE).symlink_to(target)
    out = run_inprocess(["resume", str(run)], cwd=tmp_path)
    assert_one_line(out, 2, LOCK_FILE, "symbolic link")
    assert target.read_text() == "do not overwrite me"
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


# ---------------------------------------------------------------- 3. a directory bnexp did not write


@pytest.mark.parametrize("foreign", ["metrics.json", "checkpoint.pt"])
def test_training_into_a_directory_holding_another_programs_metrics_or_checkpoint_is_refused(tmp_path, foreign):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / foreign).write_text('{"accuracy": 0.99}')
    before = snapshot(tmp_path)
    out = train(tmp_path, "hydra.run.dir=theirs")
    assert_one_line(out, 2, "theirs", foreign, "bnexp did not write" if foreign == "metrics.json" else "no bnexp")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 4. permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_metrics_and_checkpoint_get_the_permissions_the_umask_gives_any_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert train(tmp_path, "hydra.run.dir=run").returncode == 0
    finally:
        os.umask(old)
    for name in ("metrics.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == mode, name


# ---------------------------------------------------------------- 5. temp files of a killed writer


@pytest.mark.slow
def test_temp_files_a_killed_writer_left_are_removed_when_the_run_is_resumed(tmp_path):
    assert train(tmp_path, "hydra.run.dir=run").returncode == 0
    run = tmp_path / "run"
    (run / "metrics.json").write_text(json.dumps({**json.loads((run / "metrics.json").read_text()), "status": "interrupted"}))
    orphans = [run / ".checkpoint.pt.999999.abcd1234.tmp", run / ".metrics.json.k2j3h4g5.tmp"]  # this version's name, and 0.1's
    for o in orphans:
        o.write_bytes(b"\0" * 4096)
    (run / "notes.tmp").write_text("not ours")
    assert run_inprocess(["resume", str(run)], cwd=tmp_path).returncode == 0
    assert not any(o.exists() for o in orphans)
    assert (run / "notes.tmp").read_text() == "not ours"


# ---------------------------------------------------------------- 12. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_says_no_space_left_exits_1_and_keeps_the_last_good_checkpoint(small_disk, tmp_path):
    # ~1.2 MiB of weights and as much momentum: the first checkpoint fits, a second copy beside it does not.
    args = ["train", *TINY, "data=synthetic", "model.hidden=[512,512]", "train.steps=40", "train.checkpoint_every=10",
            "train.device=cpu", f"hydra.run.dir={small_disk}/run"]
    out = run_cli(args, cwd=tmp_path)
    run = small_disk / "run"
    assert out.returncode == 1, out.stderr
    assert "no space left on" in out.stderr and str(run) in out.stderr and "Traceback" not in out.stderr
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 10
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_a_disk_full_before_hydra_writes_leaves_no_empty_files_and_says_so(small_disk, tmp_path):
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    out = run_cli(["train", *TINY, f"hydra.run.dir={small_disk}/run"], cwd=tmp_path)
    assert out.returncode in (1, 2), out.stderr
    assert "no space left" in out.stderr.lower() and "Traceback" not in out.stderr, out.stderr
    assert not (small_disk / "run").exists()
