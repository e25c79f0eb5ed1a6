"""Measurements taken on a model without changing it: gradient and weight norms,
activation percentiles. The training loop calls these on logging and eval steps
only; each returns ``{tag: value}`` with values still on the device, so one
host transfer per logging step carries everything (see :func:`to_host`).

Future probes (loss-landscape smoothness, gradient predictiveness, internal
covariate shift; Santurkar et al. 2018) belong here with the same shape:
a function of (model, batch) returning tagged tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bnexp.models import Net, activation_modules, parameterized_layers

PERCENTILES = (15, 50, 85)  # Ioffe & Szegedy 2015, Fig. 1(b, c)
# Percentiles are exact over up to this many values, else taken on a fixed
# random sample of this many (the same positions at every eval, so curves stay
# smooth; rank error ~0.15 percentile points). A conv layer's input on the
# 256-image probe batch has ~8M values, and sorting them cost ~1 s on CPU at
# every eval; an MLP's (256 x 100) is below the limit and stays exact.
MAX_VALUES = 1 << 16


class LayerNorms:
    """Per-layer L2 norms of gradients and weights.

    On the device, one fused ``_foreach_norm`` over every gradient and weight
    (:meth:`__call__`); the per-layer and total norms are combined on the host
    from the per-parameter ones (:meth:`tags`), so a logging step launches two
    kernels here instead of ~10. (The logging step's code runs once every
    ``log_every`` steps with cold caches: on a 2-core CPU each extra op cost
    ~15 us there, ~1% of the BN-paper MLP's time at ``log_every=50``.)
    """

    def __init__(self, model: nn.Module):
        layers = parameterized_layers(model)
        self.names = list(layers)
        self.params = [p for ps in layers.values() for p in ps]
        self.owner = [i for i, ps in enumerate(layers.values()) for _ in ps]  # parameter -> its layer
        self._with_grad: list[int] = []

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """Norms of the gradients that exist (a parameter unused this step has none
        and adds nothing to its layer), then of every weight; a 1-D tensor on the device."""
        self._with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        return torch.stack(torch._foreach_norm([self.params[i].grad for i in self._with_grad] + self.params)).float()

    def tags(self, norms: list[float]) -> dict[str, float]:
        """``grad_norm/<layer>``, ``grad_norm/total`` and ``weight_norm/<layer>`` from
        the host copy of :meth:`__call__`'s tensor (per layer: sqrt of the summed squares)."""
        grad_sq, weight_sq = [0.0] * len(self.names), [0.0] * len(self.names)
        n = len(self._with_grad)
        for i, v in zip(self._with_grad, norms[:n]):
            grad_sq[self.owner[i]] += v * v
        for i, v in enumerate(norms[n:]):
            weight_sq[self.owner[i]] += v * v
        out = {f"grad_norm/{name}": math.sqrt(sq) for name, sq in zip(self.names, grad_sq)}
        out["grad_norm/total"] = math.sqrt(sum(grad_sq))
        out.update({f"weight_norm/{name}": math.sqrt(sq) for name, sq in zip(self.names, weight_sq)})
        return out


class ActivationProbe:
    """Percentiles of each hidden nonlinearity's input on a fixed probe batch.

    The BN paper's Fig. 1(b, c) follows the 15th/50th/85th percentile of one
    sigmoid's input over training. We log them over all units of each hidden
    layer (``act/<layer>/pNN``) and for unit 0 alone (``act/<layer>/unit0/pNN``)
    as the paper does. The probe runs the model in eval mode, the network a
    user would deploy at that step.
    """

    def __init__(self, model: Net, probe_x: torch.Tensor):
        self.model, self.x = model, probe_x
        self.acts = activation_modules(model)
        self.q = torch.tensor([p / 100 for p in PERCENTILES], device=probe_x.device)
        self._picks: dict[str, torch.Tensor] = {}

    def _values(self, key: str, a: torch.Tensor) -> torch.Tensor:
        """``a`` flattened, or the same fixed random MAX_VALUES of its values at every call."""
        flat = a.flatten()
        if flat.numel() <= MAX_VALUES:
            return flat
        if key not in self._picks:
            gen = torch.Generator().manual_seed(len(self._picks))
            self._picks[key] = torch.randint(flat.numel(), (MAX_VALUES,), generator=gen).to(flat.device)
        return flat[self._picks[key]]

    @torch.inference_mode()
    def __call__(self) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            module.register_forward_pre_hook(lambda _m, inp, name=name: captured.__setitem__(name, inp[0].detach()))
            for name, module in self.acts.items()
        ]
        was_training = self.model.training
        try:
            self.model.eval()
            self.model(self.x)
        finally:
            self.model.train(was_training)
            for h in hooks:
                h.remove()
        out: dict[str, torch.Tensor] = {}
        for name, a in captured.items():
            a = a.float()
            everything = quantiles(self._values(name, a), self.q)
            unit0 = quantiles(self._values(f"{name}/unit0", a[:, 0]), self.q)
            for p, v, u in zip(PERCENTILES, everything, unit0):
                out[f"act/{name}/p{p}"] = v
                out[f"act/{name}/unit0/p{p}"] = u
        return out


def quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1-D tensor. On CPU
    the sort goes through NumPy: ~40 us for 25,600 values, where torch.sort
    took ~2 ms here, three times per eval step."""
    if values.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(values.numpy()))
    else:
        ordered = values.sort().values
    pos = q * (len(ordered) - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def to_host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device->host copy for a dict of scalar tensors."""
    if not values:
        return {}
    with torch.no_grad():  # 0-d float32 tensors (most of them) go into the stack as they are
        parts = [v if v.dtype == torch.float32 and v.dim() == 0 else v.float().reshape(()) for v in values.values()]
        return dict(zip(values, torch.stack(parts).cpu().tolist()))
