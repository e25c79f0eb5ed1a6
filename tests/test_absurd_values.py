"""Absurd values: sizes that cannot fit, thread counts and paths no machine has,
ports TensorBoard cannot take. Each is one line and exit 2, with nothing
allocated in earnest and nothing left on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY, one_line_exit_2, run_inprocess, snapshot


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_allocated(tmp_path):
    # 3.2e13 parameters: before, torch tried to allocate them (a traceback and a failed run dir)
    out = run_inprocess(["train", *TINY, "model.hidden=[1000000000000]", "hydra.run.dir=big"], tmp_path)
    one_line_exit_2(out, "model.hidden", "parameters", "free", "allowed: a smaller model")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_device(monkeypatch):
    """The CPU as a device with 20 MB free (as a small GPU would be)."""
    from bnexp import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 20_000_000)


@pytest.mark.slow
def test_a_batch_whose_activations_cannot_fit_is_refused_before_the_first_step(tmp_path, small_device):
    # 2x1024 MLP: 1.1 M parameters, ~17 MB with gradients and Adam's state, fit;
    # ~58 KB of activations per example: 288 examples fit (17 MB), 576 do not (33 MB)
    ok = run_inprocess(["train", *TINY, "model.hidden=[1024,1024]", "train.batch_size=288", "train.steps=2", "hydra.run.dir=fits"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    before = snapshot(tmp_path)
    out = run_inprocess(["train", *TINY, "model.hidden=[1024,1024]", "train.batch_size=576", "hydra.run.dir=big"], tmp_path)
    one_line_exit_2(out, "train.batch_size: 576 examples' activations need about", "20 MB free")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_parameters_are_counted_without_memory_and_without_running_initializers():
    from bnexp.memory import param_bytes
    from bnexp.models import build_model
    from bnexp.schema import compose

    for overrides in (["model.hidden=[64,32]"], ["model=cnn", "data.shape=[3,32,32]"], ["model=resnet", "data.shape=[3,32,32]"],
                      ["model=vgg", "data.shape=[3,32,32]", "model.width=0.25"]):
        cfg = compose(["data=synthetic", *overrides])
        real = build_model(cfg.model, cfg.norm, tuple(cfg.data.shape), 10)
        count, size = param_bytes(cfg, tuple(cfg.data.shape), 10)
        assert count == sum(p.numel() for p in real.parameters()) and size == 4 * count, overrides


@pytest.mark.parametrize("root", ["/dev/null", "a_file/sub", "/proc/no_such_folder", "new_folder/deeper"])
def test_a_data_root_that_cannot_hold_a_download_or_a_failed_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, root):
    from bnexp import datasets

    monkeypatch.setattr(datasets, "MIRRORS", {"fashion_mnist": ["http://127.0.0.1:9"]})  # nothing listens there: a failed download
    (tmp_path / "a_file").write_text("not a folder")
    before = snapshot(tmp_path)
    out = run_inprocess(["train", *TINY, "data=fashion_mnist", f"data.root={root}", "data.download=true", "hydra.run.dir=run"], tmp_path)
    one_line_exit_2(out, "data.root", root.split("/")[-1] if root != "/dev/null" else "/dev/null")
    assert snapshot(tmp_path) == before  # no run dir, no data folder made for the download


@pytest.mark.parametrize("args, words", [
    (["--port", "-1"], ["--port -1", "0 for a free one"]),
    (["--port", "99999"], ["--port 99999", "1 to 65535"]),
    (["--port", "IN_USE"], ["is in use", "--port 0"]),
    (["--host", "999.1.1.1"], ["--host 999.1.1.1", "allowed"]),
    (["--host", "no-such-host.invalid"], ["--host no-such-host.invalid", "allowed"]),
], ids=["negative port", "port above 65535", "port in use", "bad address", "unknown host"])
def test_bnexp_tb_at_an_address_it_cannot_listen_on_is_one_line_exit_2(event_folder, args, words):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = [str(taken.getsockname()[1]) if a == "IN_USE" else a for a in args]
        out = run_inprocess(["tb", str(event_folder), *args], event_folder)
    one_line_exit_2(out, *words)


@pytest.fixture
def event_folder(tmp_path) -> Path:
    """A folder `bnexp tb` accepts (it holds an event file)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    return tmp_path
