import numpy as np
import pytest
import torch
from torch import nn

from bnexp.config import NormConfig
from bnexp.norms import BatchRenorm, GhostBatchNorm, make_norm
from bnexp.schema import compose


def norm_of(kind, width=8, spatial=0, **options):
    return make_norm(NormConfig(kind=kind, **options), width, spatial)


@pytest.mark.parametrize("kind", ["batch", "ghost_batch", "batch_renorm", "layer", "group"])
@pytest.mark.parametrize("spatial", [0, 1, 2])
def test_each_norm_kind_normalizes_in_train_mode_and_runs_in_eval_mode(kind, spatial):
    torch.manual_seed(0)
    norm = norm_of(kind, 16, spatial, virtual_batch_size=16, groups=4)
    x = 3 + 5 * torch.randn(32, 16, *([6] * spatial))
    y = norm.train()(x)
    assert y.shape == x.shape
    if kind in ("batch", "ghost_batch", "batch_renorm"):
        dims = [0] + list(range(2, x.dim()))
        # batch renorm's first step: running stats (0, 1) differ, r/d clipping keeps it near BN's output
        if kind != "batch_renorm":
            assert torch.allclose(y.mean(dims), torch.zeros(16), atol=1e-4)
    else:
        assert torch.allclose(y.reshape(32, -1).mean(1), torch.zeros(32), atol=1e-4)
    z = norm.eval()(x[:5])
    assert z.shape == x[:5].shape and torch.isfinite(z).all()


def test_batch_norm_eval_mode_uses_running_statistics():
    norm = norm_of("batch", 4)
    x = torch.randn(64, 4) * 2 + 1
    for _ in range(200):
        norm.train()(x)
    out = norm.eval()(x)
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=0.05)


def test_ghost_batch_norm_with_virtual_size_equal_to_batch_equals_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(32, 6, 5)
    ghost, bn = GhostBatchNorm(6, virtual_batch_size=32, momentum=0.1), nn.BatchNorm1d(6, momentum=0.1)
    assert torch.allclose(ghost.train()(x), bn.train()(x), atol=1e-5)
    assert torch.allclose(ghost.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(ghost.running_var, bn.running_var, atol=1e-6)
    assert torch.allclose(ghost.eval()(x), bn.eval()(x), atol=1e-5)


def test_ghost_batch_norm_normalizes_each_virtual_batch_separately():
    x = torch.cat([torch.randn(4, 3), 10 + 3 * torch.randn(4, 3)])
    y = GhostBatchNorm(3, virtual_batch_size=4).train()(x)
    for chunk_in, chunk_out in ((x[:4], y[:4]), (x[4:], y[4:])):
        expected = (chunk_in - chunk_in.mean(0)) / torch.sqrt(chunk_in.var(0, unbiased=False) + 1e-5)
        assert torch.allclose(chunk_out, expected, atol=1e-5)


def test_batch_renorm_with_rmax_1_and_dmax_0_equals_batch_norm_in_training():
    torch.manual_seed(1)
    renorm, bn = BatchRenorm(5, rmax=1.0, dmax=0.0), nn.BatchNorm1d(5)
    for _ in range(3):
        x = 2 + 3 * torch.randn(16, 5)
        assert torch.allclose(renorm.train()(x), bn.train()(x), atol=1e-5)
    assert torch.allclose(renorm.running_mean, bn.running_mean, atol=1e-6)


def test_batch_renorm_corrects_towards_running_statistics_by_hand_computed_r_and_d():
    renorm = BatchRenorm(1, rmax=3.0, dmax=5.0, eps=0.0)
    renorm.running_mean.fill_(1.0)
    renorm.running_std.fill_(2.0)  # sigma
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])  # mu_B = 3, sigma_B = sqrt(5)
    sigma_b = 5 ** 0.5
    r, d = sigma_b / 2, (3 - 1) / 2
    expected = (x - 3) / sigma_b * r + d
    assert torch.allclose(renorm.train()(x), expected, atol=1e-6)
    # Algorithm 1's moving averages, of the mean and of the standard deviation sigma_B
    assert torch.allclose(renorm.running_mean, torch.tensor([0.9 * 1 + 0.1 * 3]))
    assert torch.allclose(renorm.running_std, torch.tensor([0.9 * 2 + 0.1 * sigma_b]))


# ---------------------------------------------------------------- float64 NumPy references


def drifting_batches(steps: int, batch: int, channels: int, spatial: int, seed: int = 0) -> list[np.ndarray]:
    """Batches [batch, C, *spatial] whose per-channel mean and scale wander, so that
    batch renorm's r and d are clipped at some steps and not at others."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        loc = 2.0 * np.sin(t / 17 + np.arange(channels))
        scale = np.exp(0.8 * np.sin(t / 23 + 2 * np.arange(channels)))
        shape = (batch, channels, *([3] * spatial))
        out.append(loc.reshape(1, -1, *([1] * spatial)) + scale.reshape(1, -1, *([1] * spatial)) * rng.standard_normal(shape))
    return out


def channels_last(x: np.ndarray) -> np.ndarray:
    """[N, C, ...] -> [N * ..., C]: the values each channel's statistics are over."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def per_channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, *([1] * (x.ndim - 2)))


