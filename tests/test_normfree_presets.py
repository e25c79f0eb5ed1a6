"""The presets that compare BN with what the field compares it with (norm_zoo,
normfree_resnet, dropout_bn, rank_collapse): their arms are what their papers
describe, every point of their grids is a valid config, and each trains (and
normfree_resnet sweeps its five arms) at smoke size through the real CLI."""

from __future__ import annotations

import json

import pytest

from bnexp.models import build_model
from bnexp.schema import compose, validate
from tests.conftest import run_inprocess
from tests.test_presets import SMOKE, data_overrides, grid

PRESETS = ["norm_zoo", "normfree_resnet", "dropout_bn", "rank_collapse"]
ARMS = {  # normfree_resnet's arms: (norm.placement, model.init, model.skipinit, optim.clip)
    "bn": ("pre", "kaiming", False, "none"), "none": ("none", "kaiming", False, "none"), "fixup": ("none", "fixup", False, "none"),
    "skipinit": ("none", "kaiming", True, "none"), "agc": ("none", "kaiming", False, "agc"),
}


def test_normfree_resnets_arms_are_bn_and_four_ways_to_train_without_it():
    assert grid("normfree_resnet") == [[f"+experiment/normfree_resnet={arm}"] for arm in ARMS]
    for arm, want in ARMS.items():
        cfg = compose(["experiment=normfree_resnet", f"+experiment/normfree_resnet={arm}"])
        assert (cfg.norm.placement.value, cfg.model.init.value, cfg.model.skipinit, cfg.optim.clip.value) == want, arm
        assert cfg.model.depth == 8 and cfg.train.steps == 500 and cfg.probes.signal.every == 100


def test_norm_zoo_crosses_eight_norms_with_wu_and_hes_batch_sizes_at_a_linearly_scaled_lr():
    points = grid("norm_zoo")
    norms = {p for point in points for p in point if p.startswith("norm=")}
    assert norms == {f"norm={n}" for n in ("batch", "group", "layer", "group_ws", "frn", "evonorm_s0", "evonorm_b0", "none")}
    assert {p for point in points for p in point if p.startswith("train.batch_size")} == {f"train.batch_size={b}" for b in (2, 4, 8, 16, 32)}
    gn_ws, none = compose(["experiment=norm_zoo", "norm=group_ws"]).norm, compose(["experiment=norm_zoo", "norm=none"]).norm
    assert (gn_ws.kind.value, gn_ws.weight_std, gn_ws.groups) == ("group", True, 4) and none.placement.value == "none"
    assert compose(["experiment=norm_zoo"]).optim.base_batch_size == 32


def test_dropout_bn_and_rank_collapse_measure_what_their_papers_measure():
    d = compose(["experiment=dropout_bn"])
    assert d.model.dropout == 0.5 and d.norm.placement.value == "post" and d.probes.var_shift.every == d.train.eval_every
    assert {p for point in grid("dropout_bn") for p in point} >= {"model.dropout_position=before_norm", "train.precise_bn=100"}
    r = compose(["experiment=rank_collapse"])
    assert len(r.model.hidden) == 30 and r.model.init.value == "kaiming" and r.probes.signal.every == 100
    assert grid("rank_collapse") == [["norm.placement=pre"], ["norm.placement=none"]]


@pytest.mark.slow  # composing 8 + 5 + 6 + 2 points: ~4 s idle
@pytest.mark.parametrize("preset", PRESETS)
def test_every_point_of_the_comparison_presets_grids_is_a_valid_config(preset):
    extra = data_overrides(preset)
    # norm_zoo's batch sizes change no norm's validity (none needs a divisor of the batch): its smallest stands for all.
    for point in (p for p in grid(preset) if not any(o.startswith("train.batch_size=") and o != "train.batch_size=2" for o in p)):
        cfg = compose([f"experiment={preset}", *point, *extra])
        validate(cfg)
        build_model(cfg.model, cfg.norm, (1, 28, 28), 10)


SMALL = {"norm_zoo": ["model.hidden=[8,8]", "norm=frn", "train.batch_size=4", "train.epochs=null"],
         "normfree_resnet": ["+experiment/normfree_resnet=fixup", "model.width=0.25", "probes.signal.every=2"],
         "dropout_bn": ["model.hidden=[16,16]", "model.dropout_position=before_norm", "train.precise_bn=2", "probes.var_shift.every=2"],
         "rank_collapse": ["model.hidden=[16,16,16,16]", "probes.signal.every=2"]}


@pytest.mark.slow  # each evaluates the real 10,000 test images: ~3-6 s
@pytest.mark.parametrize("preset", PRESETS)
def test_comparison_preset_trains_at_smoke_size(preset, tmp_path):
    result = run_inprocess(["train", f"experiment={preset}", *SMOKE, *SMALL[preset], *data_overrides(preset)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (metrics,) = tmp_path.glob(f"runs/{preset}/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and 0 <= record["final"]["test/acc"] <= 1
    if preset in ("normfree_resnet", "rank_collapse"):
        assert any(k.startswith("signal/") and k.endswith("/stable_rank") for k in record["final"])
    if preset == "dropout_bn":
        assert "var_shift/hidden0.norm" in record["final"]


@pytest.mark.slow
def test_normfree_resnet_sweeps_its_five_arms_into_one_job_each(tmp_path):
    # Synthetic 8x8 images instead of the real test set's 10,000: the arms are what is tested here.
    args = ["sweep", "experiment=normfree_resnet", "seed=0", *SMOKE, "model.width=0.25", "data=synthetic", "data.shape=[1,8,8]",
            "data.n_train=300", "data.n_test=50", "hydra.sweep.dir=sw"]
    assert run_inprocess(args, tmp_path).returncode == 0
    jobs = sorted((tmp_path / "sw").rglob("metrics.json"))
    assert sorted(j.parent.name for j in jobs) == [f"+experiment_normfree_resnet={arm},seed=0" for arm in sorted(ARMS)]
    assert all(json.loads(j.read_text())["status"] == "completed" for j in jobs)
