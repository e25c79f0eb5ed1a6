"""Vectorized replicas: R runs that differ only in their seed (and in shape-free
scalars: optim.lr, optim.momentum, optim.weight_decay, norm.momentum, norm.eps,
model.init_std) trained as one stacked model in one loop (``hydra/launcher=vectorized``).

Each replica is a whole :class:`bnexp.train.Run`, set up by :func:`bnexp.train.setup`
exactly as its standalone run would be (its own seed, so its own initial
weights; its own sampler, logging window, probes, tracker, run dir, resumed
from its own checkpoint). Then :class:`Stack` folds the R models into one
:class:`bnexp.models.stacked.StackedNet` and points each replica's standalone
model at its slice of the stacked storage. The loop below steps the stack once
per step for every replica; everything else is the standalone code run per
replica on its own views: :func:`bnexp.train.report` (window, validation,
probes, divergence), :func:`bnexp.train.save` (a checkpoint in the standalone
format, which ``bnexp resume`` continues alone), :func:`bnexp.train.finish`
and :func:`bnexp.train.end`.

A replica that diverges is recorded as diverged at its own step and frozen: its
learning rate becomes 0 and its gradients and optimizer state are zeroed, so its
weights stay as they were; the replicas never share a value (own channels,
own batch statistics, own losses), so its NaNs reach no other replica.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bnexp.augment import NoAugment
from bnexp.config import Amp, ConfigError, OptimName, flatten, launch_world_size, plain
from bnexp.models.stacked import StackedNet
from bnexp.rundir import RunInterrupted, run_lock
from bnexp.runtime import clock, frozen_gc, recorded_threads, set_threads, stop_on_signal
from bnexp.schema import ONE_PROCESS_INSTRUMENTS
from bnexp.clip import Leaf, make_clip
from bnexp.step import WINDOW_LOGITS, LogWindow, TrainStep
from bnexp.train import Run, end, finish, report, save, setup, window_clock

log = logging.getLogger("bnexp")

# The run dir whose replica the loop is working on (None: the whole stack). The
# vectorized launcher's log handlers read it, so that each replica's bnexp.log
# holds its own lines and the stack's.
CURRENT_RUN: ContextVar[Path | None] = ContextVar("bnexp_current_run", default=None)


@contextlib.contextmanager
def current(run_dir: Path | None) -> Iterator[None]:
    token = CURRENT_RUN.set(run_dir)
    try:
        yield
    finally:
        CURRENT_RUN.reset(token)


# Keys whose values may differ among the replicas of one stack: none changes a tensor's shape.
SCALAR_KEYS = ("optim.lr", "optim.momentum", "optim.weight_decay", "norm.momentum", "norm.eps", "model.init_std")
# The model families whose networks bnexp.models.stacked folds.
STACKED_FAMILIES = ("mlp", "cnn")


def alone_reason(cfg: DictConfig) -> str | None:
    """Why a job cannot be a replica of a stack, in a few words (None: it can)."""
    try:
        flat = flatten(plain(cfg))
    except Exception:  # noqa: BLE001
        return "its config does not resolve"  # its job then says why
    return _alone_reason(flat)


def _alone_reason(flat: dict[str, Any]) -> str | None:
    if flat.get("model.kind") not in STACKED_FAMILIES:
        return f"model={flat.get('model.kind')}: the stacked model folds {' and '.join(STACKED_FAMILIES)} networks only"
    if flat.get("train.amp") == Amp.fp16.value:  # its GradScaler would skip a step for every replica at once
        return "train.amp=fp16: one grad scaler would skip a step for every replica when one overflows"
    if flat.get("norm.sync"):
        return "norm.sync=true: the stacked model does not fold synchronized norms"
    if launch_world_size() > 1:
        return "under torchrun: the ranks of a data-parallel run share each job"
    # The instruments of issue 13 act on one run's model and optimizer (trial
    # steps, extra passes, recomputed statistics); a replica's are views into
    # the stack and its optimizer a shell, so those jobs train on their own.
    for key in ONE_PROCESS_INSTRUMENTS:
        if flat.get(key):
            return f"{key}={flat[key]}: the instrument takes trial steps or passes of one run's own model"
    if flat.get("norm.noise"):
        return "norm.noise=true: the stacked model folds no noisy norms"
    if flat.get("train.loss", "cross_entropy") != "cross_entropy":
        return f"train.loss={flat['train.loss']}: the stacked step computes each replica's cross-entropy"
    if flat.get("model.dropout"):  # the stacked model has no fold rule for nn.Dropout
        return f"model.dropout={flat['model.dropout']}: each replica draws its own dropout masks"
    if flat.get("optim.train_only", "all") != "all":
        return f"optim.train_only={flat['optim.train_only']}: the stacked optimizer steps every parameter"
    return None


def stack_key(cfg: DictConfig) -> str | None:
    """What a job's config must share with another's to be stacked with it: all
    of it but ``seed`` and SCALAR_KEYS. None: it trains alone (:func:`alone_reason`)."""
    try:
        flat = flatten(plain(cfg))
    except Exception:  # noqa: BLE001
        return None
    if _alone_reason(flat) is not None:
        return None
    for key in ("seed", *SCALAR_KEYS):
        flat.pop(key, None)
    return json.dumps(flat, sort_keys=True, default=str)


def stacks_of(cfgs: list[DictConfig | None], max_replicas: int) -> list[list[int]]:
    """The positions of ``cfgs`` grouped into stacks of at most ``max_replicas``
    (a None config, or one no other shares, alone), in order of each stack's first job."""
    groups: dict[str, list[int]] = {}
    order: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        key = None if cfg is None else stack_key(cfg)
        if key is None:
            order.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
            order.append(groups[key])
    return [g[j : j + max_replicas] for g in order for j in range(0, len(g), max_replicas)]


