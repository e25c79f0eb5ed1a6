"""The training loop: :func:`train` (one run) and :func:`loop`, readable top to bottom.

:func:`setup` builds everything one run owns into a :class:`Run` (data, model,
optimizer, sampler, logging window, probes, tracker; restored from the
checkpoint when resuming); :func:`loop` trains a list of runs through one
stepper: a run alone is the list of one (:class:`Stepper`), the replicas of a
stack (``hydra/launcher=vectorized``) the same loop with bnexp.replicas'
stacked stepper. :func:`report` is what happens at a logging, evaluation or
probe step (one host copy for all of its values); :func:`save` and
:func:`end` write the checkpoint and metrics.json. Nothing here is per
process: a run's sampler, window, probes and tracker are its own, so one
process can hold several runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from omegaconf import DictConfig
from torch import nn

from bnexp import checkpoint as ckpt_mod
from bnexp import data as data_mod
from bnexp import distributed
from bnexp.augment import make_augment
from bnexp.clip import leaves_of, make_clip
from bnexp.config import Amp, ConfigError, Loss, config_hash, flatten, plain, steps_per_epoch
from bnexp.memory import check_batch_fits, check_params_fit
from bnexp.models import build_model
from bnexp.probes import ProbeContext, ProbeSetup, build_probes
from bnexp.probes.bn_gap import recompute_bn_stats
from bnexp.rundir import CHECKPOINT, ReplicasInterrupted, RunInterrupted, process_info
from bnexp.runtime import clock, frozen_gc, seed_everything, set_threads, stop_on_signal
from bnexp.schema import typed
from bnexp.step import LOSSES, LrSchedule, TrainStep, evaluate, grad_norm, make_optimizer, to_host
from bnexp.tracking import Tracker, env_info, print_summary

log = logging.getLogger("bnexp")


def train(cfg: DictConfig, run_dir: Path, resume: bool = False, extra_record: dict[str, Any] | None = None,
          summary: bool = True, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the metrics.json record.

    With ``resume``, continues from ``checkpoint`` (as :func:`bnexp.checkpoint.load`
    returned it; ``bnexp resume`` has checked it already) or else from
    ``run_dir/checkpoint.pt`` if there is one. Holds the run dir's lock from
    before the first write to after the last (in a data-parallel run, rank 0
    does, and alone writes; every rank calls train()). Raises ConfigError (RunLocked
    included) for problems found while setting up, before anything is written;
    RunInterrupted (a KeyboardInterrupt) after an interruption was saved.
    """
    run_dir = Path(run_dir)
    with distributed.training(run_dir, cfg, resume):  # rank 0 takes the lock; in a data-parallel run every rank trains
        run = setup(cfg, run_dir, resume, checkpoint, extra_record)
        interrupted = loop(Stepper(run))
    if summary and run.ranks.is_master:  # a sweep prints one table of all its jobs instead
        print_summary(run.tracker.record.data, run_dir)
    if interrupted is not None:
        raise interrupted
    return run.tracker.record.data


