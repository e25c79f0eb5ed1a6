"""What one training step is made of: the optimizer and its schedule, the
sampler that picks each step's batch, the step itself, the logging window that
collects its losses, and evaluation.

Speed choices, all visible here: the dataset sits on the device as tensors and
is indexed by a seeded permutation (no DataLoader); the step never copies to
the host (losses and logits wait in the window until a logging step);
evaluation runs under ``inference_mode`` in large batches.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnexp.config import Amp, ConfigError, Loss, OptimName, Schedule, TrainOnly, steps_per_epoch
from bnexp.norms import is_norm, use_batch_statistics
from bnexp.optim import optimizer_class

# train.loss -> the loss function of a step, an evaluation and every probe (mean over the batch).
LOSSES: dict[Loss, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {Loss.cross_entropy: F.cross_entropy, Loss.mse: F.mse_loss}

# --------------------------------------------------------------------------- optimizer and schedule


def base_lr(cfg: DictConfig, batch_size: int | None) -> float:
    """optim.lr, scaled by batch_size / optim.base_batch_size when that is set (linear scaling rule)."""
    if cfg.get("base_batch_size") is None or batch_size is None:
        return float(cfg.lr)
    return float(cfg.lr) * batch_size / cfg.base_batch_size


def trainable(cfg: DictConfig, model: nn.Module) -> list[nn.Parameter]:
    """The parameters optim.train_only trains. With ``norm`` every other parameter
    stops requiring a gradient (so backward computes none for it, and probes and
    gradient norms see only what trains): BN-only training (Frankle et al. 2021)."""
    if TrainOnly(cfg.get("train_only", TrainOnly.all)) == TrainOnly.norm:
        norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters()}
        if not norm_params:
            raise ConfigError("optim.train_only", "norm, but the model has no norm parameters to train; allowed: all, or norm layers with gamma/beta")
        for p in model.parameters():
            p.requires_grad_(id(p) in norm_params)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(params: list[nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """One param group at ``lr``, and one more per ``lr_scale`` attribute a model gave some of its
    parameters (Fixup's scalars train at lr / 10: bnexp.models.resnet.fixup_init); the main group
    stays first, whose lr ``optim/lr`` logs."""
    scales = sorted({getattr(p, "lr_scale", 1.0) for p in params} - {1.0})
    groups = [{"params": [p for p in params if getattr(p, "lr_scale", 1.0) == 1.0]}]
    return groups + [{"params": [p for p in params if getattr(p, "lr_scale", 1.0) == s], "lr": lr * s} for s in scales]


def make_optimizer(cfg: DictConfig, model: nn.Module, batch_size: int | None = None, compile: bool = False) -> torch.optim.Optimizer:
    """torch's optimizer of ``optim.name``; without train.compile (``compile``), its subclass
    that spares the process torch._dynamo's import (bnexp.optim)."""
    name, lr = OptimName(cfg.name), base_lr(cfg, batch_size)
    params = param_groups(trainable(cfg, model), lr)
    cls = optimizer_class(name.value, compile)
    if name == OptimName.sgd:
        return cls(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    return cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(cfg: DictConfig, total: int) -> Callable[[int], float]:
    """Multiplier of optim.lr after ``step`` optimizer steps: linear warmup, then the schedule."""
    warm, kind = cfg.warmup_steps, Schedule(cfg.schedule)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        if kind == Schedule.cosine:
            return 0.5 * (1 + math.cos(math.pi * frac))
        if kind == Schedule.linear:
            return 1 - frac
        if kind == Schedule.step:
            return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
        return 1.0

    return factor


class LrSchedule:
    """torch's LambdaLR over :func:`lr_factor`, stepped only when the lr can change:
    a constant schedule skips LambdaLR.step (~8 us, 1% of a small MLP's step on CPU)."""

    def __init__(self, cfg: DictConfig, optimizer: torch.optim.Optimizer, total: int):
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))
        self.changes = Schedule(cfg.schedule) != Schedule.constant or cfg.warmup_steps > 0

    def step(self) -> None:
        if self.changes:
            self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(s)


# --------------------------------------------------------------------------- batches


