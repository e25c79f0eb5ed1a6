"""How much faster is a sweep of seeds as stacked replicas (hydra/launcher=vectorized)
than the same jobs one after another (Hydra's basic launcher)?

For each model and each R, one process runs the sweep ``seed=0..R-1`` through
bnexp's real Hydra entry point (``bnexp sweep``'s code path, in process:
interpreter start and imports, the same for both launchers, are left out)
with each launcher, alternating which goes first, after one tiny warm-up
sweep of each; "quiet" with nothing else started, "busy" next to one
competing ``while True: pass`` process that the benchmark starts itself. The
vectorized launcher runs as a user gets it: its stacks on one forked worker
process per CPU (``hydra.launcher.workers``), one thread each.
It prints, per R, the whole sweep's wall time (Hydra composing each job's
config, setup, the loops, final evaluations, checkpoints) of each launcher,
their ratio and replica-steps/s (R x steps / wall time); and the time spent in
the training loops alone (each run's ``time/elapsed_sec``: summed over the
basic launcher's jobs; for the vectorized one the longest of its stacks, which
run side by side) and its ratio, with the 1-minute load before and after. Before timing, it checks that the two launchers gave
every job the same final train/loss (within 1e-4; for the CNN, whose ReLUs let
two fp32 computations of one run drift apart, it prints the largest difference).

``--profile R`` runs one vectorized sweep of R replicas in this process (one
worker, so the profiler sees every op) under torch's profiler and prints the
stacked step's time per op, per step, and the GFLOP/s of the ops that count
their floating-point work (the matmuls), so each piece's distance from the
CPU's matmul rate shows.

Models: the BN paper's MLP (``experiment=bn_paper_mnist``: 784-100-100-100-10
sigmoid, BN before the nonlinearity, batch 60, SGD lr 0.2; real MNIST when
found, else MNIST-shaped synthetic data) and the small CNN (``model=cnn``,
32-64-128 channels, BN; Fashion-MNIST when found, else synthetic 1x28x28).

    python benchmarks/bench_replicas.py                          # both models, R = 1 2 4 8 16 32
    python benchmarks/bench_replicas.py --which mlp --replicas 8 16 --steps-mlp 5000 --conditions quiet busy
    python benchmarks/bench_replicas.py --which mlp --profile 8  # where a stacked step's time goes
    python benchmarks/bench_replicas.py --which placement --rounds 3   # the README's main job, end to end
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_root(name: str) -> Path | None:
    for d in (Path(os.environ.get(f"BNEXP_{name.upper().replace('-', '_')}", "")), SHARED / name, Path("/work/shared/data") / name):
        if str(d) not in ("", ".") and (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    return None


def overrides_for(which: str, args: argparse.Namespace) -> list[str]:
    common = ["train.progress=false", f"train.device={args.device}", "norm.placement=pre"]
    if which == "mlp":
        root = data_root("mnist")
        data = [f"data.root={root}"] if root else ["data=synthetic", "data.shape=[1,28,28]", "data.n_train=60000",
                                                  "data.n_test=10000", "data.val_size=5000"]
        return ["experiment=bn_paper_mnist", f"train.steps={args.steps_mlp}", *data, *common, *args.overrides]
    root = data_root("fashion-mnist")
    data = ["data=fashion_mnist", f"data.root={root}"] if root else ["data=synthetic", "data.shape=[1,28,28]", "data.n_train=10000",
                                                                      "data.n_test=2000"]
    return ["model=cnn", "train.batch_size=64", f"train.steps={args.steps_cnn}", "train.eval_every=1000000", "train.eval_batch_size=256",
            *data, *common, *args.overrides]


def sweep(overrides: list[str], launcher: str, R: int, out: Path) -> tuple[float, list[dict]]:
    """Wall time of one `bnexp sweep` in this process, and its jobs' metrics.json."""
    from bnexp import hydra_app

    argv = ["--multirun", *overrides, f"seed=range(0,{R})", f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}"]
    if launcher == "vectorized":
        argv.append(f"hydra.launcher.max_replicas={R}")  # one stack of all R
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        t0 = time.perf_counter()
        hydra_app.hydra_main(argv)
        wall = time.perf_counter() - t0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/metrics.json"), key=lambda p: p.parent.name)]
    return wall, records


