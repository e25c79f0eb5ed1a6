"""optim.train_only=norm (Frankle, Schwab & Morcos 2021, "Training BatchNorm and
Only BatchNorm"): gamma and beta train, every other weight stays at its random
initialization, and no gradient is computed for it."""

from __future__ import annotations

from pathlib import Path

import torch

from bnexp.data import load
from bnexp.schema import compose
from bnexp.train import Run

TINY = ["data=synthetic", "data.n_train=640", "model.hidden=[16,16]", "train.batch_size=32", "train.progress=false", "train.device=cpu"]


def trained(overrides: list[str], steps: int = 5) -> tuple[Run, dict[str, torch.Tensor]]:
    cfg = compose([*TINY, *overrides])
    device = torch.device("cpu")
    torch.manual_seed(0)
    run = Run(cfg, Path("unused"), device, load(cfg.data, device), steps)
    init = {k: v.clone() for k, v in run.model.state_dict().items()}
    for _ in range(steps):
        idx = run.sampler.next()
        run.train_step.step(run.data.x_train[idx], run.data.y_train[idx])
    return run, init


def test_bn_only_training_moves_gamma_and_beta_and_nothing_else():
    run, init = trained(["optim.train_only=norm"])
    for name, p in run.model.named_parameters():
        if ".norm." in name:
            assert p.requires_grad and not torch.equal(p.detach(), init[name]), name
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p.detach(), init[name]), name
    trainable = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for n, p in run.model.named_parameters() if ".norm." in n}
    assert set(run.probes.probes["param_norms"].names) == {"hidden0.norm", "hidden1.norm"}


def test_default_trains_every_parameter():
    run, init = trained([])
    assert all(p.requires_grad and not torch.equal(p.detach(), init[n]) for n, p in run.model.named_parameters())