class Sampler:
    """Batches of indices from a seeded permutation per epoch; the last partial
    batch is dropped so that every BN step sees ``batch_size`` examples."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.per_epoch = steps_per_epoch(n, batch_size)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.perm is None or self.pos == self.per_epoch:
            self.perm = torch.randperm(self.n, generator=self.gen).to(self.device)
            self.pos = 0
        b = self.batch_size
        idx = self.perm[self.pos * b : (self.pos + 1) * b]
        self.pos += 1
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.gen.set_state(s["gen"])
        self.perm = None if s["perm"] is None else s["perm"].to(self.device)
        self.pos = s["pos"]


# --------------------------------------------------------------------------- the step


class TrainStep:
    """forward, loss, backward, update; ``step(x, y)`` returns (loss, logits) on the device.

    They still carry their autograd history (already freed by backward, apart
    from the node objects): detaching them costs ~1 us each a step, so whoever
    computes with them does so under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: Amp, device: torch.device, compile: bool,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, clip: Callable[[], None] | None = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.clip = clip  # optim.clip (bnexp.clip): between backward and the update
        self.dtype = {Amp.bf16: torch.bfloat16, Amp.fp16: torch.float16}.get(Amp(amp))
        self.device_type = device.type
        # Checkpointed either way; a disabled one is a no-op without fp16.
        self.scaler = torch.amp.GradScaler(device.type, enabled=Amp(amp) == Amp.fp16)
        # train.compile compiles forward + loss as one graph (backward is compiled
        # with it by AOTAutograd), so the loss fuses into the forward's kernels;
        # the optimizer step stays eager (foreach on CUDA).
        forward_loss = self._forward_loss if self.dtype is None else self._forward_loss_autocast
        self.forward_loss = torch.compile(forward_loss) if compile else forward_loss
        self.step = self._scaled_step if self.scaler.is_enabled() else self._plain_step

    # The plain forward, exactly as written by hand: without amp, entering even a
    # disabled autocast costs 10-40 us on CPU, and the disabled GradScaler's
    # scale/step/update calls with detaches and casts another ~6 us (together
    # 2-7% of the BN-paper MLP's ~0.7 ms step on a 2-core CPU).
    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return self.loss_fn(logits, y), logits

    def _forward_loss_autocast(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Norm layers keep themselves in fp32 under autocast (bnexp.norms.FP32Norm).
        with torch.autocast(self.device_type, dtype=self.dtype):
            logits = self.model(x)
        return self.loss_fn(logits.float(), y), logits

    def _plain_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.forward_loss(x, y)
        # A stack of replicas has one loss each ([R], bnexp.replicas.per_replica): the
        # backward pass of their sum gives each replica the gradients of its own loss.
        (loss.sum() if loss.dim() else loss).backward()
        if self.clip is not None:
            self.clip()
        self.optimizer.step()
        return loss, logits

    def _scaled_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.forward_loss(x, y)
        self.scaler.scale(loss).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)  # clipping reads the true gradients
            self.clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits


# --------------------------------------------------------------------------- the logging window

# Logits kept pending before they are folded (16 MB of floats).
WINDOW_LOGITS = 1 << 22


