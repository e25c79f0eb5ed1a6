"""``grad_norm/<layer>``, ``grad_norm/total`` and ``weight_norm/<layer>``: L2
norms of each parameterized layer's gradients (from the step just taken) and
weights. By default on every logging step (``train.log_every``), where the loop
also uses ``grad_norm/total`` to detect divergence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bnexp.models.blocks import parameterized_layers
from bnexp.probes.base import ProbeContext, ProbeSetup, register


@dataclass
class ParamNormsConfig:
    every: Optional[int] = None  # steps; null: every train.log_every; 0: off (divergence is then told by the loss alone)


class ParamNorms:
    """One fused ``_foreach_norm`` over every gradient and weight, then one
    ``index_add_`` that sums the squares per layer: a handful of kernels per
    logging step instead of ~3 per layer. (The logging step runs once every
    ``log_every`` steps with cold caches: on a 2-core CPU each extra op cost
    ~15 us there, ~1% of the BN-paper MLP's time at ``log_every=50``.)"""

    read_only = True

    def __init__(self, model: torch.nn.Module, every: int):
        layers = parameterized_layers(model)
        self.every = every
        self.names = list(layers)
        self.params = [p for ps in layers.values() for p in ps]
        self.owner = [i for i, ps in enumerate(layers.values()) for _ in ps]  # parameter -> its layer
        self._index: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _layer_index(self, with_grad: list[int], device: torch.device) -> torch.Tensor:
        """Row of each norm in the per-layer sums: gradients in rows 0..L-1, weights in L..2L-1.
        Cached: which parameters have gradients rarely changes, and a new index is a host->device copy."""
        key = tuple(with_grad)
        if self._index is None or self._index[0] != key:
            rows = [self.owner[i] for i in with_grad] + [len(self.names) + o for o in self.owner]
            self._index = (key, torch.tensor(rows, device=device))
        return self._index[1]

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> dict[str, torch.Tensor]:
        # A parameter unused this step has no gradient and adds nothing to its layer.
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        norms = torch.stack(torch._foreach_norm([self.params[i].grad for i in with_grad] + self.params)).float()
        sq = norms * norms
        per_layer = torch.zeros(2 * len(self.names), device=sq.device).index_add_(0, self._layer_index(with_grad, sq.device), sq).sqrt()
        out = {f"grad_norm/{name}": v for name, v in zip(self.names, per_layer.unbind())}
        out["grad_norm/total"] = sq[: len(with_grad)].sum().sqrt()
        out.update({f"weight_norm/{name}": v for name, v in zip(self.names, per_layer[len(self.names):].unbind())})
        return out


def build(setup: ProbeSetup, cfg: ParamNormsConfig | None) -> ParamNorms | None:
    every = setup.log_every if cfg is None or cfg.every is None else cfg.every
    return ParamNorms(setup.model, every) if every else None


register("param_norms", ParamNormsConfig, build)
