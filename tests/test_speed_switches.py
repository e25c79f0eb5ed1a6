"""The speed switches (train.compile, train.amp, channels_last) change speed, not results;
the loop's logging changes nothing about training. No timing is asserted here:
speed is measured by benchmarks/bench_train.py."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnexp import data as data_mod
from bnexp.config import Amp, ConfigError
from bnexp.models import build_model
from bnexp.norms import _RunningStatsNorm
from bnexp.probes.activations import quantiles
from bnexp.runtime import seed_everything
from bnexp.schema import compose, validate
from bnexp.step import LogWindow, TrainStep, make_optimizer
from bnexp.train import train
from tests.conftest import Forwards

# A small sigmoid MLP with BN before the activation (the BN paper's layout), logged every step.
TINY = ["data=synthetic", "data.shape=[1,8,8]", "data.n_train=640", "data.n_test=100", "model.hidden=[16,16]",
        "model.activation=sigmoid", "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.batch_size=32",
        "train.progress=false"]
TINY_CNN = ["model=cnn", "model.hidden=[8,16]", "data.shape=[3,8,8]", "norm=group", "norm.groups=4"]
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, _RunningStatsNorm)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(tmp_path: Path, overrides: list[str]) -> tuple[list[float], dict, dict[str, torch.Tensor]]:
    """Train into a fresh directory; return the per-step train/loss, metrics.json and the final weights."""
    run_dir = Path(tmp_path) / f"run{len(list(Path(tmp_path).iterdir()))}"
    run_dir.mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        record = train(compose([*TINY, *overrides]), run_dir)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    weights = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return [e.value for e in acc.Scalars("train/loss")], record, weights


@pytest.mark.slow
def test_compile_gives_the_same_losses_as_eager(tmp_path):
    # torch.compile on CPU builds C++ with gcc: ~10-20 s here, the slowest test of the file.
    with Forwards() as plain:
        eager, _, w_eager = run(tmp_path, ["train.device=cpu"])
    with Forwards() as traced:
        compiled, record, w_compiled = run(tmp_path, ["train.device=cpu", "train.compile=true"])
    assert traced.compiled and not plain.compiled  # train() really compiled the forward
    assert record["status"] == "completed" and len(compiled) == 6
    assert compiled == pytest.approx(eager, abs=1e-4)
    for k in w_eager:
        torch.testing.assert_close(w_compiled[k], w_eager[k], atol=1e-4, rtol=1e-4)


def test_bf16_autocast_on_cpu_stays_close_to_fp32(tmp_path):
    with Forwards() as full:
        fp32, _, _ = run(tmp_path, ["train.device=cpu"])
    with Forwards() as half:
        bf16, record, weights = run(tmp_path, ["train.device=cpu", "train.amp=bf16"])
    assert torch.bfloat16 in half.dtypes and torch.bfloat16 not in full.dtypes  # train() really ran under autocast
    assert record["status"] == "completed"
    assert bf16 != fp32  # and it shows in the losses ...
    assert bf16 == pytest.approx(fp32, rel=2e-2)  # ... within what bf16's 8 bits of mantissa allow
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())  # master weights stay fp32


def one_step_under(overrides: list[str], amp: Amp, device: str = "cpu") -> tuple[list[tuple], set[torch.dtype]]:
    """One training step with ``amp``: each norm call's output and what the norm's own
    forward gives on the fp32 input with autocast off; and the layers' output dtypes."""
    cfg = compose([*TINY, *overrides])
    seed_everything(0, False)
    x = torch.randn(32, *cfg.data.shape, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    model = build_model(cfg.model, cfg.norm, tuple(x.shape[1:]), 10).to(device)
    norm_calls: list[tuple] = []
    layer_dtypes: set[torch.dtype] = set()

    def hook(module, inputs, output):
        if isinstance(module, NORMS):
            with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
                expected = type(module).forward(module, inputs[0].float())
            norm_calls.append((output.detach(), expected))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            layer_dtypes.add(output.dtype)

    for m in model.modules():
        m.register_forward_hook(hook)
    step = TrainStep(model, make_optimizer(cfg.optim, model), amp, torch.device(device), compile=False).step
    loss, _ = step(x, y)
    assert torch.isfinite(loss)
    return norm_calls, layer_dtypes


def assert_norms_ran_in_fp32(norm_calls: list[tuple]) -> None:
    assert norm_calls
    for out, expected in norm_calls:
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # bf16/fp16 math would be ~1e-2 off


@pytest.mark.parametrize("overrides", [[], ["norm=layer"], ["norm=ghost_batch", "norm.virtual_batch_size=8"], TINY_CNN],
                         ids=["batch", "layer", "ghost_batch", "cnn-group"])
def test_norm_layers_run_in_fp32_under_bf16_autocast(overrides):
    norm_calls, layer_dtypes = one_step_under(overrides, Amp.bf16)
    assert layer_dtypes == {torch.bfloat16}  # autocast is on for the layers...
    assert_norms_ran_in_fp32(norm_calls)  # ...and off for the norms


def test_fp16_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="train.amp"):
        validate(compose([*TINY, "train.device=cpu", "train.amp=fp16"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="device=auto resolves to CUDA here")
def test_fp16_is_refused_when_auto_resolves_to_cpu():
    with pytest.raises(ConfigError, match="train.amp"):
        validate(compose([*TINY, "train.device=auto", "train.amp=fp16"]))


def test_window_finds_the_first_non_finite_loss_and_averages_loss_and_accuracy():
    logits = torch.tensor([[[5.0, 0, 0], [0, 5, 0]], [[5, 0, 0], [5, 0, 0]], [[float("nan"), 0, 0], [0, 0, 1]],
                           [[float("inf"), 0, 0], [0, 0, 1]]])
    labels = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])

    def window_after(steps: int) -> tuple[dict, int | None]:
        # Steps 1..steps, logged at the last of them (log_every=steps).
        window = LogWindow(log_every=steps, total=100, batch_size=2, num_classes=3, device=torch.device("cpu"))
        for col in range(steps):
            window.add(1 + col, F.cross_entropy(logits[col], labels[col]), logits[col], labels[col])
        last = steps
        host = {k: v.item() for k, v in window.sums(last).items()}
        return window.values(last, host)

    clean, bad = window_after(2)
    assert bad is None and clean["train/acc"] == 0.75
    expected = F.cross_entropy(logits[:2].flatten(0, 1), labels[:2].flatten())
    assert clean["train/loss"] == pytest.approx(expected.item())
    assert window_after(4)[1] == 3  # the first non-finite loss is step 3's


