"""R replicas of one network as one stacked model: each replica keeps its own
weights, batch statistics and running statistics, and one forward pass trains
them all (bnexp.replicas, ``hydra/launcher=vectorized``).

The replicas are folded into the channel axis, so every op is one call for all
R of them:

- Linear: a batched matmul, W [R, out, in] @ x [R, in, B] (feature-major
  layout, so that batch norm after it needs no copy: see :func:`_convert`);
- Conv: ``groups=R`` over [B, R*C, ...] ("folded" layout), pooling alike;
- Norms: as their registry entry's fold rule says (bnexp.norms, matched by
  exact type): BN, ghost BN and batch renorm over R*C channels, so each channel
  of each replica has its own batch and running statistics; group norm R*G
  groups; layer norm GroupNorm with one group per replica.

Why folding and not ``torch.func`` (``stack_module_state`` + ``functional_call``
+ ``vmap``): on the 2-core CPU, for the BN-paper MLP at R=8, a vmapped
standalone model trained 1.1-1.4x the replica-steps/s of 8 runs one after the
other; this folded form 2.4-3.3x (same prototype, same run). vmap's Python
wrapping and per-call re-batching cost more than the tiny matmuls it batches.

Every tensor of the stacked model is a leaf whose first dimension is
replica-major, so ``Slot.view`` shows any of them as [R_slot, *standalone shape]:
the optimizer applies per-replica hyperparameters by broadcasting over that
dimension, and :meth:`StackedNet.alias` makes each replica's standalone model
(a real ``bnexp.models`` network) look at its own slice of that storage, so
evaluation, probes and checkpoints run the standalone code on it unchanged.

A norm whose replicas differ in ``norm.eps`` or ``norm.momentum`` (a sweep of
those) is split into runs of consecutive replicas that share them, one folded
layer each; the replica loop orders replicas so that such runs are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnexp import norms
from bnexp.models import layers
from bnexp.models.blocks import ACTIVATIONS, Net
from bnexp.norms.frn import TLU

# Modules that act on each example (or each channel) alone: the same module
# object serves all replicas of the stacked model.
_ELEMENTWISE = tuple(set(ACTIVATIONS.values()))
_PER_CHANNEL = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_PER_EXAMPLE = (nn.Identity, nn.Flatten, nn.Unflatten)
# Modules other than norms fold by their exact type: a subclass (a Conv2d with
# its own forward) has no fold rule of its own. Weight-standardized layers (norm.weight_std)
# have theirs: they fold as the torch layers they subclass, the weight standardized per
# output unit of each replica in the stacked forward; FRN's TLU folds over R*C channels.
_LINEARS = (nn.Linear, layers.WSLinear)
_CONVS = (nn.Conv1d, nn.Conv2d, layers.WSConv1d, layers.WSConv2d)
_FOLDS = frozenset((nn.Sequential, *_LINEARS, *_CONVS, TLU, *_ELEMENTWISE, *_PER_CHANNEL, *_PER_EXAMPLE))


class NotStackable(ValueError):
    """The network has a part the stacked model does not fold; its words name the part
    (the vectorized launcher then trains such jobs one by one: bnexp.replicas.stacks_of)."""


@dataclass
class Slot:
    """One stacked tensor: replicas ``r0 .. r0+n-1`` of the standalone tensor ``name``."""

    name: str  # the standalone state_dict key, e.g. hidden0.linear.weight
    tensor: torch.Tensor  # leaf (parameter) or buffer; dim 0 is replica-major
    r0: int
    n: int
    shape: tuple[int, ...]  # the standalone tensor's shape
    shared: bool = False  # one value for the whole slot (num_batches_tracked), not one per replica

    def view(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (this slot's tensor or its gradient) as [n, *shape] (a view)."""
        t = self.tensor if t is None else t
        if self.shared:
            return t
        return t.view(self.n, *self.shape)

    def replica(self, r: int, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.view(t) if self.shared else self.view(t)[r - self.r0]


def _leaf(tensors: list[torch.Tensor], requires_grad: bool, cat: bool) -> torch.Tensor:
    with torch.no_grad():
        t = torch.cat(tensors) if cat else torch.stack(tensors)
    return t.requires_grad_(requires_grad)


def _norm_scalars(m: nn.Module) -> tuple:
    return (getattr(m, "eps", None), getattr(m, "momentum", None))


def _folded_norm(parts: list[nn.Module]) -> nn.Module:
    """One norm layer over the channels of ``parts`` (consecutive replicas with the
    same eps and momentum), as the fold rule of the norm's registry entry makes it
    (the same bnexp.norms class where the standalone one normalizes per channel,
    so fp32-under-autocast and the algorithm are its own)."""
    t = parts[0]
    entry = norms.entry_of(t)
    if entry is None or entry.fold is None:
        raise NotStackable(f"norm layer {type(t).__name__}" + (f": norm={entry.name} has no fold rule" if entry else ""))
    try:
        folded = entry.fold.join(parts)
    except norms.NotFoldable as e:
        raise NotStackable(str(e)) from None
    # Every buffer the standalone layer has (running_mean and running_var, or
    # batch renorm's running_std), so a resumed replica keeps its restored statistics.
    own = dict(t.named_buffers())
    if own.keys() != dict(folded.named_buffers()).keys():
        raise NotStackable(f"norm layer {type(t).__name__}: buffers {sorted(own)}")
    return folded


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is made contiguous. A bias's gradient is the
    output gradient summed over the batch; where that gradient arrives strided
    (from a per-example norm's folded layout) the sum runs in an order that
    depends on R, and a replica's numbers would change with its stack (bnexp
    reproduce trains it as a stack of one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class StackedNet(nn.Module):
    """R networks of one structure (``bnexp.models.blocks.Net``: stem, hidden
    blocks, head, output) as one. ``forward`` takes [R, B, *example] (each
    replica its own batch) and returns logits [R, B, classes]."""

    def __init__(self, models: list[Net]):
        super().__init__()
        if not models or not all(type(m) is Net for m in models):
            raise NotStackable(f"{type(models[0]).__name__ if models else 'no network'} (only bnexp.models.blocks.Net networks fold)")
        self.R = len(models)
        self.slots: list[Slot] = []
        self.plan: list[tuple[str, object]] = []  # (layout an op needs, the op) in forward order
        self._plan_module("stem", [m.stem for m in models])
        for i in range(len(models[0].hidden_blocks())):
            for name in models[0].hidden_blocks()[i]._modules:
                self._plan_module(f"hidden{i}.{name}", [getattr(m.hidden_blocks()[i], name) for m in models])
        self._plan_module("head", [m.head for m in models])
        self._plan_module("output", [m.output for m in models])
        # Registered, so that train()/eval() and .to() reach the folded norm layers.
        self.norms = nn.ModuleList(m for _, op in self.plan if op[0] == "norm" for _, _, m in op[1])

    # ----------------------------------------------------------------- building

    def _plan_module(self, name: str, mods: list[nn.Module]) -> None:
        t = mods[0]
        if any(type(m) is not type(t) for m in mods):
            raise NotStackable(f"{name}: the replicas differ in structure")
        if type(t) not in _FOLDS and not norms.is_norm(t):  # a norm folds by its registry entry's rule
            raise NotStackable(f"{name} ({type(t).__name__})")
        if isinstance(t, nn.Sequential):
            for child in t._modules:
                self._plan_module(f"{name}.{child}", [getattr(m, child) for m in mods])
        elif type(t) in _LINEARS:
            w = self._param(f"{name}.weight", [m.weight for m in mods], cat=False)
            b = None if t.bias is None else self._param(f"{name}.bias", [m.bias for m in mods], cat=False)
            self.plan.append(("rcb", ("linear", self._weight(name, mods, w, False), b)))
        elif type(t) in _CONVS:
            if t.padding_mode != "zeros" or t.groups != 1:
                raise NotStackable(f"{name}: conv with padding_mode={t.padding_mode}, groups={t.groups}")
            w = self._param(f"{name}.weight", [m.weight for m in mods], cat=True)
            b = None if t.bias is None else self._param(f"{name}.bias", [m.bias for m in mods], cat=True)
            conv = F.conv1d if isinstance(t, nn.Conv1d) else F.conv2d
            self.plan.append(("folded", ("conv", conv, self._weight(name, mods, w, True), b, t.stride, t.padding, t.dilation)))
        elif type(t) is TLU:  # max(x, tau) per channel: R replicas' taus over R*C channels, any channel-major layout
            self.plan.append(("rcb|folded", ("norm", self._channel_module(name, mods))))
        elif norms.is_norm(t):
            # Per channel over every other dim alike: in [R, C, B] too, as [1, R*C, B]; the others need examples in dim 0.
            fold = norms.entry_of(t).fold
            self.plan.append(("folded" if fold is None or fold.examples_first else "rcb|folded", ("norm", self._norm_ranges(name, mods))))
        elif isinstance(t, _ELEMENTWISE):
            self.plan.append(("any", ("module", t)))
        elif isinstance(t, _PER_CHANNEL):
            self.plan.append(("folded", ("module", t)))
        elif isinstance(t, nn.Flatten):
            # After global pooling a folded [B, R*C, 1, 1] flattens replica-major: still folded.
            self.plan.append(("any" if name.startswith("head") else "examples", ("module", t)))
        elif isinstance(t, _PER_EXAMPLE):
            self.plan.append(("examples", ("module", t)))
        else:
            raise NotStackable(f"{name}: {type(t).__name__}")

    def _param(self, name: str, params: list[torch.Tensor], cat: bool) -> nn.Parameter:
        leaf = nn.Parameter(_leaf(params, params[0].requires_grad, cat), requires_grad=params[0].requires_grad)  # optim.train_only
        self.register_parameter(name.replace(".", "__"), leaf)
        self.slots.append(Slot(name, leaf, 0, self.R, tuple(params[0].shape)))
        return leaf

    def _weight(self, name: str, mods: list[nn.Module], w: nn.Parameter, cat: bool) -> "nn.Parameter | _StdWeight":
        """The stacked weight, or for a weight-standardized layer what standardizes it per unit of each replica."""
        t = mods[0]
        if type(t) not in layers.STANDARDIZED:
            return w
        gain = self._param(f"{name}.gain", [m.gain for m in mods], cat=cat) if t.scaled else None
        return _StdWeight(w, 1 if cat else 2, gain, t.gamma)

    def _channel_module(self, name: str, mods: list[nn.Module]) -> list[tuple[int, int, nn.Module]]:
        """A module with one parameter per channel (FRN's TLU) over the R replicas' channels."""
        folded = norms.join_channels(mods)
        for key, t in folded.named_parameters():
            self.slots.append(Slot(f"{name}.{key}", t, 0, self.R, tuple(getattr(mods[0], key).shape)))
        return [(0, self.R, folded)]

    def _norm_ranges(self, name: str, mods: list[nn.Module]) -> list[tuple[int, int, nn.Module]]:
        ranges, r0 = [], 0
        for r in range(1, self.R + 1):
            if r == self.R or _norm_scalars(mods[r]) != _norm_scalars(mods[r0]):
                folded = _folded_norm(mods[r0:r])
                n = r - r0
                for key, t in list(folded.named_parameters()) + list(folded.named_buffers()):
                    shape = tuple(getattr(mods[r0], key).shape)
                    self.slots.append(Slot(f"{name}.{key}", t, r0, n, shape, shared=t.dim() == 0))  # num_batches_tracked
                ranges.append((r0, r, folded))
                r0 = r
        return ranges

    # ----------------------------------------------------------------- running

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R, B = x.shape[0], x.shape[1]
        layout = "rb"
        for need, op in self.plan:
            if need == "examples":  # a per-example module: on [R*B, ...]
                x = _convert(x, layout, "rb", R)
                x, layout = op[1](x.flatten(0, 1)).unflatten(0, (R, B)), "rb"
                continue
            if need == "rcb|folded":
                need = layout if layout in ("rcb", "folded") else "folded"
            if need != "any":
                x, layout = _convert(x, layout, need, R), need
            x = self._run(op, x, R, layout)
        return _convert(x, layout, "rb", R)

    @staticmethod
    def _run(op: tuple, x: torch.Tensor, R: int, layout: str) -> torch.Tensor:
        kind = op[0]
        if kind == "linear":  # [R, out, in] @ [R, in, B]: each replica's W x
            _, w, b = op
            w = w() if isinstance(w, _StdWeight) else w
            return torch.bmm(w, x) if b is None else _ContiguousGrad.apply(torch.baddbmm(b.unsqueeze(-1), w, x))
        if kind == "conv":
            _, conv, w, b, stride, padding, dilation = op
            w = w() if isinstance(w, _StdWeight) else w
            if x.device.type != "cpu":
                return conv(x, w, b, stride, padding, dilation, R)
            # On the CPU, oneDNN's grouped convolution adds a replica's products in
            # another order than one convolution of its channels does, and the order
            # depends on R: a replica's numbers would change with the stack it is in,
            # and a stack of one (bnexp reproduce) would not give them back. One
            # convolution per replica does what its standalone layer does.
            bs = [None] * R if b is None else b.chunk(R)
            return torch.cat([conv(xr, wr, br, stride, padding, dilation) for xr, wr, br in zip(x.chunk(R, 1), w.chunk(R), bs)], 1)
        if kind == "norm":
            shape = x.shape
            if layout == "rcb":  # [R, C, B] as [1, R*C, B]: per channel over B, a batch norm's statistics
                x = x.reshape(1, -1, shape[-1])
            ranges = op[1]
            if len(ranges) == 1:
                y = ranges[0][2](x)
            else:
                c = x.shape[1] // R
                y = torch.cat([m(x[:, r0 * c : r1 * c]) for r0, r1, m in ranges], 1)
            return y.view(shape) if layout == "rcb" else y
        return op[1](x)

    # ----------------------------------------------------------------- replicas

    def alias(self, models: list[Net]) -> None:
        """Point every parameter and buffer of each replica's standalone model at
        its slice of the stacked storage (no copy): the stacked training moves
        them, and standalone code (evaluation, probes, state_dict) reads them.
        The Parameter objects stay the same, so optimizers and probes built on
        them keep working."""
        for r, model in enumerate(models):
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            for s in self.slots:
                if not s.r0 <= r < s.r0 + s.n:
                    continue
                view = s.replica(r, s.tensor.detach())
                if s.name in params:
                    params[s.name].data = view
                else:
                    owner, _, key = s.name.rpartition(".")
                    model.get_submodule(owner)._buffers[key] = view
            if set(params) - {s.name for s in self.slots if s.r0 <= r < s.r0 + s.n}:
                raise NotStackable("a parameter of the standalone model has no stacked slot")

    def grad_views(self, r: int, model: Net) -> None:
        """Give replica ``r``'s parameters their slices of the stacked gradients (for probes that read ``.grad``)."""
        params = dict(model.named_parameters())
        for s in self.slots:
            if s.name in params and s.r0 <= r < s.r0 + s.n:
                params[s.name].grad = None if s.tensor.grad is None else s.replica(r, s.tensor.grad)

    @property
    def param_slots(self) -> list[Slot]:
        return [s for s in self.slots if isinstance(s.tensor, nn.Parameter) and s.tensor.requires_grad]


@dataclass
class _StdWeight:
    """A weight-standardized layer's stacked weight: each replica's units standardized (bnexp.models.layers.standardized)."""

    weight: nn.Parameter
    unit_dims: int  # 1: a conv's [R*out, ...]; 2: a Linear's [R, out, in]
    gain: nn.Parameter | None
    gamma: float

    def __call__(self) -> torch.Tensor:
        return layers.standardized(self.weight, self.unit_dims, self.gain, self.gamma)


# Layouts of the activations between ops (R replicas, batch B):
#   rb      [R, B, *example]   the input; per-example modules (stem)
#   rcb     [R, C, B]          an MLP's: Linear is bmm(W, x), batch norm sees [1, R*C, B] (no copy)
#   folded  [B, R*C, *spatial] a CNN's: conv with groups=R, pooling, norms over examples
def _convert(x: torch.Tensor, src: str, dst: str, R: int) -> torch.Tensor:
    if src == dst:
        return x
    if src == "folded":
        x = x.unflatten(1, (R, -1)).transpose(0, 1)  # -> rb, a view
        src = "rb"
    if dst == "folded":
        if src == "rcb":  # [R, C, B] -> [B, R*C], a view
            return x.flatten(0, 1).t()
        return x.transpose(0, 1).flatten(1, 2)  # rb -> folded, a copy
    return x.transpose(1, 2)  # rb <-> rcb: a view
