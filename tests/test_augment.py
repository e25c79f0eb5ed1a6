"""data.augment=crop_flip: 4-pixel-padded random crops and horizontal flips of
each training batch on the device, from a seeded generator that a checkpoint
holds, so that a resumed run trains exactly what an uninterrupted one trains."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from bnexp.augment import CropFlip
from bnexp.config import ConfigError
from bnexp.runs import load_scalars
from bnexp.schema import compose, validate
from bnexp.train import train

CPU = torch.device("cpu")


def numpy_crop_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flips: np.ndarray, pad: int = 4) -> np.ndarray:
    """The reference: zero-pad each image by ``pad``, take the crop at (dy, dx), mirror it when flipped."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return np.where(flips[:, None, None, None].astype(bool), out[..., ::-1], out)


def test_crop_flip_is_a_padded_random_crop_and_mirror_of_each_image():
    aug = CropFlip(seed=3, device=CPU)
    x = torch.randn(256, 2, 7, 5)
    state = aug.gen.get_state()
    out = aug(x)
    aug.gen.set_state(state)  # the same draws again, to give the reference
    offsets, flips = aug.draw(len(x))
    dy, dx = offsets.numpy()
    np.testing.assert_array_equal(out.numpy(), numpy_crop_flip(x.numpy(), dy, dx, flips.numpy()))
    assert set(dy) == set(dx) == set(range(9)) and 0.35 < flips.float().mean() < 0.65  # all 9 offsets, flips about half
    assert out.shape == x.shape and not torch.equal(out, x)


def test_crop_flip_draws_the_same_crops_for_the_same_seed_and_other_crops_for_another():
    x = torch.randn(64, 1, 8, 8)
    a, b, c = CropFlip(0, CPU), CropFlip(0, CPU), CropFlip(1, CPU)
    first = [a(x) for _ in range(3)]
    assert all(torch.equal(u, b(x)) for u in first)
    assert not torch.equal(first[0], c(x))
    assert not torch.equal(first[0], first[1])  # every batch gets new crops


def test_crop_flip_needs_image_data():
    with pytest.raises(ConfigError) as e:
        validate(compose(["data.augment=crop_flip"]))  # mnist1d: [1, 40] signals
    assert "data.augment: crop_flip crops and flips images [C,H,W], but data=mnist1d gives examples of shape [1, 40]" in str(e.value)
    validate(compose(["data.augment=crop_flip", "data=synthetic", "data.shape=[1,8,8]"]))


TINY = ["model=resnet", "model.depth=8", "model.width=0.25", "data=synthetic", "data.shape=[1,8,8]", "data.n_train=512",
        "data.n_test=64", "train.batch_size=32", "train.steps=12", "train.log_every=3", "train.eval_every=6", "train.probe_size=16",
        "train.checkpoint_every=6", "train.progress=false", "train.device=cpu", "train.deterministic=true"]


class Crash:
    """A probe that fails once at its step, after the step-6 checkpoint: the run dies there as a killed process would."""

    read_only = True

    def __init__(self, every: int):
        self.every, self.fired = every, False

    def __call__(self, ctx):
        if not self.fired:
            self.fired = True
            raise RuntimeError("simulated crash")
        return {}


def run(cfg, run_dir, resume=False):
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, run_dir, resume=resume, summary=False)


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def losses(run_dir):
    return [v for _, v in load_scalars(run_dir, ["train/loss"])["train/loss"]]


def crash_then_resume(cfg, run_dir, register_probe, edit_checkpoint=None):
    crash = Crash(every=9)
    register_probe("crash", lambda setup, node: crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, run_dir)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["step"] == 6
    if edit_checkpoint:
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        edit_checkpoint(ckpt)
        torch.save(ckpt, run_dir / "checkpoint.pt")
    return run(cfg, run_dir, resume=True)


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_a_run_resumed_after_a_crash_trains_bit_identical_weights_with_augmentation(tmp_path, register_probe, augment):
    cfg = compose([*TINY, f"data.augment={augment}"])
    run(cfg, tmp_path / "straight")
    record = crash_then_resume(cfg, tmp_path / "resumed", register_probe)
    assert record["status"] == "completed" and record["resumed_from"] == 6
    reference, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 4


def test_augmentation_changes_what_is_trained(tmp_path):
    run(compose([*TINY, "data.augment=none"]), tmp_path / "none")
    run(compose([*TINY, "data.augment=crop_flip"]), tmp_path / "crop_flip")
    assert losses(tmp_path / "none")[1:] != losses(tmp_path / "crop_flip")[1:]


def test_a_checkpoint_from_before_augmentation_existed_still_resumes(tmp_path, register_probe):
    cfg = compose([*TINY, "data.augment=none"])
    run(cfg, tmp_path / "straight")
    record = crash_then_resume(cfg, tmp_path / "old", register_probe, edit_checkpoint=lambda ckpt: ckpt.pop("augment"))
    assert record["status"] == "completed"
    assert all(torch.equal(weights(tmp_path / "straight")[k], v) for k, v in weights(tmp_path / "old").items())


def test_a_checkpoint_without_augmentation_state_does_not_fit_a_run_with_augmentation(tmp_path, register_probe):
    cfg = compose([*TINY, "data.augment=crop_flip"])
    with pytest.raises(ConfigError, match="does not fit this run's config.*augmentation is none, this run's is crop_flip"):
        crash_then_resume(cfg, tmp_path / "run", register_probe, edit_checkpoint=lambda ckpt: ckpt.pop("augment"))


def test_runs_recorded_before_data_augment_and_zero_init_residual_existed_keep_their_config_hash():
    from bnexp.config import config_hash, hash_matches, plain

    cfg = compose(["data=synthetic"])
    old = plain(cfg)
    del old["data"]["augment"], old["norm"]["zero_init_residual"]  # the config a run saved before these keys
    assert config_hash(old) == config_hash(cfg) and hash_matches(config_hash(old), cfg)
    assert config_hash(compose(["data=synthetic", "data.augment=crop_flip"])) != config_hash(cfg)
    assert config_hash(compose(["data=synthetic", "norm.zero_init_residual=true"])) != config_hash(cfg)
