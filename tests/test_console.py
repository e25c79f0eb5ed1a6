"""What the console shows: tagged log lines of side-by-side runs, a line said
once, short notes, a progress bar that fits 80 columns, honest footers."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import TINY, run_inprocess


@pytest.mark.slow
def test_a_stacked_sweep_tags_each_log_line_with_its_job_and_says_the_thread_count_once(tmp_path):
    out = run_inprocess(["sweep", *TINY, "train.steps=20", "train.eval_every=10", "seed=0,1,2", "hydra/launcher=vectorized",
                         "hydra.sweep.dir=sw"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    console = out.stdout + out.stderr
    lines = [line for line in console.splitlines() if "step 10/20" in line]
    assert sorted(re.search(r"\[(seed=\d)\] step 10/20", line).group(1) for line in lines) == ["seed=0", "seed=1", "seed=2"]
    threads = [line.split(" - ", 1)[1] for line in console.splitlines() if "torch threads:" in line]
    assert len(threads) == len(set(threads))  # each thread-count line once on the console ...
    for job in ("seed=0", "seed=1", "seed=2"):  # ... and in every job's own log
        assert "torch threads: 1" in (tmp_path / "sw" / job / "bnexp.log").read_text()


def test_report_of_a_tree_holding_the_same_runs_many_times_says_so_in_one_short_line(tmp_path):
    assert run_inprocess(["train", *TINY, "train.steps=4", "hydra.run.dir=runs/a/run"], tmp_path).returncode == 0
    for i in range(10):
        shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / f"copy{i:02d}")
    out = run_inprocess(["report", "runs", "--format", "csv"], tmp_path)
    assert out.returncode == 0, out.stderr
    (note,) = [line for line in out.stderr.splitlines() if "already counted" in line]
    assert note.startswith("left out 10 runs of a config and seed already counted: ") and "and 7 more" in note
    assert len(note) < 700


def test_the_progress_bar_keeps_its_bar_count_and_eta_at_80_columns():
    from rich.console import Console

    from bnexp.tracking import Console_

    bar = Console_(2000, enabled=True, title="norm.placement=pre,seed=0")
    bar.console, bar.rich = Console(width=80, force_terminal=True, record=True), True
    bar.start(0)
    try:
        bar.update(500, {"train/loss": 0.4123, "train/acc": 0.8812, "val/acc": 0.8534, "time/steps_per_sec": 634.0}, is_eval=True)
        screen = Console(width=80, force_terminal=True, record=True)
        screen.print(bar.progress.make_tasks_table(bar.progress.tasks))
    finally:
        bar.stop()
    (line,) = screen.export_text().splitlines()
    assert len(line) <= 80
    assert "━" in line and "500/2000" in line and re.search(r"(-:--:--|\d:\d\d:\d\d)", line), line
    assert "train/loss=0.4123" in line


def test_reproduces_footer_counts_and_names_exactly_what_it_left_out():
    from bnexp.rerun import differences_table

    def caption(rows):
        return differences_table(rows, None).caption

    assert caption([("val/acc", 0.5, 0.5, 0.0), ("optim/lr", 0.1, 0.1, 0.0)]) == "identical, not listed: 1 more (optim/lr)"
    many = [(f"act/hidden{i}/p50", 1.0, 1.0, 0.0) for i in range(3)] + [("grad_norm/total", 2.0, 2.0, 0.0), ("optim/lr", 0.1, 0.1, 0.0)]
    assert caption(many) == "identical, not listed: 5 more (act/* 3, grad_norm/* 1, optim/* 1)"