@contextlib.contextmanager
def condition(name: str):
    """``busy``: one competing process on a core for the duration; ``quiet``: none."""
    import subprocess

    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if name == "busy" else None
    try:
        if competitor is not None:
            time.sleep(1.0)  # let it take its core
        yield
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def bench(which: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    overrides = overrides_for(which, args)
    for w in range(args.warmup):  # first use in this process: imports, Hydra's caches, torch's kernels
        for launcher in ("basic", "vectorized"):
            sweep([*overrides, "train.steps=20"], launcher, 2, tmp / f"{which}-warmup{w}-{launcher}-{args.condition}")
    rows = []
    for R in args.replicas:
        start_load = load()
        walls: dict[str, list[float]] = {"basic": [], "vectorized": []}
        loops: dict[str, list[float]] = {"basic": [], "vectorized": []}  # seconds in the training loops (time/elapsed_sec)
        threads: dict[str, set[int]] = {"basic": set(), "vectorized": set()}  # train.threads=auto's picks (env.threads)
        drift = 0.0
        for rnd in range(args.rounds):
            order = ["basic", "vectorized"] if rnd % 2 == 0 else ["vectorized", "basic"]
            losses = {}
            for launcher in order:
                wall, records = sweep(overrides, launcher, R, tmp / f"{which}-{R}-{launcher}-{rnd}-{args.condition}")
                assert len(records) == R and all(r["status"] == "completed" for r in records), [r["status"] for r in records]
                losses[launcher] = [r["final"]["train/loss"] for r in records]
                threads[launcher].update(r["env"]["threads"] for r in records)
                walls[launcher].append(wall)
                elapsed = [r["final"]["time/elapsed_sec"] for r in records]
                # One after another, the loops add up; stacked, they run together, and stacks on workers side by side (the longest counts).
                loops[launcher].append(sum(elapsed) if launcher == "basic" else max(elapsed))
            diff = max(abs(a - b) for a, b in zip(losses["basic"], losses["vectorized"]))
            # The MLP's sigmoids keep the two within fp32 rounding; the CNN's ReLUs let
            # them drift apart as any two fp32 computations of one run do (docs/sweeps.md).
            assert which != "mlp" or diff <= 1e-4, f"{which} R={R}: final train/loss differs by {diff} between the launchers"
            drift = max(drift, diff)
        steps = args.steps_mlp if which == "mlp" else args.steps_cnn
        end_load = load()
        b, v = statistics.median(walls["basic"]), statistics.median(walls["vectorized"])
        lb, lv = statistics.median(loops["basic"]), statistics.median(loops["vectorized"])
        row = {"model": which, "R": R, "steps": steps, "basic_wall_s": b, "vectorized_wall_s": v, "ratio": b / v,
               "basic_replica_steps_per_s": R * steps / b, "vectorized_replica_steps_per_s": R * steps / v,
               "basic_loop_s": lb, "vectorized_loop_s": lv, "loop_ratio": lb / lv,
               "basic_loop_replica_steps_per_s": R * steps / lb, "vectorized_loop_replica_steps_per_s": R * steps / lv, "rounds": walls, "loop_rounds": loops,
               "threads": {k: sorted(v) for k, v in threads.items()}, "max_final_loss_difference": drift,
               "condition": args.condition, "load": [start_load, end_load]}
        rows.append(row)
        print(f"[{args.condition}, load {start_load:.1f}->{end_load:.1f}] {which:3s} R={R:2d}  sweep: basic {b:7.2f} s  vectorized {v:7.2f} s  ratio {b / v:5.2f}x  "
              f"replica-steps/s {R * steps / b:6.0f} -> {R * steps / v:6.0f}   loops: {lb:6.2f} s -> {lv:6.2f} s  ratio {lb / lv:5.2f}x  "
              f"loop replica-steps/s {R * steps / lb:6.0f} -> {R * steps / lv:6.0f}  "
              f"threads {row['threads']['basic']} -> {row['threads']['vectorized']}  final loss diff {drift:.1e}", flush=True)
    return rows


def readme_job(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """The README's main job, `bnexp sweep experiment=placement_ablation` (3 placements
    x 3 seeds), end to end as a user runs it: a new `bnexp` process each time."""
    import subprocess

    walls: dict[str, list[float]] = {"basic": [], "vectorized": []}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for rnd in range(args.warmup + args.rounds):
        for launcher in (["basic", "vectorized"] if rnd % 2 == 0 else ["vectorized", "basic"]):
            cmd = [sys.executable, "-m", "bnexp.cli", "sweep", "experiment=placement_ablation", f"hydra/launcher={launcher}",
                   f"hydra.sweep.dir={tmp / f'placement-{launcher}-{rnd}-{args.condition}'}", "train.progress=false", *args.overrides]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=tmp)
            if rnd >= args.warmup:
                walls[launcher].append(time.perf_counter() - t0)
    b, v = statistics.median(walls["basic"]), statistics.median(walls["vectorized"])
    print(f"README job (placement_ablation, 9 jobs, CLI end to end)  basic {b:6.2f} s  vectorized {v:6.2f} s  ratio {b / v:5.2f}x", flush=True)
    return [{"model": "placement_ablation", "basic_wall_s": b, "vectorized_wall_s": v, "ratio": b / v, "rounds": walls}]


def profile(which: str, args: argparse.Namespace, tmp: Path) -> None:
    """The stacked loop of one vectorized sweep (one worker, in this process) under
    torch's profiler: each op's self time per training step, and the rate of
    those that count floating-point work (the matmuls), in GFLOP/s."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = args.steps_mlp if which == "mlp" else args.steps_cnn
    # No evaluation in the loop, and one logging window: the profile is the steps'.
    overrides = [*overrides_for(which, args), "hydra.launcher.workers=1", "train.eval_every=1000000", f"train.log_every={steps}"]
    sweep(overrides, "vectorized", args.profile, tmp / "profile-warmup")
    # Unprofiled first. On a shared machine the loop's wall time counts the time
    # other processes hold the core; the process's CPU time over the sweep says
    # what share of the wall it ran, so loop / share estimates the loop on a
    # core of its own (one thread: CPU time is time on a core).
    cpu0 = time.process_time()
    wall, records = sweep(overrides, "vectorized", args.profile, tmp / "profile-plain")
    share = min(1.0, (time.process_time() - cpu0) / wall)
    loop = max(r["final"]["time/elapsed_sec"] for r in records)
    print(f"{which} R={args.profile}, {steps} steps, unprofiled: loop {loop:.2f} s, {args.profile * steps / loop:.0f} replica-steps/s "
          f"(wall); this process ran {share:.0%} of the sweep's wall time, so ~{args.profile * steps / (loop * share):.0f} "
          f"replica-steps/s on a core of its own; 1-min load {load():.1f}")
    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        wall, records = sweep(overrides, "vectorized", args.profile, tmp / "profile")
    loop = max(r["final"]["time/elapsed_sec"] for r in records)
    print(f"{which} R={args.profile}, {steps} steps: sweep {wall:.2f} s, loop {loop:.2f} s under the profiler "
          f"({1000 * loop / steps:.2f} ms a step, {args.profile * steps / loop:.0f} replica-steps/s), 1-min load {load():.1f}")
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.profile_rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"{'op':45s} {'calls/step':>10s} {'ms/step':>8s} {'share':>6s} {'GFLOP/s':>8s}")
    for e in rows:
        rate = f"{e.flops / e.self_cpu_time_total / 1e3:8.1f}" if e.flops else ""
        print(f"{e.key[:45]:45s} {e.count / steps:10.1f} {e.self_cpu_time_total / 1e3 / steps:8.3f} "
              f"{e.self_cpu_time_total / total:6.1%} {rate}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "placement"],
                   help="placement: the README's main job through the CLI, end to end")
    p.add_argument("--replicas", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--steps-mlp", type=int, default=1000)
    p.add_argument("--steps-cnn", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed tiny sweeps of each launcher before the timed ones")
    p.add_argument("--device", default="cpu")
    p.add_argument("--conditions", nargs="+", default=["quiet"], choices=["quiet", "busy"],
                   help="busy: next to one competing busy process that the benchmark starts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", type=int, default=None, metavar="R", help="profile one vectorized sweep of R replicas instead")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="write every row and round here")
    p.add_argument("overrides", nargs="*", help="bnexp overrides for every sweep, e.g. train.log_every=50")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "") + f", 1-min load {load:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-replicas-") as d:
        if args.profile:
            for which in args.which:
                profile(which, args, Path(d))
            return
        rows = []
        for cond in args.conditions:
            args.condition = cond
            with condition(cond):
                rows += [row for which in args.which for row in (readme_job(args, Path(d)) if which == "placement" else bench(which, args, Path(d)))]
    print(f"1-min load at the end {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "load_start": load,
                                         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
