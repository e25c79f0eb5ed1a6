"""Vectorized replicas: R runs that differ only in their seed (and in shape-free
scalars: optim.lr, optim.momentum, optim.weight_decay, norm.momentum, norm.eps,
model.init_std) trained as one stacked model (``hydra/launcher=vectorized``),
by :func:`bnexp.train.loop`, the loop every run trains in, with a
:class:`StackedStepper`.

Each replica is a whole :class:`bnexp.train.Run`, set up by :func:`bnexp.train.setup`
exactly as its standalone run would be (its own seed, so its own initial
weights; its own sampler, logging window, probes, tracker, run dir, resumed
from its own checkpoint). The stepper folds the R models into one
:class:`bnexp.models.stacked.StackedNet`, points each replica's model and
logging window at its slice of the stacked storage, and steps the stack once
per step for every replica. Whatever the loop does for one replica (report,
checkpoint, finish, end) runs the standalone code on that replica's own parts,
inside :meth:`StackedStepper.own`, which lends it its gradients, optimizer and
schedule state, RNG states and log file; so a checkpoint has the standalone
format, which ``bnexp resume`` continues alone.

A replica that diverges is recorded as diverged at its own step and frozen: its
gradients and optimizer state are zeroed from then on; the replicas never share
a value (own channels, own batch statistics, own losses), so its NaNs reach no
other replica.

Which jobs stack is decided by trying (:func:`stacks_of`): jobs whose configs
agree but for ``seed`` and SCALAR_KEYS are grouped, and a group whose network
does not fold (a part without a fold rule) trains job by job.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig

from bnexp import data as data_mod
from bnexp import distributed
from bnexp.augment import NoAugment
from bnexp.checkpoint import rng_state, set_rng_state
from bnexp.clip import Leaf, make_clip
from bnexp.config import Amp, ConfigError, flatten, launch_world_size, plain
from bnexp.models import build_model
from bnexp.models.stacked import NotStackable, Slot, StackedNet
from bnexp.rundir import ReplicasInterrupted, run_lock  # noqa: F401  (ReplicasInterrupted: raised from here)
from bnexp.runtime import recorded_threads, set_threads, step_flops
from bnexp.step import LogWindow, LrSchedule, TrainStep
from bnexp.tracking import print_summary
from bnexp.train import Run, end, loop, setup

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


# --------------------------------------------------------------------------- which jobs stack

# Keys whose values may differ among the replicas of one stack: none changes a tensor's shape.
SCALAR_KEYS = ("optim.lr", "optim.momentum", "optim.weight_decay", "norm.momentum", "norm.eps", "model.init_std")


def alone_reason(cfg: DictConfig) -> str | None:
    """Why a job cannot be a replica of a stack, from its config alone (None:
    it can, if its network folds and stacking pays: :func:`stack_reason`)."""
    try:
        flat = flatten(plain(cfg))
    except Exception:  # noqa: BLE001
        return "its config does not resolve"  # its job then says why
    if flat.get("train.amp") == Amp.fp16.value:
        # One GradScaler has one loss scale, and skips the step of every parameter it
        # scales when any gradient overflows; R replicas would need R scales and R skips.
        return "train.amp=fp16: one grad scaler would skip a step for every replica when one overflows"
    if launch_world_size() > 1:
        return "under torchrun: the ranks of a data-parallel run share each job"
    return None


def stack_key(cfg: DictConfig) -> str | None:
    """What a job's config must share with another's to be stacked with it: all
    of it but ``seed`` and SCALAR_KEYS. None: it trains alone (:func:`alone_reason`)."""
    if alone_reason(cfg) is not None:
        return None
    flat = flatten(plain(cfg))
    for key in ("seed", *SCALAR_KEYS):
        flat.pop(key, None)
    return json.dumps(flat, sort_keys=True, default=str)


# On the CPU, a replica whose training step has more matmul/conv work than this
# trains alone: stacking saves per-op overhead (Python, dispatch, small kernels),
# which such a step hardly has. Measured (one thread, CPU time, R=4 stacked vs 4
# steps alone, shared 2-core box at load 8): the BN-paper MLP (36 MFLOP) 1.58x,
# 784-256x3 at batch 128 (257 MFLOP) 1.23x, 784-512x3 (715 MFLOP) 0.92x; a CNN
# 8-16 (108 MFLOP) 1.03x, 32-64-128 (2862 MFLOP) 0.91x (convolutions run one per
# replica on the CPU: bnexp.models.stacked). On a GPU every stack pays (launches).
STACK_MAX_FLOPS = 2e8


def stack_reason(cfg: DictConfig) -> str | None:
    """Why jobs of ``cfg`` train one by one rather than stacked, or None: they
    stack. Found by folding the network (as a stack of one): a part without a
    fold rule; on the CPU, a step too large to gain (STACK_MAX_FLOPS). The data
    is loaded for its shapes as the job loads it, so the job's own load finds it
    cached (bnexp.data.load)."""
    try:
        device = distributed.current().device(cfg.train.device)
        data = data_mod.load(cfg.data, device)
        model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_classes)
        StackedNet([model])
    except NotStackable as e:
        return f"the stacked model has no fold rule for {e}"
    except Exception as e:  # noqa: BLE001  a config that does not build: each job says why
        return f"its network does not build ({type(e).__name__})"
    if device.type == "cpu":
        flops = step_flops(model, data.x_train[:1].cpu(), int(cfg.train.batch_size))
        if flops > STACK_MAX_FLOPS:
            return f"a step of {flops / 1e6:.0f} MFLOP keeps a CPU core busy alone: stacking gains nothing above {STACK_MAX_FLOPS / 1e6:.0f}"
    return None


def stacks_of(cfgs: list[DictConfig | None], max_replicas: int) -> tuple[list[list[int]], dict[str, int]]:
    """The positions of ``cfgs`` grouped into stacks of at most ``max_replicas``
    (a None config, or one no other shares, alone), in order of each stack's first
    job; and why jobs that could have stacked run alone (reason -> jobs)."""
    groups: dict[str, list[int]] = {}
    order: list[list[int]] = []
    reasons: Counter[str] = Counter()
    for i, cfg in enumerate(cfgs):
        why = None if cfg is None else alone_reason(cfg)
        key = None if cfg is None or why is not None else stack_key(cfg)
        if why is not None:
            reasons[why] += 1
        if key is None:
            order.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
            order.append(groups[key])
    stacks: list[list[int]] = []
    for group in order:
        why = stack_reason(cfgs[group[0]]) if len(group) > 1 else None  # type: ignore[arg-type]
        if why is not None:  # decided by trying: job by job
            reasons[why] += len(group)
            stacks += [[i] for i in group]
        else:
            stacks += [group[j : j + max_replicas] for j in range(0, len(group), max_replicas)]
    return stacks, dict(reasons)


@dataclass
class ReplicaJob:
    cfg: DictConfig
    run_dir: Path
    resume: bool = False
    extra_record: dict[str, Any] | None = None
    record: dict[str, Any] | None = None  # the run dir's metrics.json when resuming (its recorded thread count)


# --------------------------------------------------------------------------- the optimizer


@dataclass
class _Piece:
    """What the optimizer steps of one stacked tensor for one param group:
    replicas ``r0 .. r1-1`` of ``slot``; ``leaf`` is the slot's tensor itself when
    the group covers all of its replicas, else a view of those rows."""

    slot: Slot
    leaf: torch.Tensor
    r0: int
    r1: int

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like ``leaf``: its state or gradient) as [r1 - r0, *standalone shape]."""
        return t.view(self.r1 - self.r0, *self.slot.shape)


