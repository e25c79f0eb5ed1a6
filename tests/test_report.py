"""`bnexp report`: grouping over seeds, the four formats, speed-ups, plots, and
runs that are broken or half-written.

The runs are real: :func:`bnexp.train.train` writes them in this process
(tiny MLPs on synthetic data), with the ``.hydra/config.yaml`` Hydra would save.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bnexp.schema import typed
from bnexp.runs import load_scalars
from bnexp.train import train
from tests.conftest import rich_tables as tables, run_inprocess

TINY = {"steps": 30, "eval_every": 10, "log_every": 10, "progress": False, "device": "cpu", "target_acc": 0.5}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """norm.placement=pre,none x seed=0,1 under sw/, as `bnexp sweep` lays them out
    (jobs 0-3 in that order: Hydra's job number in .hydra/hydra.yaml)."""
    root = tmp_path_factory.mktemp("report") / "sw"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for num, (placement, seed) in enumerate((p, s) for p in ("pre", "none") for s in (0, 1)):
            overrides = [f"norm.placement={placement}", f"seed={seed}"]
            cfg = OmegaConf.merge(typed({}), OmegaConf.from_dotlist(overrides), {"train": TINY, "data": {"n_train": 1000}})
            run_dir = root / f"norm.placement={placement},seed={seed}"
            (run_dir / ".hydra").mkdir(parents=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
            OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), run_dir / ".hydra" / "hydra.yaml")
            train(cfg, run_dir, extra_record={"overrides": overrides}, summary=False)
    finally:
        torch.set_num_threads(threads)
    return root


def report(*args: str | Path):
    return run_inprocess(["report", *map(str, args)], Path.cwd())


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The rows of the groups' table (the first one printed): {group: cells}."""
    return {cells[0]: cells for cells in tables(stdout)[0][1:]}


def all_rows(stdout: str) -> list[list[str]]:
    return [row for table in tables(stdout) for row in table]


def finals(run_dirs, tag: str = "val/acc") -> list[float]:
    return [json.loads((d / "metrics.json").read_text())["final"][tag] for d in run_dirs]


@pytest.mark.slow
def test_report_groups_by_the_key_that_differs_and_aggregates_over_seeds(sweep):
    r = report(sweep)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    assert set(rows) == {"none", "pre"}
    for placement, cells in rows.items():
        values = finals(sweep.glob(f"norm.placement={placement},seed=*"))
        assert cells[1] == "2" and cells[2] == "2 completed"
        assert cells[3] == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def test_groups_keep_the_order_of_the_sweep_not_the_alphabet(sweep):
    # The sweep ran norm.placement=pre,none: pre first, as typed (job numbers 0-1, then 2-3).
    r = report(sweep)
    assert list(table_rows(r.stdout)) == ["pre", "none"]
    assert [g["group"] for g in json.loads(report(sweep, "--format", "json").stdout)["groups"]] == ["norm.placement=pre", "norm.placement=none"]


def test_report_formats_csv_json_and_markdown_parse(sweep):
    as_json = json.loads(report(sweep, "--format", "json").stdout)
    assert all(g["n"] == 2 and g["metrics"]["val/acc"]["n"] == 2 for g in as_json["groups"])

    rows = list(csv.DictReader(io.StringIO(report(sweep, "--format", "csv").stdout)))
    assert [r["norm.placement"] for r in rows] == ["pre", "none"]
    for row, group in zip(rows, as_json["groups"]):
        assert float(row["val/acc mean"]) == pytest.approx(group["metrics"]["val/acc"]["mean"])
        assert float(row["test/acc std"]) == pytest.approx(group["metrics"]["test/acc"]["std"])

    text = report(sweep, "--format", "markdown").stdout.strip()
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    # groups; intervals: (5 result columns) x (2 groups); verdicts: 5 x (1 group against the baseline)
    assert [len(t) for t in tables] == [4, 2 + 5 * 2, 2 + 5]
    for lines in tables:
        assert all(line.startswith("|") and line.endswith("|") for line in lines)
        assert {len(line.split(" | ")) for line in lines[:1] + lines[2:]} == {lines[0].count(" | ") + 1}
        assert set(lines[1]) <= set("|-:")


