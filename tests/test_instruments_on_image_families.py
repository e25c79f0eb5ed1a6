"""Issue 13's instruments on the families and runs that came with issues 14-15:
noisy BN in ResNet (every placement, preact included) and VGG blocks, every
landscape probe and PreciseBN on a tiny ResNet and VGG, the paper's VGG command,
and the one-line refusal of the probes under torchrun."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from bnexp.config import ConfigError
from bnexp.models import build_model
from bnexp.models.blocks import parameterized_layers
from bnexp.norms import NORM_TYPES, BatchNoise
from bnexp.schema import ONE_PROCESS_INSTRUMENTS, compose, validate
from tests.conftest import run_inprocess

IMAGES = ["data=synthetic", "data.shape=[3,8,8]", "data.n_train=256", "data.n_test=64", "train.batch_size=32", "train.steps=4",
          "train.log_every=2", "train.eval_every=4", "train.probe_size=32", "train.progress=false", "train.device=cpu"]
RESNET = ["model=resnet", "model.depth=8", "model.width=0.25", "model.shortcut=projection"]
VGG = ["model=vgg", "model.width=0.0625"]


def order(model) -> list[str]:
    """Leaf module names in registration (= forward) order, norm/noise/act/conv kinds only."""
    return [name for name, m in model.named_modules() if name and not list(m.children())]


@pytest.mark.parametrize("family, placement", [(RESNET, "preact"), (RESNET, "pre"), (RESNET, "post"), (RESNET, "none"), (VGG, "pre"), (VGG, "none")])
def test_noisy_bn_follows_every_norm_of_resnet_and_vgg_or_sits_where_pre_would_put_it(family, placement):
    cfg = compose([*family, *IMAGES, f"norm.placement={placement}", "norm.noise=true"])
    model = build_model(cfg.model, cfg.norm, (3, 8, 8), 10)
    names = order(model)
    noises = [n for n, m in model.named_modules() if isinstance(m, BatchNoise)]
    norms = [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    assert noises
    if placement == "none":
        # No norms: one noise per conv of a block, right where a pre norm would be (before the act or the addition).
        assert not norms
        assert all(names[names.index(n) - 1].split(".")[-1].startswith("conv") for n in noises), names
    else:
        assert len(noises) == len(norms)
        assert all(names[names.index(n) + 1] == n.replace("norm", "noise") for n in norms), names
    if placement == "preact":
        block = model.stage1.block0
        assert [n for n, _ in block.named_children()][:4] == ["norm1", "noise1", "act1", "conv1"]
        assert "final.noise" in names
    off = build_model(cfg.model, compose([*family, *IMAGES, f"norm.placement={placement}"]).norm, (3, 8, 8), 10)
    assert order(off) == [n for n in names if n not in noises]  # off: the models of issue 14, module for module


@pytest.mark.slow
@pytest.mark.parametrize("family, extra", [(RESNET, ["norm.placement=preact", "norm.kind=batch_renorm"]), (VGG, ["norm.running_var=biased"])])
def test_every_landscape_probe_and_precise_bn_run_on_a_tiny_resnet_and_vgg_with_noisy_bn(tmp_path, family, extra):
    probes = ["probes.ics.every=2", "probes.landscape.every=2", "probes.hessian.every=4", "probes.hessian.iterations=5",
              "probes.hessian.batch_size=32", "probes.bn_gap.every=4", "probes.bn_gap.batches=2", "train.precise_bn=2", "norm.noise=true"]
    out = run_inprocess(["train", *family, *IMAGES, *extra, *probes, "hydra.run.dir=run"], tmp_path)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed"
    final = record["final"]
    cfg = compose([*family, *IMAGES, *extra])
    model = build_model(cfg.model, cfg.norm, (3, 8, 8), 10)
    kinds = dict(model.named_modules())
    weight_layers = [n for n in parameterized_layers(model) if not isinstance(kinds[n], NORM_TYPES)]
    assert len(weight_layers) > 5
    for layer in weight_layers:  # one ICS pair per conv / linear, named by module path
        assert math.isfinite(final[f"ics/{layer}/l2"]) and -1 <= final[f"ics/{layer}/cos"] <= 1 + 1e-6, layer
    for tag in ("landscape/loss_min", "landscape/loss_max", "landscape/beta", "hessian/top_eig",
                "bn_gap/val_acc_ema", "bn_gap/val_acc_precise", "bn_gap/val_acc_batch", "test/acc"):
        assert math.isfinite(final[tag]), tag
    assert final["landscape/loss_min"] <= final["landscape/loss_max"]


def test_the_papers_vgg_command_with_the_santurkar_probes_composes_and_validates():
    # As configs/experiment/santurkar_landscape.yaml and docs/results.md write it.
    cfg = compose(["experiment=vgg_bn", "data=cifar10", "data.download=true", "optim.lr=0.1", "optim.momentum=0", "train.steps=15000",
                   "probes.landscape.every=50", "probes.ics.every=100", "probes.hessian.every=500", "probes.bn_gap.every=500",
                   "probes.bn_gap.batches=50"])
    validate(cfg)
    assert cfg.model.kind == "vgg" and cfg.train.batch_size == 128 and cfg.optim.momentum == 0
    validate(compose(["experiment=santurkar_landscape", "model=cnn", "model.hidden=[64,128,256,256,512,512,512,512]", "data=cifar10",
                      "data.download=true", "train.steps=15000", "train.eval_every=500"]))


def test_the_landscape_probes_and_precise_bn_are_refused_in_a_data_parallel_run_naming_the_key(monkeypatch):
    validate(compose(["data=synthetic", "probes.hessian.every=5", "train.precise_bn=3"]))  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    plain = compose(["data=synthetic"])
    validate(plain)  # torchrun without them: fine
    for key in ONE_PROCESS_INSTRUMENTS:
        cfg = plain.copy()
        OmegaConf.update(cfg, key, 3)
        with pytest.raises(ConfigError, match=rf"^{key}: 3, but this is a data-parallel run of 2 processes.*allowed: 0 under torchrun"):
            validate(cfg)