def renorm_algorithm_1(batches, gamma, beta, momentum, eps, rmax, dmax):
    """Ioffe 2017, Algorithm 1, in float64: outputs, final mu and sigma, and how often r or d were clipped."""
    mu, sigma = np.zeros(len(gamma)), np.ones(len(gamma))
    outs, clipped, free = [], 0, 0
    for x in batches:
        flat = channels_last(x)
        mu_b = flat.mean(0)
        sigma_b = np.sqrt(((flat - mu_b) ** 2).mean(0) + eps)
        r_raw, d_raw = sigma_b / sigma, (mu_b - mu) / sigma
        r, d = np.clip(r_raw, 1 / rmax, rmax), np.clip(d_raw, -dmax, dmax)
        clipped += int(np.sum((r != r_raw) | (d != d_raw)))
        free += int(np.sum((r == r_raw) & (d == d_raw)))
        x_hat = (x - per_channel(mu_b, x)) / per_channel(sigma_b, x) * per_channel(r, x) + per_channel(d, x)
        outs.append(per_channel(gamma, x) * x_hat + per_channel(beta, x))
        mu = mu + momentum * (mu_b - mu)
        sigma = sigma + momentum * (sigma_b - sigma)
    return outs, mu, sigma, clipped, free


@pytest.mark.parametrize("spatial", [0, 2])
def test_batch_renorm_follows_ioffe_2017_algorithm_1_over_300_steps_at_batch_10(spatial):
    channels, momentum, eps, rmax, dmax = 4, 0.1, 1e-3, 1.5, 0.5
    batches = drifting_batches(300, 10, channels, spatial)
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)
    ref_outs, mu, sigma, clipped, free = renorm_algorithm_1(batches, gamma, beta, momentum, eps, rmax, dmax)
    assert clipped > 50 and free > 50  # both branches of the clips are exercised

    renorm = BatchRenorm(channels, rmax=rmax, dmax=dmax, eps=eps, momentum=momentum).train()
    with torch.no_grad():
        renorm.weight.copy_(torch.from_numpy(gamma))
        renorm.bias.copy_(torch.from_numpy(beta))
    for step, (x, expected) in enumerate(zip(batches, ref_outs)):
        out = renorm(torch.from_numpy(x).float()).detach().double().numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=f"training output at step {step}")
    np.testing.assert_allclose(renorm.running_mean.double().numpy(), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(renorm.running_std.double().numpy(), sigma, rtol=1e-5, atol=1e-6)

    x = drifting_batches(1, 7, channels, spatial, seed=2)[0]
    expected = per_channel(gamma, x) * (x - per_channel(mu, x)) / per_channel(sigma, x) + per_channel(beta, x)
    np.testing.assert_allclose(renorm.eval()(torch.from_numpy(x).float()).detach().double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_batch_renorm_keeps_r_and_d_out_of_backprop():
    # With r and d constants, y = gamma * (x_hat * r + d) + beta backpropagates as BN does, times r:
    # dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma_B with g = dL/dy * gamma * r (per channel).
    renorm = BatchRenorm(3, rmax=3.0, dmax=5.0, eps=1e-3).double()
    with torch.no_grad():
        renorm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        renorm.running_std.copy_(torch.tensor([2.0, 0.7, 1.3], dtype=torch.float64))
        renorm.weight.copy_(torch.tensor([1.5, 0.5, -2.0], dtype=torch.float64))
    rng = np.random.default_rng(3)
    x_np, up = rng.normal(1.0, 1.5, (10, 3)), rng.normal(size=(10, 3))
    mu_b, sigma_b = x_np.mean(0), np.sqrt(x_np.var(0) + 1e-3)
    r = np.clip(sigma_b / np.array([2.0, 0.7, 1.3]), 1 / 3, 3)
    x_hat = (x_np - mu_b) / sigma_b
    g = up * np.array([1.5, 0.5, -2.0]) * r
    expected = (g - g.mean(0) - x_hat * (g * x_hat).mean(0)) / sigma_b

    x = torch.tensor(x_np, dtype=torch.float64, requires_grad=True)
    renorm.train()(x).backward(torch.from_numpy(up))
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


def batch_norm_reference(batches, momentum, eps, unbiased, virtual_batch=None):
    """torch.nn.BatchNorm's running statistics in float64, with the unbiased batch
    variance (PyTorch) or the biased one (Keras); per virtual batch for ghost BN."""
    channels = batches[0].shape[1]
    mean, var = np.zeros(channels), np.ones(channels)
    outs = []
    for x in batches:
        chunks = np.split(x, len(x) // (virtual_batch or len(x)))
        stats = [(channels_last(c).mean(0), channels_last(c).var(0), len(channels_last(c))) for c in chunks]
        outs.append(np.concatenate([(c - per_channel(m, c)) / np.sqrt(per_channel(v, c) + eps) for c, (m, v, _) in zip(chunks, stats)]))
        batch_mean = np.mean([m for m, _, _ in stats], 0)
        batch_var = np.mean([v * n / (n - 1) if unbiased else v for _, v, n in stats], 0)
        mean = (1 - momentum) * mean + momentum * batch_mean
        var = (1 - momentum) * var + momentum * batch_var
    return outs, mean, var


@pytest.mark.parametrize("rule", ["unbiased", "biased"])
@pytest.mark.parametrize("kind, spatial", [("batch", 0), ("batch", 2), ("ghost_batch", 0), ("ghost_batch", 1)])
def test_running_var_rule_matches_its_float64_reference_over_200_steps(kind, spatial, rule):
    channels, momentum, eps, virtual = 3, 0.01, 1e-3, (5 if kind == "ghost_batch" else None)
    norm = norm_of(kind, channels, spatial, running_var=rule, momentum=momentum, eps=eps, virtual_batch_size=5).train()
    batches = drifting_batches(200, 10, channels, spatial)
    ref_outs, mean, var = batch_norm_reference(batches, momentum, eps, unbiased=rule == "unbiased", virtual_batch=virtual)
    for step, (x, expected) in enumerate(zip(batches, ref_outs)):
        out = norm(torch.from_numpy(x).float()).detach().double().numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=f"training output at step {step}")
    np.testing.assert_allclose(norm.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    x = batches[-1]
    expected = (x - per_channel(mean, x)) / np.sqrt(per_channel(var, x) + eps)
    np.testing.assert_allclose(norm.eval()(torch.from_numpy(x).float()).detach().double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_seed_keras_preset_moves_running_var_towards_the_biased_batch_variance_as_keras_does():
    from bnexp.models import build_model

    cfg = compose(["experiment=seed_keras"])
    model = build_model(cfg.model, cfg.norm, (1,), 2)
    norm = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = 1 + 2 * torch.randn(cfg.train.batch_size, norm.num_features, dtype=torch.float64)
    norm.double().train()(x)
    m = cfg.norm.momentum
    assert torch.allclose(norm.running_var, (1 - m) + m * x.var(0, unbiased=False), rtol=1e-12)


def test_center_false_and_scale_false_remove_beta_and_gamma():
    norm = norm_of("batch", 4, 0, center=False, scale=False)
    assert norm.weight is None and norm.bias is None
    assert list(norm.parameters()) == []


def test_gamma_and_beta_init_set_the_affine_parameters():
    norm = norm_of("batch", 4, 0, gamma_init=0.5, beta_init=0.25)
    assert torch.all(norm.weight == 0.5) and torch.all(norm.bias == 0.25)


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    norm = norm_of("batch", 3, 0, track_running_stats=False)
    x = 5 + torch.randn(20, 3)
    assert torch.allclose(norm.eval()(x).mean(0), torch.zeros(3), atol=1e-4)


def test_momentum_follows_pytorch_convention():
    norm = norm_of("batch", 2, 0, momentum=0.25)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    norm.train()(x)
    assert torch.allclose(norm.running_mean, 0.25 * x.mean(0))


@pytest.mark.parametrize("spatial", [0, 2])
def test_biased_running_var_trains_the_same_weights_as_torch_batch_norm(spatial):
    # The rule changes only what running_var averages: the batch is normalized with
    # the same statistics, so gradients, and hence the trained weights, are the same.
    nets = {}
    for rule in ("unbiased", "biased"):
        torch.manual_seed(0)
        conv_or_linear = nn.Conv2d(3, 4, 3, padding=1) if spatial else nn.Linear(5, 4)
        nets[rule] = nn.Sequential(conv_or_linear, norm_of("batch", 4, spatial, running_var=rule), nn.ReLU())
    opts = {rule: torch.optim.SGD(net.parameters(), lr=0.1) for rule, net in nets.items()}
    torch.manual_seed(1)
    for _ in range(20):
        x = torch.randn(8, 3, 6, 6) if spatial else torch.randn(8, 5)
        for rule, net in nets.items():
            opts[rule].zero_grad()
            net.train()(x).square().mean().backward()
            opts[rule].step()
    for (name, a), (_, b) in zip(nets["unbiased"][0].named_parameters(), nets["biased"][0].named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    unbiased_rv, biased_rv = nets["unbiased"][1].running_var, nets["biased"][1].running_var
    assert not torch.allclose(unbiased_rv, biased_rv)