def test_speedup_is_against_the_no_normalization_group_and_says_so(sweep):
    r = report(sweep, "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["baseline"]["keys"] == {"norm.placement": "none"}
    groups = {g["group"]: g for g in doc["groups"]}
    reference = groups["norm.placement=none"]["metrics"]["steps to target"]["mean"]
    assert reference, "both placements reach 50% validation accuracy in 30 steps"
    for g in groups.values():
        assert g["baseline"] == "norm.placement=none"
        assert g["speedup"] == pytest.approx(reference / g["metrics"]["steps to target"]["mean"])
    assert "speed-up: steps to target of the baseline over the group's; baseline norm.placement=none (no normalization" in report(sweep).stdout


def test_baseline_flag_chooses_the_reference_group_and_a_wrong_one_is_one_line(sweep):
    doc = json.loads(report(sweep, "--baseline", "norm.placement=pre", "--format", "json").stdout)
    groups = {g["group"]: g for g in doc["groups"]}
    reference = groups["norm.placement=pre"]["metrics"]["steps to target"]["mean"]
    assert groups["norm.placement=none"]["speedup"] == pytest.approx(reference / groups["norm.placement=none"]["metrics"]["steps to target"]["mean"])
    assert groups["norm.placement=pre"]["metrics"]["val/acc"]["vs_baseline"] is None
    assert groups["norm.placement=none"]["metrics"]["val/acc"]["vs_baseline"]["diff"] == pytest.approx(
        statistics.mean(finals(sweep.glob("norm.placement=none,*"))) - statistics.mean(finals(sweep.glob("norm.placement=pre,*"))))
    for bad, says in (("norm.placement=bogus", "allowed: pre, none"), ("optim.lr=0.1", "grouping keys: norm.placement"), ("none", "KEY=VALUE")):
        r = report(sweep, "--baseline", bad)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr


def test_report_by_key_and_metric_choose_groups_and_columns(sweep):
    groups = json.loads(report(sweep, "--by", "seed", "--metric", "val/loss", "--format", "json").stdout)["groups"]
    assert [g["group"] for g in groups] == ["seed=0", "seed=1"]
    assert "val/loss" in groups[0]["metrics"] and "val/acc" not in groups[0]["metrics"]
    r = report(sweep, "--metric", "val/nope")
    assert r.returncode == 2 and "val/acc" in r.stderr and "val/nope" in r.stderr
    assert report(sweep, "--by", "norm.nope").returncode == 2


@pytest.mark.slow  # a plot over broken event files
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
    # never_started has pre,seed=0's config and seed: listed as unreadable, and not counted twice in its group.
    assert counts == {"norm.placement=none": {"completed": 2}, "norm.placement=pre": {"completed": 2}}
    (pre,) = (g for g in doc["groups"] if g["group"] == "norm.placement=pre")
    assert [Path(d["path"]).name for d in pre["duplicates"]] == ["never_started"]
    r = report(root, "--plot", tmp_path / "curves.png")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unreadable: " in r.stdout and (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "norm.placement=none,seed=0: no readable TensorBoard events; left out of the curves" in r.stderr


@pytest.mark.slow
def test_report_plot_draws_learning_curves_and_activation_percentiles(sweep, tmp_path, drawn_figures):
    import matplotlib.image
    import numpy as np

    from tests.conftest import panel, seed_mean_and_std

    r = report(sweep, "--plot", tmp_path / "curves.png")
    assert r.returncode == 0, r.stdout + r.stderr
    height, width, _ = matplotlib.image.imread(tmp_path / "curves.png").shape
    # Four learning-curve panels in the first row, one act/<layer> panel per hidden layer (3) below.
    assert width > 1.5 * height and height > 500
    (fig,) = drawn_figures
    for placement in ("pre", "none"):
        runs = sorted(sweep.glob(f"norm.placement={placement},seed=*"))
        for tag in ("train/loss", "val/acc"):
            ax = panel(fig, tag)
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == f"norm.placement={placement} (n=2)"]
            steps, mean, std = seed_mean_and_std(runs, tag)
            assert list(line.get_xdata()) == steps
            np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-6)
            (band,) = [c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], matplotlib.colors.to_rgb(line.get_color()))]
            ys = band.get_paths()[0].vertices[:, 1]
            for edge in (mean - std, mean + std):  # the band is mean +- std at every step
                assert all(np.isclose(ys, v, rtol=1e-6).any() for v in edge), (tag, placement)
        (ax,) = [a for a in fig.axes if a.get_title().startswith("act/")][:1]
        layer = ax.get_title().split("/")[1].split(":")[0]
        color = [ln for ln in ax.get_lines() if ln.get_label() == f"norm.placement={placement}"][0].get_color()
        drawn = sorted((ln for ln in ax.get_lines() if ln.get_color() == color), key=lambda ln: float(np.mean(ln.get_ydata())))
        assert len(drawn) == 3
        for line, pct in zip(drawn, ("p15", "p50", "p85")):
            _, mean, _ = seed_mean_and_std(runs, f"act/{layer}/{pct}")
            np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-6, err_msg=pct)


