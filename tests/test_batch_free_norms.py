"""FRN with its TLU, EvoNorm-S0 and EvoNorm-B0 (norm=frn, evonorm_s0, evonorm_b0)
against float64 NumPy versions of their papers' equations (forward; backward by
finite differences for one case), batch-size independence of the batch-free
ones, where the TLU replaces the activation, B0's running statistics (train and
eval modes, PreciseBN, synchronized over ranks), and each trains as stacked
replicas that equal their standalone runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bnexp.models import build_model
from bnexp.norms import make_norm
from bnexp.norms.evonorm_b0 import EvoNormB0
from bnexp.norms.frn import TLU, FilterResponseNorm
from bnexp.norms.sync import synchronized
from bnexp.schema import compose
from tests.test_norm_registry import assert_synchronized_over_ranks_as_one_process
from tests.test_replicas import CNN, assert_trains_like_standalone, configs, train_both

# ----------------------------------------------------------------- the papers' equations in NumPy


def per_channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, *[1] * (x.ndim - 2))


def frn_ref(x, gamma, beta, eps, tau=None):
    """Singh & Krishnan 2020, Eq. 1-3 (and the TLU, Eq. 4), per example and channel over positions."""
    nu2 = (x**2).mean(axis=tuple(range(2, x.ndim)), keepdims=True) if x.ndim > 2 else x**2
    y = per_channel(gamma, x) * x / np.sqrt(nu2 + eps) + per_channel(beta, x)
    return y if tau is None else np.maximum(y, per_channel(tau, x))


def s0_ref(x, v, gamma, beta, groups, eps):
    """Liu et al. 2020, Table 1: x * sigmoid(v x) / s_{w,h,c/g}(x) * gamma + beta."""
    g = x.reshape(x.shape[0], groups, -1)
    std = np.broadcast_to(np.sqrt(g.var(axis=2, keepdims=True) + eps), g.shape).reshape(x.shape)
    return x / (1 + np.exp(-per_channel(v, x) * x)) / std * per_channel(gamma, x) + per_channel(beta, x)


def b0_ref(x, v, gamma, beta, eps, batch_var=None):
    """Liu et al. 2020, Table 1: x / max(s_{b,w,h}(x), v x + s_{w,h}(x)) * gamma + beta."""
    spatial = tuple(range(2, x.ndim))
    var_b = x.var(axis=(0, *spatial)) if batch_var is None else batch_var
    var_i = x.var(axis=spatial, keepdims=True) if spatial else 0.0
    denom = np.maximum(np.sqrt(per_channel(var_b, x) + eps), per_channel(v, x) * x + np.sqrt(var_i + eps))
    return x / denom * per_channel(gamma, x) + per_channel(beta, x)


def layer(kind: str, channels: int, spatial_dims: int, **keys) -> nn.Module:
    """The norm as a user's config builds it, in float64, with random (not initial) parameters."""
    m = make_norm(compose([f"norm={kind}", "norm.groups=2", *[f"norm.{k}={v}" for k, v in keys.items()]]).norm, channels, spatial_dims)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if p.numel() > 1 else 0.0))
    return m.double()


def params(m: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in m.named_parameters()}


SHAPES = {0: (16, 4), 1: (8, 4, 5), 2: (6, 4, 3, 5)}


