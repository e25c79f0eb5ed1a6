"""ResNet images/s: bnexp's training loop against a hand-written one on the same device.

The issue-14 figure: ResNet-20 (He et al. 2016, Sec. 4.2; model=resnet,
option-A shortcuts, BN before the addition) on CIFAR-10-shaped synthetic data
(50,000 images of 3x32x32), timed by bench_train.py's contenders, interleaved
over rounds, medians reported:

  (a) bnexp: ``bnexp.train.train`` with default logging (train/*, grad/weight
      norms, val eval and activation percentiles, events, metrics.json);
  (b) a hand-written loop: data on the device, the same batches, the same
      model (channels_last on CUDA), zero_grad/forward/loss/backward/step under
      the same amp and torch.compile switches, no logging;
  (c) a DataLoader loop.

(b) and (c) do not augment: an override such as ``data.augment=crop_flip``
reaches only (a), whose a/b ratio then includes the augmentation's cost.

    python benchmarks/bench_resnet.py                      # CPU, tiny: ResNet-8, width 0.25, 16x16 images
    python benchmarks/bench_resnet.py --device cuda --full --amp bf16 --compile --json out/resnet20.json

The GPU figure (ResNet-20, bf16, compiled, channels_last) needs a CUDA machine;
it has not been taken yet (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train.py beside this file
import bench_train  # noqa: E402


def overrides(args: argparse.Namespace) -> list[str]:
    size = [3, 32, 32] if args.full else [3, 16, 16]
    model = ["model.depth=20", "model.width=1"] if args.full else ["model.depth=8", "model.width=0.25"]
    return ["model=resnet", *model, "data=synthetic", f"data.shape=[{','.join(map(str, size))}]", f"data.n_train={args.n_train}",
            "data.n_test=1000", "data.val_size=1000", f"train.batch_size={args.batch}", f"train.steps={args.steps}",
            f"train.device={args.device}", f"train.compile={str(args.compile).lower()}", f"train.amp={args.amp}", "seed=0",
            *args.overrides]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--full", action="store_true", help="ResNet-20 on 3x32x32 (default: ResNet-8 at width 0.25 on 3x16x16, for a CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 500 on CUDA, 20 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 512 on CUDA, 64 on CPU)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: 50000 on CUDA, as CIFAR-10; 4000 on CPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, cuDNN autotuning, torch.compile)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="extra bnexp overrides, e.g. train.eval_every=1000 or data.augment=crop_flip")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (500 if cuda else 20)
    args.batch = args.batch or (512 if cuda else 64)
    args.n_train = args.n_train or (50000 if cuda else 4000)
    args.clock = "wall"
    if args.threads:
        torch.set_num_threads(args.threads)
    which = "resnet20" if args.full else "resnet8"
    result = bench_train.bench(which, args, overrides(args))
    result["images_per_sec"] = result["samples_per_sec"]
    bench_train.print_table([result])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([result], indent=2))


if __name__ == "__main__":
    main()
