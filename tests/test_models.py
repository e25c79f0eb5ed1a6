"""Model families build the layers their configs ask for, in the order the
placement asks for; modules are built directly from the family schemas."""

import pytest
import torch
from torch import nn

from bnexp.config import NormConfig, NormKind, Placement
from bnexp.models import FAMILIES, build_model
from bnexp.models.cnn import CNNConfig
from bnexp.models.mlp import MLPConfig
from bnexp.config import config_dir


def block_children(model, i):
    return [name for name, _ in getattr(model, f"hidden{i}").named_children()]


def mlp(hidden=(8, 8), input_shape=(40,), classes=10, **norm):
    return build_model(MLPConfig(hidden=list(hidden)), NormConfig(**norm), input_shape, classes)


def test_pre_placement_puts_norm_between_layer_and_activation():
    model = mlp(placement=Placement.pre)
    for i in range(2):
        assert block_children(model, i) == ["linear", "norm", "act"]
        assert isinstance(model.get_submodule(f"hidden{i}.norm"), nn.BatchNorm1d)


def test_post_placement_puts_norm_after_activation():
    assert block_children(mlp(placement=Placement.post), 0) == ["linear", "act", "norm"]


def test_none_placement_has_no_norm_layers():
    model = mlp(hidden=(8, 8, 8), placement=Placement.none)
    assert all(block_children(model, i) == ["linear", "act"] for i in range(3))
    assert not any("norm" in name for name, _ in model.named_modules())


def test_norm_layers_selects_hidden_blocks():
    model = mlp(hidden=(16, 32), layers=[1], placement=Placement.post)
    assert block_children(model, 0) == ["linear", "act"]
    assert block_children(model, 1) == ["linear", "act", "norm"]


def test_output_layer_never_gets_a_norm():
    model = mlp(hidden=(8,))
    assert isinstance(model.output, nn.Linear)
    assert [n for n, _ in model.named_children()] == ["stem", "hidden0", "head", "output"]


def test_layer_followed_by_batch_norm_drops_its_bias():
    assert mlp(placement=Placement.pre).hidden0.linear.bias is None
    assert mlp(placement=Placement.post).hidden0.linear.bias is not None  # the activation sits between them
    assert mlp(kind=NormKind.layer, placement=Placement.pre).hidden0.linear.bias is not None  # layer norm centres per example


def test_cnn_uses_conv2d_for_images_and_conv1d_for_signals_and_flat_features():
    cfg = CNNConfig(hidden=[4, 8])
    img = build_model(cfg, NormConfig(), (1, 28, 28), 10)
    sig = build_model(cfg, NormConfig(), (1, 40), 10)
    flat = build_model(cfg, NormConfig(), (40,), 10)  # flat features are one channel of a signal
    assert isinstance(img.hidden0.conv, nn.Conv2d) and isinstance(img.hidden0.norm, nn.BatchNorm2d)
    assert isinstance(sig.hidden0.conv, nn.Conv1d) and isinstance(sig.hidden0.norm, nn.BatchNorm1d)
    assert isinstance(flat.hidden0.conv, nn.Conv1d) and flat.hidden0.conv.in_channels == 1
    assert img(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert sig(torch.randn(4, 1, 40)).shape == (4, 10)
    assert flat(torch.randn(4, 40)).shape == (4, 10)
    assert block_children(img, 0) == ["conv", "norm", "act", "pool"]


def test_mlp_flattens_images_itself():
    model = mlp(input_shape=(1, 6, 6))
    assert model.hidden0.linear.in_features == 36 and model(torch.randn(3, 1, 6, 6)).shape == (3, 10)


def test_normal_init_uses_init_std():
    model = build_model(MLPConfig(hidden=[200], init="normal", init_std=0.01), NormConfig(), (400,), 10)
    assert model.hidden0.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_activation_option_builds_that_nonlinearity():
    model = build_model(MLPConfig(hidden=[8], activation="sigmoid"), NormConfig(), (40,), 10)
    assert isinstance(model.hidden0.act, nn.Sigmoid)


def test_every_registered_family_has_its_config_group_option_and_back():
    yamls = {p.stem for p in (config_dir() / "model").glob("*.yaml")}
    assert set(FAMILIES) == yamls
    for name, family in FAMILIES.items():
        assert family.schema().kind == name
