"""``hessian/top_eig``: the sharpness of the training loss, the Hessian's
largest-magnitude eigenvalue, by power iteration on Hessian-vector products
(PyHessian, Yao et al. 2020: ``hessian.eigenvalues``, up to 100 iterations,
stop when two estimates differ by less than ``tolerance`` relative).

On a fixed batch: the first ``probes.hessian.batch_size`` training examples,
the same at every call, so the curve follows the parameters, not the batch.
``mode=train`` (default) differentiates the loss as training sees it, each norm
normalizing with the batch's own statistics (their running statistics are
restored afterwards); PyHessian puts the model in eval mode instead, which
``mode=eval`` does (running statistics, a different function of the weights).
Also logged: ``hessian/iterations``, the power iterations it took.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from bnexp.config import ConfigError
from bnexp.probes import grads
from bnexp.probes.base import ProbeContext, ProbeSetup, register


class HessianMode(str, Enum):
    train = "train"
    eval = "eval"


@dataclass
class HessianConfig:
    every: int = 0  # steps; 0: off. Costs ~2 backward passes per iteration.
    iterations: int = 100
    tolerance: float = 1e-3
    batch_size: int = 200
    mode: HessianMode = HessianMode.train


class TopEigenvalue:
    read_only = False

    def __init__(self, model: torch.nn.Module, every: int, x: torch.Tensor, y: torch.Tensor, iterations: int, tolerance: float,
                 mode: HessianMode):
        self.every, self.x, self.y = every, x, y
        self.iterations, self.tolerance, self.mode = iterations, tolerance, mode
        self.params = grads.params(model)

    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        ctx.model.train(self.mode == HessianMode.train)
        params = self.params
        # One graph of the gradient, reused by every Hessian-vector product (as
        # PyHessian does for a single batch): one forward, one noise draw.
        _, g = grads.loss_and_grads(ctx.model, ctx.loss_fn, self.x, self.y, params, ctx.step, create_graph=True)
        # The same start vector at every call (PyHessian draws a new one).
        gen = torch.Generator().manual_seed(0)
        v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
        v_norm = grads.norm(v)
        v = [u / v_norm for u in v]
        eig, done = None, 0
        for done in range(1, self.iterations + 1):
            if not any(t.requires_grad for t in g):  # a gradient constant in the parameters: H = 0
                eig = 0.0
                break
            hv = torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True, allow_unused=True, materialize_grads=True)
            new = grads.dot(hv, v).item()
            hv_norm = grads.norm(hv)
            if hv_norm == 0:  # H v = 0: v is in the Hessian's null space, the estimate 0, and no next direction
                eig = new
                break
            v = [h / hv_norm for h in hv]
            if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < self.tolerance:
                eig = new
                break
            eig = new
        top, iterations = torch.tensor([eig, done], device=self.x.device).unbind()
        return {"hessian/top_eig": top, "hessian/iterations": iterations}


def build(setup: ProbeSetup, cfg: HessianConfig | None) -> TopEigenvalue | None:
    if cfg is None or not cfg.every:
        return None
    n = min(int(cfg.batch_size), len(setup.data.x_train))
    return TopEigenvalue(setup.model, cfg.every, setup.data.x_train[:n], setup.data.y_train[:n], int(cfg.iterations),
                         float(cfg.tolerance), HessianMode(cfg.mode))


def check(cfg) -> None:
    h = cfg.probes.hessian
    for key in ("iterations", "batch_size"):
        if h[key] < 1:
            raise ConfigError(f"probes.hessian.{key}", f"got {h[key]}; allowed: a whole number >= 1")
    if not h.tolerance > 0:
        raise ConfigError("probes.hessian.tolerance", f"got {h.tolerance}; allowed: a number > 0")


register("hessian", HessianConfig, build, check)
