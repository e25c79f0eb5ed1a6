"""Sweep job directory names (bnexp.sweep.job_dir_name) and `bnexp runs`, which shows them.

The names are checked against the jobs Hydra's own BasicSweeper makes from the
same overrides, and end to end with real `bnexp sweep` runs on tiny configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from bnexp.sweep import MAX_NAME_BYTES, job_dir_name
from tests.conftest import REPO, TINY, mnist_root, run_inprocess


def hydra_jobs(sweep: list[str]) -> list[list[str]]:
    """The override lists of the jobs Hydra's basic sweeper launches for ``sweep``."""
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(sweep), None)[0]


def names(sweep: list[str]) -> list[str]:
    seed = lambda job: next((o.split("=", 1)[1] for o in job if o.startswith("seed=")), 0)  # noqa: E731
    return [job_dir_name(job, seed(job), sweep) for job in hydra_jobs(sweep)]


def test_a_job_is_named_by_the_keys_the_sweep_varies_with_its_seed_last():
    sweep = ["experiment=placement_ablation", "norm.placement=pre,post", "seed=0,1", *TINY]
    assert names(sweep) == ["norm.placement=pre,seed=0", "norm.placement=pre,seed=1", "norm.placement=post,seed=0", "norm.placement=post,seed=1"]
    assert names(["optim.lr=0.1", "seed=3"]) == ["seed=3"]  # nothing varies: the seed alone


def test_a_key_a_preset_sweeps_and_the_command_line_fixes_is_constant():
    # A preset's hydra.sweeper.params come first; the command line's seed=0 wins, as in Hydra.
    sweep = ["norm.placement=pre,post,none", "seed=0,1,2", "experiment=placement_ablation", "seed=0"]
    assert names(sweep) == ["norm.placement=pre,seed=0", "norm.placement=post,seed=0", "norm.placement=none,seed=0"]


def test_lists_quoted_commas_and_single_value_sweeps_are_not_taken_for_varying_keys():
    sweep = ["model.hidden=[16,16]", "notes='a,b'", "optim.lr=range(1,2)", "norm=batch,group", "data.root=/x/y/z"]
    assert names(sweep) == ["norm=batch,seed=0", "norm=group,seed=0"]
    # A list swept over lists varies; a path in a swept value does not nest the directory.
    assert sorted(names(["model.hidden=[16,16],[32]", "data.root=/a,/b/c"])) == [
        "data.root=_a,model.hidden=[16,16],seed=0", "data.root=_a,model.hidden=[32],seed=0",
        "data.root=_b_c,model.hidden=[16,16],seed=0", "data.root=_b_c,model.hidden=[32],seed=0"]


def test_interval_and_glob_sweeps_vary_and_an_unknown_sweep_names_every_override():
    assert job_dir_name(["optim.lr=0.0734", "train.steps=20"], 0, ["optim.lr=interval(0.01,0.2)", "train.steps=20"]) == "optim.lr=0.0734,seed=0"
    assert job_dir_name(["norm=group", "train.steps=20"], 1, ["norm=glob(*)", "train.steps=20"]) == "norm=group,seed=1"
    assert job_dir_name(["norm=group", "train.steps=20", "seed=1"], 1, None) == "norm=group,train.steps=20,seed=1"


@pytest.mark.slow
def test_a_sweep_with_many_long_overrides_gets_short_unique_stable_names():
    constant = [f"+extra.key_number_{i}=a_long_value_that_is_the_same_in_every_job_{i}" for i in range(12)]
    deep = "/" + "/".join(["a_deep_folder_of_datasets"] * 12)
    swept = [f"data.root={deep}/v1,{deep}/v2", "optim.lr=0.1,0.2", "model.activation=sigmoid,relu",
             "+label=" + ",".join(f"'{'é' * 200}{i}'" for i in range(2)),  # non-ASCII (quoted): cut on a character boundary
             "seed=0,1"]
    got = names([*constant, *swept])
    assert len(got) == len(set(got)) == 2**5
    assert all(len(n.encode()) <= MAX_NAME_BYTES for n in got)
    assert all(n.startswith("+label='ééé") and n.endswith((",seed=0", ",seed=1")) for n in got)
    assert got == names([*constant, *swept])  # the same command names the same jobs: a rerun finds them
    # ... in another process too (a rerun is one): Python's salted hash() would name them anew each time.
    script = ("import json, sys; from tests.test_job_dirs import names; "
              "print(json.dumps(names(json.loads(sys.argv[1]))))")
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, json.dumps([*constant, *swept])], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == got, f"PYTHONHASHSEED={salt}"


# ------------------------------------------------------------------ real sweeps

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("names")
    args = ["sweep", "norm.placement=pre,none", "seed=0,1", *TINY, "hydra.sweep.dir=sw"]
    r = run_inprocess(args, cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return cwd, args


@pytest.mark.slow  # a sweep of four runs, then its rerun
def test_a_real_sweep_names_its_jobs_by_what_it_varies_and_a_rerun_finds_them(sweep):
    cwd, args = sweep
    dirs = sorted(p.parent.name for p in (cwd / "sw").glob("*/metrics.json"))
    assert dirs == ["norm.placement=none,seed=0", "norm.placement=none,seed=1", "norm.placement=pre,seed=0", "norm.placement=pre,seed=1"]
    rerun = run_inprocess(args, cwd)
    assert rerun.returncode == 0 and "4 jobs: 4 skipped" in rerun.stdout


@pytest.mark.slow  # the four-run sweep
def test_bnexp_runs_shows_one_line_per_run_at_100_columns_without_a_runs_under_header(sweep, monkeypatch):
    cwd, _ = sweep
    monkeypatch.setenv("COLUMNS", "100")
    r = run_inprocess(["runs", "sw"], cwd)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "runs under" not in r.stdout and lines[0] == "sw"
    assert all(len(line) <= 100 for line in lines)
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == [
        "norm.placement=pre,seed=0", "norm.placement=pre,seed=1", "norm.placement=none,seed=0", "norm.placement=none,seed=1"]
    assert all("completed" in row and "30/30" in row for row in rows)


@pytest.mark.slow  # two MNIST runs
def test_a_sweep_of_the_bn_paper_mlp_spelled_out_key_by_key_runs_with_short_names(tmp_path):
    spelled = ["data=mnist", f"data.root={mnist_root()}", "data.preprocess=minmax", "model.activation=sigmoid",
               "model.init=normal", "model.hidden=[100,100,100]", "norm.placement=pre", "norm.momentum=0.1",
               "norm.eps=0.00001", "optim.lr=0.2", "optim.momentum=0.9", "train.batch_size=60", "train.target_acc=0.97",
               "train.device=cpu", "train.deterministic=true", *TINY]
    assert len(",".join(spelled)) > 255  # the old name: every override joined
    r = run_inprocess(["sweep", *spelled, "seed=0,1", "hydra.sweep.dir=sw"], tmp_path)  # raises what a traceback would show
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert sorted(p.parent.name for p in (tmp_path / "sw").glob("*/metrics.json")) == ["seed=0", "seed=1"]
    assert all(json.loads(p.read_text())["status"] == "completed" for p in (tmp_path / "sw").glob("*/metrics.json"))