def loop(stepper: "Stepper") -> RunInterrupted | None:
    """The training loop, for the runs that ``stepper`` trains together: one run
    (or this rank's share of a data-parallel run), or the replicas of a stack
    (bnexp.replicas). Each run reports, checkpoints, diverges and ends as itself,
    inside ``stepper.own(run)``; a diverged run leaves at its own step and the
    others go on. In a data-parallel run the ranks agree on divergence
    (``ranks.any``) and on stopping (``stop_vote``), so all leave at one step.
    Returns the interruption for the caller to raise once it is done (None:
    every run completed or diverged)."""
    runs, first = stepper.runs, stepper.runs[0]
    live, status = list(runs), "running"  # the runs still training, and how they end
    try:
        # From the "running" record on, the finally below writes how each run
        # ended, whenever a Ctrl-C or an error comes (even before the loop).
        for run in runs:
            run.tracker.record.write(status="running")
        first.tracker.console.start(first.state.step)
        with stop_on_signal() as stop, frozen_gc():
            t0 = time.perf_counter()
            for run in runs:
                run.t0, run.window_t0 = t0 - run.state.train_time, t0
            for step in range(first.state.step + 1, first.total + 1):
                batches = stepper.step(step)  # sample, augment, forward, backward, update, window, schedule
                for run in live:
                    run.state.step = step
                if first.reports_at(step):
                    now = clock(first.device)  # before evaluations and probes, which the windows' timing leaves out
                    for run, (x, y) in zip(runs, batches):
                        if run not in live:
                            continue
                        with stepper.own(run):
                            if run.ranks.any(report(run, step, x, y, now) == "diverged"):
                                live.remove(run)
                                stepper.freeze(run)
                                end(run, "diverged")
                    if not live:
                        break
                    restart_windows(live, step, now)
                if first.checkpoint_every and step % first.checkpoint_every == 0 and step != first.total:
                    for run in live:
                        with stepper.own(run):
                            save(run)
                for run in live:
                    run.tracker.record.heartbeat()
                if first.stop_vote(stop.is_set()):
                    status = "interrupted"
                    break
            else:
                status = "completed"
        first.stop_vote.settle()  # every rank left after the same step; nothing may stay in flight at exit
        for run in live:
            with stepper.own(run):
                finish(run, status)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        for run in live:
            run.tracker.record.data["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        for run in live:
            with stepper.own(run):
                end(run, status)
    if status != "interrupted":
        return None
    if len(runs) == 1:
        return RunInterrupted(first.run_dir, first.state.step, stop.signum)
    return ReplicasInterrupted([run.run_dir for run in live], live[0].state.step)


class Stepper:
    """Trains the runs of one :func:`loop` a step at a time; the loop does the rest
    run by run. This one trains one run through its own parts (in a data-parallel
    run, through the DDP wrapper); ``bnexp.replicas.StackedStepper`` trains R
    replicas as one stacked model, with the same four members."""

    def __init__(self, run: "Run"):
        self.runs, self.run = [run], run

    def step(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Train step ``step``; returns each run's batch (x, y), for its probes."""
        run = self.run
        idx = run.sampler.next()
        x, y = run.augment(run.data.x_train[idx]), run.data.y_train[idx]  # data.augment, on the device
        loss, logits = run.train_step.step(x, y)
        run.window.add(step, loss, logits, y)
        run.schedule.step()
        return [(x, y)]

    def own(self, run: "Run") -> ContextManager[None]:
        """A block in which ``run``'s own parts hold its state (a stack lends each
        replica its gradients, optimizer state, window, RNG and log file)."""
        return contextlib.nullcontext()

    def freeze(self, run: "Run") -> None:
        """``run`` diverged and has ended; the stepper trains the others on."""


def led(fn: Callable[[], Any]) -> Any:
    """``fn()`` (a run's checks, ending in :func:`train` or not) as rank 0 of a
    data-parallel run does it; a follower rank trains exactly when rank 0 does,
    into rank 0's run dir with rank 0's config (see bnexp.distributed.lead)."""
    out = distributed.lead(fn)
    if isinstance(out, distributed.Go):
        return train(typed(out.config), Path(out.run_dir), resume=out.resume, summary=False)
    return out


def report(run: "Run", step: int, x: torch.Tensor, y: torch.Tensor, now: float) -> str | None:
    """Log what is due at ``step``: the training window (at logging steps),
    validation (at eval steps) and every probe due; all values reach the host
    in one copy. ``now``: when the step's reports began (:func:`restart_windows`).
    Returns "diverged" when the loss or gradient is not finite."""
    logging_step, evaluating = run.window.is_logging_step(step, run.total), step % run.eval_every == 0 or step == run.total
    out = run.window.sums(step) if logging_step else {}
    if evaluating and len(run.data.x_val):
        run.recalibrate(step)
        out.update({f"val/{k}": v for k, v in evaluate(run.model, run.data.x_val, run.data.y_val, run.cfg.train.eval_batch_size).items()})
    out.update(run.probes.due(step, run.total, lambda: run.probe_context(step, x, y)))
    # The gradient's divergence check does not depend on how often the norm probe runs.
    # fp16's GradScaler skips steps with inf gradients by design; its loss check suffices.
    check_grad = logging_step and not run.train_step.scaler.is_enabled()
    if check_grad and "grad_norm/total" not in out:
        out["window/grad_norm"] = grad_norm(run.model)
    values = to_host(out)
    grad_total = values.pop("window/grad_norm", values.get("grad_norm/total", 0.0))
    if logging_step:
        train_values, bad_step = run.window.values(step, values)
        values.update(train_values)
        bad_grad = check_grad and not math.isfinite(grad_total)
        if bad_step is not None or bad_grad:
            start = run.window.start(step)  # the last logging step before it, whose values are the last finite ones
            run.state.diverged = {"step": bad_step if bad_step is not None else step, "detected_at": step,
                                  "last_finite_step": start or None, "last_finite": dict(run.tracker.final)}
            run.tracker.scalars(step, values)
            log.warning("diverged: non-finite loss or gradient at step %d", run.state.diverged["step"])
            return "diverged"
        n, elapsed = step - run.window.start(step), now - run.window_t0
        values.update({"optim/lr": run.schedule.lr(), "time/step_ms": 1000 * elapsed / n,
                       "time/samples_per_sec": n * run.cfg.train.batch_size / elapsed,
                       "time/steps_per_sec": n / elapsed, "time/elapsed_sec": now - run.t0})
    run.tracker.scalars(step, values, is_eval=evaluating)
    target = run.cfg.train.target_acc
    if target is not None and run.state.steps_to_target is None and values.get("val/acc", 0) >= target:
        run.state.steps_to_target = step
    return None


def restart_windows(runs: list["Run"], step: int, since: float) -> None:
    """After the reports of ``step``, which began at ``since``: a new window starts
    after a logging step; evaluations and probes pause the window's clock."""
    now = clock(runs[0].device)
    for run in runs:
        run.window_t0 = now if run.window.is_logging_step(step, run.total) else run.window_t0 + now - since


def finish(run: "Run", status: str) -> None:
    """A completed run's test metrics (once); the last checkpoint of a completed or interrupted one."""
    if status == "completed" and not run.state.done:
        if run.resumed_at == run.total:  # stopped at the last step (by bnexp 0.1: before its report): give it again
            report(run, run.total, run.probe_x, run.probe_y, clock(run.device))
        run.recalibrate(run.total)
        test = evaluate(run.model, run.data.x_test, run.data.y_test, run.cfg.train.eval_batch_size)
        run.tracker.scalars(run.total, to_host({f"test/{k}": v for k, v in test.items()}), is_eval=True)
        run.state.done = True
    if status in ("completed", "interrupted"):
        save(run)


# --------------------------------------------------------------------------- one run's parts


class Run:
    """Everything one run owns (see :func:`setup`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, data: data_mod.Splits, total: int):
        t = cfg.train
        self.cfg, self.run_dir, self.device, self.data, self.total = cfg, run_dir, device, data, total
        self.ranks = distributed.current()  # one process, or this rank's share of a data-parallel run
        self.ranks.set_timeout(t.dist_timeout)  # a stuck peer fails the run after this long
        self.stop_vote = self.ranks.stop_vote()  # signals reach ranks at different steps: they agree on one
        # The step trains through the DDP wrapper (step_model); all else sees the raw model.
        self.model, step_model = self.ranks.models(build_run_model(cfg, data, device), cfg.norm, t.batch_size, device)
        self.optimizer = make_optimizer(cfg.optim, self.model, t.batch_size, compile=bool(t.compile))
        self.ranks.share_running_stats(self.model, self.optimizer)
        self.schedule = LrSchedule(cfg.optim, self.optimizer, total)
        self.loss_fn = LOSSES[Loss(t.loss)]
        self.train_step = TrainStep(step_model, self.optimizer, Amp(t.amp), device, t.compile, self.loss_fn,
                                    clip=make_clip(cfg.optim, leaves_of(self.model)))
        self.sampler = self.ranks.sampler(len(data.x_train), t.batch_size, cfg.seed, device)
        self.window = self.ranks.window(int(t.log_every), total, t.batch_size, data.num_classes, device, accuracy=not data.regression)
        self.augment = make_augment(cfg.data, cfg.seed, device)
        # Plain ints for the per-step checks: a DictConfig lookup costs ~8 us.
        self.log_every, self.checkpoint_every = int(t.log_every), int(t.checkpoint_every)
        self.eval_every = int(t.eval_every) if t.eval_every is not None else self.sampler.per_epoch  # null: once per epoch
        has_val = len(data.x_val) > 0
        self.probe_x = (data.x_val if has_val else data.x_train)[: t.probe_size]
        self.probe_y = (data.y_val if has_val else data.y_train)[: t.probe_size]
        self.probes = build_probes(ProbeSetup(cfg, self.model, self.log_every, self.eval_every, self.probe_x, self.probe_y, data))
        self.cadences = tuple(sorted({self.log_every, self.eval_every, *self.probes.cadences()}))
        self.precise_bn, self.recalibrated_at = int(t.precise_bn), -1
        self.state = ckpt_mod.LoopState()
        self.resumed_at: int | None = None  # the step a resumed run continues after
        self.saved_step = 0  # the step its checkpoint holds (0: none yet)
        self.tracker: Tracker  # made last by setup(), once nothing can be rejected any more
        self.t0 = self.window_t0 = 0.0

    @property
    def parts(self) -> dict[str, Any]:
        """The stateful parts a checkpoint holds (bnexp.checkpoint.PARTS)."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.schedule,
                "scaler": self.train_step.scaler, "sampler": self.sampler, "window": self.window, "augment": self.augment}

    def reports_at(self, step: int) -> bool:
        return step == self.total or any(step % c == 0 for c in self.cadences)

    def probe_context(self, step: int, x: torch.Tensor, y: torch.Tensor) -> ProbeContext:
        return ProbeContext(self.model, self.probe_x, self.probe_y, x, y, self.optimizer, self.loss_fn, self.schedule.lr(), step)

    def recalibrate(self, step: int) -> None:
        """train.precise_bn: the running statistics recomputed (PreciseBN) before
        the evaluations of ``step``, once however many evaluate then."""
        if self.precise_bn and self.recalibrated_at != step:
            recompute_bn_stats(self.model, self.data.x_train, self.precise_bn, int(self.cfg.train.batch_size), int(self.cfg.seed), step)
            self.recalibrated_at = step


def setup(cfg: DictConfig, run_dir: Path, resume: bool, checkpoint: dict[str, Any] | None,
          extra_record: dict[str, Any] | None) -> Run:
    """The run's parts, restored from the checkpoint when resuming, and its tracker
    (the first thing that writes into ``run_dir``)."""
    t = cfg.train
    device = distributed.current().device(t.device)
    seed_everything(cfg.seed, t.deterministic)
    data = data_mod.load(cfg.data, device)
    check_params_fit(cfg, data.input_shape, data.num_classes, device)  # before the model is allocated
    run = Run(cfg, run_dir, device, data, total_steps(cfg, len(data.x_train)))
    check_batch_fits(run.model, data.x_train[:2], int(t.batch_size), device)  # before a batch's activations are
    set_threads(t.threads, run.model, data.x_train[:1], t.batch_size, device)  # train.threads; before env_info records them
    record = {
        "status": "running", "steps": 0, "total_steps": run.total, "final": {}, "best": {}, "steps_to_target": None,
        "time": {"started_at": time.time()}, "env": env_info(device), "config_hash": config_hash(cfg),
        "num_params": sum(p.numel() for p in run.model.parameters()), "process": process_info(), **run.ranks.record(device),
        **(extra_record or {}),
    }
    purge_step = None
    if resume and (checkpoint is not None or (run_dir / CHECKPOINT).exists()):
        ckpt = checkpoint if checkpoint is not None else ckpt_mod.load(run_dir / CHECKPOINT)
        run.state = ckpt_mod.restore(ckpt, run.parts, run_dir / CHECKPOINT)
        record.update(final=ckpt["final"], best=ckpt["best"], steps_to_target=run.state.steps_to_target,
                      resumed_from=run.state.step, steps=run.state.step)
        run.resumed_at = run.saved_step = run.state.step
        # Drop events logged after the checkpoint by the dead run (and the last step's own,
        # when its report is given again: see train()).
        purge_step = run.total if run.state.step == run.total and not run.state.done else run.state.step + 1
        log.info("resuming %s from step %d", run_dir, run.state.step)
    elif any(run_dir.glob("events.out.tfevents.*")):
        purge_step = 0  # a restart from scratch: TensorBoard drops the earlier attempt's events
    run.tracker = run.ranks.tracker(run_dir, flatten(plain(cfg)), run.total, bool(t.progress), record, purge_step=purge_step)
    if run.state.step == 0:  # probes that also measure the initial network (signal/*) log at step 0
        initial = run.probes.initial(lambda: run.probe_context(0, run.probe_x, run.probe_y))
        if initial:
            run.tracker.scalars(0, to_host(initial))
    run.t0 = time.perf_counter() - run.state.train_time
    run.window_t0 = time.perf_counter()
    return run


def save(run: Run) -> None:
    """Events first (purge_step drops only events logged after the checkpoint's
    step), then the checkpoint, then metrics.json: a run killed (or stopped by a
    second Ctrl-C) anywhere in between resumes from its checkpoint, and its
    metrics.json is never ahead of it."""
    run.state.train_time = time.perf_counter() - run.t0
    run.window.fold(run.state.step)  # into the checkpointed window
    tracker = run.tracker
    tracker.writer.flush()
    if run.ranks.is_master:
        ckpt_mod.save(run.run_dir / CHECKPOINT, run.parts, run.state, tracker.final, tracker.best,
                      run=ckpt_mod.owner(tracker.record.data, run.cfg.seed))
    run.saved_step = run.state.step
    tracker.record.write(steps=run.state.step, final=tracker.final, best=tracker.best, steps_to_target=run.state.steps_to_target)


def end(run: Run, status: str) -> None:
    """How the run ended, into metrics.json and the events (HParams session end)."""
    wall = time.perf_counter() - run.t0
    state, record = run.state, run.tracker.record
    # Interrupted past its last checkpoint (a second Ctrl-C cut the save short): the
    # record stays at the checkpoint's step and values, where a resume continues.
    progress = {} if status == "interrupted" and run.saved_step != state.step else dict(
        steps=state.step, final=run.tracker.final, best=run.tracker.best, steps_to_target=state.steps_to_target)
    record.write(
        status=status, diverged=state.diverged, **progress,
        time={**record.data["time"], "wall_sec": wall, "steps_per_sec": state.step / max(wall, 1e-9), "finished_at": time.time()},
    )
    run.tracker.close(status)


def total_steps(cfg: DictConfig, n_train: int) -> int:
    if n_train < cfg.train.batch_size:
        raise ConfigError("train.batch_size", f"{cfg.train.batch_size} is larger than the {n_train} training examples; allowed: <= {n_train}")
    if cfg.train.epochs is not None:
        return int(cfg.train.epochs) * steps_per_epoch(n_train, cfg.train.batch_size)
    return int(cfg.train.steps)


def build_run_model(cfg: DictConfig, data: data_mod.Splits, device: torch.device) -> nn.Module:
    """The model a run trains: built for the data's shape, on ``device``, and
    channels_last for images on CUDA (cuDNN's fast layout for conv + BN)."""
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_classes).to(device)
    if device.type == "cuda" and len(data.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model
