"""Bad input gets one line naming the key and what is allowed, exit code 2, and
leaves nothing behind (issue 16, items 6, 7, 9, 10, 11 and 13)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, run_inprocess, snapshot, start_cli


def assert_refused(tmp_path: Path, args: list[str], *names: str, command: str = "train") -> str:
    (tmp_path / "keep.txt").write_text("keep")
    before = snapshot(tmp_path)
    out = run_inprocess([command, *args], cwd=tmp_path)
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in out.stdout + out.stderr, err
    for name in names:
        assert name in err, (name, err)
    assert snapshot(tmp_path) == before, "something was written or removed"
    return err


BAD = {
    "a removed key": (["~seed"], ["seed", "removed"]),
    "a removed group key": (["~train.log_every"], ["train.log_every", "deletion"]),
    "a typo added with +": (["+norm.placment=pre"], ["norm.placment", "did you mean norm.placement?"]),
    "a typo of a train key added with +": (["+train.stepz=10"], ["train.stepz", "did you mean train.steps?"]),
    "a typo without +": (["norm.placment=pre"], ["norm.placment", "did you mean norm.placement?"]),
    "nan gamma": (["norm.gamma_init=nan"], ["norm.gamma_init", "finite"]),
    "inf lr": (["optim.lr=inf"], ["optim.lr", "finite"]),
    "inf eps": (["norm.eps=inf"], ["norm.eps", "finite"]),
    "data that overflows to inf": (["data=synthetic", "data.cluster_std=1e38"], ["data", "non-finite", "data.preprocess"]),
    "mps on a machine without Metal": (["train.device=mps"], ["train.device", "mps"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("args, names", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, names):
    assert_refused(tmp_path, [*TINY, "hydra.run.dir=run", *args], *names)


@pytest.mark.slow
def test_a_user_key_added_at_the_top_level_with_plus_still_trains(tmp_path):
    out = run_inprocess(["train", *TINY, "data=synthetic", "+my_note=hello", "hydra.run.dir=run"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "my_note: hello" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_a_run_dir_that_is_an_existing_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    assert_refused(tmp_path, [*TINY, "hydra.run.dir=afile/run"], "hydra.run.dir", "afile", "not a directory")


def test_a_run_dir_that_cannot_be_created_is_refused(tmp_path):
    # /proc takes no new directories, for root either (a read-only location root cannot write into).
    assert_refused(tmp_path, [*TINY, "hydra.run.dir=/proc/bnexp-test/run"], "hydra.run.dir", "/proc/bnexp-test/run")


def test_reproduce_into_an_existing_file_is_refused(tmp_path):
    assert run_inprocess(["train", *TINY, "data=synthetic", "hydra.run.dir=orig"], cwd=tmp_path).returncode == 0
    (tmp_path / "out.txt").write_text("mine")
    assert_refused(tmp_path, ["orig", "--out", "out.txt"], "--out", "out.txt", "not a directory", command="reproduce")


# ---------------------------------------------------------------- 13. interrupted before or while training


@pytest.mark.slow
def test_sigterm_while_setting_up_says_there_is_nothing_to_resume_and_leaves_no_run_dir(tmp_path):
    # A million 64-feature examples take a few seconds to generate: the signal lands in setup.
    proc = start_cli(["train", *TINY, "data=synthetic", "data.n_train=1000000", "data.shape=[64]", "hydra.run.dir=run"], tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / ".hydra" / "config.yaml").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "nothing to resume" in err and "bnexp resume" not in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_while_training_names_the_run_dir_that_bnexp_resume_continues(tmp_path):
    proc = start_cli(["train", "data=synthetic", "model.hidden=[16,16]", "train.steps=100000", "train.log_every=10",
                      "train.eval_every=100", "train.progress=false", "hydra.run.dir=run"], tmp_path)
    log = tmp_path / "run" / "bnexp.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "step 100/100000" in log.read_text()):  # its first eval: inside the training loop
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"`bnexp resume {(tmp_path / 'run').resolve()}` continues it" in err, err


@pytest.mark.parametrize("hydra_flag", ["hydra.job.name=myjob", "hydra.output_subdir=cfg"])
@pytest.mark.parametrize("bad", [["+norm.placment=pre"], ["train.batch_size=99999"]], ids=["typo", "found while setting up"])
def test_a_rejected_run_leaves_nothing_whatever_hydra_calls_its_log_and_record(tmp_path, hydra_flag, bad):
    assert_refused(tmp_path, [*TINY, "hydra.run.dir=jn/x", hydra_flag, *bad], bad[0].lstrip("+").split("=")[0])
    assert not (tmp_path / "jn").exists()


def test_a_key_of_another_model_family_says_which_family_it_belongs_to(tmp_path):
    err = assert_refused(tmp_path, [*TINY, "hydra.run.dir=run", "model.kernel_size=5"], "model.kernel_size", "model=cnn")
    assert "did you mean" not in err
