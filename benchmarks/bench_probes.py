"""What does each optimization-landscape probe cost, next to the training step it measures?

For each setup (the santurkar_landscape MLP on Fashion-MNIST, the santurkar_dln
deep linear net, and optionally a small CNN on CIFAR-10-shaped synthetic data)
one process builds the run's parts exactly as ``bnexp train`` does
(``bnexp.train.Run``), trains a few warm-up steps, then times, interleaved in
rounds (step, probe a, step, probe b, ...), one training step and one call of
each probe through the loop's own call site (``ProbeSet.due``, so inside
``preserved()``). Interleaving makes load from other processes hit all of them
alike; the table gives medians and each probe's ratio to a step. The share of a
run is (probe ms / probe's ``every``) / step ms at the preset's cadence.

    python benchmarks/bench_probes.py                  # CPU, mlp and dln
    python benchmarks/bench_probes.py --which cnn --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bnexp import data as data_mod  # noqa: E402
from bnexp.probes import ProbeSet  # noqa: E402
from bnexp.runtime import clock, seed_everything  # noqa: E402
from bnexp.schema import compose  # noqa: E402
from bnexp.train import Run  # noqa: E402

FASHION = [Path(os.environ.get("BNEXP_FASHION", "")), Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"]
PROBES = ("ics", "landscape", "hessian", "bn_gap")


def setup_overrides(which: str, device: str) -> list[str]:
    every = ["probes.ics.every=1", "probes.landscape.every=1", "probes.hessian.every=1", "probes.bn_gap.every=1"]
    if which == "mlp":
        root = next((d for d in FASHION if str(d) not in ("", ".") and (d / "train-images-idx3-ubyte.gz").is_file()), None)
        data = [f"data.root={root}"] if root else ["data=synthetic", "data.shape=[1,28,28]", "data.n_train=60000", "data.val_size=5000"]
        return ["experiment=santurkar_landscape", *data, *every, f"train.device={device}"]
    if which == "dln":
        return ["experiment=santurkar_dln", *every[:3], f"train.device={device}"]
    return ["experiment=santurkar_landscape", "model=cnn", "model.hidden=[32,64,128]", "data=synthetic", "data.shape=[3,32,32]",
            "data.n_train=10000", "data.val_size=2000", *every, f"train.device={device}"]


def preset_every(which: str) -> dict[str, int]:
    cfg = compose([f"experiment={'santurkar_dln' if which == 'dln' else 'santurkar_landscape'}"])
    return {name: int(cfg.probes[name].every) for name in PROBES}


def bench(which: str, device: str, rounds: int) -> dict:
    cfg = compose(setup_overrides(which, device))
    dev = torch.device(device)
    seed_everything(0, False)
    data = data_mod.load(cfg.data, dev)
    run = Run(cfg, Path("unused"), dev, data, 10_000)
    probes = {name: ProbeSet({name: run.probes.probes[name]}) for name in PROBES if name in run.probes.probes}

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        idx = run.sampler.next()
        x, y = data.x_train[idx], data.y_train[idx]
        run.train_step.step(x, y)
        return x, y

    for _ in range(5):
        x, y = step()
    times: dict[str, list[float]] = {"step": [], **{name: [] for name in probes}}
    gc.collect()
    for r in range(rounds):
        for name, probe_set in probes.items():
            t = clock(dev)
            x, y = step()
            times["step"].append(clock(dev) - t)
            t = clock(dev)
            probe_set.due(r + 1, 10**9, lambda: run.probe_context(r + 1, x, y))
            times[name].append(clock(dev) - t)
    step_ms = 1000 * statistics.median(times["step"])
    every = preset_every(which)
    out = {"setup": which, "device": device, "step_ms": step_ms, "probes": {}}
    for name in probes:
        ms = 1000 * statistics.median(times[name])
        out["probes"][name] = {"ms": ms, "x_step": ms / step_ms, "every": every[name],
                               "share": (ms / every[name]) / step_ms if every[name] else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", nargs="+", default=["mlp", "dln"], choices=["mlp", "dln", "cnn"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load {load:.2f} at start")
    for which in args.which:
        res = bench(which, args.device, args.rounds)
        results.append(res)
        print(f"\n{which}: one training step {res['step_ms']:.2f} ms (median of {args.rounds * len(res['probes'])})")
        print(f"{'probe':<10} {'ms/call':>9} {'x step':>8} {'every':>6} {'share of run':>13}")
        for name, r in res["probes"].items():
            share = f"{100 * r['share']:.1f}%" if r["share"] is not None else "-"
            print(f"{name:<10} {r['ms']:9.2f} {r['x_step']:8.1f} {r['every']:6d} {share:>13}")
    print(f"1-min load {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else "")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_start": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