@pytest.mark.slow
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


def test_a_reproduce_copy_of_a_seed_is_not_counted_as_one_more_seed(sweep, tmp_path):
    again = tmp_path / "again"
    made = run_inprocess(["reproduce", str(sweep / "norm.placement=pre,seed=0"), "--out", str(again)], Path.cwd())
    assert made.returncode == 0, made.stdout + made.stderr
    assert json.loads((again / "metrics.json").read_text())["reproduce_of"]
    r = report(sweep, again, "--format", "json")
    groups = {g["group"]: g for g in json.loads(r.stdout)["groups"]}
    pre = groups["norm.placement=pre"]
    assert pre["n"] == 2 and pre["metrics"]["val/acc"]["n"] == 2  # seeds 0 and 1, not 0, 0 and 1
    assert pre["duplicates"] == [{"path": str(again), "same_as": str(sweep / "norm.placement=pre,seed=0")}]
    assert str(again) not in pre["runs"]
    table = report(sweep, again)
    assert table_rows(table.stdout)["pre"][1] == "2"
    (line,) = [line for line in table.stdout.splitlines() if line.startswith("left out")]
    assert line == f"left out 1 run of a config and seed already counted: {again} (same as {sweep / 'norm.placement=pre,seed=0'})"
    assert f"left out 1 run of a config and seed already counted: {again}" in report(sweep, again, "--format", "csv").stderr


# An independent reference for the statistics: Student's t distribution from its
# density, integrated in float64 NumPy (no scipy), and Welch's formulas written out.

def _t_cdf(x: float, df: float) -> float:
    import numpy as np

    grid = np.linspace(0.0, abs(x), 400_001)
    density = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + grid**2 / df) ** (-(df + 1) / 2)
    half = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)))
    return 0.5 + math.copysign(half, x)


def _t_quantile(q: float, df: float) -> float:
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def _ci95(xs: list[float]) -> tuple[float, float]:
    n, mean, sd = len(xs), statistics.mean(xs), statistics.stdev(xs)
    half = _t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def _welch(a: list[float], b: list[float]) -> tuple[float, tuple[float, float], float]:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    d, se = statistics.mean(a) - statistics.mean(b), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = _t_quantile(0.975, df) * se
    return d, (d - half, d + half), 2 * (1 - _t_cdf(abs(d) / se, df))


@pytest.mark.slow
def test_report_gives_95_percent_intervals_and_welch_differences_from_the_baseline_in_every_format(sweep):
    pre, none = (finals(sorted(sweep.glob(f"norm.placement={p},*")), "train/loss") for p in ("pre", "none"))
    ci_pre, ci_none = _ci95(pre), _ci95(none)
    diff, diff_ci, p = _welch(pre, none)

    loss = {g["group"]: g["metrics"]["train/loss"] for g in json.loads(report(sweep, "--format", "json").stdout)["groups"]}
    assert loss["norm.placement=pre"]["ci95"] == pytest.approx(list(ci_pre), rel=1e-6)
    assert loss["norm.placement=none"]["ci95"] == pytest.approx(list(ci_none), rel=1e-6)
    assert loss["norm.placement=none"]["vs_baseline"] is None  # the baseline itself
    vs = loss["norm.placement=pre"]["vs_baseline"]
    assert vs["diff"] == pytest.approx(diff, rel=1e-9)
    assert vs["ci95"] == pytest.approx(list(diff_ci), rel=1e-6)
    assert vs["p"] == pytest.approx(p, rel=1e-5)

    (row,) = [r for r in csv.DictReader(io.StringIO(report(sweep, "--format", "csv").stdout)) if r["norm.placement"] == "pre"]
    assert [float(row[f"train/loss {k}"]) for k in ("ci95 low", "ci95 high", "diff", "diff ci95 low", "diff ci95 high", "p")] == \
        pytest.approx([*ci_pre, diff, *diff_ci, p], rel=1e-5)
    assert row["baseline"] == "norm.placement=none"

    interval = ["↓ train/loss", "pre", "2", f"{statistics.mean(pre):.4f}", f"[{ci_pre[0]:.4f}, {ci_pre[1]:.4f}]"]
    # One comparison of train/loss: the Holm-adjusted p is p itself.
    verdict = ["↓ train/loss", "pre", f"{diff:+.4f}", f"[{diff_ci[0]:+.4f}, {diff_ci[1]:+.4f}]"]
    tail = [f"{p:.2g}", f"{p:.2g}"]
    markdown = report(sweep, "--format", "markdown").stdout.splitlines()
    rows = all_rows(report(sweep).stdout)
    assert "| " + " | ".join(interval) + " |" in markdown and interval in rows
    assert any(line.startswith("| " + " | ".join(verdict) + " |") and " | ".join(tail) in line for line in markdown)
    assert any(row[:4] == verdict and row[6:8] == tail for row in rows)


