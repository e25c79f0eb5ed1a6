"""Normalizer-free baselines and gradient clipping: Fixup's zeros and scales at
init (Zhang et al. 2019), SkipInit's network at init is the network without its
branches (De & Smith 2020), ``optim.clip=norm`` is torch's clip_grad_norm_,
``optim.clip=agc`` leaves every unit's gradient-to-weight ratio at most lambda
(Brock et al. 2021b), per replica in a stack, and every name runs from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp.clip import Leaf, clip_agc, clip_norm, leaves_of
from bnexp.models import build_model
from bnexp.models.resnet import BasicBlock, ZeroPadShortcut
from bnexp.runs import load_scalars
from bnexp.schema import compose
from tests.conftest import TINY, run_inprocess
from tests.test_replicas import assert_trains_like_standalone, configs, train_both

IMAGES = ["data=synthetic", "data.shape=[1,8,8]", "model=resnet", "model.depth=14"]
RESNET_TINY = [*(o for o in TINY if not o.startswith("model.hidden")), "data.shape=[1,8,8]", "model=resnet", "model.depth=8"]


def resnet(*overrides: str) -> nn.Module:
    cfg = compose([*IMAGES, *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.norm, (1, 8, 8), 10)


def branch_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What each block's branch adds to its shortcut, for the input the block gets in the network."""
    outs = []

    def hook(block, inputs, _):
        outs.append(block.residual(inputs[0])[1])

    handles = [b.register_forward_hook(hook) for b in model.blocks()]
    model(x)
    for h in handles:
        h.remove()
    return outs


def test_fixup_starts_with_every_branch_and_the_classifier_at_exactly_zero_and_scales_conv1_by_the_depth():
    model = resnet("norm.placement=none", "model.init=fixup", "model.width=4")
    outs = branch_outputs(model, torch.randn(4, 1, 8, 8))
    assert len(outs) == 6 and all(torch.count_nonzero(o) == 0 for o in outs)
    assert torch.count_nonzero(model.output.weight) == 0 and torch.count_nonzero(model.output.bias) == 0
    assert all(getattr(m, "bias", None) is None for m in model.modules() if isinstance(m, nn.Conv2d))  # scalar biases instead
    block = model.stage3.block1  # 256 x 256 x 3 x 3 weights: He-normal over fan-out, times L^(-1/2) with L = 6 branches
    want = math.sqrt(2 / (256 * 9)) / math.sqrt(6)
    assert block.conv1.weight.std().item() == pytest.approx(want, rel=0.02)
    assert [n for n, _ in block.named_children()][:8] == ["bias1a", "conv1", "bias1b", "act1", "bias2a", "conv2", "scale", "bias2b"]


