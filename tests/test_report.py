"""`bnexp report`: grouping over seeds, the four formats, speed-ups, plots, and
runs that are broken or half-written.

The runs are real: :func:`bnexp.train.train` writes them in this process
(tiny MLPs on synthetic data), with the ``.hydra/config.yaml`` Hydra would save.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bnexp.config import Config
from bnexp.runs import load_scalars
from bnexp.train import train
from tests.conftest import run_inprocess

TINY = {"steps": 30, "eval_every": 10, "log_every": 10, "progress": False, "device": "cpu", "target_acc": 0.5}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """norm.placement=pre,none x seed=0,1 under sw/, as `bnexp sweep` lays them out."""
    root = tmp_path_factory.mktemp("report") / "sw"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for placement in ("pre", "none"):
            for seed in (0, 1):
                overrides = [f"norm.placement={placement}", f"seed={seed}"]
                cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(overrides), {"train": TINY, "data": {"n_train": 1000}})
                run_dir = root / f"norm.placement={placement},seed={seed}"
                (run_dir / ".hydra").mkdir(parents=True)
                OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
                OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
                train(cfg, run_dir, extra_record={"overrides": overrides})
    finally:
        torch.set_num_threads(threads)
    return root


def report(*args: str | Path):
    return run_inprocess(["report", *map(str, args)], Path.cwd())


def test_report_groups_by_the_key_that_differs_and_aggregates_over_seeds(sweep):
    r = report(sweep)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if "norm.placement=" in line}
    assert set(rows) == {"norm.placement=none", "norm.placement=pre"}
    for label, line in rows.items():
        finals = [json.loads((d / "metrics.json").read_text())["final"]["val/acc"] for d in sweep.glob(f"{label},seed=*")]
        cells = [c.strip() for c in line.split("│")]
        assert cells[2] == "2" and cells[3] == "2 completed"
        assert cells[4] == f"{statistics.mean(finals):.4f} ± {statistics.stdev(finals):.4f}"


def test_report_formats_csv_json_and_markdown_parse(sweep):
    as_json = json.loads(report(sweep, "--format", "json").stdout)
    assert [g["group"] for g in as_json["groups"]] == ["norm.placement=none", "norm.placement=pre"]
    assert all(g["n"] == 2 and g["metrics"]["val/acc"]["n"] == 2 for g in as_json["groups"])

    rows = list(csv.DictReader(io.StringIO(report(sweep, "--format", "csv").stdout)))
    assert [r["norm.placement"] for r in rows] == ["none", "pre"]
    for row, group in zip(rows, as_json["groups"]):
        assert float(row["val/acc mean"]) == pytest.approx(group["metrics"]["val/acc"]["mean"])
        assert float(row["test/acc std"]) == pytest.approx(group["metrics"]["test/acc"]["std"])

    lines = report(sweep, "--format", "markdown").stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert {len(line.split(" | ")) for line in lines[:1] + lines[2:]} == {lines[0].count(" | ") + 1}
    assert set(lines[1]) <= set("|-:")


def test_report_gives_the_steps_to_target_speedup_over_the_slowest_group(sweep):
    groups = json.loads(report(sweep, "--format", "json").stdout)["groups"]
    means = [g["metrics"]["steps to target"]["mean"] for g in groups]
    assert all(means), "both placements reach 50% validation accuracy in 30 steps"
    for g, mean in zip(groups, means):
        assert g["speedup"] == pytest.approx(max(means) / mean)


def test_report_by_key_and_metric_choose_groups_and_columns(sweep):
    groups = json.loads(report(sweep, "--by", "seed", "--metric", "val/loss", "--format", "json").stdout)["groups"]
    assert [g["group"] for g in groups] == ["seed=0", "seed=1"]
    assert "val/loss" in groups[0]["metrics"] and "val/acc" not in groups[0]["metrics"]
    r = report(sweep, "--metric", "val/nope")
    assert r.returncode == 2 and "val/acc" in r.stderr and "val/nope" in r.stderr
    assert report(sweep, "--by", "norm.nope").returncode == 2


def test_report_lists_broken_and_half_written_runs_and_reports_the_rest(sweep, tmp_path):
    root = tmp_path / "sw"
    shutil.copytree(sweep, root)
    # Killed before training: Hydra's config, no metrics.json.
    (root / "never_started" / ".hydra").mkdir(parents=True)
    shutil.copy(sweep / "norm.placement=pre,seed=0" / ".hydra" / "config.yaml", root / "never_started" / ".hydra")
    # A half-written config and a torn metrics.json (files written by other tools).
    (root / "torn" / ".hydra").mkdir(parents=True)
    (root / "torn" / ".hydra" / "config.yaml").write_text("model: {hidden: [1")
    (root / "torn" / "metrics.json").write_text('{"status": "compl')
    # A run whose event file was cut off mid-record.
    (events,) = (root / "norm.placement=none,seed=1").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[: events.stat().st_size // 2])
    # And one whose event file is not one at all: left out of the curves, with a warning.
    (foreign,) = (root / "norm.placement=none,seed=0").glob("events.out.tfevents.*")
    foreign.write_bytes(b"not a TFRecord file")

    doc = json.loads(report(root, "--format", "json").stdout)
    problems = {Path(u["path"]).name: u["problem"] for u in doc["unreadable"]}
    assert set(problems) == {"never_started", "torn"}
    assert problems["never_started"].startswith("no metrics.json")
    assert problems["torn"].startswith("metrics.json is unreadable; .hydra/config.yaml is unreadable (")
    counts = {g["group"]: g["status"] for g in doc["groups"]}
    assert counts == {"norm.placement=none": {"completed": 2}, "norm.placement=pre": {"completed": 2, "unreadable": 1}}
    r = report(root, "--plot", tmp_path / "curves.png")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unreadable: " in r.stdout and (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "norm.placement=none,seed=0: no readable TensorBoard events; left out of the curves" in r.stderr


def test_report_plot_draws_learning_curves_and_activation_percentiles(sweep, tmp_path):
    import matplotlib.image

    r = report(sweep, "--plot", tmp_path / "curves.png")
    assert r.returncode == 0, r.stdout + r.stderr
    height, width, _ = matplotlib.image.imread(tmp_path / "curves.png").shape
    # Four learning-curve panels in the first row, one act/<layer> panel per hidden layer (3) below.
    assert width > 1.5 * height and height > 500


def test_load_scalars_reads_every_point_not_tensorboards_default_sample(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        for step in range(12_000):  # the reader keeps 10,000 points per tag by default
            w.add_scalar("train/loss", float(step), step)
    points = load_scalars(tmp_path)["train/loss"]
    assert len(points) == 12_000 and points[-1] == (11_999, 11_999.0)


def test_report_of_runs_without_test_metrics_yet_leaves_that_default_column_out(sweep, tmp_path):
    # Runs still running (or interrupted) have val/* but no test/* yet: a report on them
    # must not fail on its own default columns; a --metric the user names still must exist.
    for src in sweep.glob("norm.placement=pre,seed=*"):
        dst = tmp_path / "live" / src.name
        shutil.copytree(src, dst)
        m = json.loads((dst / "metrics.json").read_text())
        m["final"] = {k: v for k, v in m["final"].items() if not k.startswith("test/")}
        m["status"] = "interrupted"
        (dst / "metrics.json").write_text(json.dumps(m))
    r = report(tmp_path / "live", "--format", "csv")
    assert r.returncode == 0, r.stdout + r.stderr
    header = next(csv.reader(io.StringIO(r.stdout)))
    assert any("val/acc" in h for h in header) and not any("test/acc" in h for h in header)
    assert report(tmp_path / "live", "--metric", "test/acc").returncode == 2


def test_runs_that_differ_only_in_eval_every_are_separate_groups_not_seeds(sweep, tmp_path):
    # train.eval_every changes recorded numbers (best val/acc, steps to target): the
    # contract groups by every differing key except seed, so it is a group key.
    root = tmp_path / "ev"
    shutil.copytree(sweep / "norm.placement=pre,seed=0", root / "a")
    shutil.copytree(sweep / "norm.placement=pre,seed=0", root / "b")
    cfg_path = root / "b" / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    cfg.train.eval_every = 15
    OmegaConf.save(cfg, cfg_path)
    r = report(root, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    groups = json.loads(r.stdout)["groups"]
    assert sorted(g["group"] for g in groups) == ["train.eval_every=10", "train.eval_every=15"]


@pytest.mark.parametrize("broken", [
    {"status": "running", "time": "x"},
    {"status": "completed", "final": ["val/acc", 0.5]},
    {"status": "completed", "steps": "20", "best": {"val/acc": "high"}},
    {"status": "running", "process": {"host": 3, "pid": "12"}},
    ["not", "an", "object"],
])
def test_a_metrics_json_of_the_wrong_shape_is_listed_as_unreadable_by_runs_and_report(sweep, tmp_path, broken):
    root = tmp_path / "sw"
    shutil.copytree(sweep, root)
    (root / "norm.placement=pre,seed=1" / "metrics.json").write_text(json.dumps(broken))

    listing = run_inprocess(["runs", str(root)], Path.cwd())
    assert listing.returncode == 0, listing.stdout + listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.startswith("│") and "seed=" in line}
    assert len(rows) == 4
    assert "unreadable" in rows["norm.placement=pre,seed=1"]
    assert all("completed" in line for name, line in rows.items() if name != "norm.placement=pre,seed=1")

    doc = json.loads(report(root, "--format", "json").stdout)
    (problem,) = doc["unreadable"]
    assert Path(problem["path"]).name == "norm.placement=pre,seed=1" and problem["problem"].startswith("metrics.json")
    counts = {g["group"]: g["status"] for g in doc["groups"]}
    assert counts == {"norm.placement=none": {"completed": 2}, "norm.placement=pre": {"completed": 1, "unreadable": 1}}
    table = report(root)
    assert table.returncode == 0 and f"unreadable: {root / 'norm.placement=pre,seed=1'}: metrics.json" in table.stdout
