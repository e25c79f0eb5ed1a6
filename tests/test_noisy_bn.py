"""norm.noise: Santurkar et al. 2018's noisy BatchNorm (Algorithm 1). Its draws
over many steps and examples have the distributions the algorithm names, it
sits right after each norm (on the pre-activation without one), and it is off
in eval mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from bnexp.config import NormConfig, Placement
from bnexp.models import build_model
from bnexp.models.cnn import CNNConfig
from bnexp.models.mlp import MLPConfig
from bnexp.norms import BatchNoise

N_MU, N_SIGMA, R_MU, R_SIGMA = 0.5, 1.25, 0.1, 0.1  # the paper's values


def test_noise_draws_follow_algorithm_1_over_many_steps_and_examples():
    torch.manual_seed(0)
    noise = BatchNoise(N_MU, N_SIGMA, R_MU, R_SIGMA).train()
    steps, n, units = 400, 2000, 4
    # Half the batch is 0 (output m) and half 1 (output s + m): per step and unit
    # the means estimate mu_j and sigma_j + mu_j, the spreads r_mu / sqrt(3) and sqrt(r_sigma^2 + r_mu^2 / 3).
    x = torch.cat([torch.zeros(n, units), torch.ones(n, units)])
    mu, sigma, spread_m, spread_sm = [], [], [], []
    for _ in range(steps):
        y = noise(x).double()
        m, sm = y[:n], y[n:]
        assert (m - m.mean(0)).abs().max() <= R_MU + 0.01  # m ~ U(mu - r_mu, mu + r_mu); the mean estimates mu to ~0.002
        mu.append(m.mean(0))
        sigma.append(sm.mean(0) - m.mean(0))
        spread_m.append(m.std(0))
        spread_sm.append(sm.std(0))
    mu, sigma = torch.stack(mu).flatten().numpy(), torch.stack(sigma).flatten().numpy()
    assert mu.min() > -N_MU - 0.01 and mu.max() < N_MU + 0.01
    assert sigma.min() > 1 - 0.01 and sigma.max() < N_SIGMA + 0.01
    # mu ~ U(-n_mu, n_mu), sigma ~ U(1, n_sigma), a new draw per step and unit (1600 draws each)
    assert stats.kstest(mu, stats.uniform(-N_MU, 2 * N_MU).cdf).pvalue > 1e-3
    assert stats.kstest(sigma, stats.uniform(1, N_SIGMA - 1).cdf).pvalue > 1e-3
    assert abs(np.corrcoef(mu[:-units], mu[units:])[0, 1]) < 0.1  # independent across steps
    assert float(torch.stack(spread_m).mean()) == pytest.approx(R_MU / np.sqrt(3), rel=0.02)
    assert float(torch.stack(spread_sm).mean()) == pytest.approx(np.sqrt(R_SIGMA**2 + R_MU**2 / 3), rel=0.02)


def test_noise_is_the_identity_in_eval_mode():
    x = torch.randn(16, 3)
    assert torch.equal(BatchNoise(N_MU, N_SIGMA, R_MU, R_SIGMA).eval()(x), x)


def test_in_conv_layers_height_and_width_count_as_batch():
    torch.manual_seed(0)
    y = BatchNoise(N_MU, N_SIGMA, R_MU, R_SIGMA).train()(torch.zeros(8, 3, 32, 32))
    # One mu per channel for the step, a fresh m at every position of every example.
    per_channel = y.mean((0, 2, 3))
    assert (y - per_channel.view(1, 3, 1, 1)).abs().max() <= R_MU + 0.01
    assert float(y[0, 0].std()) == pytest.approx(R_MU / np.sqrt(3), rel=0.1)
    assert per_channel.std() > 0.05  # channels draw their own mu


@pytest.mark.parametrize("placement, order", [
    (Placement.pre, ["linear", "norm", "noise", "act"]),
    (Placement.post, ["linear", "act", "norm", "noise"]),
    (Placement.none, ["linear", "noise", "act"]),
])
def test_noise_goes_right_after_the_norm_or_on_the_pre_activation_without_one(placement, order):
    model = build_model(MLPConfig(hidden=[8, 8, 8]), NormConfig(placement=placement, noise=True, layers=[0, 2]), (4,), 3)
    assert list(dict(model.hidden0.named_children())) == order
    assert "noise" not in dict(model.hidden1.named_children())  # norm.layers names the noisy blocks too
    assert list(dict(model.hidden2.named_children())) == order


def test_cnn_blocks_get_the_noise_after_their_norm_and_before_the_pool():
    model = build_model(CNNConfig(hidden=[4, 4]), NormConfig(noise=True), (1, 16, 16), 3)
    assert list(dict(model.hidden0.named_children())) == ["conv", "norm", "noise", "act", "pool"]


def test_without_norm_noise_the_model_has_no_noise_module():
    model = build_model(MLPConfig(hidden=[8]), NormConfig(), (4,), 3)
    assert not any(isinstance(m, BatchNoise) for m in model.modules())
