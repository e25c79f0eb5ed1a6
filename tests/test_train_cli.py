"""`bnexp train` end to end, through the real CLI: in this process, and once as the console script in a subprocess."""

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY, mnist_root, run_cli, run_inprocess, snapshot


def only_run_dir(cwd: Path) -> Path:
    dirs = [p.parent for p in cwd.glob("runs/*/*/metrics.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_short_run_writes_every_contract_tag(workdir):
    result = run_cli(["train", *TINY, "model.activation=sigmoid"], workdir)  # the console script, as a user runs it
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(workdir)
    assert run_dir.parent.name == "default"
    tags = set(scalars(run_dir).Tags()["scalars"])
    required = {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "optim/lr",
                "grad_norm/total", "time/step_ms", "time/samples_per_sec", "time/elapsed_sec"}
    for layer in ("hidden0.linear", "hidden1.linear", "hidden0.norm", "output"):
        required |= {f"grad_norm/{layer}", f"weight_norm/{layer}"}
    for block in ("hidden0", "hidden1"):
        required |= {f"act/{block}/p{p}" for p in (15, 50, 85)} | {f"act/{block}/unit0/p50"}
    assert required <= tags, sorted(required - tags)
    acc = scalars(run_dir)
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20, 30]
    assert [e.step for e in acc.Scalars("val/acc")] == [15, 30]
    assert [e.step for e in acc.Scalars("test/acc")] == [30]


def test_metrics_json_records_status_results_and_env(workdir):
    assert run_inprocess(["train", *TINY, "train.target_acc=0.05"], workdir).returncode == 0
    m = json.loads((only_run_dir(workdir) / "metrics.json").read_text())
    assert m["status"] == "completed" and m["steps"] == 30
    assert 0 <= m["final"]["test/acc"] <= 1 and m["best"]["val/acc"] >= m["final"]["val/acc"]
    assert m["steps_to_target"] == 15
    assert m["time"]["wall_sec"] > 0 and m["time"]["steps_per_sec"] > 0
    assert {"bnexp", "torch", "python", "device"} <= set(m["env"])
    assert (only_run_dir(workdir) / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_hydra_run_dir_override_and_experiment_name_pick_the_directory(workdir):
    assert run_inprocess(["train", *TINY, "hydra.run.dir=out/here"], workdir).returncode == 0
    assert (workdir / "out/here/metrics.json").exists()
    assert run_inprocess(["train", *TINY, "name=mine"], workdir).returncode == 0
    assert len(list(workdir.glob("runs/mine/*/metrics.json"))) == 1


@pytest.mark.slow
def test_drug_trial_tutorial_command_trains(workdir):
    result = run_inprocess(["train", "data=drug_trial", "model.hidden=[16,32]", "norm.placement=post", "norm.layers=[1]",
                      "optim=adam", "optim.lr=1e-3", "train.batch_size=10", "train.epochs=2", "data.preprocess=minmax",
                      "train.progress=false"], workdir)
    assert result.returncode == 0, result.stderr
    m = json.loads((only_run_dir(workdir) / "metrics.json").read_text())
    assert m["steps"] == 2 * 189 and m["final"]["test/acc"] > 0.8


@pytest.mark.parametrize("bad, key", [
    ("norm.placement=sideways", "norm.placement"),
    ("model=transformer", "model"),
    ("no_such_key=1", "no_such_key"),
    ("train.steps=many", "train.steps"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.steps=-5", "train.steps"),
    ("model.hidden=[]", "model.hidden"),
    ("norm=group norm.groups=5", "norm.groups"),
    ("norm=ghost_batch norm.virtual_batch_size=128", "norm.virtual_batch_size"),
    ("norm.layers=[7]", "norm.layers"),
    ("train.device=tpu", "train.device"),
    ("train.batch_size=100000", "train.batch_size"),
])
@pytest.mark.slow
def test_invalid_config_exits_2_with_one_line_and_no_run_dir(workdir, bad, key):
    (workdir / "keep.txt").write_text("precious")
    before = snapshot(workdir)
    result = run_inprocess(["train", *TINY, *bad.split()], workdir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert snapshot(workdir) == before


def test_missing_data_files_exit_2_naming_folder_and_files(workdir):
    (workdir / "empty").mkdir()
    result = run_inprocess(["train", "data=mnist", "data.root=empty"], workdir)
    assert result.returncode == 2
    assert "empty" in result.stderr and "train-images-idx3-ubyte.gz" in result.stderr and "data.download=true" in result.stderr
    assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dataset, folder, floor", [("mnist", "mnist", 0.85), ("fashion_mnist", "fashion-mnist", 0.7)])
def test_real_idx_files_reach_well_above_chance_in_a_few_hundred_steps(workdir, dataset, folder, floor):
    root = mnist_root(folder)
    result = run_inprocess(["train", f"data={dataset}", f"data.root={root}", "train.steps=300", "train.eval_every=300",
                      "train.progress=false"], workdir)
    assert result.returncode == 0, result.stderr
    m = json.loads((only_run_dir(workdir) / "metrics.json").read_text())
    assert m["final"]["test/acc"] > floor  # chance is 0.1


def test_show_prints_composed_config_and_group_options(workdir):
    result = run_inprocess(["show", "norm=group"], workdir)
    assert result.returncode == 0
    assert "kind: group" in result.stdout and "norm: batch, batch_renorm, evonorm_b0, evonorm_s0, frn, ghost_batch, group, group_ws, layer, none" in result.stdout
