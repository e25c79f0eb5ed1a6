"""The training loop: one function, :func:`train`, readable top to bottom.

Speed choices, all visible here: the dataset sits on the device as tensors and
is indexed by a seeded permutation (no DataLoader); the step never copies to
the host except on logging steps (losses, accuracies and a divergence flag
accumulate on the device); gradient norms are one fused pass on logging steps;
evaluation runs under ``inference_mode`` in large batches.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnexp import data as data_mod
from bnexp.config import Amp, ConfigError, ModelKind, OptimName, Schedule, config_hash, flatten, plain, steps_per_epoch
from bnexp.models import build_model
from bnexp.runtime import pick_device, seed_everything, set_threads
from bnexp.probes import ActivationProbe, LayerNorms, to_host
from bnexp.record import CHECKPOINT, RunInterrupted, process_info, run_lock  # noqa: F401  (CHECKPOINT, RunInterrupted: their home is torch-free)
from bnexp.tracking import Tracker, env_info, print_summary

log = logging.getLogger("bnexp")

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "sampler", "rng", "state", "window", "final", "best")


# --------------------------------------------------------------------------- setup


def total_steps(cfg: DictConfig, n_train: int) -> int:
    if n_train < cfg.train.batch_size:
        raise ConfigError("train.batch_size", f"{cfg.train.batch_size} is larger than the {n_train} training examples; allowed: <= {n_train}")
    if cfg.train.epochs is not None:
        return int(cfg.train.epochs) * steps_per_epoch(n_train, cfg.train.batch_size)
    return int(cfg.train.steps)


def base_lr(cfg: DictConfig, batch_size: int | None) -> float:
    """optim.lr, scaled by batch_size / optim.base_batch_size when that is set (linear scaling rule)."""
    if cfg.get("base_batch_size") is None or batch_size is None:
        return float(cfg.lr)
    return float(cfg.lr) * batch_size / cfg.base_batch_size


def build_run_model(cfg: DictConfig, data: data_mod.Splits, device: torch.device) -> nn.Module:
    """The model a run trains: built for the data's shape, on ``device``, and
    channels_last for a CNN on images on CUDA (cuDNN's fast layout for conv + BN)."""
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_classes).to(device)
    if ModelKind(cfg.model.kind) == ModelKind.cnn and device.type == "cuda" and data.x_train.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(cfg: DictConfig, model: nn.Module, batch_size: int | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name, lr = OptimName(cfg.name), base_lr(cfg, batch_size)
    if name == OptimName.sgd:
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if name == OptimName.adam else torch.optim.AdamW
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


def keep_norms_fp32(model: nn.Module) -> None:
    """Under autocast, run every norm layer in fp32 (as cifar10-airbench does):
    batch statistics of half-precision activations lose too much."""
    from bnexp.norms import NORM_TYPES

    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            forward = module.forward

            def fp32_forward(x: torch.Tensor, _forward=forward) -> torch.Tensor:
                with torch.autocast(x.device.type, enabled=False):
                    return _forward(x.float())

            module.forward = fp32_forward


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, amp: Amp, device: torch.device, compile: bool):
    """The step: forward, loss, backward, update. Returns (loss, logits) on the device.

    They still carry their autograd history (already freed by backward, apart
    from the node objects): detaching them costs ~1 us each a step, so whoever
    computes with them does so under ``torch.no_grad()``."""
    dtype = {Amp.bf16: torch.bfloat16, Amp.fp16: torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == Amp.fp16)

    if dtype is None:
        # The plain step, exactly as written by hand: without amp, entering even a
        # disabled autocast costs 10-40 us on CPU, and the disabled GradScaler's
        # scale/step/update calls with detaches and casts another ~6 us (together
        # 2-7% of the BN-paper MLP's ~0.7 ms step on a 2-core CPU).
        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
    else:
        keep_norms_fp32(model)

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast(device.type, dtype=dtype):
                logits = model(x)
            return F.cross_entropy(logits.float(), y), logits

    # train.compile compiles forward + loss as one graph (backward is compiled
    # with it by AOTAutograd), so the loss fuses into the forward's kernels;
    # the optimizer step stays eager (foreach on CUDA).
    forward_loss_ = torch.compile(forward_loss) if compile else forward_loss

    if scaler.is_enabled():
        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            optimizer.zero_grad(set_to_none=True)
            loss, logits = forward_loss_(x, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return loss, logits
    else:
        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            optimizer.zero_grad(set_to_none=True)
            loss, logits = forward_loss_(x, y)
            loss.backward()
            optimizer.step()
            return loss, logits

    step.scaler = scaler  # type: ignore[attr-defined]  (checkpointed; a no-op one without fp16)
    return step


# Logits kept pending before they are folded (16 MB of floats).
WINDOW_LOGITS = 1 << 22


class PendingSteps:
    """The losses, logits and labels of the training steps not yet folded into the logging window.

    A step only keeps references to its loss, logits and labels: no copy, no
    kernel, no host sync. A per-step argmax and sums into running totals cost
    several kernels a step (~10% of the BN-paper MLP's step on an H200, which
    is launch-bound), and even one copy into a preallocated buffer cost ~1.4% of
    it on a 2-core CPU, where keeping the references costs ~0.5%. :meth:`fold`
    stacks the losses and counts correct predictions in one batched pass: at
    logging steps, before a checkpoint, and whenever WINDOW_LOGITS logits are
    pending.
    """

    def __init__(self, batch_size: int, num_classes: int):
        self.limit = max(1, WINDOW_LOGITS // (batch_size * num_classes))
        self.losses: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, window: torch.Tensor, col: int) -> None:
        self.losses.append(loss)
        self.logits.append(logits)
        self.labels.append(labels)
        if len(self.logits) == self.limit:
            self.fold(window, col)

    @torch.no_grad()
    def fold(self, window: torch.Tensor, last_col: int) -> None:
        """Write the pending steps' losses and correct counts into window[0] and
        window[1] at columns ``last_col - n + 1 .. last_col`` (column 0: the
        window's first step). Each step's values are its own, whichever steps
        are folded together, so a run resumed mid-window logs bit-identical values."""
        if not self.logits:
            return
        cols = slice(last_col - len(self.logits) + 1, last_col + 1)
        # Written in place (out=): this runs once per window with cold caches,
        # where each op saved is ~20 us on CPU. Losses are fp32 (amp casts logits first).
        torch.stack(self.losses, out=window[0, cols])
        # argmax via max(): over 10 classes argmax runs ~4x slower on CPU.
        correct = torch.stack(self.logits).max(-1).indices == torch.stack(self.labels)
        torch.sum(correct, 1, dtype=window.dtype, out=window[1, cols])
        self.losses, self.logits, self.labels = [], [], []


def window_values(window: torch.Tensor, sums: list[float], steps: int, batch_size: int, first_step: int) -> tuple[dict[str, float], int | None]:
    """``train/loss`` and ``train/acc`` of the window's first ``steps`` steps from
    ``sums`` (its summed losses and correct counts, already on the host), and the
    first step whose loss is not finite (None: none; the window's first step is
    ``first_step``). Only a non-finite sum looks at single steps."""
    loss_sum, correct = sums
    bad_step = None
    if not math.isfinite(loss_sum):
        bad = (~torch.isfinite(window[0, :steps])).nonzero().flatten().tolist()
        bad_step = first_step + (bad[0] if bad else steps - 1)  # no single bad step: the sum overflowed
    return {"train/loss": loss_sum / steps, "train/acc": correct / (steps * batch_size)}, bad_step


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size]).float()
        loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum()
    model.train()
    return {"loss": loss / len(x), "acc": correct.float() / len(x)}


@contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- state


@dataclass
class LoopState:
    """What the loop carries between steps besides model and optimizer; all of it is checkpointed."""

    step: int = 0
    steps_to_target: int | None = None
    window_start_step: int = 0
    diverged: dict[str, Any] | None = None
    train_time: float = 0.0  # seconds spent in this run's loop, over all resumes
    done: bool = False  # the final eval and test are logged; only the status is left to write


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    name, key, *rest = s["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, scaler, sampler, state: LoopState, window, tracker) -> None:
    from bnexp.io import atomic_write

    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_state(),
        "state": state.__dict__.copy(),
        "window": list(window.cpu()),  # two rows, losses and correct counts
        "final": dict(tracker.final),
        "best": dict(tracker.best),
    }
    atomic_write(run_dir / CHECKPOINT, lambda f: torch.save(ckpt, f), mode="wb")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """weights_only=True: a checkpoint can hold tensors and plain containers, never code
    (a pickle that would import or call anything is refused, not run)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types for a bad file
        raise ConfigError("checkpoint", f"{path} is not a readable bnexp checkpoint ({type(e).__name__}); delete it to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise ConfigError("checkpoint", f"{path} is not a bnexp checkpoint (format {CHECKPOINT_FORMAT} with {', '.join(CHECKPOINT_KEYS)})")
    return ckpt


# --------------------------------------------------------------------------- the loop


def train(cfg: DictConfig, run_dir: Path, resume: bool = False, extra_record: dict[str, Any] | None = None,
          summary: bool = True, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the metrics.json record.

    With ``resume``, continues from ``checkpoint`` (as :func:`load_checkpoint`
    returned it; ``bnexp resume`` has checked it already) or else from
    ``run_dir/checkpoint.pt`` if there is one.

    Holds the run dir's lock (:func:`bnexp.record.run_lock`) from before the
    first write to after the last, so two processes never train into one run
    dir. Raises RunLocked (a ConfigError) if another process holds it, and
    ConfigError for problems found while setting up (data, sizes), in both cases
    before anything is written; KeyboardInterrupt after an interruption was saved.
    """
    with run_lock(run_dir):
        return _train(cfg, run_dir, resume, extra_record, summary, checkpoint)


