"""The experiment presets (configs/experiment/*.yaml): each composes to what its
paper describes, every point of its sweep grid is a valid config, and it runs
end to end at smoke size through the real CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bnexp.config import config_dir
from bnexp.schema import compose, validate
from bnexp.models import build_model
from bnexp.runs import load_scalars
from tests.conftest import SHARED_DATA, run_inprocess

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
PAPER_PRESETS = ["seed_keras", "bn_paper_mnist", "lr_ablation", "batch_size_ablation", "placement_cnn"]
# Smoke size: a few steps on a few examples; the CNN presets get 4-channel blocks
# so the final validation/test passes over the real 5k/10k images stay fast.
SMOKE = ["train.steps=3", "train.log_every=1", "train.eval_every=2", "train.progress=false", "data.subset=200", "data.val_size=64"]
CNN_SMOKE = ["model.hidden=[8,8]", "norm.groups=4"]


def data_overrides(preset: str) -> list[str]:
    """Real MNIST / Fashion-MNIST from ../shared/data when present; skip otherwise (no network in tests)."""
    name = OmegaConf.to_container(compose([f"experiment={preset}"]).data)["name"]
    folder = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}.get(name)
    if folder is None:
        return []
    path = SHARED_DATA / folder
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real {name} files not found at {path}")
    return [f"data.root={path}"]


def grid(preset: str) -> list[list[str]]:
    """Every job of the preset's hydra.sweeper.params but the seed's, as override lists
    (a seed changes no config's validity; composing costs ~0.2 s a point)."""
    params = dict(OmegaConf.load(config_dir() / "experiment" / f"{preset}.yaml").hydra.sweeper.params)
    assert len(str(params.pop("seed", "")).split(",")) >= 3, "a preset's sweep should cover several seeds"
    axes = [[f"{k}={v.strip()}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(point) for point in itertools.product(*axes)]


def test_the_paper_presets_exist_and_each_cites_its_source():
    assert set(PAPER_PRESETS) <= set(PRESETS)
    for preset in PRESETS:
        text = (config_dir() / "experiment" / f"{preset}.yaml").read_text()
        assert text.startswith("# @package _global_"), preset
        assert any(s in text for s in ("Ioffe", "Wu & He", "Keras", "Sec.")), f"{preset} cites no source"


def test_bn_paper_mnist_is_the_section_4_1_network():
    cfg = compose(["experiment=bn_paper_mnist"])
    assert cfg.data.name.value == "mnist" and list(cfg.model.hidden) == [100, 100, 100]
    assert cfg.model.activation.value == "sigmoid" and cfg.model.init.value == "normal"
    assert cfg.train.batch_size == 60 and cfg.train.steps == 50_000 and cfg.train.epochs is None
    assert cfg.norm.placement.value == "pre" and cfg.norm.kind.value == "batch"


def test_seed_keras_is_the_keras_tutorial_network():
    cfg = compose(["experiment=seed_keras"])
    assert cfg.data.name.value == "drug_trial" and cfg.data.preprocess.value == "minmax"
    assert list(cfg.model.hidden) == [16, 32] and list(cfg.norm.layers) == [1] and cfg.norm.placement.value == "post"
    assert cfg.optim.name.value == "adam" and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 10 and cfg.train.epochs == 20
    assert cfg.norm.momentum == pytest.approx(0.01)  # Keras momentum=0.99


@pytest.mark.slow
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_point_of_a_presets_sweep_grid_is_a_valid_config(preset):
    extra = data_overrides(preset)
    points = grid(preset)
    assert len(points) >= 2
    for point in points:
        cfg = compose([f"experiment={preset}", *point, *extra])
        validate(cfg)  # group norm's groups divide the widths, ghost batch's virtual size divides the batch, ...
        shape = (1, 28, 28) if cfg.model.kind == "cnn" else (1,)
        build_model(cfg.model, cfg.norm, shape, 10)


@pytest.mark.slow
def test_batch_size_ablation_scales_the_learning_rate_linearly_with_the_batch(tmp_path):
    args = ["train", "experiment=batch_size_ablation", *SMOKE, *CNN_SMOKE, "train.batch_size=4", *data_overrides("batch_size_ablation")]
    assert run_inprocess(args, tmp_path).returncode == 0
    (run_dir,) = [p.parent for p in tmp_path.glob("runs/batch_size_ablation/*/metrics.json")]
    lrs = [v for _, v in load_scalars(run_dir, ["optim/lr"])["optim/lr"]]
    assert lrs and lrs == pytest.approx([0.1 * 4 / 32] * len(lrs))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_preset_trains_at_smoke_size(preset, tmp_path):
    args = ["train", f"experiment={preset}", *SMOKE, *data_overrides(preset)]
    if compose([f"experiment={preset}"]).model.kind == "cnn":
        args += CNN_SMOKE
    if preset == "seed_keras":
        args += ["train.epochs=1"]  # epochs win over steps; 200 examples / batch 10 = 20 steps
    result = run_inprocess(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (metrics,) = tmp_path.glob(f"runs/{preset}/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and 0 <= record["final"]["test/acc"] <= 1


@pytest.mark.slow
def test_bnexp_sweep_runs_the_grid_a_preset_declares(tmp_path):
    args = ["sweep", "experiment=lr_ablation", "seed=0", *SMOKE, *data_overrides("lr_ablation"), "hydra.sweep.dir=sw"]
    assert run_inprocess(args, tmp_path).returncode == 0
    # rglob: a data.root=/a/path override puts slashes into the job directories' names
    jobs = sorted((tmp_path / "sw").rglob("metrics.json"))
    assert len(jobs) == 6, jobs  # 3 learning rates x BN pre/none, one seed
    lrs = [json.loads(j.read_text())["final"]["optim/lr"] for j in jobs]
    assert sorted(lrs) == pytest.approx([0.05, 0.05, 0.25, 0.25, 1.5, 1.5])  # x1, x5, x30


@pytest.mark.slow
def test_lr_ablation_divergence_is_status_diverged_with_exit_code_0(tmp_path):
    args = ["train", "experiment=lr_ablation", *SMOKE, "train.steps=20", "norm.placement=none", "model.activation=relu",
            "model.init=default", "optim.lr=1e8", *data_overrides("lr_ablation")]
    result = run_inprocess(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (metrics,) = tmp_path.glob("runs/lr_ablation/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "diverged" and record["diverged"]["step"] >= 1
    assert all(math.isfinite(v) for v in record["diverged"]["last_finite"].values())
