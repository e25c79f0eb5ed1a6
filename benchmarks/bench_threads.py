"""How many intra-op threads should a bnexp run use, on an idle and on a shared machine?

Times bnexp's training loop (``bnexp.train.train``, steps / the loop's own
time/elapsed_sec, as bench_train.py's contender (a)) with 1 thread and with
every core of the budget (``bnexp.runtime.thread_budget``), for three models
from small to large work per step:

  seed_keras   the Keras tutorial's 1-16-32-2 MLP, batch 10 (drug trial)
  bn_mlp       the BN paper's 784-100-100-100-10 MLP, batch 60 (MNIST, or MNIST-shaped synthetic data)
  wide_mlp     784-512-512-512-10, batch 128, on the same data
  cnn          model=cnn (32-64-128 channels), batch 64, CIFAR-10-shaped synthetic data

twice: with nothing else started ("idle"; the load average of the moment is
printed, since others may share the machine) and with one competing busy
process (a Python loop spinning on one core), the case where a step split over
every core waits at each op for the thread that lost its core. Thread counts
alternate within each block; medians over rounds. The last columns give what
``train.threads=auto`` picks for the model and how its speed compares with the
better of the two.

    python benchmarks/bench_threads.py
    python benchmarks/bench_threads.py --rounds 5 --which bn_mlp cnn --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_train import mnist_root, run_bnexp  # noqa: E402  (benchmarks/ is this script's folder)
from bnexp import data as data_mod  # noqa: E402
from bnexp.schema import compose  # noqa: E402
from bnexp.runtime import auto_threads, idle_cpus, step_flops, thread_budget  # noqa: E402
from bnexp.train import build_run_model  # noqa: E402

MODELS = ["seed_keras", "bn_mlp", "wide_mlp", "cnn"]
STEPS = {"seed_keras": 400, "bn_mlp": 400, "wide_mlp": 100, "cnn": 20}
QUIET = ["train.progress=false", "train.device=cpu", "seed=0", "train.eval_every=1000000"]  # no in-loop eval: the step alone


def overrides(which: str, steps: int) -> list[str]:
    if which == "seed_keras":
        return ["experiment=seed_keras", "train.epochs=null", f"train.steps={steps}", *QUIET]
    if which in ("bn_mlp", "wide_mlp"):
        root = mnist_root()
        data = ["data=mnist", f"data.root={root}"] if root else ["data=synthetic", "data.shape=[1,28,28]", "data.n_train=20000"]
        net = ["model.hidden=[100,100,100]", "train.batch_size=60"] if which == "bn_mlp" else ["model.hidden=[512,512,512]", "train.batch_size=128"]
        return [*net, "model.activation=sigmoid", *data, f"train.steps={steps}", *QUIET]
    return ["model=cnn", "data=synthetic", "data.shape=[3,32,32]", "data.n_train=10000", "data.n_test=500",
            "train.batch_size=64", f"train.steps={steps}", *QUIET]


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(which: str, steps: int, threads: list[int], rounds: int) -> dict[int, float]:
    speeds: dict[int, list[float]] = {n: [] for n in threads}
    for r in range(rounds + 1):  # round 0 warms up (imports, allocator, data cache)
        for n in threads if r % 2 else threads[::-1]:
            cfg = compose([*overrides(which, steps), f"train.threads={n}"])
            sps, _ = run_bnexp(cfg, None, torch.device("cpu"))
            if r:
                speeds[n].append(sps)
    return {n: statistics.median(v) for n, v in speeds.items()}


def work_of(which: str) -> float:
    cfg = compose(overrides(which, 1))
    data = data_mod.load(cfg.data, torch.device("cpu"))
    return step_flops(build_run_model(cfg, data, torch.device("cpu")), data.x_train[:1], cfg.train.batch_size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", nargs="+", choices=MODELS, default=MODELS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=json.loads, default=STEPS, help=f"steps per run, as JSON (default {json.dumps(STEPS)})")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.steps = {**STEPS, **args.steps}
    budget = thread_budget()
    threads = [1, budget] if budget > 1 else [1]
    print(f"torch {torch.__version__}; thread budget {budget} (affinity {len(os.sched_getaffinity(0))} CPUs, "
          f"torch default {torch.get_num_threads()}); steps/s of bnexp's loop, median of {args.rounds} rounds")
    results = []
    for which in args.which:
        flops = work_of(which)
        for condition in ("idle", "busy"):
            load = os.getloadavg()[0]
            competitor = busy_process() if condition == "busy" else None
            try:
                time.sleep(0.5)  # the competitor is spinning before the CPUs are looked at
                idle = idle_cpus()
                auto = auto_threads(flops, budget, idle)
                speed = measure(which, args.steps[which], threads, args.rounds)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            results.append({"model": which, "condition": condition, "loadavg_1min_before": load, "idle_cpus": idle,
                            "step_flops": flops, "steps_per_sec": speed, "auto_threads": auto})
            best = max(speed.values())
            print(f"{which:<10} {condition:<5} (load {load:4.2f}, {idle:3.1f} CPUs idle) {flops / 1e6:9.3g} MFLOP/step  "
                  + "  ".join(f"{n} thread{'s' if n > 1 else ''}: {v:7.1f}" for n, v in speed.items())
                  + (f"  {budget}/1: {speed[budget] / speed[1]:5.2f}" if budget > 1 else "")
                  + f"  auto -> {auto}: {speed[auto] / best:4.2f} of the best", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "budget": budget, "results": results}, indent=2))


if __name__ == "__main__":
    main()
