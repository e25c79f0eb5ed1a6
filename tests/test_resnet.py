"""model=resnet: CIFAR ResNets (He et al. 2016) whose residual blocks order
conv, norm and activation as norm.placement says, checked against the
paper's equations written with torch.nn.functional in float64."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import ConfigError, NormConfig, NormKind, Placement
from bnexp.models import build_model
from bnexp.models.resnet import BasicBlock, ResNetConfig, Shortcut
from bnexp.norms import make_norm
from bnexp.runs import load_scalars
from bnexp.schema import compose, validate
from bnexp.train import train
from tests.conftest import mnist_root, run_inprocess


def block(placement: Placement, cin=4, cout=4, stride=1, shortcut=Shortcut.identity, **norm) -> BasicBlock:
    norm_cfg = NormConfig(placement=placement, **norm)
    make = (lambda c: None) if placement == Placement.none else (lambda c: make_norm(norm_cfg, c, spatial_dims=2))
    b = BasicBlock(cin, cout, stride, placement, make, nn.ReLU, shortcut).double()
    with torch.no_grad():  # gammas and betas away from 1 and 0, so a misplaced norm shows
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    return b


def bn(h, norm):
    return F.batch_norm(h, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)


def conv(h, c):
    return F.conv2d(h, c.weight, c.bias, c.stride, c.padding)


# The block equations, with s the shortcut; (+) marks the addition.
REFERENCE = {
    # He et al. 2016a, Fig. 2 / Sec. 3.2: y = relu(F(x) + x), F = BN(conv(relu(BN(conv(x)))))
    Placement.pre: lambda b, x, s: F.relu(bn(conv(F.relu(bn(conv(x, b.conv1), b.norm1)), b.conv2), b.norm2) + s(x)),
    Placement.post: lambda b, x, s: bn(F.relu(conv(bn(F.relu(conv(x, b.conv1)), b.norm1), b.conv2) + s(x)), b.norm2),
    # He et al. 2016b, Fig. 4(e): x + conv(relu(BN(conv(relu(BN(x))))))
    Placement.preact: lambda b, x, s: conv(F.relu(bn(conv(F.relu(bn(x, b.norm1)), b.conv1), b.norm2)), b.conv2) + s(x),
    Placement.none: lambda b, x, s: F.relu(conv(F.relu(conv(x, b.conv1)), b.conv2) + s(x)),
}

# What runs before the addition (up to the shortcut, which runs at the addition) and what after it.
ORDER = {
    Placement.pre: (["conv1", "norm1", "act1", "conv2", "norm2"], ["act2"]),
    Placement.post: (["conv1", "act1", "norm1", "conv2"], ["act2", "norm2"]),
    Placement.preact: (["norm1", "act1", "conv1", "norm2", "act2", "conv2"], []),
    Placement.none: (["conv1", "act1", "conv2"], ["act2"]),
}


def call_order(module: nn.Module, x: torch.Tensor) -> list[str]:
    calls: list[str] = []
    hooks = [child.register_forward_hook(lambda *_, name=name: calls.append(name)) for name, child in module.named_children()]
    module(x)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("placement", list(Placement), ids=lambda p: p.value)
def test_each_placement_runs_its_modules_in_order_with_the_addition_where_the_paper_puts_it(placement):
    b = block(placement)
    before, after = ORDER[placement]
    assert call_order(b, torch.randn(8, 4, 6, 6, dtype=torch.float64)) == [*before, "shortcut", *after]
    assert [name for name, _ in b.named_children()] == [*before, "shortcut", *after]


@pytest.mark.parametrize("placement", list(Placement), ids=lambda p: p.value)
def test_each_placement_computes_its_block_equation(placement):
    b = block(placement)
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(b(x), REFERENCE[placement](b, x, lambda v: v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement", list(Placement), ids=lambda p: p.value)
def test_option_a_shortcut_subsamples_and_zero_pads_channels_without_parameters(placement):
    b = block(placement, cin=4, cout=8, stride=2)
    assert not list(b.shortcut.parameters())
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    pad = lambda v: torch.cat([v[:, :, ::2, ::2], torch.zeros(8, 4, 3, 3, dtype=v.dtype)], 1)  # noqa: E731
    torch.testing.assert_close(b(x), REFERENCE[placement](b, x, pad), rtol=1e-10, atol=1e-10)


def test_projection_shortcut_is_a_normalized_1x1_conv_in_pre_and_reads_the_preactivated_input_in_preact():
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    pre = block(Placement.pre, cin=4, cout=8, stride=2, shortcut=Shortcut.projection)
    assert [n for n, _ in pre.shortcut.named_children()] == ["conv", "norm"] and pre.shortcut.conv.kernel_size == (1, 1)
    torch.testing.assert_close(pre(x), REFERENCE[Placement.pre](pre, x, lambda v: bn(conv(v, pre.shortcut.conv), pre.shortcut.norm)))
    preact = block(Placement.preact, cin=4, cout=8, stride=2, shortcut=Shortcut.projection)
    assert [n for n, _ in preact.shortcut.named_children()] == ["conv"]
    projected = lambda v: conv(F.relu(bn(v, preact.norm1)), preact.shortcut.conv)  # noqa: E731  He et al.'s pre-activation code
    torch.testing.assert_close(preact(x), REFERENCE[Placement.preact](preact, x, projected))


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_depth_6n_plus_2_has_the_parameter_count_of_the_papers_table_6(depth, params):
    net = build_model(ResNetConfig(depth=depth), NormConfig(), (3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n convs in blocks + the stem conv + the Linear output (option A: no shortcut convs)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(params, rel=0.02)
    assert [net.get_submodule(f"stage{s}.block0.conv1").out_channels for s in (1, 2, 3)] == [16, 32, 64]


def test_width_multiplies_every_stage_and_preact_ends_with_a_norm_and_activation():
    net = build_model(ResNetConfig(depth=8, width=0.5), NormConfig(placement=Placement.preact), (1, 28, 28), 10)
    assert [net.get_submodule(f"stage{s}.block0.conv2").out_channels for s in (1, 2, 3)] == [8, 16, 32]
    assert [n for n, _ in net.named_children()] == ["stem", "stage1", "stage2", "stage3", "final", "head", "output"]
    assert [n for n, _ in net.stem.named_children()] == ["conv"] and [n for n, _ in net.final.named_children()] == ["norm", "act"]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("placement", list(Placement), ids=lambda p: p.value)
def test_zero_init_residual_starts_every_branch_at_zero_and_the_zeroed_weights_still_train(placement):
    norm_cfg = NormConfig(placement=placement, zero_init_residual=True)
    net = build_model(ResNetConfig(depth=8, width=0.25), norm_cfg, (1, 8, 8), 10).double()
    zeroed = "norm2" if placement == Placement.pre else "conv2"
    for b in net.blocks():
        assert not getattr(b, zeroed).weight.any()
        x = torch.randn(4, b.conv1.in_channels, 8, 8, dtype=torch.float64)
        branch_free = x if isinstance(b.shortcut, nn.Identity) else b.shortcut(x)
        for m in b._after:  # only what follows the addition acts on the shortcut alone
            branch_free = m(branch_free)
        torch.testing.assert_close(b(x), branch_free)
    loss = F.cross_entropy(net(torch.randn(16, 1, 8, 8, dtype=torch.float64)), torch.randint(0, 10, (16,)))
    loss.backward()
    assert all(getattr(b, zeroed).weight.grad.abs().sum() > 0 for b in net.blocks())
    plain = build_model(ResNetConfig(depth=8, width=0.25), NormConfig(placement=placement), (1, 8, 8), 10)
    assert all(getattr(b, zeroed).weight.any() for b in plain.blocks())


def test_a_zero_gamma_before_a_relu_never_trains_which_is_why_preact_zeroes_conv2_instead():
    b = block(Placement.preact)
    with torch.no_grad():
        b.norm2.weight.zero_()
        b.norm2.bias.zero_()
    b(torch.randn(8, 4, 6, 6, dtype=torch.float64)).square().sum().backward()
    assert not b.norm2.weight.grad.any() and not b.norm2.bias.grad.any()  # relu'(0) = 0: the branch would stay dead


KINDS = {NormKind.batch: {}, NormKind.ghost_batch: {"virtual_batch_size": 4}, NormKind.batch_renorm: {},
         NormKind.layer: {}, NormKind.group: {"groups": 2}}


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.value)
@pytest.mark.parametrize("placement", [Placement.pre, Placement.post, Placement.preact], ids=lambda p: p.value)
def test_every_norm_kind_trains_in_every_residual_placement(kind, placement):
    net = build_model(ResNetConfig(depth=8, width=0.25, shortcut=Shortcut.projection), NormConfig(kind=kind, placement=placement, **KINDS[kind]),
                      (3, 8, 8), 10)
    norms = [m for m in net.modules() if type(m).__name__ in ("BatchNorm2d", "GhostBatchNorm", "BatchRenorm", "GroupNorm")]
    assert len(norms) >= 7  # stem or final + 2 per block + the normalized projections (pre)
    assert_fits_a_batch(net, torch.randn(16, 3, 8, 8))


def assert_fits_a_batch(net: nn.Module, x: torch.Tensor, lr: float = 0.1) -> None:
    """Five SGD steps on one batch lower its loss, and every parameter of every
    layer gets a gradient and moves: every layer is wired into the graph and trains."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    y = torch.randint(0, 10, (len(x),))
    params = dict(net.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    start = {name: p.detach().clone() for name, p in params.items()}
    before = F.cross_entropy(net(x), y)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        missing = [name for name, p in params.items() if p.grad is None]
        assert not missing, f"no gradient reaches {missing}"
        opt.step()
    assert F.cross_entropy(net(x), y) < before
    frozen = [name for name, p in params.items() if torch.equal(p.detach(), start[name])]
    assert not frozen, f"these did not train: {frozen}"


REFUSED = {
    ("model=resnet",): "model.kind: model=resnet needs images [C,H,W], and data=mnist1d gives examples of shape [1, 40]",
    ("model.depth=12",): "model.depth: got 12; allowed: 6n+2",
    ("model.width=0",): "model.width: got 0.0; allowed: a multiplier > 0",
    ("norm.layers=[0]",): "norm.layers: got [0]",
    ("norm=group", "model.width=0.25"): "norm.groups: 8 does not divide stage1's width 4",
    ("norm.zero_init_residual=true", "norm.scale=false"): "norm.zero_init_residual: with norm.placement=pre it zeroes each block's last gamma",
    ("model=mlp", "norm.placement=preact"): "norm.placement: preact (norm -> act -> layer) orders residual blocks, and model=mlp has none",
    ("model=cnn", "norm.zero_init_residual=true"): "norm.zero_init_residual: model=cnn has no residual blocks",
}


@pytest.mark.parametrize("overrides", list(REFUSED), ids=lambda o: " ".join(o))
def test_bad_resnet_configs_are_refused_naming_the_key(overrides):
    base = ["model=resnet", "data=synthetic", "data.shape=[1,8,8]"] if overrides != ("model=resnet",) else []
    with pytest.raises(ConfigError) as e:
        validate(compose([*base, *overrides]))
    assert REFUSED[overrides] in str(e.value)


def test_a_bad_resnet_config_is_exit_2_with_one_line_and_no_run_dir(tmp_path):
    result = run_inprocess(["train", "model=resnet", "data=synthetic", "data.shape=[1,8,8]", "model.depth=12", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "model.depth: got 12; allowed: 6n+2" in line
    assert not (tmp_path / "run").exists()


TINY_IMAGES = ["data=synthetic", "data.shape=[3,8,8]", "data.n_train=256", "data.n_test=64", "train.batch_size=32", "train.steps=4",
               "train.log_every=2", "train.eval_every=4", "train.probe_size=32", "train.progress=false", "train.device=cpu"]


def test_layer_names_in_tensorboard_tags_are_the_stable_module_paths(tmp_path):
    cfg = compose(["model=resnet", "model.depth=8", "model.width=0.25", "norm.placement=preact", *TINY_IMAGES])
    train(cfg, tmp_path, summary=False)
    tags = set(load_scalars(tmp_path))
    for layer in ("stem.conv", "stage1.block0.norm1", "stage1.block0.conv1", "stage3.block0.conv2", "final.norm", "output"):
        assert f"grad_norm/{layer}" in tags and f"weight_norm/{layer}" in tags, layer
    for act in ("stage1.block0.act1", "stage2.block0.act2", "final.act"):
        assert {f"act/{act}/p15", f"act/{act}/p50", f"act/{act}/p85", f"act/{act}/unit0/p50"} <= tags, act


@pytest.mark.slow
def test_resnet_placement_preset_trains_each_placement_at_smoke_size(tmp_path):
    from tests.test_presets import SMOKE

    root = mnist_root("fashion-mnist")
    cfg = compose(["experiment=resnet_placement", f"data.root={root}"])
    assert (cfg.model.kind, cfg.model.depth, cfg.data.name.value, cfg.optim.schedule.value) == ("resnet", 8, "fashion_mnist", "step")
    sweep = ["sweep", "experiment=resnet_placement", "seed=0", *SMOKE, "model.width=0.25", "train.eval_batch_size=500",
             f"data.root={root}", "hydra.sweep.dir=sw"]
    result = run_inprocess(sweep, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sw").rglob("metrics.json"))]
    assert len(records) == 4 and all(r["status"] == "completed" and 0 <= r["final"]["test/acc"] <= 1 for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["resnet_placement", "vgg_bn"])
def test_every_point_of_the_new_presets_grids_is_a_valid_config(preset):
    from tests.test_presets import data_overrides, grid

    points = grid(preset)  # without the seed axis: seeds change no shape or check
    assert len(points) == 4
    for point in points:
        cfg = compose([f"experiment={preset}", *point, *data_overrides(preset)])
        validate(cfg)
        assert build_model(cfg.model, cfg.norm, (1, 28, 28), 10)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
