"""What a user waits for, timed from outside: `bnexp` commands in fresh processes.

Everything here runs the real command line (``python -m bnexp ...``), a new
process each time, as a user types it; figures are ratios of two commands
timed side by side in the same run, alternating, so that a machine shared with
other work slows both alike. Each part runs "quiet" (nothing started by the
benchmark) and "busy" (one competing ``while True: pass`` process that the
benchmark starts itself and stops after); the 1-minute load average is
recorded before and after every part, since the machine may be shared.

- **Fixed costs**, each as a ratio to ``python -c "import torch"`` timed in the
  same rounds: the time to the first training step of ``bnexp train`` with the
  default config (from process start to the log line of step 1, with
  ``train.steps=1 train.log_every=1``; after one untimed run, so that data and
  checksum caches are warm, as for a user's second run), the whole
  process of that one-step run, and a config error (``bnexp train
  model.hidden=oops``, exit 2).
- **Sweeps**: the whole wall time of ``bnexp sweep seed=range(0,R)`` with
  Hydra's basic launcher and with ``hydra/launcher=vectorized`` (one stack of
  all R), for the BN paper's MLP (``experiment=bn_paper_mnist`` on real MNIST,
  batch 60) and the small CNN (``model=cnn``, Fashion-MNIST, batch 64), each
  sweep in a new directory (a rerun into the same one would skip its jobs).
  The MLP's two launchers must agree on every job's final train/loss (1e-4).

    python benchmarks/bench_sweep_cli.py                # a few minutes: R=8, MLP 1000 steps, CNN 20 steps
    python benchmarks/bench_sweep_cli.py --full         # R=8,16; MLP 1000 and 5000 steps; CNN 100 steps
    python benchmarks/bench_sweep_cli.py --only startup --startup-rounds 7
    python benchmarks/bench_sweep_cli.py --which mlp --replicas 8 16 --mlp-steps 5000 --conditions busy
    python benchmarks/bench_sweep_cli.py --baseline /tmp/old   # and another version of bnexp, interleaved with this one

With ``--baseline TREE`` every command also runs from that source tree (first on
PYTHONPATH, with caches of its own), interleaved with this checkout's, so a
before/after comparison meets the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replicas import condition, load, overrides_for  # noqa: E402  the same sweeps and conditions as the in-process benchmark

PYTHON = sys.executable
BNEXP = [PYTHON, "-m", "bnexp"]


# Commands that failed once and were run again (the machine is shared: another
# process's burst can make thread creation fail); saved with the figures.
RETRIED: list[str] = []


def once_more(run):
    """``run()``; if its command fails, once more, and the failure is recorded."""
    try:
        return run()
    except RuntimeError as e:
        RETRIED.append(str(e)[-500:])
        print(f"retrying once: {str(e)[-300:]}", flush=True)
        time.sleep(5)
        return run()


def wall(cmd: list[str], cwd: Path, expect: int = 0, env: dict | None = None) -> float:
    return once_more(lambda: _wall(cmd, cwd, expect, env))


def _wall(cmd: list[str], cwd: Path, expect: int, env: dict | None) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if done.returncode != expect:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}, expected {expect}:\n{done.stderr[-3000:]}")
    return elapsed


def first_step(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(seconds to the log line of step 1, seconds to the process's exit)."""
    return once_more(lambda: _first_step(cmd, cwd, env))


def _first_step(cmd: list[str], cwd: Path, env: dict | None) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    seen, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if seen is None and "step 1/" in line:
            seen = time.perf_counter() - t0
    code = proc.wait()
    total = time.perf_counter() - t0
    if code != 0 or seen is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {code} without a step-1 line:\n{''.join(lines)[-3000:]}")
    return seen, total


def trees(baseline: Path | None, tmp: Path) -> dict[str, dict | None]:
    """The bnexp versions timed side by side: this checkout (prefix "") and, with
    --baseline, another source tree (prefix "baseline/"), imported first through
    PYTHONPATH, with caches of its own (its checksum cache's format may differ)."""
    if baseline is None:
        return {"": None}
    env = {**os.environ, "PYTHONPATH": str(baseline.resolve()), "XDG_CACHE_HOME": str(tmp / "baseline-cache")}
    return {"": None, "baseline/": env}