def _train(cfg: DictConfig, run_dir: Path, resume: bool, extra_record: dict[str, Any] | None, summary: bool,
           checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    t = cfg.train
    device = pick_device(t.device)
    seed_everything(cfg.seed, t.deterministic)

    data = data_mod.load(cfg, device)
    total = total_steps(cfg, len(data.x_train))
    model = build_run_model(cfg, data, device)
    set_threads(t.threads, model, data.x_train[:1], t.batch_size, device)
    optimizer = make_optimizer(cfg.optim, model, t.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, total))
    # A constant schedule never changes the lr: skip LambdaLR.step (~8 us, 1% of a small MLP's step on CPU).
    lr_changes = Schedule(cfg.optim.schedule) != Schedule.constant or cfg.optim.warmup_steps > 0
    sampler = Sampler(len(data.x_train), t.batch_size, cfg.seed, device)
    train_step = make_train_step(model, optimizer, Amp(t.amp), device, t.compile)
    layer_norms = LayerNorms(model)
    has_val = len(data.x_val) > 0
    probe = ActivationProbe(model, (data.x_val if has_val else data.x_train)[: t.probe_size])

    state = LoopState()
    # The logging window on the device: row 0 each step's loss, row 1 its
    # correct count (column 0: the first step since the last logging step).
    # Steps not yet folded in wait in ``pending``.
    window = torch.zeros(2, min(t.log_every, total), device=device)
    pending = PendingSteps(t.batch_size, data.num_classes)
    cfg_plain = plain(cfg)
    record = {
        "status": "running", "steps": 0, "total_steps": total, "final": {}, "best": {}, "steps_to_target": None,
        "time": {"started_at": time.time()}, "env": env_info(device), "config_hash": config_hash(cfg),
        "num_params": sum(p.numel() for p in model.parameters()), "process": process_info(), **(extra_record or {}),
    }
    purge_step = None
    ckpt_path = run_dir / CHECKPOINT
    if resume and (checkpoint is not None or ckpt_path.exists()):
        ckpt = checkpoint if checkpoint is not None else load_checkpoint(ckpt_path)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            train_step.scaler.load_state_dict(ckpt["scaler"])
            sampler.load_state_dict(ckpt["sampler"])
            set_rng_state(ckpt["rng"])
            state = LoopState(**ckpt["state"])
            window.copy_(torch.stack(ckpt["window"]))
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError("checkpoint", f"{ckpt_path} does not fit this run's config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        record.update(final=ckpt["final"], best=ckpt["best"], steps_to_target=state.steps_to_target, resumed_from=state.step, steps=state.step)
        purge_step = state.step + 1  # drop events logged after the checkpoint by the dead run
        log.info("resuming %s from step %d", run_dir, state.step)
    elif any(run_dir.glob("events.out.tfevents.*")):
        purge_step = 0  # a restart from scratch: TensorBoard drops the earlier attempt's events

    hparams = flatten(cfg_plain)
    tracker = Tracker(run_dir, hparams, total, bool(t.progress), record, purge_step=purge_step)
    status = "running"
    t0 = time.perf_counter() - state.train_time
    window_t0 = time.perf_counter()

    def save() -> None:
        # Events first, then the checkpoint: a run killed later resumes from
        # here, and purge_step drops only events logged after this step.
        state.train_time = time.perf_counter() - t0
        pending.fold(window, state.step - state.window_start_step - 1)  # into the checkpointed window
        tracker.writer.flush()
        tracker.record.write(steps=state.step, final=tracker.final, best=tracker.best, steps_to_target=state.steps_to_target)
        save_checkpoint(run_dir, model, optimizer, scheduler, train_step.scaler, sampler, state, window, tracker)

    def eval_and_probe(step: int) -> None:
        out: dict[str, torch.Tensor] = {}
        if has_val:
            out.update({f"val/{k}": v for k, v in evaluate(model, data.x_val, data.y_val, t.eval_batch_size).items()})
        out.update(probe())
        values = to_host(out)
        tracker.scalars(step, values, is_eval=True)
        if t.target_acc is not None and state.steps_to_target is None and values.get("val/acc", 0) >= t.target_acc:
            state.steps_to_target = step

    # Plain ints for the per-step checks: a DictConfig lookup costs ~8 us.
    log_every, checkpoint_every = int(t.log_every), int(t.checkpoint_every)
    eval_every = int(t.eval_every) if t.eval_every is not None else sampler.per_epoch  # null: once per epoch
    x_train, y_train = data.x_train, data.y_train
    try:
        # From the "running" record on, the finally below writes how the run
        # ended, whenever a Ctrl-C or an error comes (even before the loop).
        tracker.record.write(status="running")
        tracker.console.start(state.step)
        # Hide everything made before the loop (imports, Hydra's config, data,
        # model: ~300k objects) from the cyclic garbage collector until the run
        # ends. A full collection otherwise scans them all (~100 ms on this
        # project's 2-core CPU) and lands in whichever step happens to trigger
        # it: 15% of a 1000-step BN-paper MLP run on CPU, and more in a sweep's
        # process, where each finished run leaves more behind. The young
        # generations are collected first (a few ms), so that setup's fresh
        # garbage is not kept for the whole run.
        gc.collect(1)
        gc.freeze()
        with stop_on_signal() as stop:
            for step in range(state.step + 1, total + 1):
                idx = sampler.next()
                y = y_train[idx]
                loss, logits = train_step(x_train[idx], y)
                pending.add(loss, logits, y, window, step - state.window_start_step - 1)
                if lr_changes:
                    scheduler.step()
                state.step = step

                if step % log_every == 0 or step == total:
                    n_steps = step - state.window_start_step
                    pending.fold(window, n_steps - 1)
                    # Everything the step logs in one device->host copy: window sums and per-parameter norms.
                    host = torch.cat([window[:, :n_steps].sum(1), layer_norms()]).tolist()
                    values, bad_step = window_values(window, host[:2], n_steps, len(idx), state.window_start_step + 1)
                    values.update(layer_norms.tags(host[2:]))
                    # fp16's GradScaler skips steps with inf gradients by design; its loss check suffices.
                    bad_grad = not math.isfinite(values["grad_norm/total"]) and not train_step.scaler.is_enabled()
                    if bad_step is not None or bad_grad:
                        # The values of the last logging step before it (none if it broke within the first window).
                        state.diverged = {"step": bad_step if bad_step is not None else step, "detected_at": step,
                                          "last_finite_step": state.window_start_step or None,
                                          "last_finite": {k: v for k, v in tracker.final.items()}}
                        tracker.scalars(step, values)
                        status = "diverged"
                        log.warning("diverged: non-finite loss or gradient at step %d", state.diverged["step"])
                        break
                    elapsed = time.perf_counter() - window_t0
                    values.update({"optim/lr": scheduler.get_last_lr()[0], "time/step_ms": 1000 * elapsed / n_steps,
                                   "time/samples_per_sec": n_steps * t.batch_size / elapsed,
                                   "time/steps_per_sec": n_steps / elapsed, "time/elapsed_sec": time.perf_counter() - t0})
                    tracker.scalars(step, values)
                    state.window_start_step = step
                    window_t0 = time.perf_counter()
                if step % eval_every == 0 and step != total:
                    eval_and_probe(step)
                if checkpoint_every and step % checkpoint_every == 0 and step != total:
                    save()
                tracker.record.heartbeat()
                if stop.is_set():
                    status = "interrupted"
                    break
            else:
                status = "completed"

        if status == "completed" and not state.done:
            eval_and_probe(total)
            test = evaluate(model, data.x_test, data.y_test, t.eval_batch_size)
            tracker.scalars(total, to_host({f"test/{k}": v for k, v in test.items()}), is_eval=True)
            state.done = True
        if status in ("completed", "interrupted"):
            save()
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        tracker.record.data["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        gc.unfreeze()  # back to the oldest generation: collectable once this run lets go of them
        wall = time.perf_counter() - t0
        tracker.record.write(
            status=status, steps=state.step, final=tracker.final, best=tracker.best, steps_to_target=state.steps_to_target,
            diverged=state.diverged,
            time={**tracker.record.data["time"], "wall_sec": wall, "steps_per_sec": state.step / max(wall, 1e-9), "finished_at": time.time()},
        )
        tracker.close(status)
    if summary:  # a sweep prints one table of all its jobs instead
        print_summary(tracker.record.data, run_dir)
    if status == "interrupted":
        raise RunInterrupted(run_dir, state.step)
    return tracker.record.data
