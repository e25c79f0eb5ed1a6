"""Vectorized replicas (bnexp.replicas): R runs trained as one stacked model give
each replica the weights, losses and probe values of its standalone run, keep
diverging replicas from touching the others, and leave checkpoints that a
standalone `bnexp resume` continues.

The reference is the standalone run itself (bnexp.train.train on the same
config). "Within 1e-5 relative" is per tensor: max |stacked - standalone| <=
1e-5 * max |standalone|. The networks use smooth activations (the BN paper's
sigmoid, tanh): with ReLU, a unit whose input lies within fp32 rounding of 0
takes the other branch in one of two correct computations that round
differently (a batched matmul and a single one), and from then on the two runs
drift apart chaotically (seen: a 1e-3 difference in one CNN replica of four
after 20 steps), as any two fp32 implementations of the same run would. For the
same reason the configs are well-conditioned: group norm has groups of 8
channels here; with groups of 4 at lr 0.1 a standalone run whose initial
weights are perturbed by 1e-7 (relative) ends 2e-5 to 2e-3 away from the
unperturbed one after 50 steps, which no comparison at 1e-5 can survive.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnexp.models import build_model
from bnexp.models.stacked import NotStackable, StackedNet
from bnexp.replicas import ReplicaJob, ReplicasInterrupted, stacks_of, train_replicas
from bnexp.runs import load_scalars
from bnexp.schema import compose
from bnexp.train import train
from tests.conftest import Forwards

TINY = ["data=synthetic", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]", "train.steps=50",
        "train.log_every=10", "train.eval_every=25", "train.batch_size=32", "train.progress=false", "train.device=cpu",
        "model.activation=sigmoid", "probes.activations.every=25"]
CNN = ["model=cnn", "model.hidden=[8,8]", "data.shape=[3,8,8]", "model.activation=tanh"]
R = 4


def quietly(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def configs(overrides: list[str], per_replica: list[list[str]] | None = None) -> list:
    per_replica = per_replica or [[] for _ in range(R)]
    return [compose([*TINY, *overrides, f"seed={r}", *extra]) for r, extra in enumerate(per_replica)]


def train_both(tmp: Path, cfgs: list) -> list:
    for r, cfg in enumerate(cfgs):
        quietly(train, cfg, tmp / f"alone{r}")
    return quietly(train_replicas, [ReplicaJob(cfg, tmp / f"replica{r}") for r, cfg in enumerate(cfgs)])


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_close_tensors(got: dict, want: dict, rel: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {k}"
        if w.is_floating_point():
            assert (g - w).abs().max() <= rel * w.abs().max(), f"{what} {k}: {(g - w).abs().max()} vs max {w.abs().max()}"
        else:
            assert torch.equal(g, w), f"{what} {k}"


def assert_trains_like_standalone(tmp: Path, replicas=range(R), trained_layer: str = "output") -> None:
    """tmp/replica<r> holds what tmp/alone<r> holds: status, weights, optimizer state, sampler, every logged value."""
    for r in replicas:
        alone, replica = tmp / f"alone{r}", tmp / f"replica{r}"
        assert json.loads((replica / "metrics.json").read_text())["status"] == "completed"
        want, got = checkpoint(alone), checkpoint(replica)
        assert_close_tensors(got["model"], want["model"], 1e-5, f"replica {r} weights")
        for i, st in want["optimizer"]["state"].items():
            assert_close_tensors(got["optimizer"]["state"][i], st, 1e-4, f"replica {r} optimizer state {i}")
        assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        assert got["sampler"]["pos"] == want["sampler"]["pos"] and torch.equal(got["sampler"]["perm"], want["sampler"]["perm"])
        a, b = load_scalars(alone), load_scalars(replica)
        tags = {t for t in a if not t.startswith("time/")}
        assert tags == {t for t in b if not t.startswith("time/")} and "train/loss" in tags and "grad_norm/total" in tags
        assert "act/hidden1/p50" in tags and f"weight_norm/{trained_layer}" in tags
        for tag in tags:
            assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
            for (_, va), (_, vb) in zip(a[tag], b[tag]):
                tol = 1e-5 if tag == "train/loss" else 1e-4 * max(1.0, abs(va))  # probes: norms, percentiles, accuracies
                assert abs(va - vb) <= tol, f"replica {r} {tag}: {vb} vs standalone {va}"


# Fast: the BN-paper MLP's case with different learning rates, and the CNN.
def test_replicas_with_different_lrs_train_the_weights_losses_and_probe_values_of_their_standalone_runs(tmp_path):
    records = train_both(tmp_path, configs(["norm.placement=pre"], [[f"optim.lr={lr}"] for lr in (0.05, 0.1, 0.2, 0.4)]))
    assert [rec["replica"] for rec in records] == [{"index": r, "of": R} for r in range(R)]
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow
def test_cnn_replicas_with_grouped_convolutions_train_like_their_standalone_runs(tmp_path):
    train_both(tmp_path, configs([*CNN, "norm.placement=pre"]))
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    ["norm.placement=post"],
    ["norm.placement=none"],
    [*CNN, "norm.placement=post"],
    [*CNN, "norm.placement=none"],
    ["norm=ghost_batch", "norm.virtual_batch_size=8"],
    [*CNN, "norm=ghost_batch", "norm.virtual_batch_size=8"],
    ["norm=batch_renorm", "norm.rmax=1.5", "norm.dmax=0.5"],
    [*CNN, "norm=batch_renorm"],
    ["norm=layer", "norm.placement=post"],
    [*CNN, "norm=layer"],
    ["norm=group", "norm.groups=2"],
    [*CNN, "norm=group", "norm.groups=2"],
    ["norm.layers=[1]", "norm.center=false"],
    ["norm.scale=false", "norm.track_running_stats=false"],
    ["norm.running_var=biased"],
    # Each replica's own crops and flips (data.augment), from its own generator.
    [*CNN, "norm=ghost_batch", "norm.virtual_batch_size=8", "norm.running_var=biased", "data.augment=crop_flip"],
], ids=lambda case: " ".join(case).replace("model=cnn model.hidden=[8,8] data.shape=[3,8,8] model.activation=tanh", "cnn"))
def test_every_norm_kind_placement_and_family_trains_each_replica_like_its_standalone_run(tmp_path, case):
    train_both(tmp_path, configs(case))
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("common, per_replica", [
    (["optim=adam"], [["optim.lr=1e-3"], ["optim.lr=3e-3"], ["optim.lr=1e-2"], ["optim.lr=3e-2"]]),
    (["optim=adamw"], [["optim.weight_decay=0"], ["optim.weight_decay=0.01"], ["optim.weight_decay=0.1"], ["optim.lr=0.01"]]),
    (["optim=adam", "optim.weight_decay=0.01"], None),
    (["optim.nesterov=true"], [["optim.momentum=0"], ["optim.momentum=0.5"], ["optim.momentum=0.9"], ["optim.weight_decay=0.01"]]),
    (["optim.schedule=cosine", "optim.warmup_steps=5"], [["optim.lr=0.05"], ["optim.lr=0.1"], [], ["optim.lr=0.3"]]),
    ([], [["norm.momentum=0.01"], ["norm.momentum=0.01"], ["norm.momentum=0.5", "norm.eps=1e-3"], ["norm.eps=1e-2"]]),
    (["model.init=normal"], [["model.init_std=0.01"], ["model.init_std=0.1"], ["model.init_std=0.3"], ["model.init_std=1.0"]]),
], ids=["adam lrs", "adamw decays", "adam l2", "sgd momenta", "cosine", "norm momenta and eps", "init std"])
def test_per_replica_optimizer_and_norm_scalars_train_each_replica_like_its_standalone_run(tmp_path, common, per_replica):
    cfgs = configs(common, per_replica)
    records = train_both(tmp_path, cfgs)
    # The stack puts replicas that share norm.eps and norm.momentum next to each other.
    order = sorted(range(R), key=lambda r: (cfgs[r].norm.eps, cfgs[r].norm.momentum))
    assert [records[r]["replica"] for r in order] == [{"index": i, "of": R} for i in range(R)]
    assert_trains_like_standalone(tmp_path)


def test_a_stack_of_one_replica_trains_like_its_standalone_run(tmp_path):
    cfg = configs(["norm.placement=pre"])[0]
    quietly(train, cfg, tmp_path / "alone0")
    [record] = quietly(train_replicas, [ReplicaJob(cfg, tmp_path / "replica0")])
    assert record["replica"] == {"index": 0, "of": 1}
    assert_trains_like_standalone(tmp_path, replicas=[0])


def test_a_diverging_replica_is_marked_diverged_at_its_own_step_and_the_others_train_on_untouched(tmp_path):
    # No norm and a huge lr for replica 1: its weights overflow at once.
    records = train_both(tmp_path, configs(["norm.placement=none", "model.activation=identity"], [[], ["optim.lr=1e30"], [], []]))
    alone = json.loads((tmp_path / "alone1" / "metrics.json").read_text())
    assert alone["status"] == records[1]["status"] == "diverged"
    assert records[1]["diverged"] == alone["diverged"] and records[1]["steps"] == alone["steps"] < 50
    assert not (tmp_path / "replica1" / "checkpoint.pt").exists() and not (tmp_path / "alone1" / "checkpoint.pt").exists()
    assert all(math.isfinite(v) for r in (0, 2, 3) for v in records[r]["final"].values())
    assert_trains_like_standalone(tmp_path, replicas=(0, 2, 3))


@pytest.mark.slow
def test_stacks_group_jobs_that_differ_only_in_seed_and_shape_free_scalars_and_whose_network_folds(monkeypatch):
    base = ["data=synthetic", "train.device=cpu"]
    jobs = [
        [*base, "seed=0"], [*base, "seed=1", "optim.lr=0.3"], [*base, "norm.placement=none"],  # 0, 1 | 2
        [*base, "seed=2", "norm.momentum=0.5", "norm.eps=1e-3", "model.init_std=0.1", "optim.weight_decay=0.1", "optim.momentum=0"],
        [*base, "model=cnn"], [*base, "model=cnn", "seed=1"], [*base, "train.amp=bf16"], [*base, "train.steps=7"],
        [*base, "seed=3"], [*base, "seed=4"],
        # ResNet's network has no fold rule (found by folding it): 10 | 11. In one process norm.sync=true
        # leaves the norms as they are, so those two stack: 12, 13.
        *([*base, "data.shape=[3,8,8]", "model=resnet", f"seed={s}"] for s in (0, 1)), *([*base, "norm.sync=true", f"seed={s}"] for s in (0, 1)),
    ]
    cfgs = [compose(j) for j in jobs]
    no_fold = {"the stacked model has no fold rule for ResNet (only bnexp.models.blocks.Net networks fold)": 2}
    assert stacks_of(cfgs, 16) == ([[0, 1, 3, 8, 9], [2], [4, 5], [6], [7], [10], [11], [12, 13]], no_fold)
    assert stacks_of(cfgs, 2) == ([[0, 1], [3, 8], [9], [2], [4, 5], [6], [7], [10], [11], [12, 13]], no_fold)
    assert stacks_of([cfgs[0], None, cfgs[1]], 16) == ([[0, 2], [1]], {})  # None: a job that must run alone (hydra.job.chdir)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a process of a data-parallel run (torchrun): its ranks share each job
    assert stacks_of(cfgs[:2], 16) == ([[0], [1]], {"under torchrun: the ranks of a data-parallel run share each job": 2})


def test_seeds_whose_network_has_a_part_without_a_fold_rule_are_not_stacked_and_the_reason_names_the_part():
    # Noisy BN draws its noise inside the forward pass from the process's generator: folded, R replicas would share one stream.
    cfgs = [compose(["data=synthetic", "train.device=cpu", "norm.noise=true", f"seed={s}"]) for s in (0, 1)]
    assert stacks_of(cfgs, 16) == ([[0], [1]], {"the stacked model has no fold rule for hidden0.noise (BatchNoise)": 2})

def test_seeds_with_dropout_are_not_stacked_and_the_reason_names_the_dropout_layer():
    # Each replica draws its own masks from its own generator alone; folded, R replicas would share one stream.
    cfgs = [compose(["data=synthetic", "train.device=cpu", "model.dropout=0.1", f"seed={s}"]) for s in (0, 1)]
    assert stacks_of(cfgs, 16) == ([[0], [1]], {"the stacked model has no fold rule for head.dropout (Dropout)": 2})


def test_a_conv_subclass_with_its_own_forward_is_not_folded_as_a_plain_conv():
    class StdConv2d(nn.Conv2d):  # weight standardization (Qiao et al. 2019): the same parameters, another forward
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return self._conv_forward(x, w, self.bias)

    cfg = compose([*TINY, *CNN])
    nets = [build_model(cfg.model, cfg.norm, (3, 8, 8), 10) for _ in range(2)]
    StackedNet(nets)  # plain convs fold
    for net in nets:
        conv = net.hidden1.conv
        net.hidden1.conv = StdConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=conv.bias is not None)
    with pytest.raises(NotStackable, match=r"^hidden1\.conv \(StdConv2d\)$"):
        StackedNet(nets)


# What the landscape probes, PreciseBN, BN-only training and the deep linear net's mse loss do to
# one run's model and optimizer, they do to each replica's own parts inside the stack.
@pytest.mark.parametrize("case", [
    pytest.param(["probes.ics.every=10", "probes.landscape.every=25", "probes.hessian.every=25", "probes.bn_gap.every=25",
                  "probes.bn_gap.batches=3"], marks=pytest.mark.slow),
    pytest.param(["train.precise_bn=3"], marks=pytest.mark.slow),
    ["optim.train_only=norm"],
    # Sigmoid units (TINY's), not the deep linear net's identity: with linear units every beta but the last
    # is shifted away by the next norm's mean, so its value is fp32 rounding noise, the same in no two runs.
    pytest.param(["data=linear_regression", "train.loss=mse", "optim.momentum=0", "optim.lr=0.01"], marks=pytest.mark.slow),
], ids=["landscape probes", "precise bn", "bn-only training", "mse"])
def test_replicas_with_instruments_of_one_runs_model_or_an_mse_loss_train_like_their_standalone_runs(tmp_path, case):
    train_both(tmp_path, configs(case))
    assert_trains_like_standalone(tmp_path, trained_layer="hidden1.norm" if "optim.train_only=norm" in case else "output")


@pytest.mark.slow
def test_a_replicas_checkpoint_is_standalone_and_bnexp_resume_or_a_resumed_stack_continues_it_to_its_standalone_result(
        tmp_path, register_probe):
    from bnexp.rerun import resume

    class CtrlC:  # the first replica's report at step 20 sends one SIGINT, as a Ctrl-C would
        every, read_only, sent = 20, True, []

        def __call__(self, ctx):
            if ctx.step == 20 and not self.sent:
                self.sent.append(os.kill(os.getpid(), signal.SIGINT))
            return {}

    probe = CtrlC()
    register_probe("ctrl_c", lambda setup, cfg: probe)
    # Batch renorm: its running_std (Ioffe 2017, Algorithm 1) must come back from the checkpoint into the stack.
    cfgs = configs(["train.steps=40", "norm=batch_renorm"], [[f"optim.lr={lr}"] for lr in (0.05, 0.1, 0.2, 0.4)])
    with pytest.raises(ReplicasInterrupted) as stopped:
        quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"replica{r}") for r, cfg in enumerate(cfgs)])
    assert stopped.value.step == 20 and stopped.value.resumable
    for r, cfg in enumerate(cfgs):
        quietly(train, cfg, tmp_path / f"alone{r}")
    want = checkpoint(tmp_path / "alone0")
    for r in range(R):
        ckpt = checkpoint(tmp_path / f"replica{r}")
        assert ckpt["state"]["step"] == 20 and ckpt.keys() == want.keys()
        # One replica's weights only, not the whole stack's storage.
        assert (tmp_path / f"replica{r}" / "checkpoint.pt").stat().st_size < 1.5 * (tmp_path / "alone0" / "checkpoint.pt").stat().st_size
    probe.sent.append(None)  # no more signals
    for r, cfg in enumerate(cfgs):  # what Hydra writes into a sweep job's run dir, which bnexp resume reads
        (tmp_path / f"replica{r}" / ".hydra").mkdir()
        OmegaConf.save(cfg, tmp_path / f"replica{r}" / ".hydra" / "config.yaml")
    for r in range(2):  # two alone, by bnexp resume
        assert quietly(resume, tmp_path / f"replica{r}")["steps"] == 40
    records = quietly(train_replicas, [ReplicaJob(cfgs[r], tmp_path / f"replica{r}", resume=True) for r in range(2, R)])
    assert [(rec["resumed_from"], rec["steps"], rec["replica"]) for rec in records] == [(20, 40, {"index": i, "of": 2}) for i in range(2)]
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow
def test_compiled_replicas_train_like_their_compiled_standalone_runs(tmp_path):
    train_both(tmp_path, configs(["train.compile=true"]))
    assert_trains_like_standalone(tmp_path)


@pytest.mark.slow
def test_bf16_replicas_stay_within_bf16_rounding_of_their_standalone_runs(tmp_path):
    # bf16 matmuls round to 8 bits of mantissa: a batched and a single one differ at that level.
    cfgs = configs(["train.amp=bf16"])
    for r, cfg in enumerate(cfgs):
        quietly(train, cfg, tmp_path / f"alone{r}")
    with Forwards() as stacked:
        quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"replica{r}") for r, cfg in enumerate(cfgs)])
    assert torch.bfloat16 in stacked.dtypes  # the stack really ran under autocast
    fp32 = tmp_path / "fp32"
    quietly(train, configs([])[0], fp32)  # replica 0's config without amp
    assert load_scalars(fp32)["train/loss"] != load_scalars(tmp_path / "replica0")["train/loss"]  # bf16 shows in the losses
    for r in range(R):
        assert_close_tensors(checkpoint(tmp_path / f"replica{r}")["model"], checkpoint(tmp_path / f"alone{r}")["model"], 1e-2, f"replica {r}")
        a, b = load_scalars(tmp_path / f"alone{r}")["train/loss"], load_scalars(tmp_path / f"replica{r}")["train/loss"]
        assert [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= 1e-3 for (_, x), (_, y) in zip(a, b))


@pytest.mark.slow
def test_a_probe_that_meddles_with_its_replica_leaves_the_stack_training_bit_identical(tmp_path, register_probe):
    from tests.test_core import Meddler  # a trial step, a train-mode forward, random draws, a cleared optimizer state

    cfgs = configs(["train.steps=12", "train.log_every=3", "probes.param_norms.every=1", "probes.activations.every=1"])
    quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"quiet{r}") for r, cfg in enumerate(cfgs)])
    register_probe("meddler", lambda setup, cfg: Meddler())
    quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"meddled{r}") for r, cfg in enumerate(cfgs)])
    for r in range(R):
        quiet, meddled = checkpoint(tmp_path / f"quiet{r}"), checkpoint(tmp_path / f"meddled{r}")
        assert all(torch.equal(meddled["model"][k], v) for k, v in quiet["model"].items())
        a, b = load_scalars(tmp_path / f"quiet{r}"), load_scalars(tmp_path / f"meddled{r}")
        assert b["train/loss"] == a["train/loss"] and b["grad_norm/total"] == a["grad_norm/total"] and len(b["meddler/loss"]) == 6


def assert_same_run(got_dir: Path, want_dir: Path, what: str) -> None:
    """Bit for bit: weights, buffers, optimizer state, status and every logged value but timing."""
    got, want = checkpoint(got_dir), checkpoint(want_dir)
    assert got["model"].keys() == want["model"].keys()
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), f"{what}: {k}"
    for i, st in want["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(got["optimizer"]["state"][i][k], v), f"{what}: optimizer state {i} {k}"
    a, b = load_scalars(want_dir), load_scalars(got_dir)
    tags = {t for t in a if not t.startswith("time/")}
    assert tags == {t for t in b if not t.startswith("time/")} and "train/loss" in tags
    for tag in tags:
        assert b[tag] == a[tag], f"{what}: {tag}"
    final = lambda d: {k: v for k, v in json.loads((d / "metrics.json").read_text())["final"].items() if not k.startswith("time/")}  # noqa: E731
    assert final(got_dir) == final(want_dir), what


@pytest.mark.parametrize("family", [[], CNN, ["optim.clip=norm", "optim.clip_value=0.5"], ["norm=group", "norm.groups=4"], ["norm=layer"],
                                    ["norm=evonorm_s0", "norm.groups=4"], [*CNN, "norm=group", "norm.groups=4"]],
                         ids=["mlp", "cnn", "mlp-clipped", "mlp-group", "mlp-layer", "mlp-evonorm_s0", "cnn-group"])
def test_a_replicas_numbers_are_bit_identical_in_any_stack_and_in_a_stack_of_one(tmp_path, family):
    # ReLU, where fp32 differences grow instead of fading; distinct lrs, so the replicas are not alike.
    cfgs = configs([*family, "model.activation=relu", "train.deterministic=true"], [[f"optim.lr={lr}"] for lr in (0.05, 0.1, 0.2, 0.4)])
    quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"stack{r}") for r, cfg in enumerate(cfgs)])
    quietly(train_replicas, [ReplicaJob(cfgs[r], tmp_path / f"pair{r}") for r in (1, 3)])
    for r in (0, 3):
        quietly(train_replicas, [ReplicaJob(cfgs[r], tmp_path / f"one{r}")])
    for r in (1, 3):
        assert_same_run(tmp_path / f"pair{r}", tmp_path / f"stack{r}", f"replica {r} in a stack of 2")
    for r in (0, 3):
        assert_same_run(tmp_path / f"one{r}", tmp_path / f"stack{r}", f"replica {r} alone")


def test_a_replica_resumed_alone_or_restacked_after_a_neighbour_diverged_ends_bit_identical_to_the_uninterrupted_stack(
        tmp_path, register_probe):
    from bnexp.rerun import resume

    class CtrlC:  # the first replica's report at step 20 sends one SIGINT, as a Ctrl-C would
        every, read_only, armed = 20, True, [False]

        def __call__(self, ctx):
            if ctx.step == 20 and self.armed[0]:
                self.armed[0] = False
                os.kill(os.getpid(), signal.SIGINT)
            return {}

    probe = CtrlC()
    register_probe("ctrl_c", lambda setup, cfg: probe)
    # Replica 1 diverges at once (no norm, a huge lr); the others train on.
    cfgs = configs(["train.steps=40", "norm.placement=none", "model.activation=relu", "train.deterministic=true"],
                   [[], ["optim.lr=1e30"], ["optim.lr=0.2"], ["optim.lr=0.05"]])
    quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"whole{r}") for r, cfg in enumerate(cfgs)])
    probe.armed[0] = True
    with pytest.raises(ReplicasInterrupted):
        quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"cut{r}") for r, cfg in enumerate(cfgs)])
    assert json.loads((tmp_path / "cut1" / "metrics.json").read_text())["status"] == "diverged"
    for r, cfg in enumerate(cfgs):  # what Hydra writes into a sweep job's run dir, which bnexp resume reads
        (tmp_path / f"cut{r}" / ".hydra").mkdir()
        OmegaConf.save(cfg, tmp_path / f"cut{r}" / ".hydra" / "config.yaml")
    assert quietly(resume, tmp_path / "cut0")["steps"] == 40  # alone, by bnexp resume
    # The rerun of the sweep skips the diverged replica and stacks the two left as a stack of 2.
    records = quietly(train_replicas, [ReplicaJob(cfgs[r], tmp_path / f"cut{r}", resume=True) for r in (2, 3)])
    assert sorted((rec["resumed_from"], rec["replica"]["index"], rec["replica"]["of"]) for rec in records) == [(20, 0, 2), (20, 1, 2)]
    for r in (0, 2, 3):
        assert_same_run(tmp_path / f"cut{r}", tmp_path / f"whole{r}", f"replica {r}")


def test_a_second_ctrl_c_while_a_stack_saves_its_checkpoints_leaves_no_metrics_json_ahead_of_its_checkpoint(tmp_path, monkeypatch,
                                                                                                          register_probe):
    import bnexp.checkpoint

    class CtrlC:  # the first Ctrl-C, at the first replica's report of step 20
        every, read_only, sent = 20, True, []

        def __call__(self, ctx):
            if ctx.step == 20 and not self.sent:
                self.sent.append(os.kill(os.getpid(), signal.SIGINT))
            return {}

    register_probe("ctrl_c", lambda setup, cfg: CtrlC())
    save, saved = bnexp.checkpoint.save, []

    def second_ctrl_c(path, parts, state, *args, **kwargs):  # lands while the second replica writes its step-20 checkpoint
        if state.step == 20 and len([s for s in saved if s == 20]) == 1:
            raise KeyboardInterrupt
        saved.append(state.step)
        return save(path, parts, state, *args, **kwargs)

    monkeypatch.setattr(bnexp.checkpoint, "save", second_ctrl_c)
    cfgs = configs(["train.steps=40", "train.checkpoint_every=15"])
    with pytest.raises(KeyboardInterrupt):
        quietly(train_replicas, [ReplicaJob(cfg, tmp_path / f"replica{r}") for r, cfg in enumerate(cfgs)])
    steps = [(json.loads((tmp_path / f"replica{r}" / "metrics.json").read_text())["steps"], checkpoint(tmp_path / f"replica{r}")["state"]["step"])
             for r in range(R)]
    assert steps == [(20, 20), (15, 15), (15, 15), (15, 15)]
    assert all(json.loads((tmp_path / f"replica{r}" / "metrics.json").read_text())["status"] == "interrupted" for r in range(R))