@dataclass
class ReplicaJob:
    cfg: DictConfig
    run_dir: Path
    resume: bool = False
    extra_record: dict[str, Any] | None = None
    record: dict[str, Any] | None = None  # the run dir's metrics.json when resuming (its recorded thread count)


class ReplicasInterrupted(RunInterrupted):
    """SIGINT/SIGTERM stopped a stack after a whole step; every replica's checkpoint is saved."""

    def __init__(self, run_dirs: list[Path], step: int):
        super().__init__(run_dirs[0], step)
        self.run_dirs = run_dirs
        self.args = (f"{len(run_dirs)} replicas ({run_dirs[0]} ...) interrupted after step {step}; checkpoints saved",)

    @property
    def resumable(self) -> bool:
        return all(RunInterrupted(d, self.step).resumable for d in self.run_dirs)


# --------------------------------------------------------------------------- the optimizer


class StackedOptimizer:
    """SGD, Adam or AdamW over a StackedNet with each replica's own lr, momentum
    and weight decay, computed as torch's single-tensor optimizers compute them.

    Hyperparameters every replica shares are applied as Python floats, in the
    very calls torch makes (``add_(alpha=-lr)``, ``addcdiv_(value=-step_size)``);
    differing ones as [R] tensors broadcast over each slot's replica dimension.
    ``shells`` are the replicas' own torch optimizers (never stepped): they give
    the hyperparameters, and a checkpoint's state goes in and out through them
    (:meth:`export`), so it has torch's format for ``bnexp resume`` to load.
    """

    def __init__(self, net: StackedNet, models: list[torch.nn.Module], shells: list[torch.optim.Optimizer], name: OptimName):
        self.name, self.R = name, net.R
        self.slots = net.param_slots
        device = self.slots[0].tensor.device
        groups = [opt.param_groups[0] for opt in shells]
        g0 = groups[0]
        if g0.get("amsgrad") or g0.get("maximize") or g0.get("dampening"):
            raise ConfigError("hydra/launcher", "the vectorized launcher's optimizer has no amsgrad, maximize or dampening")
        # A replica without momentum has nesterov off (make_optimizer); for it both updates are the same.
        self.nesterov = any(g.get("nesterov") for g in groups)
        self.betas, self.eps = g0.get("betas"), g0.get("eps")
        self.lr_host = [float(g["lr"]) for g in groups]
        self.wd_host = [float(g["weight_decay"]) for g in groups]
        self.mom_host = [float(g.get("momentum", 0.0)) for g in groups]
        self.lr, self.wd, self.mom = (torch.tensor(h, device=device) for h in (self.lr_host, self.wd_host, self.mom_host))
        self.scratch = torch.zeros(self.R, device=device)  # per-replica step sizes / decays, rewritten each step
        self.p = [s.view() for s in self.slots]
        self.lr_v, self.wd_v, self.mom_v, self.scratch_v = ([self._per_slot(t, s) for s in self.slots] for t in (self.lr, self.wd, self.mom, self.scratch))
        self.frozen: list[int] = []
        # Which standalone parameter each slot is, per replica: the shells' parameter order.
        self._params = [[(p, self._slot_of(model, p, r)) for p in opt.param_groups[0]["params"]] for r, (model, opt) in enumerate(zip(models, shells))]
        self.t = 0
        self.state: dict[str, list[torch.Tensor] | None] = {"momentum_buffer": None, "exp_avg": None, "exp_avg_sq": None}
        self._import(shells)

    @staticmethod
    def _per_slot(t: torch.Tensor, s) -> torch.Tensor:
        return t[s.r0 : s.r0 + s.n].view(s.n, *([1] * len(s.shape)))

    def _slot_of(self, model: torch.nn.Module, p: torch.nn.Parameter, r: int) -> int:
        name = next(n for n, q in model.named_parameters() if q is p)
        return next(i for i, s in enumerate(self.slots) if s.name == name and s.r0 <= r < s.r0 + s.n)

    @property
    def keys(self) -> tuple[str, ...]:
        if self.name == OptimName.sgd:
            return ("momentum_buffer",) if any(self.mom_host) else ()
        return ("exp_avg", "exp_avg_sq")

    def _import(self, shells: list[torch.optim.Optimizer]) -> None:
        """The shells' state (a resumed replica's checkpoint) into the stacked state."""
        for key in self.keys:
            if not any(key in opt.state.get(p, {}) for opt, params in zip(shells, self._params) for p, _ in params):
                continue  # nothing saved yet: the first step initializes it as torch does
            bufs = [torch.zeros_like(p) for p in self.p]
            for r, (opt, params) in enumerate(zip(shells, self._params)):
                for p, i in params:
                    if key in opt.state.get(p, {}):
                        bufs[i][r - self.slots[i].r0].copy_(opt.state[p][key])
            self.state[key] = bufs
        steps = {float(opt.state[p]["step"]) for opt, params in zip(shells, self._params) for p, _ in params if "step" in opt.state.get(p, {})}
        if len(steps) > 1:
            raise ConfigError("checkpoint", f"the replicas' Adam states are at different steps ({sorted(steps)})")
        self.t = int(steps.pop()) if steps else 0

    def export(self, r: int, shell: torch.optim.Optimizer) -> None:
        """Replica ``r``'s state, as torch's optimizer of its standalone run holds it, into ``shell`` (copies)."""
        shell.state.clear()
        for p, i in self._params[r]:
            s = self.slots[i]
            st: dict[str, torch.Tensor] = {}
            if self.name != OptimName.sgd and self.t:
                st["step"] = torch.tensor(float(self.t))
            for key in self.keys:
                if self.state[key] is not None and (key != "momentum_buffer" or self.mom_host[r]):
                    st[key] = self.state[key][i][r - s.r0].clone()
            if st:
                shell.state[p] = st

    def set_lr(self, lrs: list[float]) -> None:
        if lrs != self.lr_host:
            self.lr_host = [0.0 if r in self.frozen else lr for r, lr in enumerate(lrs)]
            self.lr.copy_(torch.tensor(self.lr_host))

    def freeze(self, r: int) -> None:
        """Replica ``r`` stops: lr 0, and from now on zero gradients and zero optimizer state."""
        self.frozen.append(r)
        self.set_lr([0.0 if q == r else lr for q, lr in enumerate(self.lr_host)])
        with torch.no_grad():
            for bufs in self.state.values():
                for s, b in zip(self.slots, bufs or []):
                    if s.r0 <= r < s.r0 + s.n:
                        b[r - s.r0].zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.slots:
            s.tensor.grad = None

    @staticmethod
    def _uniform(host: list[float]) -> float | None:
        return host[0] if all(h == host[0] for h in host) else None

    @torch.no_grad()
    def step(self) -> None:
        g = [s.view(s.tensor.grad) for s in self.slots]
        if self.frozen:
            for s, grad in zip(self.slots, g):
                local = [r - s.r0 for r in self.frozen if s.r0 <= r < s.r0 + s.n]
                if local:
                    grad[local] = 0
        if self.name == OptimName.sgd:
            self._sgd(g)
        else:
            self._adam(g)

    def _sgd(self, g: list[torch.Tensor]) -> None:
        p, wd, mom, lr = self.p, self._uniform(self.wd_host), self._uniform(self.mom_host), self._uniform(self.lr_host)
        if wd != 0:
            g = torch._foreach_add(g, p, alpha=wd) if wd is not None else torch._foreach_addcmul(g, p, self.wd_v)
        if any(self.mom_host):
            bufs = self.state["momentum_buffer"]
            if bufs is None:
                self.state["momentum_buffer"] = bufs = [t.detach().clone() for t in g]
            else:
                torch._foreach_mul_(bufs, mom if mom is not None else self.mom_v)
                torch._foreach_add_(bufs, g)
            if self.nesterov:
                g = torch._foreach_add(g, bufs, alpha=mom) if mom is not None else torch._foreach_addcmul(g, bufs, self.mom_v)
            else:
                g = bufs
        if lr is not None:
            torch._foreach_add_(p, g, alpha=-lr)
        else:
            torch._foreach_addcmul_(p, g, self.lr_v, value=-1)

    def _adam(self, g: list[torch.Tensor]) -> None:
        p, wd, lr = self.p, self._uniform(self.wd_host), self._uniform(self.lr_host)
        beta1, beta2 = self.betas
        if self.state["exp_avg"] is None:
            self.state["exp_avg"], self.state["exp_avg_sq"] = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
        exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
        self.t += 1
        if wd != 0:
            if self.name == OptimName.adamw:  # decoupled: param *= 1 - lr * wd
                if wd is not None and lr is not None:
                    torch._foreach_mul_(p, 1 - lr * wd)
                else:
                    torch.mul(self.lr, self.wd, out=self.scratch).neg_().add_(1)
                    torch._foreach_mul_(p, self.scratch_v)
            else:
                g = torch._foreach_add(g, p, alpha=wd) if wd is not None else torch._foreach_addcmul(g, p, self.wd_v)
        torch._foreach_lerp_(exp_avg, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
        bias_correction1, bias_correction2 = 1 - beta1**self.t, 1 - beta2**self.t
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias_correction2**0.5)
        torch._foreach_add_(denom, self.eps)
        if lr is not None:
            torch._foreach_addcdiv_(p, exp_avg, denom, -lr / bias_correction1)
        else:
            torch.div(self.lr, bias_correction1, out=self.scratch)
            torch._foreach_addcmul_(p, torch._foreach_div(exp_avg, denom), self.scratch_v, value=-1)