class StackedOptimizer:
    """The replicas' own torch optimizer (SGD, Adam, AdamW) over the stacked
    tensors, with one param group per range of consecutive replicas whose
    hyperparameters agree: a stack of seeds is one group, an lr sweep stacked
    one group per lr. Its settings are theirs, foreach included, so torch runs
    each standalone run's very code path (foreach on CUDA, its per-tensor loop
    on the CPU; the two differ: foreach nesterov SGD updates the gradients in
    place). A group steps a view of a tensor's rows where it covers only some of
    its replicas; the views' gradients are pointed at the tensor's before each
    step. ``schedule`` is the replicas' lr schedule over the groups.

    Why torch's optimizer even for replicas that differ: its cost grows with the
    param groups, each a pass over the network's tensors. Measured (the BN-paper
    MLP, R=8, one thread, CPU time a step, shared 2-core box): 8 lrs, 1.7-2.1 ms
    for the optimizer against 0.35 ms for the hand-written version it replaced
    ([R] hyperparameter tensors broadcast over each stacked tensor), in a 6.5 ms
    step; one lr, 0.40-0.44 against 0.31 ms. An lr sweep stacked pays that
    share (+20-30% with every replica distinct, less with seeds per lr) rather
    than bnexp keeping 165 lines of private ``torch._foreach_*`` calls.

    Each replica's own optimizer and schedule (never stepped) give the
    hyperparameters, and their state goes in (when resuming) and out
    (:meth:`lend`) in torch's format, for ``bnexp resume`` to load."""

    def __init__(self, net: StackedNet, runs: list[Run]):
        shells = [run.optimizer for run in runs]
        hyper = [{k: v for k, v in opt.param_groups[0].items() if k != "params"} for opt in shells]
        ranges: list[list[int]] = []  # [r0, r1) with equal hyperparameters
        for r in range(len(runs)):
            if r and hyper[r] == hyper[r - 1]:
                ranges[-1][1] = r + 1
            else:
                ranges.append([r, r + 1])
        self.ranges = ranges
        self.pieces: list[list[_Piece]] = []
        for g0, g1 in ranges:
            pieces = []
            for s in net.param_slots:
                a, b = max(g0, s.r0), min(g1, s.r0 + s.n)
                if a < b:
                    whole = (a, b) == (s.r0, s.r0 + s.n)
                    pieces.append(_Piece(s, s.tensor if whole else s.view(s.tensor.detach())[a - s.r0 : b - s.r0], a, b))
            self.pieces.append(pieces)
        # The tensors stepped through views of their rows, each with its pieces in replica order.
        split: dict[int, list[_Piece]] = {}
        for p in (p for pieces in self.pieces for p in pieces if p.leaf is not p.slot.tensor):
            split.setdefault(id(p.slot), []).append(p)
        self.split = [(ps[0].slot, ps, [p.r1 - p.r0 for p in ps]) for ps in (sorted(v, key=lambda p: p.r0) for v in split.values())]
        self.group_of = [next(g for g, (g0, g1) in enumerate(ranges) if g0 <= r < g1) for r in range(len(runs))]
        groups = [{**hyper[g0], "params": [p.leaf for p in pieces]} for (g0, _), pieces in zip(ranges, self.pieces)]
        self.torch: torch.optim.Optimizer = type(shells[0])(groups)
        self.torch.register_step_pre_hook(self._before_step)
        self.frozen: list[int] = []
        # Replica r's parameters in its own optimizer's order, each with its piece.
        self.params = []
        for r, run in enumerate(runs):
            names = {p: n for n, p in run.model.named_parameters()}
            self.params.append([(p, self._piece(names[p], r)) for p in run.optimizer.param_groups[0]["params"]])
        self._import(shells)
        # The replicas' schedule over the groups, at each group's first replica's step and lr.
        self.schedule = LrSchedule(runs[0].cfg.optim, self.torch, runs[0].total)
        heads = [runs[g0] for g0, _ in ranges]
        states = [run.schedule.state_dict() for run in heads]
        self.schedule.load_state_dict({k: [s[k][0] for s in states] if isinstance(v, list) else v for k, v in states[0].items()})
        for group, run in zip(self.torch.param_groups, heads):
            group["lr"] = run.optimizer.param_groups[0]["lr"]

    def _piece(self, name: str, r: int) -> _Piece:
        return next(p for p in self.pieces[self.group_of[r]] if p.slot.name == name and p.r0 <= r < p.r1)

    def clear_split_grads(self) -> None:
        """Before each step: the gradients of tensors stepped through views (the optimizer's zero_grad clears the views')."""
        for slot, _, _ in self.split:
            slot.tensor.grad = None

    def _before_step(self, *args: Any) -> None:
        for slot, pieces, rows in self.split:
            g = slot.tensor.grad
            for p, view in zip(pieces, [None] * len(pieces) if g is None else slot.view(g).split(rows)):
                p.leaf.grad = view
        for r in self.frozen:
            for p in self.pieces[self.group_of[r]]:
                if p.leaf.grad is not None and p.r0 <= r < p.r1:
                    p.rows(p.leaf.grad)[r - p.r0].zero_()

    def _import(self, shells: list[torch.optim.Optimizer]) -> None:
        """The replicas' own optimizer states (restored from their checkpoints) into the stacked one."""
        if not any(opt.state for opt in shells):
            return  # nothing saved yet: the first step initializes the state as torch does
        sd = self.torch.state_dict()
        index = 0
        for pieces in self.pieces:
            for piece in pieces:
                states = [shells[r].state.get(self._param(r, piece), {}) for r in range(piece.r0, piece.r1)]
                if states[0]:
                    sd["state"][index] = {k: v.clone() if v.dim() == 0 else torch.stack([st[k] for st in states]).view_as(piece.leaf)
                                          for k, v in states[0].items()}
                index += 1
        self.torch.load_state_dict(sd)

    def _param(self, r: int, piece: _Piece) -> torch.Tensor:
        return next(p for p, q in self.params[r] if q is piece)

    def lend(self, r: int, run: Run) -> None:
        """Replica ``r``'s state and lr, and its schedule's, into ``run``'s own optimizer
        and schedule, as its standalone run would hold them (copies)."""
        g, shell = self.group_of[r], run.optimizer
        # LambdaLR's state keeps a list per param group (base_lrs, _last_lr, lr_lambdas): the replica's group's.
        run.schedule.load_state_dict({k: [v[g]] if isinstance(v, list) and len(v) == len(self.ranges) else v
                                      for k, v in self.schedule.state_dict().items()})
        state = {}
        for i, (_, piece) in enumerate(self.params[r]):
            st = self.torch.state.get(piece.leaf)
            if st:
                state[i] = {k: (v if v.dim() == 0 else piece.rows(v)[r - piece.r0]).clone() for k, v in st.items()}
        group = {k: v for k, v in shell.param_groups[0].items() if k != "params"}
        group.update(lr=self.torch.param_groups[g]["lr"], params=list(range(len(self.params[r]))))
        shell.load_state_dict({"state": state, "param_groups": [group]})

    def freeze(self, r: int) -> None:
        """Replica ``r`` stops: from now on zero gradients and zero optimizer state."""
        self.frozen.append(r)
        with torch.no_grad():
            for p in self.pieces[self.group_of[r]]:
                if p.r0 <= r < p.r1:
                    for v in self.torch.state.get(p.leaf, {}).values():
                        if v.dim():
                            p.rows(v)[r - p.r0].zero_()