def test_a_group_of_one_seed_says_it_needs_two_seeds_instead_of_an_interval(sweep, tmp_path):
    root = tmp_path / "sw"
    shutil.copytree(sweep, root, ignore=shutil.ignore_patterns("norm.placement=none,seed=1"))
    doc = json.loads(report(root, "--format", "json").stdout)
    none = next(g for g in doc["groups"] if g["group"] == "norm.placement=none")
    pre = next(g for g in doc["groups"] if g["group"] == "norm.placement=pre")
    assert none["metrics"]["val/acc"]["ci95"] == "needs >= 2 seeds"
    assert pre["metrics"]["val/acc"]["vs_baseline"]["ci95"] == "needs >= 2 seeds"
    assert pre["metrics"]["val/acc"]["vs_baseline"]["p"] == "needs >= 2 seeds"
    (row,) = [r for r in csv.DictReader(io.StringIO(report(root, "--format", "csv").stdout)) if r["norm.placement"] == "none"]
    assert row["val/acc ci95 low"] == row["val/acc ci95 high"] == "needs >= 2 seeds"
    rows = all_rows(report(root).stdout)
    markdown = [[c.strip() for c in line.split("|")[1:-1]] for line in report(root, "--format", "markdown").stdout.splitlines()]
    for table in (rows, markdown):
        # The intervals (val/acc's section: pre first, none under it) and the verdicts.
        at = table.index(next(r for r in table if r[:2] == ["↑ val/acc", "pre"] and len(r) == 5))
        assert table[at + 1][:2] == ["", "none"] and table[at + 1][4] == "needs >= 2 seeds"
        (verdict,) = [r for r in table if r[:2] == ["↑ val/acc", "pre"] and len(r) > 5]
        assert verdict[3:5] == ["needs >= 2 seeds", "needs >= 2 seeds"] and verdict[6] == "needs >= 2 seeds"