def test_fixups_scalar_biases_multipliers_and_classifier_bias_train_at_a_tenth_of_the_learning_rate_as_in_its_reference_code():
    from bnexp.step import make_optimizer

    cfg = compose([*IMAGES, "norm.placement=none", "model.init=fixup", "model.skipinit=true", "optim.lr=0.2"])
    model = build_model(cfg.model, cfg.norm, (1, 8, 8), 10)
    main, scalars = make_optimizer(cfg.optim, model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert main["lr"] == 0.2 and scalars["lr"] == pytest.approx(0.02)
    assert sorted(names[id(p)].rsplit(".", 1)[0].rsplit(".", 1)[-1] for p in scalars["params"]) == sorted(
        ["bias1a", "bias1b", "bias2a", "scale", "bias2b"] * 6 + ["bias", "bias", "output"])  # each block's, the stem's, the head's
    assert {id(model.output.bias)} <= set(map(id, scalars["params"])) and {id(model.output.weight)} <= set(map(id, main["params"]))  # by name, as the reference
    assert any(names[id(p)].endswith("skip.weight") for p in main["params"])  # SkipInit's gates train at optim.lr


def test_skipinit_at_init_is_the_network_with_its_residual_branches_removed():
    for placement in ("none", "pre"):
        model = resnet(f"norm.placement={placement}", "model.skipinit=true").eval()
        x = torch.randn(4, 1, 8, 8)
        h = model.stem(x)
        for block in model.blocks():  # each block without its branch: shortcut, then what follows the addition
            h = block.shortcut(h)
            for m in block._after:
                h = m(h)
        assert torch.equal(model(x), model.output(model.head(h))), placement
        assert all(b.skip.weight.item() == 0 and b.skip.weight.requires_grad for b in model.blocks())


def test_fixup_and_skipinit_are_refused_where_they_do_not_apply_with_one_line(tmp_path):
    for overrides, line in [
        (["model.init=fixup"], "error: model.init: fixup rescales residual branches, and model=mlp has none; allowed: default, normal, "
                               "kaiming, xavier (or model=resnet)"),
        (["model.skipinit=true", "model=cnn"], "error: model.skipinit: model=cnn has no residual branches to scale; allowed: false (or model=resnet)"),
        (["model.init=fixup"], "error: model.init: fixup is the init of a network without norms, and norm.placement=pre; "
                                            "allowed: model.init=fixup with norm.placement=none"),
    ]:
        out = run_inprocess(["train", *(RESNET_TINY if "error: model.init: fixup is the" in line else TINY), *overrides], tmp_path)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [line]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- clipping


def grads_of(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    F.cross_entropy(model(torch.randn(16, 1, 8, 8, generator=gen) * 5), torch.randint(0, 10, (16,), generator=gen)).backward()


def test_norm_clipping_is_torchs_clip_grad_norm():
    for max_norm in (1e-3, 0.5, 1e6):
        model, reference = resnet(), resnet()
        grads_of(model), grads_of(reference)
        clip_norm(leaves_of(model), max_norm)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def unit_ratios(p: torch.Tensor) -> torch.Tensor:
    """||G_i|| / max(||W_i||, 1e-3) per unit: rows of a weight matrix / output channels, a vector as one unit (float64)."""
    w, g = p.detach().double(), p.grad.double()
    if p.dim() <= 1:
        return g.norm().view(1) / w.norm().clamp(min=1e-3)
    return g.flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1).clamp(min=1e-3)


def test_adaptive_clipping_leaves_every_units_gradient_to_weight_ratio_at_most_lambda_and_the_classifier_alone():
    lam = 0.01
    model = resnet("norm.placement=none", "model.init=fixup")  # each conv2 at zero: the 1e-3 floor
    with torch.no_grad():
        model.output.weight.normal_()  # else no gradient reaches the blocks
    grads_of(model)
    before = {n: (p.grad.clone(), unit_ratios(p)) for n, p in model.named_parameters()}
    clip_agc(leaves_of(model), lam)
    clipped = 0
    for name, p in model.named_parameters():
        grad, ratio = before[name]
        if name.startswith("output."):
            assert torch.equal(p.grad, grad), name  # not clipped (Brock et al. 2021b, Sec. 4.1)
            continue
        after = unit_ratios(p)
        assert (after <= lam + 1e-6).all(), name
        over = ratio > lam
        clipped += int(over.sum())
        torch.testing.assert_close(after[over], torch.full_like(after[over], lam), rtol=1e-5, atol=0)  # scaled down to lambda
        if p.dim() > 1:
            assert torch.equal(p.grad[~over], grad[~over]), name  # units under the threshold keep their gradient bit for bit
    assert clipped > 10


def test_clipping_works_on_a_stacks_per_replica_views_as_on_each_replica_alone():
    models = [resnet(), resnet()]
    with torch.no_grad():
        for p in models[1].parameters():
            p.mul_(3)
    for r, m in enumerate(models):
        grads_of(m, seed=r)
    stacked = [Leaf(n, nn.Parameter(torch.stack([dict(m.named_parameters())[n].detach() for m in models])), tuple(p.shape))
               for n, p in models[0].named_parameters()]
    for leaf in stacked:
        leaf.param.grad = torch.stack([dict(m.named_parameters())[leaf.name].grad for m in models])
    for fn, value in ((clip_agc, 0.01), (clip_norm, 0.1)):
        alone = [{n: p.grad.clone() for n, p in m.named_parameters()} for m in models]
        for m in models:
            fn(leaves_of(m), value)
        fn(stacked, value)
        for r, m in enumerate(models):
            for leaf in stacked:
                torch.testing.assert_close(leaf.param.grad[r], dict(m.named_parameters())[leaf.name].grad, rtol=1e-6, atol=1e-12)
            assert any(not torch.equal(a, p.grad) for a, p in zip(alone[r].values(), m.parameters()))  # it clipped


@pytest.mark.parametrize("clip", [["optim.clip=norm", "optim.clip_value=0.05"],
                                  pytest.param(["optim.clip=agc", "optim.clip_value=0.001"], marks=pytest.mark.slow)], ids=["norm", "agc"])
def test_clipped_replicas_train_like_their_standalone_runs(tmp_path, clip):
    train_both(tmp_path, configs([*clip, "train.steps=30"], [[f"optim.lr={lr}"] for lr in (0.05, 0.1, 0.2, 0.4)]))
    assert_trains_like_standalone(tmp_path)
    if clip[0] == "optim.clip=norm":  # the logged gradient norm is the clipped one
        assert all(v <= 0.05 + 1e-6 for _, v in load_scalars(tmp_path / "replica0")["grad_norm/total"])


# ----------------------------------------------------------------- the command line


@pytest.mark.parametrize("overrides, tags", [
    ([*RESNET_TINY, "norm.placement=none", "model.init=fixup", "optim.clip=agc", "probes.signal.every=10"],
     ["signal/stage1.block0/stable_rank", "grad_norm/stage1.block0.scale"]),
    ([*RESNET_TINY, "model.skipinit=true", "norm=frn", "norm.placement=preact", "norm.weight_std=scaled",
      "optim.clip=norm", "optim.clip_value=0.5", "model.dropout=0.2"], ["grad_norm/stage1.block0.skip", "grad_norm/stage1.block0.act1"]),
    (["norm=evonorm_b0", "model.dropout=0.5", "model.dropout_position=before_norm", "probes.var_shift.every=10",
      "train.precise_bn=2", "probes.bn_gap.every=15", "probes.bn_gap.batches=3"],  # B0 is a batch-statistics norm to both
     ["var_shift/hidden0.norm", "bn_gap/val_loss_ema", "bn_gap/val_loss_precise", "bn_gap/val_loss_batch"]),
    (["norm=evonorm_s0", "norm.groups=4", "norm.weight_std=true", "model.dropout=0.3", "model.dropout_position=after_norm"],
     ["grad_norm/hidden0.norm"]),
], ids=["fixup agc signal", "skipinit frn scaled ws clip dropout", "b0 dropout var_shift precise_bn bn_gap", "s0 ws dropout"])
def test_every_new_name_trains_from_the_command_line(tmp_path, overrides, tags):
    out = run_inprocess(["train", *(TINY if "model=resnet" not in overrides else []), *overrides, "hydra.run.dir=run"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    logged = load_scalars(tmp_path / "run")
    assert set(tags) <= logged.keys()