def test_a_window_folded_in_parts_holds_the_same_bits(monkeypatch):
    # A checkpoint or a full buffer folds a window part-way; the values logged must not depend on it.
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, 32, 10, generator=gen), torch.randint(0, 10, (10, 32), generator=gen)
    buffers = []
    for parts, limit in (([10], 1 << 22), ([4, 6], 1 << 22), ([1, 2, 3, 4], 1 << 22), ([10], 3 * 32 * 10)):
        monkeypatch.setattr("bnexp.step.WINDOW_LOGITS", limit)  # the last: a full buffer folds every 3 steps
        window, step = LogWindow(10, 10, 32, 10, torch.device("cpu")), 0
        for size in parts:
            for _ in range(size):
                step += 1
                window.add(step, F.cross_entropy(logits[step - 1], labels[step - 1]), logits[step - 1], labels[step - 1])
            window.fold(step)
        buffers.append(window.buf)
    for buf in buffers[1:]:
        assert torch.equal(buf, buffers[0])


def test_loop_with_logging_trains_the_same_weights_as_a_bare_loop(tmp_path):
    # Logging, evaluation and probes must not touch training: same seed and batches, same weights.
    _, _, logged = run(tmp_path, ["train.device=cpu", "train.steps=25", "train.log_every=4", "train.eval_every=5"])
    cfg = compose([*TINY, "train.device=cpu"])
    device = torch.device("cpu")
    seed_everything(cfg.seed, False)
    data = data_mod.load(cfg.data, device)
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_classes)
    opt = make_optimizer(cfg.optim, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(data.x_train) // 32
    for step in range(25):
        if step % per_epoch == 0:
            perm = torch.randperm(len(data.x_train), generator=gen)
        idx = perm[(step % per_epoch) * 32 : (step % per_epoch + 1) * 32]
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(logged[k], v), k


def test_the_loop_hides_setup_objects_from_the_collector_and_gives_them_back(tmp_path, register_probe):
    # gc.freeze() for the loop, gc.unfreeze() when the run ends, whether it completes or fails.
    import gc

    seen = []

    class FreezeCount:
        every, read_only = 1, True

        def __call__(self, ctx):
            seen.append(gc.get_freeze_count())
            return {}

    register_probe("freeze_count", lambda setup, cfg: FreezeCount())
    run(tmp_path, ["train.device=cpu"])
    assert seen and min(seen) > 1000 and gc.get_freeze_count() == 0

    class Broken(FreezeCount):
        def __call__(self, ctx):
            raise RuntimeError("a bug in a probe")

    register_probe("freeze_count", lambda setup, cfg: Broken())
    with pytest.raises(RuntimeError, match="a bug in a probe"):
        run(tmp_path, ["train.device=cpu"])
    assert gc.get_freeze_count() == 0


@cuda
def test_channels_last_cnn_on_cuda_matches_contiguous(tmp_path):
    # train() puts a CNN in channels_last on CUDA; the same model without it gives the same losses.
    cfg = compose([*TINY, "model=cnn", "model.hidden=[8,16]", "data.shape=[3,8,8]", "train.device=cuda"])
    device = torch.device("cuda")
    x = torch.randn(32, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    losses = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        seed_everything(0, False)
        model = build_model(cfg.model, cfg.norm, (3, 8, 8), 10).to(device).to(memory_format=fmt)
        step = TrainStep(model, make_optimizer(cfg.optim, model), Amp.none, device, compile=False).step
        losses[fmt] = [step(x, y)[0].item() for _ in range(4)]
    # cuDNN may pick other (TF32) conv algorithms for the other layout: close, not bit-equal.
    assert losses[torch.channels_last] == pytest.approx(losses[torch.contiguous_format], abs=1e-3)


@cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda_stays_close_to_fp32_and_keeps_norms_fp32(tmp_path, amp):
    fp32, _, _ = run(tmp_path, ["train.device=cuda"])
    low, record, _ = run(tmp_path, ["train.device=cuda", f"train.amp={amp}"])
    assert record["status"] == "completed"
    assert low == pytest.approx(fp32, rel=2e-2)
    norm_calls, layer_dtypes = one_step_under([], Amp(amp), device="cuda")
    assert layer_dtypes == {torch.bfloat16 if amp == "bf16" else torch.float16}
    assert_norms_ran_in_fp32(norm_calls)


@cuda
def test_compile_on_cuda_gives_the_same_losses_as_eager(tmp_path):
    eager, _, _ = run(tmp_path, ["train.device=cuda"])
    compiled, _, _ = run(tmp_path, ["train.device=cuda", "train.compile=true"])
    assert compiled == pytest.approx(eager, abs=1e-3)


@pytest.mark.parametrize("n", [1, 2, 7, 25_600])
def test_probe_quantiles_equal_torch_quantile(n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q = torch.tensor([0.15, 0.5, 0.85])
    torch.testing.assert_close(quantiles(values, q), torch.quantile(values, q))
