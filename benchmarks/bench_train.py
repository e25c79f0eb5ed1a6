"""How fast is bnexp's training loop next to the loops people write by hand?

One process times three contenders on the same model, data and batch order:

  (a) bnexp: ``bnexp.train.train`` on a composed config, default logging
      (train/* and grad/weight norms every ``train.log_every`` steps, val eval +
      activation percentiles every ``train.eval_every`` steps, TensorBoard
      events, metrics.json heartbeat, LR scheduler). Its figure is
      ``steps / time/elapsed_sec`` at the last step, which the loop itself logs:
      the training loop with its in-loop evals, without setup (data, model,
      writer) and without the end-of-run val/test eval and checkpoint.
  (b) hand-written: data tensors on the device, a seeded permutation per epoch
      (the same batches as bnexp's Sampler), zero_grad/forward/loss/backward/step,
      no logging, no host sync until the end.
  (c) DataLoader: TensorDataset + DataLoader(shuffle=True, batch_size, drop_last=True).

Contenders run interleaved (a b c, b c a, c a b, ...) for several rounds after
one warm-up round, so that load from other processes hits all of them alike;
the table shows medians. Models: the BN paper's MLP (784-100-100-100-10,
sigmoid, BN before the activation, batch 60; Ioffe & Szegedy 2015, Sec. 4.1)
on MNIST (real files if found, else MNIST-shaped synthetic data), and a small
CNN (model=cnn, 32-64-128 channels) on CIFAR-10-shaped synthetic data.

    python benchmarks/bench_train.py                       # CPU, both models
    python benchmarks/bench_train.py --device cuda --compile --which mlp
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bnexp import data as data_mod  # noqa: E402
from bnexp import runtime as runtime_mod  # noqa: E402
from bnexp import train as train_mod  # noqa: E402
from bnexp.config import Amp  # noqa: E402
from bnexp.runtime import seed_everything  # noqa: E402
from bnexp.schema import compose  # noqa: E402
from bnexp.step import make_optimizer  # noqa: E402
from bnexp.train import build_run_model, train  # noqa: E402

MNIST_DIRS = [Path(os.environ.get("BNEXP_MNIST", "")), Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist",
              Path("/work/shared/data/mnist")]


def mnist_root() -> Path | None:
    for d in MNIST_DIRS:
        if str(d) not in ("", ".") and (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    return None


def overrides_for(which: str, args: argparse.Namespace) -> list[str]:
    # (a) runs on the process's thread count, as (b) and (c) do, not on train.threads=auto's choice.
    common = [f"train.device={args.device}", f"train.steps={args.steps[which]}", f"train.compile={str(args.compile).lower()}",
              f"train.amp={args.amp}", "seed=0", f"train.threads={torch.get_num_threads()}"]
    if which == "mlp":
        root = None if args.synthetic else mnist_root()
        data = [f"data=mnist", f"data.root={root}"] if root else ["data=synthetic", "data.shape=[1,28,28]", "data.n_train=60000",
                                                                  "data.n_test=10000", "data.val_size=5000"]
        # BN paper Sec. 4.1: 3 hidden layers of 100 sigmoid units, BN before the nonlinearity, minibatch 60.
        return ["model=mlp", "model.hidden=[100,100,100]", "model.activation=sigmoid", "norm=batch", "norm.placement=pre",
                "train.batch_size=60", *data, *common, *args.overrides]
    return ["model=cnn", "data=synthetic", "data.shape=[3,32,32]", f"data.n_train={args.cnn_n_train}", "data.n_test=1000",
            f"train.batch_size={args.cnn_batch}", *common, *args.overrides]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(cfg, data, device: torch.device):
    """The model bnexp's train() would build: same seed, same init, same memory format
    (its norm layers keep themselves in fp32 under autocast)."""
    seed_everything(cfg.seed, cfg.train.deterministic)
    return build_run_model(cfg, data, device)


def hand_step(cfg, model, device: torch.device):
    """One batch of the hand-written loops (b) and (c): zero_grad, forward (under
    autocast with --amp), loss, backward, update (through a GradScaler with fp16)."""
    opt = make_optimizer(cfg.optim, model)
    fwd = torch.compile(model) if cfg.train.compile else model
    amp = Amp(cfg.train.amp)
    dtype = {Amp.bf16: torch.bfloat16, Amp.fp16: torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type) if amp == Amp.fp16 else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


# --clock cpu times this process's CPU time instead of wall time: on a shared
# machine, time spent waiting for a core then counts for no contender. With
# --threads 1 it equals the work done; bnexp's loop reads its clock through
# bnexp.train.time.perf_counter and bnexp.runtime.time.perf_counter, which are
# swapped for the same clock here.
clock = time.perf_counter


class _CpuTimeModule:
    perf_counter = staticmethod(time.process_time)

    def __getattr__(self, name):
        return getattr(time, name)


def run_bnexp(cfg, data, device) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-") as d, contextlib.redirect_stdout(io.StringIO()):
        if clock is time.process_time:
            train_mod.time = runtime_mod.time = _CpuTimeModule()
        try:
            record = train(cfg, Path(d))
        finally:
            train_mod.time = runtime_mod.time = time
        state = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    elapsed = record["final"]["time/elapsed_sec"]
    return record["steps"] / elapsed, state


def run_hand(cfg, data, device) -> tuple[float, dict]:
    model = fresh_model(cfg, data, device)
    step_fn = hand_step(cfg, model, device)
    x_train, y_train, n, b = data.x_train, data.y_train, len(data.x_train), cfg.train.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)  # bnexp's Sampler draws the same permutations
    per_epoch, steps = n // b, cfg.train.steps
    sync(device)
    t0 = clock()
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen).to(device)
        idx = perm[(step % per_epoch) * b : (step % per_epoch + 1) * b]
        step_fn(x_train[idx], y_train[idx])
    sync(device)
    return steps / (clock() - t0), {k: v.cpu() for k, v in model.state_dict().items()}


def run_dataloader(cfg, data, device) -> tuple[float, dict]:
    from torch.utils.data import DataLoader, TensorDataset

    model = fresh_model(cfg, data, device)
    step_fn = hand_step(cfg, model, device)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps, done = cfg.train.steps, 0
    sync(device)
    t0 = clock()
    while done < steps:
        for x, y in loader:
            step_fn(x, y)
            done += 1
            if done == steps:
                break
    sync(device)
    return steps / (clock() - t0), {}


CONTENDERS = {"a": ("bnexp (default logging)", run_bnexp), "b": ("hand-written loop", run_hand), "c": ("DataLoader loop", run_dataloader)}


def bench(which: str, args: argparse.Namespace, overrides: list[str] | None = None) -> dict:
    """The contenders on the model ``which`` (overrides_for's, or ``overrides`` when given)."""
    cfg = compose(overrides if overrides is not None else overrides_for(which, args))
    device = torch.device(args.device)
    data = data_mod.load(cfg.data, device)
    batch = cfg.train.batch_size
    names = list(CONTENDERS)
    times: dict[str, list[float]] = {k: [] for k in names}
    first: dict[str, float] = {}
    same_weights = None
    for r in range(args.warmup + args.rounds):
        order = names[r % 3:] + names[: r % 3]  # rotate who goes first
        states, this_round = {}, {}
        for k in order:
            gc.collect()  # each contender starts with no garbage of the last one's to collect mid-run
            sps, states[k] = CONTENDERS[k][1](cfg, data, device)
            this_round[k] = sps
            if r < args.warmup:
                first.setdefault(k, sps)
            else:
                times[k].append(sps)
        if states.get("a") and states.get("b"):
            # With the same init and batch order, (a) and (b) train the same weights: logging must not change training.
            diff = max((states["a"][k].float() - states["b"][k].float()).abs().max().item() for k in states["b"])
            same_weights = diff if same_weights is None else max(same_weights, diff)
        print(f"  [{which}] round {r + 1}/{args.warmup + args.rounds}{' (warm-up)' if r < args.warmup else ''}: "
              + "  ".join(f"{k}={this_round[k]:.0f}" for k in names) + " steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": which, "data": str(cfg.data.name), "batch_size": batch, "steps": int(cfg.train.steps), "rounds": args.rounds,
        "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "compile": bool(args.compile), "amp": args.amp, "clock": args.clock,
        "steps_per_sec": med, "samples_per_sec": {k: v * batch for k, v in med.items()},
        "all_rounds": times, "warmup_round": first,
        "ratio_a_b": med["a"] / med["b"], "ratio_a_c": med["a"] / med["c"],
        # a and b of one round ran back to back, under about the same load
        "ratio_a_b_per_round_median": statistics.median(a / b for a, b in zip(times["a"], times["b"])),
        "max_weight_diff_a_b": same_weights,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def print_table(results: list[dict]) -> None:
    print()
    print(f"{'model':<5} {'device':<28} {'mode':<14} {'(a) bnexp':>11} {'(b) hand':>11} {'(c) loader':>11} {'a/b':>6} {'a/c':>6}  unit")
    for r in results:
        mode = ("compiled" if r["compile"] else "eager") + (f"+{r['amp']}" if r["amp"] != "none" else "")
        for unit, key in (("steps/s", "steps_per_sec"), ("samples/s", "samples_per_sec")):
            v = r[key]
            print(f"{r['model']:<5} {r['device'][:28]:<28} {mode:<14} {v['a']:>11.0f} {v['b']:>11.0f} {v['c']:>11.0f} "
                  f"{r['ratio_a_b']:>6.3f} {r['ratio_a_c']:>6.2f}  {unit}")
    for r in results:
        print(f"{r['model']}: median of per-round a/b {r['ratio_a_b_per_round_median']:.3f}; "
              f"max |weight difference| a vs b after training: {r['max_weight_diff_a_b']:.3g}")
    print("medians over rounds; (a) = steps / the loop's own time/elapsed_sec at its last step (in-loop evals included, setup and final test eval not)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--which", choices=["mlp", "cnn", "all"], default="all")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: mlp 1000; cnn 200 on CPU, 1000 on CUDA)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after --warmup rounds); medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, kernels, torch.compile)")
    p.add_argument("--compile", action="store_true", help="train.compile=true (and torch.compile in (b), (c))")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--cnn-batch", type=int, default=None, help="CNN batch size (default: 64 on CPU, 512 on CUDA)")
    p.add_argument("--cnn-n-train", type=int, default=None, help="CNN training examples (default: 50000, as CIFAR-10)")
    p.add_argument("--synthetic", action="store_true", help="MNIST-shaped synthetic data even if MNIST files are found")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's, one per core)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (robust to other load; use with --threads 1 and --device cpu)")
    p.add_argument("overrides", nargs="*", help="extra bnexp overrides for all contenders, e.g. train.eval_every=1000")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global clock
        clock = time.process_time
    cuda = args.device.startswith("cuda")
    args.cnn_batch = args.cnn_batch or (512 if cuda else 64)
    args.cnn_n_train = args.cnn_n_train or 50000  # CIFAR-10's training-set size: epochs (and evals) as long as on the real data
    args.steps = {"mlp": args.steps or 1000, "cnn": args.steps or (1000 if cuda else 200)}
    results = []
    for which in (["mlp", "cnn"] if args.which == "all" else [args.which]):
        results.append(bench(which, args))
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
