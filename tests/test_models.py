import pytest
import torch
from torch import nn

from bnexp.config import compose
from bnexp.models import build_model


def block_children(model, i):
    return [name for name, _ in getattr(model, f"hidden{i}").named_children()]


def build(overrides, input_shape=(40,), classes=10):
    cfg = compose(overrides)
    return build_model(cfg.model, cfg.norm, input_shape, classes)


def test_pre_placement_puts_norm_between_layer_and_activation():
    model = build(["norm.placement=pre", "model.hidden=[8,8]"])
    for i in range(2):
        assert block_children(model, i) == ["linear", "norm", "act"]
        assert isinstance(model.get_submodule(f"hidden{i}.norm"), nn.BatchNorm1d)


def test_post_placement_puts_norm_after_activation():
    model = build(["norm.placement=post", "model.hidden=[8,8]"])
    assert block_children(model, 0) == ["linear", "act", "norm"]


def test_none_placement_has_no_norm_layers():
    model = build(["norm.placement=none", "model.hidden=[8,8,8]"])
    assert all(block_children(model, i) == ["linear", "act"] for i in range(3))
    assert not any("norm" in name for name, _ in model.named_modules())


def test_norm_layers_selects_hidden_blocks():
    model = build(["norm.layers=[1]", "model.hidden=[16,32]", "norm.placement=post"])
    assert block_children(model, 0) == ["linear", "act"]
    assert block_children(model, 1) == ["linear", "act", "norm"]


def test_output_layer_never_gets_a_norm():
    model = build(["model.hidden=[8]"])
    assert isinstance(model.output, nn.Linear)
    assert [n for n, _ in model.named_children()] == ["stem", "hidden0", "head", "output"]


def test_layer_followed_by_batch_norm_drops_its_bias():
    pre = build(["norm.placement=pre", "model.hidden=[8,8]"])
    post = build(["norm.placement=post", "model.hidden=[8,8]"])
    layer = build(["norm=layer", "norm.placement=pre", "model.hidden=[8,8]"])
    assert pre.hidden0.linear.bias is None
    assert post.hidden0.linear.bias is not None  # the activation sits between them
    assert layer.hidden0.linear.bias is not None  # layer norm centres per example, not per feature


def test_cnn_uses_conv2d_for_images_and_conv1d_for_signals():
    img = build(["model=cnn", "model.hidden=[4,8]"], input_shape=(1, 28, 28))
    sig = build(["model=cnn", "model.hidden=[4,8]"], input_shape=(1, 40))
    assert isinstance(img.hidden0.conv, nn.Conv2d) and isinstance(img.hidden0.norm, nn.BatchNorm2d)
    assert isinstance(sig.hidden0.conv, nn.Conv1d) and isinstance(sig.hidden0.norm, nn.BatchNorm1d)
    assert img(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert sig(torch.randn(4, 1, 40)).shape == (4, 10)
    assert block_children(img, 0) == ["conv", "norm", "act", "pool"]


def test_normal_init_uses_init_std():
    model = build(["model.init=normal", "model.init_std=0.01", "model.hidden=[200]"], input_shape=(400,))
    assert model.hidden0.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_activation_option_builds_that_nonlinearity():
    model = build(["model.activation=sigmoid", "model.hidden=[8]"])
    assert isinstance(model.hidden0.act, nn.Sigmoid)
