"""Runs that bnexp 0.1 wrote stay usable: resumable, reproducible, skippable,
reported in the same group as this version's runs of the same config."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from bnexp.config import hash_matches
from bnexp.rundir import Action, policy
from bnexp.runs import read_run
from bnexp.schema import compose, typed
from tests.conftest import TINY, run_inprocess

# What 0.1 saved for the default MLP: one model node with every family's keys.
V01_MODEL = {"kind": "mlp", "hidden": [16, 16], "activation": "relu", "init": "default", "init_std": 0.01,
             "kernel_size": 3, "pool": True}
V01_HASH_OF_DEFAULTS = "b5233e83d3466afa"  # 0.1's config_hash of `bnexp train` with no overrides


def v01_run(run_dir: Path, **record) -> Path:
    cfg = OmegaConf.to_container(compose(TINY), resolve=True, enum_to_str=True)
    cfg.pop("probes")
    cfg["model"] = dict(V01_MODEL)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed", "steps": 30, "final": {}, "best": {}, **record}))
    return run_dir


def test_the_config_hash_bnexp_01_recorded_still_matches_the_same_config():
    assert hash_matches(V01_HASH_OF_DEFAULTS, compose([]))


def test_a_saved_01_mlp_config_loads_and_reproduces(tmp_path):
    run = v01_run(tmp_path / "old")
    assert "kernel_size" not in typed(OmegaConf.load(run / ".hydra" / "config.yaml")).model
    out = run_inprocess(["reproduce", "old", "--out", "again"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["status"] == "completed"


def test_a_failure_record_01_wrote_for_a_refused_sweep_job_is_retrained_not_refused(tmp_path):
    run = tmp_path / "job"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"steps": 0, "final": {}, "best": {}, "overrides": [], "status": "failed",
                                                  "error": "invalid config: train.batch_size: 64 is larger than ..."}))
    assert policy(compose(TINY), run).action == Action.train


def test_a_01_run_and_a_new_run_of_one_config_fall_in_one_report_group(tmp_path):
    from bnexp.report import group_runs

    v01_run(tmp_path / "sw" / "old", config_hash="x")
    assert run_inprocess(["train", *TINY, "seed=1", "hydra.run.dir=sw/new"], cwd=tmp_path).returncode == 0
    runs = [read_run(tmp_path / "sw" / "old"), read_run(tmp_path / "sw" / "new")]
    assert len(group_runs(runs)) == 1