# --------------------------------------------------------------------------- the stepper


def per_replica(loss_fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn`` (train.loss: a mean over the batch) for a stack: each replica's
    own mean loss [R], from outputs [R, B, ...] and targets [R, B, ...]."""

    def losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(out.flatten(0, 1), y.flatten(0, 1), reduction="none").view(len(y), -1).mean(1)

    return losses


class StackedStepper:
    """Trains R replica runs set up alike (same config but for the shape-free
    scalars, same step) as one stacked model, for :func:`bnexp.train.loop`:
    the standalone :class:`bnexp.train.Stepper`'s four members."""

    def __init__(self, runs: list[Run], rngs: list[dict[str, Any]]):
        self.runs, self.rngs = runs, rngs  # rngs: each replica's RNG states, as its setup left them
        self.index = {run: r for r, run in enumerate(runs)}
        first, R = runs[0], len(runs)
        cfg, models = first.cfg, [run.model for run in runs]
        self.net = StackedNet(models)
        self.net.alias(models)
        self.optimizer = StackedOptimizer(self.net, runs)
        self.train_step = TrainStep(self.net, self.optimizer.torch, Amp(cfg.train.amp), first.device, bool(cfg.train.compile),
                                    per_replica(first.loss_fn), clip=make_clip(cfg.optim, [Leaf(s.name, s.tensor, s.shape) for s in self.net.param_slots]))
        w = first.window
        self.window = LogWindow(w.log_every, first.total, w.batch_size, first.data.num_classes, first.device, w.accuracy, replicas=R)
        self.window.buf = torch.stack([run.window.buf for run in runs])
        self.last = first.state.step  # the last step trained
        self.augmenting = not isinstance(first.augment, NoAugment)
        # train.threads for the stack's step (auto on a CPU: one); each replica records the count.
        threads = set_threads(cfg.train.threads, first.model, first.data.x_train[:1], R * cfg.train.batch_size, first.device, stack=True)
        for r, run in enumerate(runs):
            run.window.buf = self.window.buf[r]  # its rows: read and checkpointed by the standalone code
            run.tracker.record.data["replica"] = {"index": r, "of": R}
            run.tracker.record.data["env"]["threads"] = threads
            if r and first.tracker.console.progress is not None:  # in a terminal: one bar for the stack; else each logs its evals
                run.tracker.console = _Quiet()  # type: ignore[assignment]

    def step(self, step: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        runs, data = self.runs, self.runs[0].data
        idx = torch.stack([run.sampler.next() for run in runs])
        # index_select of the flat indices: 0.07 ms against x_train[idx]'s 0.28 ms for [8, 60] rows of 784 (one thread).
        x = data.x_train.index_select(0, idx.flatten()).unflatten(0, idx.shape)
        y = data.y_train.index_select(0, idx.flatten()).unflatten(0, idx.shape)
        if self.augmenting:  # each replica's own crops and flips, from its own generator (data.augment)
            x = torch.stack([run.augment(xr) for run, xr in zip(runs, x)])
        self.optimizer.clear_split_grads()
        losses, logits = self.train_step.step(x, y)
        self.window.add(step, losses, logits, y)
        self.optimizer.schedule.step()
        self.last = step
        return zip(x, y)  # each replica's batch, made only when a report reads it

    @contextlib.contextmanager
    def own(self, run: Run) -> Iterator[None]:
        r = self.index[run]
        with current(run.run_dir):
            self.window.fold(self.last)
            self.net.grad_views(r, run.model)
            self.optimizer.lend(r, run)
            process = rng_state()
            set_rng_state(self.rngs[r])
            try:
                yield
            finally:
                self.rngs[r] = rng_state()
                set_rng_state(process)

    def freeze(self, run: Run) -> None:
        self.optimizer.freeze(self.index[run])


class _Quiet:
    """The console of a replica whose stack shows one progress bar (the first replica's)."""

    def start(self, step: int) -> None: ...
    def update(self, step: int, scalars: dict[str, float], is_eval: bool) -> None: ...
    def stop(self) -> None: ...


# --------------------------------------------------------------------------- training


def train_replicas(jobs: list[ReplicaJob]) -> list[dict[str, Any] | ConfigError]:
    """Train ``jobs`` (as :func:`stacks_of` grouped them) as stacks of replicas;
    returns, per job, its metrics.json record, or the ConfigError that stopped it
    while setting up (the others go on).

    Replicas resumed at different steps form separate stacks. Holds every run
    dir's lock throughout. Raises ReplicasInterrupted after an interruption was
    saved; any other exception fails every replica still training.
    """
    out: list[dict[str, Any] | ConfigError] = [ConfigError("replicas", "not trained")] * len(jobs)
    with contextlib.ExitStack() as locks:
        runs: list[tuple[int, Run, dict[str, Any]]] = []
        for i, job in enumerate(jobs):
            with current(job.run_dir):
                try:
                    locks.enter_context(run_lock(job.run_dir))
                    runs.append((i, setup(job.cfg, job.run_dir, job.resume, None, job.extra_record), rng_state()))
                except ConfigError as e:
                    out[i] = e
        for stack in _stacks(runs):
            # A resumed stack keeps the thread count it was trained with, as a resumed run does.
            recorded = next((jobs[i].record for i, _, _ in stack if jobs[i].resume and jobs[i].record), None)
            with recorded_threads(stack[0][1].cfg, recorded):
                interrupted = loop(_stepper([run for _, run, _ in stack], [rng for _, _, rng in stack]))
            for i, run, _ in stack:
                out[i] = run.tracker.record.data
            if interrupted is not None:
                raise interrupted
    return out


def train_alone(cfg: DictConfig, run_dir: Path, resume: bool = False, extra_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One replica of a stack trained again on its own (``bnexp resume``, ``bnexp
    reproduce``) as a stack of one, which computes it as its stack did: a batched
    matmul per replica, norms over its own channels, a convolution per replica on
    the CPU, its own window rows, one thread (train.threads=auto). On the CPU its
    numbers are then the stack's, bit for bit (:func:`replica_caveat` says where
    not). Returns its metrics.json record; raises ConfigError as :func:`bnexp.train.train`."""
    [out] = train_replicas([ReplicaJob(cfg, Path(run_dir), resume, extra_record)])
    if isinstance(out, ConfigError):
        raise out
    print_summary(out, Path(run_dir))
    return out


def replica_caveat(record: dict[str, Any]) -> str | None:
    """Why a stack of one cannot give the numbers that the replica of ``record``
    (its metrics.json) had in its stack, in one line; None: it gives them exactly."""
    replica, env = record.get("replica") or {}, record.get("env") or {}
    where = f"replica {replica.get('index')} of a stack of {replica.get('of')}"
    if not str(env.get("device", "cpu")).startswith("cpu"):
        return f"{where} on {env.get('device')}: its kernels need not add one replica's products in the order they add R replicas' (bit-identical on the CPU only)"
    threads = env.get("threads")
    if isinstance(threads, int) and threads > 1:
        return f"{where} with {threads} threads: a batched matmul splits one replica's work over threads otherwise than R replicas' (bit-identical with train.threads=1 or auto)"
    return None


def _stepper(runs: list[Run], rngs: list[dict[str, Any]]) -> StackedStepper:
    try:
        return StackedStepper(runs, rngs)
    except BaseException as e:  # nothing trained: each replica ends failed
        for run in runs:
            with current(run.run_dir):
                run.tracker.record.data["error"] = f"{type(e).__name__}: {e}"
                end(run, "failed")
        raise


def _stacks(runs: list[tuple[int, Run, dict[str, Any]]]) -> list[list[tuple[int, Run, dict[str, Any]]]]:
    """Runs at the same step, stacked; within a stack ordered so that replicas
    sharing norm.eps and norm.momentum are neighbours (one folded norm layer
    each), and among those, replicas sharing optimizer hyperparameters (one param group each)."""
    by_step: dict[int, list[tuple[int, Run, dict[str, Any]]]] = {}
    for item in runs:
        by_step.setdefault(item[1].state.step, []).append(item)

    def key(item: tuple[int, Run, dict[str, Any]]) -> tuple[float, ...]:
        n, o = item[1].cfg.norm, item[1].cfg.optim
        return float(n.eps), float(n.momentum), float(o.lr), float(o.momentum), float(o.weight_decay)

    return [sorted(group, key=key) for group in by_step.values()]