def startup(rounds: int, tmp: Path, versions: dict[str, dict | None]) -> dict:
    """import torch, time to first step, a whole one-step run and a config error, interleaved."""
    tmp.mkdir(parents=True, exist_ok=True)
    train = [*BNEXP, "train", "train.steps=1", "train.log_every=1"]
    for prefix, env in versions.items():  # fills the data and checksum caches, as a first run does
        first_step([*train, f"hydra.run.dir={tmp / f'{prefix}warm'}"], tmp, env)
    parts = ["import_torch", *(f"{prefix}{p}" for prefix in versions for p in ("first_step", "config_error"))]
    times: dict[str, list[float]] = {p: [] for p in parts}
    times.update({f"{prefix}one_step_run": [] for prefix in versions})
    for r in range(rounds):
        for part in parts[r % len(parts):] + parts[: r % len(parts)]:
            prefix, _, what = part.rpartition("/")
            prefix, env = (f"{prefix}/" if prefix else ""), versions.get(f"{prefix}/" if prefix else "")
            if what == "import_torch":
                times[part].append(wall([PYTHON, "-c", "import torch"], tmp))
            elif what == "config_error":
                times[part].append(wall([*BNEXP, "train", "model.hidden=oops"], tmp, expect=2, env=env))
            else:
                seen, total = first_step([*train, f"hydra.run.dir={tmp / f'{prefix}run{r}'}"], tmp, env)
                times[part].append(seen)
                times[f"{prefix}one_step_run"].append(total)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["import_torch"] for k in med if k != "import_torch"}
    return {"median_s": med, "ratio_to_import_torch": ratios, "rounds": times}


def sweep(overrides: list[str], launcher: str, R: int, out: Path, cwd: Path, env: dict | None = None) -> tuple[float, list[dict]]:
    cmd = [*BNEXP, "sweep", *overrides, f"seed=range(0,{R})", f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}"]
    if launcher == "vectorized":
        cmd.append(f"hydra.launcher.max_replicas={R}")  # one stack of all R
    def run() -> float:
        shutil.rmtree(out, ignore_errors=True)  # a sweep run again into its dir would skip the jobs that finished
        return _wall(cmd, cwd, 0, env)

    elapsed = once_more(run)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/metrics.json"), key=lambda p: p.parent.name)]
    if len(records) != R or any(r.get("status") != "completed" for r in records):
        raise SystemExit(f"{launcher} sweep in {out}: {[r.get('status') for r in records]}")
    return elapsed, records


def sweeps(which: str, R: int, steps: int, rounds: int, tmp: Path, versions: dict[str, dict | None]) -> dict:
    ns = argparse.Namespace(steps_mlp=steps, steps_cnn=steps, device="cpu", overrides=[])
    overrides = overrides_for(which, ns)
    runs = [f"{prefix}{launcher}" for prefix in versions for launcher in ("basic", "vectorized")]
    walls: dict[str, list[float]] = {k: [] for k in runs}
    threads: dict[str, set] = {k: set() for k in runs}
    drift = 0.0
    for rnd in range(rounds):
        losses = {}
        for run in runs[rnd % len(runs):] + runs[: rnd % len(runs)]:
            prefix, _, launcher = run.rpartition("/")
            out = tmp / f"{which}-R{R}-s{steps}-{run.replace('/', '-')}-{rnd}"
            elapsed, records = sweep(overrides, launcher, R, out, tmp, versions[f"{prefix}/" if prefix else ""])
            walls[run].append(elapsed)
            losses[run] = [r["final"]["train/loss"] for r in records]
            threads[run].update(r.get("env", {}).get("threads") for r in records)
            shutil.rmtree(out, ignore_errors=True)
        drift = max(drift, max(abs(a - b) for a, b in zip(losses["basic"], losses["vectorized"])))
    if which == "mlp" and drift > 1e-4:
        raise SystemExit(f"mlp R={R}: the launchers' final train/loss differ by {drift}")
    med = {k: statistics.median(v) for k, v in walls.items()}
    row = {"model": which, "R": R, "steps": steps, "median_s": med, "rounds": walls,
           "threads": {k: sorted(x for x in t if x is not None) for k, t in threads.items()}, "max_final_loss_difference": drift}
    for prefix in versions:
        row[f"{prefix}ratio"] = med[f"{prefix}basic"] / med[f"{prefix}vectorized"]
        row[f"{prefix}replica_steps_per_s"] = {k: R * steps / med[f"{prefix}{k}"] for k in ("basic", "vectorized")}
    return row