@pytest.mark.slow
def test_plot_never_replaces_an_existing_file_unless_told_to(sweep, tmp_path):
    target = tmp_path / "curves.png"
    target.write_bytes(b"an earlier figure")
    r = report(sweep, "--plot", target)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: --plot {target} exists; choose another name, or --overwrite to replace it\n"
    assert target.read_bytes() == b"an earlier figure"
    r = report(sweep, "--plot", target, "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {target}\n" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temp file left beside it


@pytest.mark.slow  # three plots
def test_plot_names_the_file_it_writes_and_refuses_formats_it_cannot(sweep, tmp_path):
    r = report(sweep, "--plot", tmp_path / "noext")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"plot: {tmp_path / 'noext.png'} (PNG: {tmp_path / 'noext'} has no extension)" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext.png"]
    assert (tmp_path / "noext.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vector = report(sweep, "--plot", tmp_path / "curves.svg")
    assert vector.returncode == 0 and (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    bad = report(sweep, "--plot", tmp_path / "curves.txt")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert "'.txt' is no image format matplotlib writes; allowed: " in bad.stderr and "png" in bad.stderr
    assert not (tmp_path / "curves.txt").exists()


def test_result_tables_print_a_long_run_dir_path_whole_on_its_own_line(sweep, tmp_path, monkeypatch):
    deep = tmp_path / ("a_rather_long_folder_name_for_a_study_of_batch_normalization_" * 2) / "sw"
    shutil.copytree(sweep, deep)
    monkeypatch.setenv("COLUMNS", "80")
    assert len(str(deep)) > 80
    r = report(deep)
    assert r.returncode == 0 and str(deep) in r.stdout.splitlines()
    again = tmp_path / "again"
    made = run_inprocess(["reproduce", str(deep / "norm.placement=pre,seed=0"), "--out", str(again)], Path.cwd())
    assert made.returncode == 0 and f"{deep / 'norm.placement=pre,seed=0'} -> {again}" in made.stdout.splitlines()
    # and the summary of `bnexp train`, printed by the run itself
    assert str(again) in made.stdout.splitlines()


def tensorboard(logdir: Path):
    """TensorBoard's own plugins over ``logdir``, in this process: ``(runs, get)`` with
    ``get(plugin, route, **query)`` / ``post(plugin, route, body)`` answering as `tensorboard` would."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
    from tensorboard.plugins.hparams.hparams_plugin import HParamsPlugin
    from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin
    from werkzeug.test import Client

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    context = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))
    plugins = {"scalars": ScalarsPlugin(context)}
    context.plugin_name_to_instance = plugins
    plugins.update(hparams=HParamsPlugin(context), custom_scalars=CustomScalarsPlugin(context))

    def call(plugin: str, route: str, body: dict | None = None, **query):
        client = Client(plugins[plugin].get_plugin_apps()[route])
        r = client.post("/", json=body) if body is not None else client.get("/", query_string=query)
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json()

    return sorted(mux.Runs()), call


def test_tensorboard_names_each_trial_by_its_run_shows_seeds_as_integers_and_finds_every_seed_band_tag(sweep, tmp_path):
    root = tmp_path / "sw"
    shutil.copytree(sweep, root)
    assert report(root, "--tensorboard").returncode == 0
    runs, call = tensorboard(root)
    jobs = sorted(p.name for p in sweep.iterdir())
    # No stray run for the sweep's own records: the jobs and their seed bands only.
    assert runs == sorted([*jobs, "aggregate/norm.placement=pre", "aggregate/norm.placement=none"])

    statuses = ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING", "STATUS_UNKNOWN"]
    groups = call("hparams", "/session_groups", {"experimentName": "", "allowedStatuses": statuses, "colParams": [],
                                                 "startIndex": 0, "sliceSize": 100})["sessionGroups"]
    # The Trial ID column is the session group's name: the run dir's name within the sweep.
    assert sorted(g["name"] for g in groups) == jobs
    for g in groups:
        assert [s["name"] for s in g["sessions"]] == [g["name"]]
        assert g["hparams"]["seed"] == g["name"].rsplit("seed=", 1)[1]  # "0", shown as 0 (a number shows as 0.0000)
    experiment = call("hparams", "/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert infos["seed"]["domainDiscrete"] == ["0", "1"] and infos["norm.placement"]["domainDiscrete"] == ["none", "pre"]

    # Each margin chart's three tags: every run has all of them or none (else the chart says "Missing Tags").
    layout = call("custom_scalars", "/layout")
    margins = [c["margin"]["series"][0] for cat in layout["category"] for c in cat["chart"] if "margin" in c]
    assert {m["value"] for m in margins} >= {"Mean over seeds/val/acc", "Mean over seeds/train/loss", "Mean over seeds/grad_norm/total"}
    assert [cat["title"] for cat in layout["category"]][0].startswith("seed bands")  # the bands first
    # The seed-band runs add no card to the runs' own groups (train/, val/, ...): their tags
    # sit in two groups of their own, the means ahead of every other (act/ included).
    for run in runs:
        tags = call("scalars", "/tags")[run] if run in call("scalars", "/tags") else {}
        groups_of = {t.split("/", 1)[0] for t in tags}
        assert (groups_of == {"Mean over seeds", "seed_band"}) == run.startswith("aggregate/"), (run, groups_of)
        assert sorted([*groups_of, "act"])[0] == ("Mean over seeds" if run.startswith("aggregate/") else "act")
    for series in margins:
        wanted = [series["value"], series["lower"], series["upper"]]
        regex = "|".join(f"({re.escape(t)})" for t in wanted)  # what the margin chart card asks for
        for run in runs:
            found = call("custom_scalars", "/scalars", run=run, tag=regex)["tag_to_events"]
            assert len([t for t in wanted if t in found]) in (0, 3), (run, series, sorted(found))
            assert (len([t for t in wanted if t in found]) == 3) == run.startswith("aggregate/")


def test_bnexp_tb_on_a_folder_without_events_or_with_a_wrong_flag_says_so_in_one_line(sweep, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = run_inprocess(["tb", str(tmp_path / "empty")], Path.cwd())
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path / 'empty'} holds no TensorBoard event files (events.out.tfevents.*); " \
                       "allowed: a run or sweep directory, or a folder of them (default: runs/)\n"
    r = run_inprocess(["tb", str(sweep), "--bogus"], Path.cwd())
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: tensorboard: error: unrecognized arguments: --bogus\n"