# --------------------------------------------------------------------------- the step and the window


class StackedStep(TrainStep):
    """TrainStep over the stack: ``step(x [R, B, ...], y [R, B])`` returns each
    replica's loss [R] and logits [R, B, classes]; the backward pass runs on
    their sum, so each replica's gradients are those of its own loss.
    (fp16's GradScaler skips a step for all it scales: the launcher runs fp16 jobs alone.)"""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Logits as [R, classes, B] (the stacked MLP's own layout, no copy), the (N, C, d) form cross_entropy takes.
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)

    def backward(self, losses: torch.Tensor) -> None:
        losses.sum().backward()


class StackedWindow(LogWindow):
    """The logging windows of R replicas as one: a step keeps references to its
    [R] losses and [R, B, classes] logits, and one fold writes every replica's
    column of the buffer [2, steps, R] (see :class:`bnexp.step.LogWindow`)."""

    def __init__(self, windows: list[LogWindow], num_classes: int):
        w0, R = windows[0], len(windows)
        super().__init__(w0.log_every, w0.buf.shape[1], w0.batch_size, num_classes, w0.buf.device, limit_logits=WINDOW_LOGITS // R)
        self.buf = torch.stack([w.buf for w in windows], -1)


class ReplicaWindow(LogWindow):
    """Replica ``r``'s own window: its rows of the stacked window's buffer, read
    and checkpointed by the standalone code; folding folds the whole stack."""

    def __init__(self, stacked: StackedWindow, r: int):
        self.log_every, self.batch_size, self.stacked = stacked.log_every, stacked.batch_size, stacked
        self.accuracy = stacked.accuracy  # stacks train classifiers only (alone_reason: train.loss)
        self.buf = stacked.buf[..., r]
        self.losses, self.logits, self.labels = [], [], []

    def fold(self, step: int) -> None:
        self.stacked.fold(step)


# --------------------------------------------------------------------------- the stack


class Stack:
    """The stacked parts of R replica runs set up alike (same config but for the
    shape-free scalars, same step): model, optimizer, step and window, with each
    run's own parts pointed at their slices."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        cfg, models = runs[0].cfg, [run.model for run in runs]
        self.net = StackedNet(models)
        self.net.alias(models)
        self.optimizer = StackedOptimizer(self.net, models, [run.optimizer for run in runs], OptimName(cfg.optim.name))
        self.train_step = StackedStep(self.net, self.optimizer, Amp(cfg.train.amp), runs[0].device, bool(cfg.train.compile),  # type: ignore[arg-type]
                                      clip=make_clip(cfg.optim, [Leaf(s.name, s.tensor, s.shape) for s in self.net.param_slots]))
        self.window = StackedWindow([run.window for run in runs], runs[0].data.num_classes)
        for run in runs:
            # The replicas' own optimizers never step (the stack does their work), which
            # their lr schedulers would otherwise warn about at their first step.
            run.optimizer._opt_called = True  # type: ignore[attr-defined]
        for r, run in enumerate(runs):
            run.window = ReplicaWindow(self.window, r)

    def lend(self, r: int) -> None:
        """Replica ``r``'s gradients and optimizer state into its standalone parts, for a report or a checkpoint."""
        self.net.grad_views(r, self.runs[r].model)
        self.optimizer.export(r, self.runs[r].optimizer)


class _Quiet:
    """The console of a replica whose stack shows one progress bar (the first replica's)."""

    def start(self, step: int) -> None: ...
    def update(self, step: int, scalars: dict[str, float], is_eval: bool) -> None: ...
    def stop(self) -> None: ...


# --------------------------------------------------------------------------- the loop


def train_replicas(jobs: list[ReplicaJob]) -> list[dict[str, Any] | ConfigError]:
    """Train ``jobs`` as stacks of replicas; returns, per job, its metrics.json
    record, or the ConfigError that stopped it while setting up (the others go on).

    Replicas resumed at different steps form separate stacks. Holds every run
    dir's lock throughout. Raises RunInterrupted after an interruption was
    saved; any other exception fails every replica still training.
    """
    out: list[dict[str, Any] | ConfigError] = [ConfigError("replicas", "not trained")] * len(jobs)
    with contextlib.ExitStack() as locks:
        runs: list[tuple[int, Run]] = []
        for i, job in enumerate(jobs):
            with current(job.run_dir):
                try:
                    locks.enter_context(run_lock(job.run_dir))
                    runs.append((i, setup(job.cfg, job.run_dir, job.resume, None, job.extra_record)))
                except ConfigError as e:
                    out[i] = e
        for stack in _stacks(runs):
            # A resumed stack keeps the thread count it was trained with, as a resumed run does.
            recorded = next((jobs[i].record for i, _ in stack if jobs[i].resume and jobs[i].record), None)
            with recorded_threads(stack[0][1].cfg, recorded):
                for (i, run), record in zip(stack, _train_stack([run for _, run in stack])):
                    out[i] = record
    return out


def _stacks(runs: list[tuple[int, Run]]) -> list[list[tuple[int, Run]]]:
    """Runs at the same step, stacked; within a stack ordered so that replicas
    sharing norm.eps and norm.momentum are neighbours (one folded norm layer each)."""
    by_step: dict[int, list[tuple[int, Run]]] = {}
    for i, run in runs:
        by_step.setdefault(run.state.step, []).append((i, run))
    return [sorted(group, key=lambda ir: (float(ir[1].cfg.norm.eps), float(ir[1].cfg.norm.momentum))) for group in by_step.values()]


def _train_stack(runs: list[Run]) -> list[dict[str, Any]]:
    R, first = len(runs), runs[0]
    for r, run in enumerate(runs):
        run.tracker.record.data["replica"] = {"index": r, "of": R}
    status = ["running"] * R
    active = list(range(R))  # replicas still training
    ended: set[int] = set()
    stopped = False
    try:
        stack = Stack(runs)
        # train.threads for the stack's step, R replicas' work in one process (auto:
        # the rule sees R times a replica's FLOPs); each replica records the count.
        threads = set_threads(first.cfg.train.threads, first.model, first.data.x_train[:1], R * first.cfg.train.batch_size, first.device)
        augmenting = not isinstance(first.augment, NoAugment)
        for run in runs:
            run.tracker.record.data["env"]["threads"] = threads
            run.tracker.record.write(status="running")
        first.tracker.console.start(first.state.step)
        if first.tracker.console.progress is not None:  # in a terminal: one bar for the stack; else each replica logs its evals
            for run in runs[1:]:
                run.tracker.console = _Quiet()  # type: ignore[assignment]
        with stop_on_signal() as stop, frozen_gc():
            t0 = time.perf_counter()
            for run in runs:  # the stack's clock, not each setup's
                run.t0, run.window_t0 = t0 - run.state.train_time, t0
            data = first.data
            for step in range(first.state.step + 1, first.total + 1):
                idx = torch.stack([run.sampler.next() for run in runs])
                x, y = data.x_train[idx], data.y_train[idx]
                if augmenting:  # each replica's own crops and flips, from its own generator (data.augment)
                    x = torch.stack([run.augment(xr) for run, xr in zip(runs, x)])
                losses, logits = stack.train_step.step(x, y)
                stack.window.add(step, losses, logits, y)
                if first.schedule.changes:
                    for run in runs:
                        run.schedule.step()
                    stack.optimizer.set_lr([run.schedule.lr() for run in runs])
                for r in active:
                    runs[r].state.step = step
                if first.reports_at(step):
                    now = clock(first.device)
                    for r in list(active):
                        with current(runs[r].run_dir):
                            stack.lend(r)
                            if report(runs[r], step, x[r], y[r], now) == "diverged":
                                status[r] = "diverged"
                                active.remove(r)
                                stack.optimizer.freeze(r)
                                end(runs[r], "diverged")
                                ended.add(r)
                    for r in active:
                        window_clock(runs[r], step, now)
                if first.checkpoint_every and step % first.checkpoint_every == 0 and step != first.total:
                    for r in active:
                        _save(stack, r)
                for r in active:
                    runs[r].tracker.record.heartbeat()
                if not active:
                    break
                if stop.is_set():
                    stopped = True
                    break
            final = "interrupted" if stopped else "completed"
            for r in active:
                status[r] = final
        for r in active:
            with current(runs[r].run_dir):
                stack.lend(r)
                finish(runs[r], status[r])
    except BaseException as e:
        for r in active:
            status[r] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            runs[r].tracker.record.data["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        for r, run in enumerate(runs):
            if r not in ended:
                with current(run.run_dir):
                    end(run, status[r])
    if stopped:
        raise ReplicasInterrupted([runs[r].run_dir for r in active], runs[active[0]].state.step)
    return [run.tracker.record.data for run in runs]


def _save(stack: Stack, r: int) -> None:
    with current(stack.runs[r].run_dir):
        stack.lend(r)
        save(stack.runs[r])

