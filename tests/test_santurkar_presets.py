"""The Santurkar et al. 2018 presets: every point of their sweep grids is a
valid config with the probes they promise, and each runs at smoke size."""

from __future__ import annotations

import json

import pytest

from bnexp.schema import compose, validate
from tests.conftest import run_inprocess
from tests.test_presets import SMOKE, data_overrides, grid

PRESETS = ["santurkar_dln", "santurkar_landscape", "noisy_bn"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_point_of_a_santurkar_grid_is_valid_and_compares_bn_with_none(preset):
    points = grid(preset)
    assert {p for point in points for p in point if p.startswith("norm.placement=")} == {"norm.placement=pre", "norm.placement=none"}
    for point in points:
        validate(compose([f"experiment={preset}", *point, *data_overrides(preset)]))


def test_santurkar_landscape_measures_the_papers_quantities_with_plain_sgd():
    cfg = compose(["experiment=santurkar_landscape"])
    assert cfg.optim.name.value == "sgd" and cfg.optim.momentum == 0 and cfg.optim.lr == 0.1 and cfg.train.batch_size == 128
    assert all(cfg.probes[p].every > 0 for p in ("ics", "landscape", "hessian", "bn_gap"))
    assert min(cfg.probes.landscape.etas) == 0.5 and max(cfg.probes.landscape.etas) == 4  # [1/2, 4] x lr


def test_noisy_bn_uses_algorithm_1s_values():
    n = compose(["experiment=noisy_bn", "norm.noise=true"]).norm
    assert (n.noise_mu, n.noise_sigma, n.noise_r_mu, n.noise_r_sigma) == (0.5, 1.25, 0.1, 0.1)
    assert "norm.noise=true" in {p for point in grid("noisy_bn") for p in point}


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra", [("santurkar_landscape", ["probes.landscape.every=1", "probes.ics.every=2", "probes.hessian.every=3",
                                                                     "probes.hessian.iterations=2", "probes.bn_gap.every=3", "probes.bn_gap.batches=2"]),
                                           ("noisy_bn", ["norm.noise=true"])])
def test_santurkar_preset_trains_at_smoke_size(preset, extra, tmp_path):
    args = ["train", f"experiment={preset}", *SMOKE, "model.hidden=[16,16]", *extra, *data_overrides(preset)]
    result = run_inprocess(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (metrics,) = tmp_path.glob(f"runs/{preset}/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and 0 <= record["final"]["test/acc"] <= 1
    if preset == "santurkar_landscape":
        assert {"landscape/beta", "ics/output/cos", "hessian/top_eig", "bn_gap/val_acc_precise"} <= set(record["final"])