def describe_startup(s: dict) -> str:
    m, r = s["median_s"], s["ratio_to_import_torch"]
    text = (f"import torch {m['import_torch']:.2f} s | first step {m['first_step']:.2f} s ({r['first_step']:.2f}x) | one-step run "
            f"{m['one_step_run']:.2f} s ({r['one_step_run']:.2f}x) | config error {m['config_error']:.2f} s ({r['config_error']:.2f}x)")
    if "baseline/first_step" in m:
        text += (f" || baseline: first step {r['baseline/first_step']:.2f}x, one-step run {r['baseline/one_step_run']:.2f}x, "
                 f"config error {r['baseline/config_error']:.2f}x")
    return text


def describe_sweep(row: dict) -> str:
    m = row["median_s"]
    text = (f"{row['model']} R={row['R']} {row['steps']} steps: basic {m['basic']:.1f} s, vectorized {m['vectorized']:.1f} s, "
            f"ratio {row['ratio']:.2f}x (threads {row['threads']['basic']} / {row['threads']['vectorized']})")
    if "baseline/basic" in m:
        text += (f" || baseline: basic {m['baseline/basic']:.1f} s, vectorized {m['baseline/vectorized']:.1f} s; "
                 f"this/baseline time: basic {m['basic'] / m['baseline/basic']:.2f}, vectorized {m['vectorized'] / m['baseline/vectorized']:.2f}")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["startup", "sweeps"], default=None)
    p.add_argument("--which", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--replicas", nargs="+", type=int, default=[8])
    p.add_argument("--mlp-steps", nargs="+", type=int, default=[1000])
    p.add_argument("--cnn-steps", nargs="+", type=int, default=[20])
    p.add_argument("--rounds", type=int, default=1, help="timed sweeps of each launcher per setting (median)")
    p.add_argument("--startup-rounds", type=int, default=5)
    p.add_argument("--conditions", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    p.add_argument("--full", action="store_true", help="R = 8 and 16, MLP 1000 and 5000 steps, CNN 100 steps")
    p.add_argument("--baseline", type=Path, default=None, metavar="TREE",
                   help="another bnexp source tree (e.g. `git archive COMMIT | tar -x -C TREE`) timed side by side, interleaved")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cpu" / "sweep_cli.json")
    args = p.parse_args()
    if args.full:
        args.replicas, args.mlp_steps, args.cnn_steps = [8, 16], [1000, 5000], [100]

    import torch

    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                "python": platform.python_version()},
                    "args": {k: str(v) for k, v in vars(args).items()}, "startup": {}, "sweeps": []}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1-min load {load():.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-cli-") as d:
        tmp = Path(d)
        versions = trees(args.baseline, tmp)
        for cond in args.conditions:
            with condition(cond):
                if args.only in (None, "startup"):
                    before = load()
                    s = startup(args.startup_rounds, tmp / f"startup-{cond}", versions)
                    s["load"] = [before, load()]
                    result["startup"][cond] = s
                    save(args.json, result)
                    print(f"[{cond}, load {before:.1f}->{load():.1f}] {describe_startup(s)}", flush=True)
                if args.only in (None, "sweeps"):
                    for which in args.which:
                        for steps in (args.mlp_steps if which == "mlp" else args.cnn_steps):
                            for R in args.replicas:
                                before = load()
                                row = sweeps(which, R, steps, args.rounds, tmp, versions)
                                row.update(condition=cond, load=[before, load()])
                                result["sweeps"].append(row)
                                save(args.json, result)
                                print(f"[{cond}, load {before:.1f}->{load():.1f}] {describe_sweep(row)}", flush=True)
    save(args.json, result)
    print(f"written: {args.json}")


def save(path: Path, result: dict) -> None:
    """After every part, so that a long run stopped halfway keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "retried": RETRIED}, indent=1))


if __name__ == "__main__":
    main()
