"""norm.weight_std: each output unit's standardized weights have mean 0 and std 1
(Qiao et al. 2019); scaled WS gives them std gamma * g / sqrt(fan-in) with gamma
the activation's gain (recomputed here by quadrature); every family's weight
layers (not the classifier) are standardized, with any norm or none; and WS
networks train as stacked replicas that equal their standalone runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnexp.config import Activation
from bnexp.models import build_model
from bnexp.models.blocks import ACTIVATIONS
from bnexp.models.layers import GAINS, STANDARDIZED, WSConv2d, WSLinear
from bnexp.schema import compose
from tests.test_replicas import CNN, assert_trains_like_standalone, configs, train_both


def unit_stats(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    rows = w.detach().double().numpy().reshape(w.shape[0], -1)
    return rows.mean(1), rows.std(1)


@pytest.mark.parametrize("layer", [WSLinear(20, 6, True, scaled=False, gamma=1.0), WSConv2d(3, 5, 3, scaled=False, gamma=1.0)])
def test_weight_standardization_gives_each_output_unit_mean_0_and_std_1_weights(layer):
    with torch.no_grad():
        layer.weight.mul_(7).add_(torch.arange(layer.weight.shape[0]).view(-1, *[1] * (layer.weight.dim() - 1)))  # far from standard
    mean, std = unit_stats(layer.std_weight())
    np.testing.assert_allclose(mean, 0, atol=1e-6)
    np.testing.assert_allclose(std, 1, atol=1e-5)  # sqrt(var / (var + 1e-6)): 1e-6 below 1 for these weights
    x = torch.randn(4, *([20] if isinstance(layer, nn.Linear) else [3, 6, 6]))
    plain = nn.Linear(20, 6) if isinstance(layer, nn.Linear) else nn.Conv2d(3, 5, 3)
    with torch.no_grad():
        plain.weight.copy_(layer.std_weight())
        plain.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), plain(x))  # the forward is the torch layer's with the standardized weight


def test_scaled_weight_standardization_has_std_gamma_times_its_gain_over_the_root_of_the_fan_in():
    layer = WSConv2d(4, 3, 3, scaled=True, gamma=GAINS[Activation.relu])
    with torch.no_grad():
        layer.gain.copy_(torch.tensor([1.0, 2.0, 0.5]))
    mean, std = unit_stats(layer.std_weight())
    np.testing.assert_allclose(mean, 0, atol=1e-7)
    # WS divides by sqrt(var + 1e-6): 5e-5 below the exact std for these weights (var ~ 1 / (3 * 36)).
    np.testing.assert_allclose(std, GAINS[Activation.relu] * np.array([1.0, 2.0, 0.5]) / np.sqrt(4 * 9), rtol=1e-4)


@pytest.mark.parametrize("act", list(Activation))
def test_each_activations_gain_is_one_over_its_output_std_for_a_standard_normal_input(act):
    z = np.linspace(-12, 12, 2_400_001)  # E[f(z)], z ~ N(0, 1), by the trapezoid rule on a fine grid
    pdf = np.exp(-z**2 / 2) / np.sqrt(2 * np.pi)
    with torch.no_grad():
        f = ACTIVATIONS[act]()(torch.from_numpy(z)).numpy()
    m1, m2 = np.trapezoid(f * pdf, z), np.trapezoid(f**2 * pdf, z)
    assert GAINS[act] == pytest.approx(1 / np.sqrt(m2 - m1**2), rel=1e-8)


@pytest.mark.parametrize("overrides, layers", [
    (["norm=group_ws", "model.hidden=[8,16]"], ["hidden0.linear", "hidden1.linear"]),
    (["model=cnn", "norm=layer", "norm.weight_std=true", "model.hidden=[8,16]"], ["hidden0.conv", "hidden1.conv"]),
    (["model=resnet", "model.depth=8", "norm.placement=none", "norm.weight_std=scaled", "model.shortcut=projection"],
     ["stem.conv", "stage1.block0.conv1", "stage1.block0.conv2", "stage2.block0.shortcut.conv", "stage3.block0.conv2"]),
    (["model=vgg", "model.width=0.125", "norm=frn", "norm.weight_std=true"], ["stage1.block0.conv", "stage5.block1.conv"]),
])
def test_every_weight_layer_of_every_family_is_standardized_but_the_classifier(overrides, layers):
    cfg = compose(["data=fashion_mnist", *overrides])
    model = build_model(cfg.model, cfg.norm, (1, 28, 28), 10)
    found = {name for name, m in model.named_modules() if type(m) in STANDARDIZED}
    assert set(layers) <= found and type(model.output) is nn.Linear
    assert found == {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and name != "output"}
    scaled = cfg.norm.weight_std == "scaled"
    assert all(model.get_submodule(n).scaled == scaled for n in found)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_weight_standardization_is_off_by_default_and_leaves_config_hashes_alone():
    from bnexp.config import config_hash

    cfg = compose(["data=synthetic"])
    assert cfg.norm.weight_std is False and config_hash(cfg) == "cc1df50f7b333183"  # as recorded before the key existed
    model = build_model(cfg.model, cfg.norm, (32,), 10)
    assert not any(type(m) in STANDARDIZED for m in model.modules())


def test_weight_standardized_cnn_replicas_train_like_their_standalone_runs(tmp_path):
    train_both(tmp_path, configs([*CNN, "norm=group_ws", "norm.groups=1", "train.steps=30"]))  # groups of 8 channels (tests/test_replicas.py: why)
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    ["norm.weight_std=true"],
    ["norm.weight_std=scaled", "norm.placement=none"],
    [*CNN, "norm.weight_std=scaled", "norm=evonorm_s0", "norm.groups=2"],
], ids=["mlp ws", "mlp scaled ws without norms", "cnn scaled ws evonorm_s0"])
def test_weight_standardized_replicas_train_like_their_standalone_runs(tmp_path, case):
    train_both(tmp_path, configs(case))
    assert_trains_like_standalone(tmp_path)