class LogWindow:
    """The training steps since the last logging step: their losses and correct counts.

    On the device, row 0 of ``buf`` holds each step's loss and row 1 its correct
    count (column 0: the window's first step). A step only keeps references to
    its loss, logits and labels (:meth:`add`): no copy, no kernel, no host sync.
    A per-step argmax and sums into running totals cost several kernels a step
    (~10% of the BN-paper MLP's step on an H200, which is launch-bound), and even
    one copy into a preallocated buffer cost ~1.4% of it on a 2-core CPU, where
    keeping the references costs ~0.5%. :meth:`fold` stacks the pending losses
    and counts correct predictions in one batched pass: at logging steps, before
    a checkpoint, and whenever WINDOW_LOGITS logits are pending.

    With ``replicas=R`` each step's loss is [R] (and its logits [R, B, classes]):
    the window of a stack, whose fold writes every replica's rows of ``buf``
    [R, 2, steps] at once (bnexp.replicas points each replica's own window at
    ``buf[r]``). Replica-major, so that each replica's rows are laid out as a
    standalone window's: its sums then add in the same order whatever stack it
    is in (a column of [2, steps, R] summed in another order than a stack of
    one's, and train/loss differed in the last bit).

    The window's first step is derived, not stored: logging steps are the
    multiples of ``log_every`` (and the last step, after which nothing follows).
    """

    def __init__(self, log_every: int, total: int, batch_size: int, num_classes: int, device: torch.device,
                 accuracy: bool = True, replicas: int | None = None):
        # accuracy=False (regression): only losses are kept, and there is no train/acc.
        self.log_every, self.batch_size, self.accuracy = log_every, batch_size, accuracy
        self.replicas = replicas
        self.buf = torch.zeros(*(() if replicas is None else (replicas,)), 2, min(log_every, total), device=device)
        self.limit = max(1, WINDOW_LOGITS // (batch_size * num_classes * (replicas or 1)))
        self.losses: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def start(self, step: int) -> int:
        """The last logging step before ``step`` (0 before the first): the window holds the steps after it."""
        return (step - 1) // self.log_every * self.log_every

    def is_logging_step(self, step: int, total: int) -> bool:
        return step % self.log_every == 0 or step == total

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses.append(loss)
        if not self.accuracy:
            return
        self.logits.append(logits)
        self.labels.append(labels)
        if len(self.logits) == self.limit:
            self.fold(step)

    @torch.no_grad()
    def fold(self, step: int) -> None:
        """Write the pending steps (the last one is ``step``) into their columns.
        Each step's values are its own, whichever steps are folded together, so a
        run resumed mid-window logs bit-identical values."""
        if not self.losses:
            return
        last = step - self.start(step) - 1
        cols = slice(last - len(self.losses) + 1, last + 1)
        # Written in place (out=): this runs once per window with cold caches,
        # where each op saved is ~20 us on CPU. Losses are fp32 (amp casts logits first).
        stacked = self.replicas is not None  # steps go in the last dim: [R] per step -> [R, steps]
        if stacked:
            self.buf[:, 0, cols] = torch.stack(self.losses, -1)
        else:
            torch.stack(self.losses, out=self.buf[0, cols])
        if not self.accuracy:
            self.losses = []
            return
        # argmax via max(): over 10 classes argmax runs ~4x slower on CPU.
        correct = torch.stack(self.logits).max(-1).indices == torch.stack(self.labels)
        if stacked:
            self.buf[:, 1, cols] = torch.sum(correct, -1, dtype=self.buf.dtype).t()
        else:
            torch.sum(correct, -1, dtype=self.buf.dtype, out=self.buf[1, cols])
        self.losses, self.logits, self.labels = [], [], []

    def sums(self, step: int) -> dict[str, torch.Tensor]:
        """The window's summed losses and correct counts up to logging step ``step``, on the device."""
        self.fold(step)
        loss_sum, correct = self.buf[:, : step - self.start(step)].sum(1).unbind()
        return {"window/loss_sum": loss_sum, "window/correct": correct}

    def values(self, step: int, host: dict[str, float]) -> tuple[dict[str, float], int | None]:
        """``train/loss`` and ``train/acc`` from the host copy of :meth:`sums`
        (its keys are removed from ``host``), and the first step whose loss is not
        finite (None: none). Only a non-finite sum looks at single steps."""
        loss_sum, correct = host.pop("window/loss_sum"), host.pop("window/correct")
        first, steps = self.start(step) + 1, step - self.start(step)
        bad_step = None
        if not math.isfinite(loss_sum):
            bad = (~torch.isfinite(self.buf[0, :steps])).nonzero().flatten().tolist()
            bad_step = first + (bad[0] if bad else steps - 1)  # no single bad step: the sum overflowed
        values = {"train/loss": loss_sum / steps}
        if self.accuracy:
            values["train/acc"] = correct / (steps * self.batch_size)
        return values, bad_step

    def state_dict(self) -> list[torch.Tensor]:
        return list(self.buf.cpu())  # two rows, losses and correct counts (checkpoint format 1)

    def load_state_dict(self, rows: list[torch.Tensor]) -> None:
        self.buf.copy_(torch.stack(rows))


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, batch_stats: bool = False) -> dict[str, torch.Tensor]:
    """Mean loss and accuracy over (x, y) in eval mode (running statistics), on the device.
    Real-valued targets (regression) give the mean squared error over every
    output, as ``train.loss=mse`` trains it, and no accuracy. With ``batch_stats``
    the norms normalize each chunk of ``batch_size`` with its own statistics, as
    in training (their running statistics move: callers restore them)."""
    if batch_stats:
        use_batch_statistics(model)
    else:
        model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    regression = y.is_floating_point()
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size]).float()
        if regression:
            loss += F.mse_loss(logits, y[i : i + batch_size], reduction="sum")
            continue
        loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum()
    model.train()
    if regression:
        return {"loss": loss / y.numel()}
    return {"loss": loss / len(x), "acc": correct.float() / len(x)}


@torch.no_grad()
def grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm of all gradients, on the device (0 when there are none)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(torch._foreach_norm(grads)).float().norm()


def to_host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device->host copy for a dict of scalar tensors."""
    if not values:
        return {}
    with torch.no_grad():  # 0-d float32 tensors (most of them) go into the stack as they are
        parts = [v if v.dtype == torch.float32 and v.dim() == 0 else v.float().reshape(()) for v in values.values()]
        return dict(zip(values, torch.stack(parts).cpu().tolist()))
