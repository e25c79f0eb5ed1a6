import pytest
import numpy as np
import torch

from bnexp import data
from bnexp.schema import compose
from tests.conftest import mnist_root


def test_drug_trial_matches_the_keras_tutorial_design():
    arrays = data.drug_trial(compose(["data=drug_trial"]).data)
    x, y = arrays["x_train"][:, 0], arrays["y_train"]
    assert len(x) == 2100 and len(arrays["x_test"]) == 420
    assert x.min() >= 13 and x.max() <= 100
    assert (x < 65).sum() == 1050
    assert y[x >= 65].mean() == 1000 / 1050  # 95% of the old had side effects
    assert y[x < 65].mean() == 50 / 1050  # 95% of the young did not


def test_preprocessing_statistics_come_from_the_training_split_only():
    cfg = compose(["data=synthetic", "data.preprocess=standardize", "model=mlp"])
    arrays = data.synthetic(cfg.data)
    splits = data.load(cfg.data, torch.device("cpu"))
    train_idx, _ = data.split_train_val(len(arrays["x_train"]), cfg.data.val_size, cfg.data.seed)
    raw_train = arrays["x_train"][train_idx]
    # training split: exactly mean 0 / std 1 per feature; test split: shifted by the train statistics
    assert np.allclose(splits.x_train.mean(0).numpy(), 0, atol=1e-4)
    assert np.allclose(splits.x_train.std(0, unbiased=False).numpy(), 1, atol=1e-3)
    expected_test = (arrays["x_test"] - raw_train.mean(0)) / raw_train.std(0)
    assert np.allclose(splits.x_test.numpy(), expected_test, atol=1e-4)


def test_minmax_maps_training_split_to_unit_interval():
    cfg = compose(["data=drug_trial", "data.preprocess=minmax"])
    splits = data.load(cfg.data, torch.device("cpu"))
    assert splits.x_train.min().item() == 0.0 and splits.x_train.max().item() == 1.0


def test_validation_split_is_deterministic_and_disjoint():
    a_train, a_val = data.split_train_val(1000, 0.1, seed=3)
    b_train, b_val = data.split_train_val(1000, 0.1, seed=3)
    _, c_val = data.split_train_val(1000, 0.1, seed=4)
    assert len(a_val) == 100 and len(a_train) == 900
    assert np.array_equal(a_val, b_val) and not np.array_equal(a_val, c_val)
    assert not set(a_train) & set(a_val)
    assert len(data.split_train_val(1000, 250, seed=0)[1]) == 250


@pytest.mark.slow
def test_subset_keeps_only_the_first_training_examples():
    cfg = compose(["data.subset=500"])
    splits = data.load(cfg.data, torch.device("cpu"))
    assert len(splits.x_train) == 500 and len(splits.x_val) == 400 and len(splits.x_test) == 1000
    # Raw values: the first 500 of the full training part, the same validation part, and no example in both.
    full = data.load(compose(["data.preprocess=none"]).data, torch.device("cpu"))
    sub = data.load(compose(["data.preprocess=none", "data.subset=500"]).data, torch.device("cpu"))
    assert torch.equal(sub.x_train, full.x_train[:500]) and torch.equal(sub.y_train, full.y_train[:500])
    assert torch.equal(sub.x_val, full.x_val) and torch.equal(sub.x_test, full.x_test)
    train_rows = {row.numpy().tobytes() for row in sub.x_train}
    assert not any(row.numpy().tobytes() in train_rows for row in sub.x_val)  # no validation example leaked into training


def test_real_mnist_images_keep_their_chw_shape_and_the_mlp_flattens_them():
    from bnexp.models import build_model

    cfg = compose(["data=mnist", f"data.root={mnist_root()}", "data.subset=1000", "model.hidden=[8]"])
    images = data.load(cfg.data, torch.device("cpu"))
    assert images.input_shape == (1, 28, 28)
    assert len(images.x_val) == 5000 and len(images.x_test) == 10000
    # standardize on images: one statistic per channel, from the training part
    assert abs(images.x_train.mean().item()) < 1e-3 and abs(images.x_train.std().item() - 1) < 1e-2
    assert abs(images.x_test.mean().item()) < 0.1
    mlp = build_model(cfg.model, cfg.norm, images.input_shape, images.num_classes)
    assert mlp.hidden0.linear.in_features == 784 and mlp(images.x_train[:4]).shape == (4, 10)


@pytest.mark.slow
def test_mnist1d_default_dataset_shapes():
    splits = data.load(compose([]).data, torch.device("cpu"))
    assert splits.input_shape == (1, 40) and splits.num_classes == 10  # a one-channel signal
    assert len(splits.x_train) + len(splits.x_val) == 4000 and len(splits.x_test) == 1000


@pytest.mark.slow
def test_the_last_load_is_reused_until_the_data_config_or_the_files_change(tmp_path):
    # A sweep's jobs in one process share their data; any change to what load() reads loads again.
    import os
    import shutil

    root = tmp_path / "mnist"
    shutil.copytree(mnist_root(), root)
    base = ["data=mnist", f"data.root={root}", "data.subset=1000"]
    cpu = torch.device("cpu")
    first = data.load(compose(base).data, cpu)
    assert data.load(compose(base).data, cpu) is first  # the next job of a sweep
    assert data.load(compose([*base, "model=cnn", "norm.placement=none"]).data, cpu) is first  # the model is not the data's business
    other = data.load(compose([*base, "data.val_size=2000"]).data, cpu)
    assert len(other.x_val) == 2000
    again = data.load(compose(base).data, cpu)
    assert again is not first and torch.equal(again.x_train, first.x_train)
    labels = root / "train-labels-idx1-ubyte.gz"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert data.load(compose(base).data, cpu) is not again
