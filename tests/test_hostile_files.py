"""Files that do not belong where bnexp finds them: a checkpoint copied from
another run, damaged or hostile saved configs, checkpoints and run trees.
Each is refused in one line with exit 2 (or listed as unreadable), and what is
on disk stays as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY, one_line_exit_2, run_inprocess, snapshot

TRAIN = [*TINY, "train.steps=20", "train.eval_every=10"]


def bnexp(*args: str, cwd: Path):
    return run_inprocess(list(args), cwd)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def mark(run_dir: Path, status: str) -> None:
    """As if the run had stopped there (the checkpoint at its last step is resumable)."""
    (run_dir / "metrics.json").write_text(json.dumps({**metrics(run_dir), "status": status}))


# ---------------------------------------------------------------- a checkpoint of another run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    for seed in (0, 7):
        assert bnexp("train", *TRAIN, f"seed={seed}", f"hydra.run.dir=seed{seed}", cwd=root).returncode == 0
        mark(root / f"seed{seed}", "interrupted")
    return root


@pytest.fixture
def two_runs(trained, tmp_path) -> tuple[Path, Path]:
    """Two interrupted runs that differ only in seed (copies: a test may change them)."""
    for seed in (0, 7):
        shutil.copytree(trained / f"seed{seed}", tmp_path / f"seed{seed}", symlinks=True)
    return tmp_path / "seed0", tmp_path / "seed7"


def test_resume_refuses_a_checkpoint_copied_from_another_run_naming_both(two_runs):
    mine, other = two_runs
    shutil.copy2(other / "checkpoint.pt", mine / "checkpoint.pt")
    before = snapshot(mine.parent)
    err = one_line_exit_2(bnexp("resume", str(mine), cwd=mine.parent), "checkpoint.pt belongs to another run", "seed 7", "this run: seed 0")
    assert "delete it" in err
    assert snapshot(mine.parent) == before
    # and train into that dir is refused the same way, before Hydra writes anything
    out = bnexp("train", *TRAIN, "seed=0", f"hydra.run.dir={mine}", cwd=mine.parent)
    one_line_exit_2(out, "belongs to another run")
    assert snapshot(mine.parent) == before


def test_resume_takes_the_runs_own_checkpoint(two_runs):
    mine, _ = two_runs
    out = bnexp("resume", str(mine), cwd=mine.parent)
    assert out.returncode == 0, out.stderr
    assert metrics(mine)["status"] == "completed"


def test_a_checkpoint_names_its_run_without_being_loaded(two_runs):
    from bnexp.rundir import checkpoint_owner

    mine, other = two_runs
    assert checkpoint_owner(mine / "checkpoint.pt") == {"config_hash": metrics(mine)["config_hash"], "seed": 0, "replica": None}
    assert checkpoint_owner(other / "checkpoint.pt")["seed"] == 7


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "vectorized"])
def test_a_sweep_rerun_does_not_resume_a_job_from_another_jobs_checkpoint(tmp_path, launcher):
    args = ["sweep", *TRAIN, "seed=0,1", "hydra.sweep.dir=sw", f"hydra/launcher={launcher}"]
    out = bnexp(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = {p.name: p for p in (tmp_path / "sw").iterdir() if p.is_dir() and p.name.startswith("seed")}
    assert sorted(jobs) == ["seed=0", "seed=1"]
    for job in jobs.values():
        mark(job, "interrupted")
    shutil.copy2(jobs["seed=0"] / "checkpoint.pt", jobs["seed=1"] / "checkpoint.pt")  # seed 1 would become seed 0
    victim = snapshot(jobs["seed=1"])
    out = bnexp(*args, cwd=tmp_path)
    assert out.returncode == 1
    assert "belongs to another run" in (jobs["seed=1"] / "bnexp.log").read_text()
    assert {k: v for k, v in snapshot(jobs["seed=1"]).items() if not k.startswith((".hydra", "bnexp.log", ".bnexp.lock"))} == \
           {k: v for k, v in victim.items() if not k.startswith((".hydra", "bnexp.log", ".bnexp.lock"))}
    assert metrics(jobs["seed=1"])["status"] == "interrupted"
    assert metrics(jobs["seed=0"])["status"] == "completed"  # the other job resumed from its own


# ---------------------------------------------------------------- damaged or hostile saved configs


def damage(run_dir: Path, case: str) -> None:
    config = run_dir / ".hydra" / "config.yaml"
    text = config.read_text()
    edits = {
        "recursive": lambda t: t.replace("seed: 0", "seed: ${notes}").replace("notes: null", "notes: ${seed}"),
        "oc.env": lambda t: t.replace("notes: null", "notes: ${oc.env:BNEXP_TEST_SECRET}"),
        "hydra": lambda t: t.replace("notes: null", "notes: ${hydra:runtime.cwd}"),
        "dangling": lambda t: t.replace("notes: null", "notes: ${no.such.key}"),
        "cut short": lambda t: t[: len(t) // 2].rsplit("\n", 1)[0] + "\n",
        "empty": lambda t: "",
        "edited": lambda t: t.replace("steps: 20", "steps: 21"),
    }
    if case in edits:
        config.write_text(edits[case](text))
    elif case == "yaml tag in overrides.yaml":
        (run_dir / ".hydra" / "overrides.yaml").write_text("- !!python/object/apply:os.system ['touch PWNED']\n")


SAVED_CONFIG_CASES = {
    "recursive": ["seed", "Recursive interpolation"],
    "oc.env": ["notes", "${oc.env:BNEXP_TEST_SECRET}", "never resolves"],
    "hydra": ["notes", "${hydra:runtime.cwd}", "never resolves"],
    "dangling": ["notes", "no.such.key"],
    "cut short": ["config.yaml", "misses", "cut short"],
    "empty": ["config.yaml", "misses seed"],
    "edited": ["no longer matches the run in metrics.json"],
    "yaml tag in overrides.yaml": ["overrides.yaml", "python/object/apply:os.system"],
}


@pytest.mark.parametrize("cmd", ["resume", "reproduce"])
@pytest.mark.parametrize("case", SAVED_CONFIG_CASES)
def test_a_damaged_or_hostile_saved_config_is_refused_in_one_line_with_nothing_written(two_runs, monkeypatch, cmd, case):
    if cmd == "resume" and case == "yaml tag in overrides.yaml":
        pytest.skip("resume reads the overrides from metrics.json")
    monkeypatch.setenv("BNEXP_TEST_SECRET", "hunter2")
    run, _ = two_runs
    damage(run, case)
    before = snapshot(run.parent)
    args = ["resume", str(run)] if cmd == "resume" else ["reproduce", str(run), "--out", str(run.parent / "again")]
    out = bnexp(*args, cwd=run.parent)
    one_line_exit_2(out, *SAVED_CONFIG_CASES[case])
    assert "hunter2" not in out.stdout + out.stderr
    assert snapshot(run.parent) == before and not (run.parent / "PWNED").exists()


def test_reproduce_takes_a_value_in_place_of_a_resolver_and_never_reads_the_environment(two_runs, monkeypatch):
    monkeypatch.setenv("BNEXP_TEST_SECRET", "hunter2")
    run, _ = two_runs
    damage(run, "oc.env")
    out = bnexp("reproduce", str(run), "--out", "again", "notes=plain", cwd=run.parent)
    assert out.returncode == 0, out.stderr
    written = b"".join(p.read_bytes() for p in (run.parent / "again").rglob("*") if p.is_file())
    assert b"plain" in written and b"hunter2" not in written


def test_runs_and_report_show_a_resolver_as_written_never_its_value(two_runs, monkeypatch):
    monkeypatch.setenv("BNEXP_TEST_SECRET", "hunter2")
    run, other = two_runs
    for r in (run, other):
        damage(r, "oc.env")
    (run / ".hydra" / "config.yaml").write_text((run / ".hydra" / "config.yaml").read_text().replace(
        "root: data", "root: ${oc.env:BNEXP_TEST_SECRET}", 1))
    out = bnexp("report", str(run.parent), "--format", "json", cwd=run.parent)
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout + out.stderr and "${oc.env:BNEXP_TEST_SECRET}" in out.stdout


# ---------------------------------------------------------------- a checkpoint that claims more than it holds


def test_a_zip_bomb_checkpoint_is_refused_from_what_it_claims_before_anything_is_inflated(two_runs):
    import zipfile

    import torch

    run, _ = two_runs
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model"]["padding"] = torch.zeros(2**22)  # 16 MiB of zeros: 16 KiB deflated
    plain = run / "plain.pt"
    torch.save(ckpt, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(run / "checkpoint.pt", "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in src.infolist():
            bomb.writestr(info.filename, src.read(info))
    plain.unlink()
    assert (run / "checkpoint.pt").stat().st_size < 2**20
    before = snapshot(run.parent)
    one_line_exit_2(bnexp("resume", str(run), cwd=run.parent), "checkpoint.pt claims 16.", "refused before loading")
    assert snapshot(run.parent) == before


# ---------------------------------------------------------------- special and oversized files in a runs tree


def hostile_tree(trained: Path, root: Path) -> Path:
    """A runs tree: one good run, and beside it runs whose records are FIFOs, a
    device, a huge file, a nesting bomb, an alias bomb, an event file that is a FIFO."""
    import os

    tree = root / "runs"
    shutil.copytree(trained / "seed0", tree / "good")
    cases = {
        "fifo_metrics": ("metrics.json", "fifo"), "fifo_config": (".hydra/config.yaml", "fifo"),
        "fifo_overrides": (".hydra/overrides.yaml", "fifo"), "fifo_hydra": (".hydra/hydra.yaml", "fifo"),
        "device_metrics": ("metrics.json", "/dev/zero"), "huge_metrics": ("metrics.json", "huge"),
        "deep_metrics": ("metrics.json", "deep"), "alias_bomb_config": (".hydra/config.yaml", "aliases"),
        "fifo_events": ("events.out.tfevents.0.host.1.0", "fifo"),
    }
    for name, (rel, kind) in cases.items():
        run = tree / name
        shutil.copytree(trained / "seed7", run)
        target = run / rel
        target.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(target)
        elif kind.startswith("/dev/"):
            target.symlink_to(kind)
        elif kind == "huge":
            with open(target, "wb") as f:
                f.truncate(2**30)  # 1 GiB, sparse
        elif kind == "deep":
            target.write_text("[" * 200_000 + "]" * 200_000)
        elif kind == "aliases":
            lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
            lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
            target.write_text("\n".join(lines) + "\n")
    return tree


@pytest.mark.parametrize("cmd", [["runs"], pytest.param(["report"], marks=pytest.mark.slow),
                                 pytest.param(["report", "--format", "json"], marks=pytest.mark.slow)])
def test_special_and_oversized_files_in_a_runs_tree_never_block_a_listing(trained, tmp_path, cmd):
    from tests.conftest import run_cli

    tree = hostile_tree(trained, tmp_path)
    before = snapshot(tree)
    out = run_cli([*cmd, str(tree)], cwd=tmp_path, timeout=60)  # before: blocked forever on the first FIFO
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    assert "good" in out.stdout or "runs in" in out.stdout
    if cmd == ["report", "--format", "json"]:
        doc = json.loads(out.stdout)
        problems = {Path(u["path"]).name: u["problem"] for u in doc["unreadable"]}
        assert {"fifo_metrics", "device_metrics", "huge_metrics", "deep_metrics"} <= set(problems)
        assert "not a regular file" in problems["fifo_metrics"] and "bytes" in problems["huge_metrics"]
    assert snapshot(tree) == before


@pytest.mark.parametrize("where", ["", "a_folder", "a_folder/", "/dev/null", "/proc/curves.png", "missing_parent_file/x.png"])
def test_report_plot_to_a_place_it_cannot_write_is_one_line_exit_2_before_anything_is_printed(two_runs, where):
    run, _ = two_runs
    (run.parent / "a_folder").mkdir()
    (run.parent / "missing_parent_file").write_text("a file where a folder should be")
    before = snapshot(run.parent)
    out = bnexp("report", str(run), "--plot", where, cwd=run.parent)
    one_line_exit_2(out, "--plot")
    assert out.stdout == ""  # said before the report, not after it
    assert snapshot(run.parent) == before and not Path("/dev/null.png").exists()


# ---------------------------------------------------------------- a folder bnexp did not make


def another_hydra_apps_output(root: Path) -> Path:
    out = root / "outputs" / "2024-01-01" / "12-00-00"
    (out / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (out / ".hydra" / name).write_text("theirs: 1\n")
    (out / "my_app.log").write_text("their log\n")
    return out


@pytest.mark.parametrize("case", ["another Hydra app's run", "a project folder", pytest.param("an empty folder", marks=pytest.mark.slow)])
def test_train_refuses_a_non_empty_folder_bnexp_did_not_make(tmp_path, case):
    if case == "another Hydra app's run":
        target = another_hydra_apps_output(tmp_path)
    else:
        target = tmp_path / "folder"
        target.mkdir()
        if case == "a project folder":
            (target / "train.py").write_text("print('mine')\n")
    before = snapshot(tmp_path)
    out = bnexp("train", *TRAIN, f"hydra.run.dir={target}", cwd=tmp_path)
    if case == "an empty folder":
        assert out.returncode == 0, out.stderr
        return
    one_line_exit_2(out, "hydra.run.dir", "not empty", "not made by bnexp")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- other signals


@pytest.mark.slow
def test_sighup_saves_and_stops_the_run_as_ctrl_c_does(tmp_path):
    import signal
    import time

    from tests.conftest import start_cli

    run = tmp_path / "run"
    proc = start_cli(["train", *TRAIN, "train.steps=100000", "train.checkpoint_every=50", f"hydra.run.dir={run}"], tmp_path)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)  # the terminal closed: before, the process died mid-step with nothing saved
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert metrics(run)["status"] == "interrupted" and "bnexp resume" in err and "Traceback" not in err


def test_a_sighup_that_nohup_ignores_stays_ignored_while_training():
    import signal

    from bnexp.runtime import stop_on_signal

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a program
    try:
        with stop_on_signal() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            signal.raise_signal(signal.SIGHUP)
            assert not stop.is_set()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with stop_on_signal() as stop:  # a terminal's SIGHUP stops the loop after its step
            signal.raise_signal(signal.SIGHUP)
            assert stop.is_set() and stop.signum == signal.SIGHUP
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("name", ["hydra.yaml", "overrides.yaml"])
def test_reproduce_refuses_a_saved_record_that_is_a_fifo_instead_of_blocking_on_it(two_runs, name):
    import os

    run, _ = two_runs
    (run / ".hydra" / name).unlink()
    os.mkfifo(run / ".hydra" / name)
    before = snapshot(run.parent)
    one_line_exit_2(bnexp("reproduce", str(run), "--out", str(run.parent / "again"), cwd=run.parent), name)
    assert snapshot(run.parent) == before
