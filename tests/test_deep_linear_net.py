"""The deep-linear-net setup (Santurkar et al. 2018): data=linear_regression,
train.loss=mse, full-batch steps. Regression runs have no accuracy: the tags
and metrics.json leave it out, and `bnexp report` / a sweep's tables head with
the losses instead."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnexp.config import LATER_KEYS, ConfigError, config_hash, plain
from bnexp.data import load
from bnexp.models import build_model
from bnexp.runs import load_scalars
from bnexp.schema import compose, validate
from tests.conftest import run_inprocess, snapshot

DLN = ["data=linear_regression", "train.loss=mse", "model.hidden=[10,10,10]", "model.activation=identity",
       "train.batch_size=1000", "optim.momentum=0", "optim.lr=0.01", "train.steps=20", "train.log_every=5",
       "train.progress=false", "train.device=cpu"]


def test_linear_regression_targets_are_one_fixed_linear_map_of_gaussian_inputs():
    data = load(compose(["data=linear_regression", "data.out_dim=4", "data.n_test=50"]).data, torch.device("cpu"))
    assert data.regression and data.num_classes == 4 and data.input_shape == (10,)
    assert data.x_train.shape == (1000, 10) and data.y_train.dtype == torch.float32 and len(data.x_val) == 0
    x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
    a, *_ = np.linalg.lstsq(x, y, rcond=None)  # the one A behind every target, train and test alike
    np.testing.assert_allclose(data.x_test.double().numpy() @ a, data.y_test.double().numpy(), atol=1e-4)
    assert abs(x.mean()) < 0.05 and x.std() == pytest.approx(1, abs=0.05)
    again = load(compose(["data=linear_regression", "data.out_dim=4", "data.n_train=500"]).data, torch.device("cpu"))
    np.testing.assert_allclose(again.x_train[:1].double().numpy() @ a, again.y_train[:1].double().numpy(), atol=1e-4)


def only_run(tmp_path):
    (metrics,) = tmp_path.glob("runs/*/*/metrics.json")
    return metrics.parent, json.loads(metrics.read_text())


@pytest.mark.slow
def test_mse_run_logs_losses_without_any_accuracy_and_its_test_loss_is_the_mean_squared_error(tmp_path):
    result = run_inprocess(["train", *DLN], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir, record = only_run(tmp_path)
    assert record["status"] == "completed"
    assert not any(k.endswith("/acc") for k in [*record["final"], *record["best"]])
    tags = load_scalars(run_dir)
    assert [s for s, _ in tags["train/loss"]] == [5, 10, 15, 20] and "test/loss" in tags
    assert not any(t.endswith("/acc") for t in tags)
    assert "train/acc" not in result.stdout and "test/loss" in result.stdout  # the run's summary table
    cfg = compose(DLN)
    data = load(cfg.data, torch.device("cpu"))
    model = build_model(cfg.model, cfg.norm, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    with torch.no_grad():
        pred = model.eval()(data.x_test).double().numpy()
    assert record["final"]["test/loss"] == pytest.approx(((pred - data.y_test.double().numpy()) ** 2).mean(), rel=1e-5)
    # Full-batch gradient descent without BN noise trains steadily down.
    losses = [v for _, v in tags["train/loss"]]
    assert losses == sorted(losses, reverse=True)


@pytest.mark.slow
def test_report_and_sweep_tables_of_regression_runs_head_with_losses(tmp_path):
    result = run_inprocess(["sweep", *DLN, "norm.placement=pre,none", "hydra.sweep.dir=sw"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs_table = result.stdout.split("comparison")[0]
    assert "test/loss" in jobs_table and "val/acc" not in jobs_table and "test/acc" not in jobs_table
    report = run_inprocess(["report", "sw", "--format", "csv"], tmp_path)
    assert report.returncode == 0, report.stderr
    header = report.stdout.splitlines()[0].split(",")
    assert "test/loss mean" in header and "train/loss mean" in header
    assert not any("acc" in h for h in header)
    rows = report.stdout.splitlines()[1:]
    assert len(rows) == 2 and all(r.split(",")[header.index("test/loss mean")] for r in rows)
    listing = run_inprocess(["runs", "sw"], tmp_path)  # bnexp runs: one table per folder, headed the same way
    assert listing.returncode == 0, listing.stderr
    assert "test/loss" in listing.stdout and "val/acc" not in listing.stdout and "test/acc" not in listing.stdout


def test_santurkar_dln_preset_is_the_papers_25_layer_full_batch_net():
    cfg = compose(["experiment=santurkar_dln"])
    assert len(cfg.model.hidden) == 24 and set(cfg.model.hidden) == {10}  # + the output layer: 25 weight matrices
    assert cfg.model.activation.value == "identity" and cfg.train.loss.value == "mse"
    assert cfg.train.batch_size == cfg.data.n_train == 1000 and cfg.data.val_size == 0
    assert cfg.optim.momentum == 0 and cfg.train.steps == 10_000
    assert min(cfg.probes.landscape.etas) == 0.01 and max(cfg.probes.landscape.etas) == 30
    model = build_model(cfg.model, cfg.norm, (10,), 10)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 25


@pytest.mark.slow
def test_santurkar_dln_trains_at_smoke_size_with_its_probes(tmp_path):
    args = ["train", "experiment=santurkar_dln", "train.steps=4", "train.log_every=2", "probes.landscape.every=2",
            "probes.ics.every=4", "probes.hessian.every=4", "probes.hessian.iterations=3", "train.progress=false"]
    result = run_inprocess(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _, record = only_run(tmp_path)
    final = record["final"]
    assert len([k for k in final if k.startswith("ics/") and k.endswith("/l2")]) == 25
    assert final["landscape/loss_max"] >= final["landscape/loss_min"] and "hessian/top_eig" in final


BAD = [
    ("data=linear_regression", "train.loss"),  # cross_entropy on real-valued targets
    ("train.loss=mse", "train.loss"),  # mse on class labels
    ("data=linear_regression train.loss=mse train.target_acc=0.9", "train.target_acc"),
    ("optim.train_only=norm norm.placement=none", "optim.train_only"),
    ("optim.train_only=norm norm.scale=false norm.center=false", "optim.train_only"),
    ("norm.noise=true norm.noise_sigma=0.5", "norm.noise_sigma"),
    ("norm.noise=true norm.noise_r_sigma=-0.1", "norm.noise_r_sigma"),
    ("train.precise_bn=-1", "train.precise_bn"),
    ("probes.landscape.every=5 probes.landscape.etas=[]", "probes.landscape.etas"),
    ("probes.landscape.every=5 probes.landscape.etas=[1,-2]", "probes.landscape.etas"),
    ("probes.hessian.every=5 probes.hessian.iterations=0", "probes.hessian.iterations"),
    ("probes.hessian.every=5 probes.hessian.tolerance=0", "probes.hessian.tolerance"),
    ("probes.bn_gap.every=5 data.val_size=0", "probes.bn_gap.every"),
    ("probes.bn_gap.batches=0", "probes.bn_gap.batches"),
    ("probes.ics.every=-1", "probes.ics.every"),
]


@pytest.mark.parametrize("bad, key", BAD)
def test_invalid_instrument_settings_are_refused_naming_the_key_and_what_is_allowed(bad, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(bad.split()))
    assert e.value.key == key and "allowed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad, key", [BAD[0], BAD[3], BAD[8], ("probes.hessian.every=5 probes.hessian.mode=test", "probes.hessian.mode")])
def test_invalid_instrument_settings_exit_2_with_one_line_and_no_run_dir(tmp_path, bad, key):
    (tmp_path / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    result = run_inprocess(["train", "train.steps=5", "train.progress=false", *bad.split()], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_runs_recorded_before_the_instrument_keys_existed_keep_their_config_hash():
    now = plain(compose([]))
    old = json.loads(json.dumps(now))
    for key in LATER_KEYS:  # the config as bnexp wrote it before these keys
        if key == "world_size":  # hashed like a key, but no config key
            continue
        *parents, leaf = key.split(".")
        node = old
        for p in parents:
            node = node[p]
        node.pop(leaf)
    old.pop("probes")
    assert config_hash(old) == config_hash(now)
    assert {"norm.noise", "train.precise_bn", "train.loss", "optim.train_only", "data.out_dim"} <= set(LATER_KEYS)
    noisy = json.loads(json.dumps(now))
    noisy["norm"]["noise"] = True
    assert config_hash(noisy) != config_hash(now)
    probed = json.loads(json.dumps(now))
    probed["probes"]["hessian"]["every"] = 5
    assert config_hash(probed) == config_hash(now)  # probes change no trained number
