"""model=vgg: VGG-11/13/16 for CIFAR-sized images with the single-Linear
classifier of Santurkar et al.'s CIFAR-10 VGG, a norm after each conv or none."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bnexp.config import ConfigError, NormConfig, Placement
from bnexp.models import build_model
from bnexp.models.vgg import VGGConfig
from bnexp.runs import load_scalars
from bnexp.schema import compose, validate
from bnexp.train import train
from tests.conftest import mnist_root, run_inprocess
from tests.test_resnet import KINDS, TINY_IMAGES, assert_fits_a_batch, call_order

# Simonyan & Zisserman 2015, Table 1 (configurations A, B, D): output channels of the convs, "M" a max-pool.
TABLE_1 = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def layer_list(net: nn.Module) -> list:
    return [m.out_channels if isinstance(m, nn.Conv2d) else "M" for m in net.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]


@pytest.mark.parametrize("variant", [11, 13, 16])
def test_variants_are_the_layer_lists_of_table_1_with_one_linear_classifier_on_512_features(variant):
    net = build_model(VGGConfig(variant=variant), NormConfig(), (3, 32, 32), 10)
    assert layer_list(net) == TABLE_1[variant]
    assert [m for m in net.modules() if isinstance(m, nn.Linear)] == [net.output]
    assert (net.output.in_features, net.output.out_features) == (512, 10)
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in net.modules() if isinstance(m, nn.Conv2d))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_11_has_the_parameter_count_of_the_cifar_10_vgg_in_santurkars_code():
    # robustness/cifar_models/vgg.py: 3x3 convs with biases, each followed by an affine BN, and Linear(512, 10).
    # bnexp drops the conv biases that the BN right after them makes redundant (BN paper Sec. 3.2).
    widths = [c for c in TABLE_1[11] if c != "M"]
    convs = sum(9 * cin * cout for cin, cout in zip([3, *widths], widths))
    theirs = convs + sum(widths) + 2 * sum(widths) + 512 * 10 + 10
    net = build_model(VGGConfig(variant=11), NormConfig(), (3, 32, 32), 10)
    assert sum(p.numel() for p in net.parameters()) == theirs - sum(widths)


def test_width_scales_the_channels_and_28_pixel_images_skip_the_pool_that_would_empty_the_map():
    net = build_model(VGGConfig(variant=11, width=0.25), NormConfig(), (1, 28, 28), 10)
    assert layer_list(net) == [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128]  # 28 -> 14 -> 7 -> 3 -> 1
    assert net.output.in_features == 128 and net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("placement,order", [(Placement.pre, ["conv", "norm", "act"]), (Placement.post, ["conv", "act", "norm"]),
                                             (Placement.none, ["conv", "act"])], ids=lambda v: getattr(v, "value", ""))
def test_placement_orders_every_conv_block(placement, order):
    net = build_model(VGGConfig(variant=11, width=0.125), NormConfig(placement=placement), (3, 32, 32), 10)
    blocks = [m for name, m in net.named_modules() if name.rsplit(".", 1)[-1].startswith("block")]
    assert len(blocks) == 8
    for b in blocks:
        assert call_order(b, torch.randn(2, b.conv.in_channels, 4, 4)) == order


def test_norm_layers_picks_conv_blocks_by_their_index_in_network_order():
    net = build_model(VGGConfig(variant=11, width=0.125), NormConfig(layers=[0, 7]), (3, 32, 32), 10)
    normed = [name for name, m in net.named_modules() if name.endswith(".norm")]
    assert normed == ["stage1.block0.norm", "stage5.block1.norm"]
    assert net.stage2.block0.conv.bias is not None and net.stage1.block0.conv.bias is None


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.value)
def test_every_norm_kind_trains_in_vgg(kind):
    net = build_model(VGGConfig(variant=11, width=0.125), NormConfig(kind=kind, **KINDS[kind]), (3, 32, 32), 10)
    assert_fits_a_batch(net, torch.randn(16, 3, 32, 32), lr=0.05)


@pytest.mark.parametrize("overrides,line", [
    (["model.variant=19"], "model.variant: got 19; allowed: 11, 13, 16"),
    (["model.width=-1"], "model.width: got -1.0; allowed: a multiplier > 0"),
    (["norm.placement=preact"], "norm.placement: preact (norm -> act -> layer) orders residual blocks, and model=vgg has none"),
    (["norm.zero_init_residual=true"], "norm.zero_init_residual: model=vgg has no residual blocks"),
    (["norm=group", "model.width=0.05"], "norm.groups: 8 does not divide conv block 0's width 3"),
    (["data=mnist1d"], "model.kind: model=vgg needs images [C,H,W], and data=mnist1d"),
])
def test_bad_vgg_configs_are_refused_naming_the_key(overrides, line):
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=synthetic", "data.shape=[3,8,8]"]
    with pytest.raises(ConfigError) as e:
        validate(compose(["model=vgg", *data, *overrides]))
    assert line in str(e.value)


def test_vgg_tags_name_stage_and_block(tmp_path):
    train(compose(["model=vgg", "model.width=0.0625", *TINY_IMAGES]), tmp_path, summary=False)
    tags = set(load_scalars(tmp_path))
    for layer in ("stage1.block0.conv", "stage1.block0.norm", "stage5.block1.conv", "output"):
        assert f"grad_norm/{layer}" in tags, layer
    assert {"act/stage1.block0.act/p50", "act/stage5.block1.act/p85"} <= tags


def test_vgg_bn_preset_is_santurkars_vgg_with_and_without_bn_at_their_two_learning_rates():
    cfg = compose(["experiment=vgg_bn"])
    assert (cfg.model.kind, cfg.model.variant, cfg.norm.placement.value, cfg.norm.kind.value) == ("vgg", 11, "pre", "batch")
    from tests.test_presets import grid

    points = grid("vgg_bn")
    assert sorted({p[0] for p in points}) == ["norm.placement=none", "norm.placement=pre"] and {p[1] for p in points} == {"optim.lr=0.1", "optim.lr=0.5"}
    assert len(points) == 4  # the grid without its 3 seeds


@pytest.mark.slow
def test_vgg_bn_preset_trains_at_smoke_size(tmp_path):
    from tests.test_presets import SMOKE

    root = mnist_root("fashion-mnist")
    args = ["train", "experiment=vgg_bn", *SMOKE, "model.width=0.0625", "train.eval_batch_size=4096", f"data.root={root}"]
    result = run_inprocess(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (metrics,) = tmp_path.glob("runs/vgg_bn/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and 0 <= record["final"]["test/acc"] <= 1
