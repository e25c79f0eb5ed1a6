"""The disk cache of prepared datasets (bnexp.data_cache): served only for its exact
key, rebuilt when damaged, safe with two writers, bounded, and the same bits as no cache."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnexp import data, data_cache
from bnexp.config import ConfigError
from bnexp.schema import compose
from tests.conftest import REPO, _cli_env, mnist_root

CPU = torch.device("cpu")
PARTS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("BNEXP_DATA_CACHE", str(folder))
    monkeypatch.setattr(data, "_last", None)  # no in-process reuse from an earlier test
    return folder


@functools.lru_cache(maxsize=None)
def data_cfg(*overrides: str):
    return compose(list(overrides)).data  # (read only: composing each time costs ~0.3 s)


def load(*overrides: str) -> data.Splits:
    data._last = None  # as a new process: nothing kept in memory
    return data.load(data_cfg(*overrides), CPU)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("bnexp-data-*.arrays")) if folder.is_dir() else []


def assert_same(a: data.Splits, b: data.Splits) -> None:
    for part in PARTS:
        x, y = getattr(a, part), getattr(b, part)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), part
    assert a.num_classes == b.num_classes


def uncached(monkeypatch, *overrides: str) -> data.Splits:
    with monkeypatch.context() as m:
        m.setenv("BNEXP_DATA_CACHE", "off")
        return load(*overrides)


def test_a_cached_dataset_is_bit_identical_to_one_prepared_without_the_cache(cache, monkeypatch):
    first = load("data=mnist1d")
    assert len(entries(cache)) == 1
    written = entries(cache)[0].stat().st_mtime_ns
    again = load("data=mnist1d")
    assert entries(cache)[0].stat().st_mtime_ns >= written  # read (and marked used), not written anew
    assert_same(again, first)
    assert_same(again, uncached(monkeypatch, "data=mnist1d"))


@pytest.mark.parametrize("change", ["data.preprocess=minmax", "data.preprocess=none", "data.val_size=0.2", "data.seed=1", "data.subset=1000"])
def test_another_split_or_preprocessing_is_never_served_from_an_entry_of_the_default(cache, monkeypatch, change):
    load("data=mnist1d")
    changed = load("data=mnist1d", change)
    assert len(entries(cache)) == 2
    assert_same(changed, uncached(monkeypatch, "data=mnist1d", change))


def test_an_entry_whose_stored_key_differs_is_not_served(cache, monkeypatch):
    load("data=mnist1d", "data.preprocess=minmax")
    (minmax,) = entries(cache)
    # The standardize entry's name now holds the minmax entry's arrays (and key).
    standardize = data_cache.entry_path(data._disk_key(data_cfg("data=mnist1d")))
    minmax.rename(standardize)
    assert_same(load("data=mnist1d"), uncached(monkeypatch, "data=mnist1d"))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "empty"])
def test_a_truncated_or_damaged_entry_is_rebuilt_not_trusted(cache, monkeypatch, damage, caplog):
    load("data=mnist1d")
    (entry,) = entries(cache)
    raw = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # inside the largest member's data: only its CRC-32 can tell
        middle = len(raw) // 3
        entry.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1 :])
    rebuilt = load("data=mnist1d")
    assert_same(rebuilt, uncached(monkeypatch, "data=mnist1d"))
    assert "unreadable" in caplog.text
    assert entry.stat().st_size == len(raw) and data_cache.read(data._disk_key(data_cfg("data=mnist1d"))) is not None  # written again, whole


WRITER = """
import sys, time
from pathlib import Path
import torch
from bnexp import data
from bnexp.schema import compose
cfg = compose(["data=mnist1d"]).data
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
splits = data.load(cfg, torch.device("cpu"))
print(float(splits.x_train.sum()))
"""


@pytest.mark.slow  # two fresh interpreters
def test_two_processes_writing_the_same_entry_at_once_leave_one_valid_entry(cache, monkeypatch, tmp_path):
    go = tmp_path / "go"
    env = _cli_env({"BNEXP_DATA_CACHE": str(cache)})
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(go)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(0.5)
    go.touch()  # both start preparing (and then writing) together
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0]
    assert len(entries(cache)) == 1 and not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    cached = data_cache.read(data._disk_key(data_cfg("data=mnist1d")))
    assert cached is not None
    assert_same(load("data=mnist1d"), uncached(monkeypatch, "data=mnist1d"))


def test_the_cache_keeps_within_its_bound_dropping_the_least_recently_used(cache, monkeypatch):
    load("data=mnist1d")
    (size,) = [p.stat().st_size for p in entries(cache)]
    monkeypatch.setenv("BNEXP_DATA_CACHE_MB", str(2.5 * size / 2**20))  # room for two entries
    load("data=mnist1d", "data.seed=1")
    time.sleep(0.01)
    load("data=mnist1d")  # a hit: now the most recently used
    someone_elses = cache / "notes.txt"
    someone_elses.write_text("not the cache's")
    dead_writer = cache / f".{entries(cache)[0].name}.999999999.abc.tmp"  # a writer that died mid-write
    dead_writer.write_bytes(b"half")
    load("data=mnist1d", "data.seed=2")
    kept = {p.name for p in entries(cache)}
    keys = {name: data_cache.entry_path(data._disk_key(data_cfg("data=mnist1d", *over))).name
            for name, over in (("default", []), ("seed1", ["data.seed=1"]), ("seed2", ["data.seed=2"]))}
    assert kept == {keys["default"], keys["seed2"]}
    assert someone_elses.read_text() == "not the cache's" and not dead_writer.exists()


def test_with_the_cache_off_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("BNEXP_DATA_CACHE", "off")
    load("data=mnist1d")
    assert not (tmp_path / "bnexp" / "data").exists()


@pytest.mark.slow
def test_mnist_from_the_cache_is_bit_identical_and_a_changed_file_is_refused_not_served(cache, monkeypatch, tmp_path):
    root = tmp_path / "mnist"
    shutil.copytree(mnist_root(), root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # this copy's MD5s are remembered apart
    over = ["data=mnist", f"data.root={root}"]
    first = load(*over)
    assert_same(load(*over), first)
    assert_same(first, uncached(monkeypatch, *over))
    labels = root / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])  # the published file no longer
    with pytest.raises(ConfigError, match=r"^data.root: .*has MD5"):  # said to the user as a bad data.root
        load(*over)
    assert len(entries(cache)) == 1