def inputs(spatial_dims: int, seed: int = 0) -> torch.Tensor:
    # Mean away from 0 and channels of unequal scale: what a norm is for.
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[spatial_dims]
    return 0.7 + torch.randn(shape, generator=gen, dtype=torch.float64) * torch.arange(1, shape[1] + 1, dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_frn_and_its_tlu_are_the_papers_equations(spatial_dims):
    m, x = layer("frn", 4, spatial_dims, eps=1e-3), inputs(spatial_dims)
    p = params(m)
    np.testing.assert_allclose(m(x).detach().numpy(), frn_ref(x.numpy(), p["weight"], p["bias"], 1e-3), rtol=1e-12, atol=1e-12)
    tlu = TLU(4).double()
    with torch.no_grad():
        tlu.tau.copy_(torch.tensor([-0.5, 0.0, 0.3, 1.0]))
    np.testing.assert_allclose(tlu(m(x)).detach().numpy(), frn_ref(x.numpy(), p["weight"], p["bias"], 1e-3, tlu.tau.detach().numpy()),
                               rtol=1e-12, atol=1e-12)


def test_frn_with_a_learned_eps_starts_as_with_the_fixed_one_and_learns_its_absolute_value():
    fixed, learned, x = layer("frn", 4, 0, eps=1e-2), layer("frn", 4, 0, eps=1e-2, learn_eps="true"), inputs(0)
    with torch.no_grad():
        learned.weight.copy_(fixed.weight)
        learned.bias.copy_(fixed.bias)
        learned.learned_eps.fill_(-1e-2)  # |eps_l|: the sign is free
    torch.testing.assert_close(learned(x), fixed(x), rtol=1e-12, atol=1e-12)
    learned(x).square().sum().backward()
    assert learned.learned_eps.grad is not None and learned.learned_eps.grad.abs().item() > 0


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_evonorm_s0_is_the_papers_equation(spatial_dims):
    m, x = layer("evonorm_s0", 4, spatial_dims, eps=1e-3), inputs(spatial_dims)
    p = params(m)
    np.testing.assert_allclose(m(x).detach().numpy(), s0_ref(x.numpy(), p["v"], p["weight"], p["bias"], 2, 1e-3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_evonorm_b0_is_the_papers_equation_with_batch_statistics_in_training_and_running_ones_in_eval(spatial_dims):
    m, x = layer("evonorm_b0", 4, spatial_dims, eps=1e-3, momentum=0.25), inputs(spatial_dims)
    p, xn = params(m), x.numpy()
    np.testing.assert_allclose(m(x).detach().numpy(), b0_ref(xn, p["v"], p["weight"], p["bias"], 1e-3), rtol=1e-12, atol=1e-12)
    n = xn.size // xn.shape[1]
    want_rv = 0.75 * 1.0 + 0.25 * xn.var(axis=(0, *range(2, xn.ndim))) * n / (n - 1)  # torch's rule: towards the unbiased variance
    np.testing.assert_allclose(m.running_var.numpy(), want_rv, rtol=1e-12)
    m.eval()
    x2 = inputs(spatial_dims, seed=1)
    np.testing.assert_allclose(m(x2).detach().numpy(), b0_ref(x2.numpy(), p["v"], p["weight"], p["bias"], 1e-3, batch_var=want_rv),
                               rtol=1e-12, atol=1e-12)


def test_evonorm_b0s_backward_is_the_finite_differences_of_the_papers_equation():
    m, x = layer("evonorm_b0", 4, 2, eps=1e-3), inputs(2).requires_grad_()
    p = params(m)
    w = np.random.default_rng(0).standard_normal(x.shape)  # a random linear loss: sum(w * y)
    (torch.from_numpy(w) * m(x)).sum().backward()

    def loss(xn, v):
        return (w * b0_ref(xn, v, p["weight"], p["bias"], 1e-3)).sum()

    xn, h = x.detach().numpy(), 1e-6
    fd_x = np.zeros_like(xn)
    for i in np.ndindex(xn.shape):
        d = np.zeros_like(xn)
        d[i] = h
        fd_x[i] = (loss(xn + d, p["v"]) - loss(xn - d, p["v"])) / (2 * h)
    fd_v = np.array([(loss(xn, p["v"] + h * e) - loss(xn, p["v"] - h * e)) / (2 * h) for e in np.eye(4)])
    np.testing.assert_allclose(x.grad.numpy(), fd_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.v.grad.numpy(), fd_v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["frn", "evonorm_s0"])
def test_a_batch_free_norm_gives_each_example_the_same_output_at_batch_2_as_at_batch_32(kind):
    m = layer(kind, 4, 2)
    x = inputs(2).repeat(6, 1, 1, 1)[:32]
    torch.testing.assert_close(m(x[:2]), m(x)[:2], rtol=0, atol=1e-13)
    b0 = layer("evonorm_b0", 4, 2)  # the batch-statistics one does not: the comparison can fail
    assert not torch.allclose(b0(x[:2]), b0(x)[:2])


# ----------------------------------------------------------------- where the TLU goes


def modules(overrides: list[str]) -> dict[str, type]:
    cfg = compose(["data=fashion_mnist", *overrides])
    shape = (1, 28, 28) if cfg.model.kind != "mlp" else (20,)
    return {name: type(m) for name, m in build_model(cfg.model, cfg.norm, shape, 10).named_modules()}


def test_frns_tlu_and_the_evonorms_replace_the_activation_that_takes_their_output_directly_and_only_that_one():
    pre = modules(["norm=frn", "model.hidden=[8,8]"])
    assert pre["hidden0.norm"] is FilterResponseNorm and pre["hidden0.act"] is TLU and pre["hidden1.act"] is TLU
    assert list(pre)[list(pre).index("hidden0.norm") + 1] == "hidden0.act"
    post = modules(["norm=frn", "norm.placement=post", "model.hidden=[8,8]"])
    assert post["hidden0.act"] is nn.ReLU and post["hidden0.norm"] is FilterResponseNorm
    resnet = modules(["model=resnet", "model.depth=8", "norm=frn"])
    assert resnet["stem.act"] is TLU and resnet["stage1.block0.act1"] is TLU and resnet["stage1.block0.act2"] is nn.ReLU  # after (+)
    preact = modules(["model=resnet", "model.depth=8", "norm=frn", "norm.placement=preact"])
    assert preact["stage2.block0.act1"] is TLU and preact["stage2.block0.act2"] is TLU and preact["final.act"] is TLU
    assert modules(["model=resnet", "model.depth=8", "norm=frn", "norm.placement=post"])["stage1.block0.act1"] is nn.ReLU
    assert modules(["norm=batch", "model.hidden=[8]"])["hidden0.act"] is nn.ReLU
    for evonorm in ("evonorm_s0", "evonorm_b0"):  # a normalization-activation layer: nothing after it but where post puts the act
        assert modules([f"norm={evonorm}", "norm.groups=4", "model.hidden=[8]"])["hidden0.act"] is nn.Identity
        assert modules([f"norm={evonorm}", "norm.groups=4", "model.hidden=[8]", "norm.placement=post"])["hidden0.act"] is nn.ReLU
    # norm.layers: an unnormalized layer keeps the model's activation
    some = modules(["norm=frn", "model.hidden=[8,8,8]", "norm.layers=[1]"])
    assert "hidden0.norm" not in some and some["hidden0.act"] is nn.ReLU and some["hidden1.act"] is TLU and some["hidden2.act"] is nn.ReLU
    cnn = modules(["model=cnn", "model.hidden=[8,8]", "norm=evonorm_b0", "norm.groups=4", "norm.layers=[0]"])
    assert cnn["hidden0.norm"] is EvoNormB0 and cnn["hidden0.act"] is nn.Identity and cnn["hidden1.act"] is nn.ReLU


def test_batch_free_norms_keep_the_bias_of_the_layer_before_them():
    for kind in ("frn", "evonorm_s0", "evonorm_b0"):
        cfg = compose(["data=synthetic", f"norm={kind}", "model.hidden=[8]"])
        assert build_model(cfg.model, cfg.norm, (4,), 3).hidden0.linear.bias is not None, kind  # no mean is subtracted


# ----------------------------------------------------------------- B0's running statistics


def test_evonorm_b0_gets_precise_bn_and_is_synchronized_by_its_twin():
    from bnexp.probes.bn_gap import batch_indices, recompute_bn_stats
    from bnexp.sync_norms import _twin

    torch.manual_seed(0)
    cfg = compose(["norm=evonorm_b0", "model.hidden=[6]"])
    model = build_model(cfg.model, cfg.norm, (4,), 3)
    x = torch.randn(100, 4) * 3 + 1
    assert recompute_bn_stats(model, x, batches=5, batch_size=16, seed=3, step=40) == 1
    w, b = model.hidden0.linear.weight.detach().double().numpy(), model.hidden0.linear.bias.detach().double().numpy()
    pooled = np.concatenate([x.double().numpy()[i] @ w.T + b for i in batch_indices(100, 5, 16, seed=3, step=40)])
    np.testing.assert_allclose(model.hidden0.norm.running_var.double().numpy(), pooled.var(0, ddof=1), rtol=1e-5)
    assert type(_twin(model.hidden0.norm, 4, 2, cuda=False)) is synchronized(EvoNormB0)


@pytest.mark.slow  # two gloo processes: ~4 s on the loaded box
def test_evonorm_b0_synchronized_over_two_ranks_is_one_process_on_the_whole_batch(tmp_path):
    assert_synchronized_over_ranks_as_one_process(tmp_path, lambda: layer("evonorm_b0", 4, 2).train(), inputs(2).repeat(2, 1, 1, 1))


# ----------------------------------------------------------------- stacked replicas


@pytest.mark.slow  # 2.5 s idle: the fast subset has the WS CNN's stack (tests/test_weight_std.py)
def test_frn_with_its_tlu_and_a_learned_eps_trains_stacked_replicas_like_their_standalone_runs(tmp_path):
    train_both(tmp_path, configs([*CNN, "norm=frn", "norm.learn_eps=true", "train.steps=30"]))
    assert_trains_like_standalone(tmp_path)


# Over an MLP's [N, C] FRN is x / sqrt(x^2 + eps), with a slope of 1 / sqrt(eps) at 0: at
# the paper's eps 1e-6 two fp32 computations of one run part at once (tests/test_replicas.py
# says why that rules out any 1e-5 comparison), so the MLP cases take eps 1. With a learned eps
# (one scalar summing every unit's gradient) the stack and the standalone run still part
# chaotically: 1.5e-7 (relative) after 1 step, 2.9e-7 after 20, 2.8e-5 after 50; it trains 20.
# B0 after a ReLU (post) the same way: the stack's fp32 sums part from the standalone run's by
# 1-2e-7 at step 1 and 2e-6 at step 30, then one replica's weights jump to 1e-2 by step 50 (a
# discrete switch, B0's max() or a ReLU, flipping in that replica; not traced further); it trains 20.
@pytest.mark.slow
@pytest.mark.parametrize("case", [
    ["norm=frn", "norm.placement=post", "model.activation=tanh", "norm.eps=1"],
    ["norm=frn", "norm.learn_eps=true", "norm.eps=1", "train.steps=20", "train.eval_every=10"],
    [*CNN, "norm=evonorm_s0", "norm.groups=2"],
    ["norm=evonorm_b0"],
    [*CNN, "norm=evonorm_b0", "norm.placement=post", "train.steps=20", "train.eval_every=10"],
], ids=lambda case: " ".join(case).replace("model=cnn model.hidden=[8,8] data.shape=[3,8,8] model.activation=tanh", "cnn"))
def test_each_batch_free_norm_trains_each_replica_like_its_standalone_run(tmp_path, case):
    train_both(tmp_path, configs(case))
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow  # one in-process sweep of 4 jobs
def test_the_vectorized_launcher_stacks_the_batch_free_norms_seeds(tmp_path):
    from tests.conftest import TINY, run_inprocess

    out = run_inprocess(["sweep", *TINY, "model.activation=tanh", "norm=frn,evonorm_b0", "seed=0,1",
                         "hydra/launcher=vectorized", "hydra.sweep.dir=sw"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Launching 4 jobs: 2 stacks of replicas (2, 2), 0 alone" in out.stdout
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sw").glob("*/metrics.json"))]
    assert len(records) == 4 and all(r["status"] == "completed" and r["replica"]["of"] == 2 for r in records)
