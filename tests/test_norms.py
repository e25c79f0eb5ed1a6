import pytest
import torch
from torch import nn

from bnexp.config import NormConfig
from bnexp.norms import BatchRenorm, GhostBatchNorm, make_norm


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


def test_batch_renorm_with_rmax_1_and_dmax_0_equals_batch_norm():
    torch.manual_seed(1)
    renorm, bn = BatchRenorm(5, rmax=1.0, dmax=0.0), nn.BatchNorm1d(5)
    for _ in range(3):
        x = 2 + 3 * torch.randn(16, 5)
        assert torch.allclose(renorm.train()(x), bn.train()(x), atol=1e-5)
    assert torch.allclose(renorm.running_var, bn.running_var, atol=1e-6)
    assert torch.allclose(renorm.eval()(x), bn.eval()(x), atol=1e-5)


def test_batch_renorm_corrects_towards_running_statistics_by_hand_computed_r_and_d():
    renorm = BatchRenorm(1, rmax=3.0, dmax=5.0, eps=0.0)
    renorm.running_mean.fill_(1.0)
    renorm.running_var.fill_(4.0)  # sigma = 2
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])  # mu_B = 3, sigma_B = sqrt(5)
    sigma_b = 5 ** 0.5
    r, d = sigma_b / 2, (3 - 1) / 2
    expected = (x - 3) / sigma_b * r + d
    assert torch.allclose(renorm.train()(x), expected, atol=1e-6)


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
