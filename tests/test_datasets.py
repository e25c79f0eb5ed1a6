"""bnexp.datasets: file formats, checksums, downloads and MNIST-1D generation.

Real MNIST / Fashion-MNIST files are used when the shared data folder is there; every
other case runs on small files generated here, and downloads go to a local HTTP server.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from bnexp import datasets as D
from bnexp.datasets import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IDX = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- small IDX files


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def make_mnist_folder(folder: Path, n_train=5, n_test=3, seed=0) -> dict:
    """Four small valid IDX .gz files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for fname, key in zip(IDX, ["x_train", "y_train", "x_test", "y_test"]):
        a = arrays[key]
        write_gz(folder / fname, idx_bytes(2051 if a.ndim == 3 else 2049, a.shape, a.tobytes()))
    return arrays


@pytest.fixture(autouse=True)
def own_md5_cache(tmp_path, monkeypatch) -> Path:
    """Each test remembers MD5s in a cache of its own, not the user's ~/.cache/bnexp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "bnexp" / "md5.json"


@pytest.fixture
def patched_md5s(monkeypatch):
    """Make CHECKSUMS[name] match the files now in a folder (generated data has other MD5s)."""

    def patch(name: str, folder: Path):
        monkeypatch.setitem(D.CHECKSUMS, name, {f: md5(folder / f) for f in D.CHECKSUMS[name]})

    return patch


# ---------------------------------------------------------------- API basics


def test_required_files():
    assert D.REAL_DATASETS == ("mnist1d", "mnist", "fashion_mnist", "cifar10")
    assert D.required_files("mnist") == IDX
    assert D.required_files("fashion_mnist") == IDX
    assert D.required_files("cifar10") == ["cifar-10-python.tar.gz"]
    assert D.required_files("mnist1d") == []
    with pytest.raises(DataError) as e:
        D.required_files("imagenet")
    assert "imagenet" in one_line(e) and "mnist1d" in str(e.value)


def test_module_import_is_cheap():
    # Load the file on its own (not through bnexp/__init__) so only this module is judged.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ds', {str(REPO / 'bnexp' / 'datasets.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "bad = [x for x in ('torch', 'gzip', 'tarfile', 'urllib.request', 'scipy') if x in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_available_names_folder_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        D.check_available("mnist", "data/mnist", download=False)  # relative root
    msg = one_line(e)
    assert str(tmp_path / "data" / "mnist") in msg  # absolute
    assert all(f in msg for f in IDX)
    assert "data.download=true" in msg and "put the files there" in msg

    with pytest.raises(DataError) as e:
        D.check_available("cifar10", str(tmp_path), download=False)
    assert "cifar-10-python.tar.gz" in one_line(e) and str(tmp_path) in str(e.value)

    # only what is missing is called missing
    make_mnist_folder(tmp_path / "m")
    (tmp_path / "m" / IDX[2]).unlink()
    with pytest.raises(DataError) as e:
        D.check_available("mnist", str(tmp_path / "m"), download=False)
    assert f"missing in {tmp_path / 'm'}: {IDX[2]} (" in one_line(e)

    D.check_available("mnist", str(tmp_path / "nowhere"), download=True)  # will be fetched
    D.check_available("mnist1d", str(tmp_path / "nowhere"), download=False)  # generated
    D.check_available("mnist", str(tmp_path / "m0"), download=True)


def test_load_without_files_raises_the_same_message(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_arrays("fashion_mnist", str(tmp_path), download=False)
    assert "Fashion-MNIST" in one_line(e) and all(f in str(e.value) for f in IDX)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- real MNIST / Fashion-MNIST


@pytest.mark.parametrize(
    "name, folder, train_counts",
    [
        ("mnist", "mnist", [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
        ("fashion_mnist", "fashion-mnist", [6000] * 10),
    ],
)
def test_real_idx_files(name, folder, train_counts):
    root = SHARED_DATA / folder
    if not all((root / f).is_file() for f in IDX):
        pytest.skip(f"real {name} files not found in {root}")
    for f in IDX:  # the shared copies are the published files
        assert md5(root / f) == D.CHECKSUMS[name][f]
    for f, magic in zip(IDX, (2051, 2049, 2051, 2049)):
        with gzip.open(root / f) as fh:
            assert int.from_bytes(fh.read(4), "big") == magic

    d = D.load_arrays(name, str(root), download=False)
    assert d["num_classes"] == 10
    assert d["x_train"].shape == (60000, 1, 28, 28) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (10000, 1, 28, 28) and d["x_test"].dtype == np.uint8
    assert d["y_train"].shape == (60000,) and d["y_train"].dtype == np.int64
    assert d["y_test"].shape == (10000,) and d["y_test"].dtype == np.int64
    assert d["y_train"].min() == 0 and d["y_train"].max() == 9
    assert np.bincount(d["y_train"]).tolist() == train_counts
    assert np.bincount(d["y_test"], minlength=10).sum() == 10000
    assert d["x_train"].max() == 255 and d["x_train"].min() == 0


def test_wrong_dataset_folder_is_named(tmp_path, monkeypatch):
    # MNIST and Fashion-MNIST files share names: a root pointing at the other one is caught by MD5.
    make_mnist_folder(tmp_path)
    monkeypatch.setitem(D.CHECKSUMS, "mnist", {f: md5(tmp_path / f) for f in IDX})
    with pytest.raises(DataError) as e:
        D.load_arrays("fashion_mnist", str(tmp_path), download=False)
    msg = one_line(e)
    assert "is the MNIST file, not the Fashion-MNIST one" in msg and "data.root" in msg


# ---------------------------------------------------------------- IDX parsing on small files


def test_idx_roundtrip(tmp_path, patched_md5s):
    arrays = make_mnist_folder(tmp_path)
    patched_md5s("mnist", tmp_path)
    d = D.load_arrays("mnist", str(tmp_path), download=False)
    assert d["x_train"].shape == (5, 1, 28, 28) and d["x_test"].shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(d["x_train"][:, 0], arrays["x_train"])
    np.testing.assert_array_equal(d["y_test"], arrays["y_test"].astype(np.int64))
    assert d["y_train"].dtype == np.int64


@pytest.mark.parametrize(
    "raw, images, expect",
    [
        (idx_bytes(2049, (2, 2, 2), bytes(8)), True, "magic number 2049, expected 2051"),
        (idx_bytes(2051, (3,), bytes(3)), False, "magic number 2051, expected 2049"),
        (idx_bytes(2051, (2, 28, 28), bytes(2 * 784 - 5)), True, "holds 1563 bytes of images data, expected 1568"),
        (idx_bytes(2051, (2, 28, 28), bytes(2 * 784 + 1)), True, "expected 1568"),
        (idx_bytes(2049, (4,), bytes([0, 9, 10, 3])), False, "label 10, expected labels 0..9"),
        (idx_bytes(2049, (4,), bytes(2)), False, "holds 2 bytes of labels data, expected 4"),
        (b"\x00\x00", False, "too short"),
        (idx_bytes(2051, (2,), b""), True, "ends inside its IDX header"),
    ],
    ids=["images-wrong-magic", "labels-wrong-magic", "short-payload", "long-payload", "label-range", "short-labels", "tiny", "short-header"],
)
def test_idx_errors(tmp_path, raw, images, expect):
    path = write_gz(tmp_path / "f.gz", raw)
    with pytest.raises(DataError) as e:
        D._read_idx(path, images=images)
    msg = one_line(e)
    assert expect in msg and str(path) in msg and "re-download" in msg


def test_idx_bad_gzip(tmp_path):
    not_gz = tmp_path / "plain.gz"
    not_gz.write_bytes(idx_bytes(2049, (1,), b"\x01"))
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(2049, (1000,), bytes(1000)))[:30])
    for path in (not_gz, truncated):
        with pytest.raises(DataError) as e:
            D._read_idx(path, images=False)
        assert "not a readable gzip file" in one_line(e) and str(path) in str(e.value)


def test_idx_count_mismatch(tmp_path, patched_md5s):
    make_mnist_folder(tmp_path)
    write_gz(tmp_path / IDX[1], idx_bytes(2049, (4,), bytes(4)))  # 5 train images, 4 labels
    patched_md5s("mnist", tmp_path)
    with pytest.raises(DataError) as e:
        D.load_arrays("mnist", str(tmp_path), download=False)
    assert "5 images but train-labels has 4 labels" in one_line(e)


def test_existing_file_checksum_mismatch(tmp_path):
    make_mnist_folder(tmp_path)  # valid IDX, but not the published bytes
    with pytest.raises(DataError) as e:
        D.load_arrays("mnist", str(tmp_path), download=True)  # present files are not re-fetched
    msg = one_line(e)
    assert str(tmp_path / IDX[0]) in msg
    assert md5(tmp_path / IDX[0]) in msg and D.CHECKSUMS["mnist"][IDX[0]] in msg
    assert "delete it and re-download" in msg
    assert (tmp_path / IDX[0]).exists()  # the user's file is left alone


def copy_of_real_mnist(dest: Path) -> Path:
    src = SHARED_DATA / "mnist"
    if not all((src / f).is_file() for f in IDX):
        pytest.skip(f"real MNIST files not found in {src}")
    dest.mkdir(parents=True)
    for f in IDX:
        (dest / f).write_bytes((src / f).read_bytes())
    return dest


def spoil_truncated(folder: Path) -> str:
    path = folder / IDX[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"{path} has MD5 "


def spoil_other_content(folder: Path) -> str:
    # A valid gzipped IDX image file, under the right name, holding other images.
    (folder / IDX[0]).write_bytes((folder / IDX[2]).read_bytes())
    return f"{folder / IDX[0]} has MD5 {md5(folder / IDX[2])}, expected {D.CHECKSUMS['mnist'][IDX[0]]} for MNIST"


def spoil_fashion_file(folder: Path) -> str:
    fashion = SHARED_DATA / "fashion-mnist" / IDX[1]
    if not fashion.is_file():
        pytest.skip(f"real Fashion-MNIST files not found in {fashion.parent}")
    (folder / IDX[1]).write_bytes(fashion.read_bytes())
    return f"{folder / IDX[1]} is the Fashion-MNIST file, not the MNIST one (same file name); point data.root at a folder of MNIST files"


@pytest.mark.parametrize("spoil", [spoil_truncated, spoil_other_content, spoil_fashion_file], ids=["truncated", "other-content", "fashion-as-mnist"])
def test_train_on_a_corrupt_dataset_file_exits_2_with_one_line_before_any_run_dir_exists(tmp_path, spoil):
    from tests.conftest import run_inprocess, snapshot

    root = copy_of_real_mnist(tmp_path / "mnist")
    expected = spoil(root)
    before = snapshot(root)
    result = run_inprocess(["train", "data=mnist", f"data.root={root}", "hydra.run.dir=runs/here", "train.steps=5", "train.progress=false"],
                     tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: data.root: ") and expected in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
    assert snapshot(root) == before  # the user's files are left as they are


def test_md5_of_an_unchanged_file_is_read_from_the_cache(tmp_path, patched_md5s, own_md5_cache):
    make_mnist_folder(tmp_path / "m")
    patched_md5s("mnist", tmp_path / "m")
    D.check_available("mnist", str(tmp_path / "m"), download=False)
    cache = json.loads(own_md5_cache.read_text())
    path = tmp_path / "m" / IDX[0]
    st = path.stat()
    assert cache[str(path)] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, md5(path)]
    # The next check believes the cache while the file is unchanged: it does not read the file again.
    cache[str(path)][-1] = "0" * 32
    own_md5_cache.write_text(json.dumps(cache))
    with pytest.raises(DataError) as e:
        D.check_available("mnist", str(tmp_path / "m"), download=False)
    assert f"{path} has MD5 {'0' * 32}" in one_line(e)


def test_a_file_replaced_by_another_with_its_size_mtime_and_ctime_is_hashed_again(tmp_path, patched_md5s, own_md5_cache):
    make_mnist_folder(tmp_path / "m")
    patched_md5s("mnist", tmp_path / "m")
    D.check_available("mnist", str(tmp_path / "m"), download=False)
    path = tmp_path / "m" / IDX[0]
    st = path.stat()
    cache = json.loads(own_md5_cache.read_text())
    cache[str(path)][3] = st.st_ino + 1  # as if hashed when another file (inode) lived at this path
    cache[str(path)][-1] = "0" * 32
    own_md5_cache.write_text(json.dumps(cache))
    D.check_available("mnist", str(tmp_path / "m"), download=False)  # hashed again: the real MD5 passes
    assert json.loads(own_md5_cache.read_text())[str(path)] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, md5(path)]


def test_a_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(tmp_path, patched_md5s):
    make_mnist_folder(tmp_path / "m")
    patched_md5s("mnist", tmp_path / "m")
    D.check_available("mnist", str(tmp_path / "m"), download=False)
    path = tmp_path / "m" / IDX[1]
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the gzip stream: same size, other bytes
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p or touch -r would leave it
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(DataError) as e:
        D.check_available("mnist", str(tmp_path / "m"), download=False)
    assert f"{path} has MD5 {md5(path)}" in one_line(e)


def test_an_unwritable_md5_cache_only_costs_the_hashing(tmp_path, patched_md5s, monkeypatch):
    make_mnist_folder(tmp_path / "m")
    patched_md5s("mnist", tmp_path / "m")
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    D.check_available("mnist", str(tmp_path / "m"), download=False)
    (tmp_path / "m" / IDX[3]).write_bytes(b"junk")
    with pytest.raises(DataError) as e:
        D.check_available("mnist", str(tmp_path / "m"), download=False)
    assert f"{tmp_path / 'm' / IDX[3]} has MD5 " in one_line(e)


# ---------------------------------------------------------------- CIFAR-10 tarball


def cifar_batch(rng, n: int) -> dict:
    # Same layout as the published python-version pickles (protocol 2, byte-string keys).
    return {
        b"batch_label": b"testing batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


class Boom:  # unpickling this would call os.system
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def make_cifar_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cifar_members(rng, n=4) -> tuple[dict[str, bytes], dict]:
    batches = {f"cifar-10-batches-py/data_batch_{i}": cifar_batch(rng, n) for i in range(1, 6)}
    batches["cifar-10-batches-py/test_batch"] = cifar_batch(rng, n + 1)
    members = {"cifar-10-batches-py/readme.html": b"<html>not a pickle</html>"}
    members |= {k: pickle.dumps(v, protocol=2) for k, v in batches.items()}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(Boom(), protocol=2)  # never unpickled
    return members, batches


def test_cifar_tarball(tmp_path):
    rng = np.random.default_rng(0)
    members, batches = cifar_members(rng)
    path = make_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    d = D._read_cifar10_tar(path)
    assert d["num_classes"] == 10
    assert d["x_train"].shape == (20, 3, 32, 32) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (5, 3, 32, 32)
    assert d["y_train"].dtype == np.int64 and d["y_train"].shape == (20,)
    b1 = batches["cifar-10-batches-py/data_batch_1"]
    b5 = batches["cifar-10-batches-py/data_batch_5"]
    # channel planes: row = 1024 R, 1024 G, 1024 B, each 32x32 row-major
    np.testing.assert_array_equal(d["x_train"][0, 1], b1[b"data"][0, 1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(d["x_train"][-1].ravel(), b5[b"data"][-1])
    np.testing.assert_array_equal(d["y_train"][:4], b1[b"labels"])
    np.testing.assert_array_equal(d["y_test"], batches["cifar-10-batches-py/test_batch"][b"labels"])
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]  # nothing extracted


def test_cifar_through_load_arrays(tmp_path, patched_md5s):
    members, _ = cifar_members(np.random.default_rng(1), n=2)
    make_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    patched_md5s("cifar10", tmp_path)
    d = D.load_arrays("cifar10", str(tmp_path), download=False)
    assert d["x_train"].shape == (10, 3, 32, 32) and d["x_test"].shape == (3, 3, 32, 32)


def test_cifar_errors(tmp_path):
    rng = np.random.default_rng(2)
    members, _ = cifar_members(rng)

    del members["cifar-10-batches-py/data_batch_3"]
    path = make_cifar_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(DataError) as e:
        D._read_cifar10_tar(path)
    assert "lacks the CIFAR-10 members cifar-10-batches-py/data_batch_3" in one_line(e)

    members["cifar-10-batches-py/data_batch_3"] = pickle.dumps(Boom(), protocol=2)
    path = make_cifar_tar(tmp_path / "b.tar.gz", members)
    with pytest.raises(DataError) as e:
        D._read_cifar10_tar(path)
    assert "data_batch_3 is not a CIFAR-10 batch" in one_line(e) and "refusing" in str(e.value)

    members["cifar-10-batches-py/data_batch_3"] = pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    path = make_cifar_tar(tmp_path / "c.tar.gz", members)
    with pytest.raises(DataError) as e:
        D._read_cifar10_tar(path)
    assert "expected uint8 [N, 3072]" in one_line(e)

    members["cifar-10-batches-py/data_batch_3"] = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    path = make_cifar_tar(tmp_path / "d.tar.gz", members)
    with pytest.raises(DataError) as e:
        D._read_cifar10_tar(path)
    assert "labels outside 0..9" in one_line(e)

    for bad in (b"not a tarball at all", gzip.compress(b"x" * 2000), path.read_bytes()[:5000]):
        p = tmp_path / "bad.tar.gz"
        p.write_bytes(bad)
        with pytest.raises(DataError) as e:
            D._read_cifar10_tar(p)
        assert str(p) in one_line(e) and "re-download" in str(e.value)


# ---------------------------------------------------------------- downloads


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A folder served on 127.0.0.1; yields (folder, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_download_success(tmp_path, http_dir, monkeypatch, patched_md5s):
    served, url = http_dir
    arrays = make_mnist_folder(served)
    patched_md5s("mnist", served)
    monkeypatch.setitem(D.MIRRORS, "mnist", [url.rstrip("/") + "/missing/", url])  # first mirror 404s
    root = tmp_path / "new" / "root"  # created on demand
    d = D.load_arrays("mnist", str(root), download=True)
    assert sorted(p.name for p in root.iterdir()) == sorted(IDX)  # no .part left behind
    for f in IDX:
        assert md5(root / f) == D.CHECKSUMS["mnist"][f]
    np.testing.assert_array_equal(d["x_test"][:, 0], arrays["x_test"])

    # a second load uses the files in place: the server is no longer needed
    monkeypatch.setitem(D.MIRRORS, "mnist", [])
    assert D.load_arrays("mnist", str(root), download=True)["x_train"].shape == (5, 1, 28, 28)


def test_download_checksum_mismatch_leaves_nothing(tmp_path, http_dir, monkeypatch):
    served, url = http_dir
    make_mnist_folder(served)
    monkeypatch.setitem(D.MIRRORS, "mnist", [url])  # serves files with other MD5s than the published
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        D.load_arrays("mnist", str(root), download=True)
    msg = one_line(e)
    first = IDX[0]
    assert first in msg and D.CHECKSUMS["mnist"][first] in msg and md5(served / first) in msg
    assert not root.exists()  # neither the final file nor a temporary one, nor the folder the download made


def test_download_http_error_leaves_nothing(tmp_path, http_dir, monkeypatch):
    _, url = http_dir  # empty folder: every file is a 404
    monkeypatch.setitem(D.MIRRORS, "cifar10", [url])
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        D.load_arrays("cifar10", str(root), download=True)
    msg = one_line(e)
    assert "could not download cifar-10-python.tar.gz" in msg and "404" in msg and str(root) in msg
    assert not root.exists()


def test_download_writes_to_temp_then_renames(tmp_path, monkeypatch):
    # A download that dies midway must not leave a file under the real name.
    calls = []

    class Dying(io.BytesIO):
        def read(self, n=-1):
            calls.append(n)
            if len(calls) > 1:
                raise ConnectionResetError("connection reset by peer")
            return super().read(n)

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Dying(b"partial data"))
    with pytest.raises(DataError) as e:
        D._download("mnist", tmp_path, IDX[1])
    assert "connection reset" in one_line(e)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- MNIST-1D


# From the reference package (mnist1d 0.0.2.post1, make_dataset() with default args).
REF_Y_TRAIN_HEAD = [2, 6, 4, 5, 6, 6, 6, 0, 3, 1, 6, 9, 4, 3, 4, 5, 1, 9, 0, 3]
REF_Y_TEST_HEAD = [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
REF_TRAIN_COUNTS = [398, 396, 411, 394, 394, 402, 401, 404, 402, 398]
REF_X_TRAIN_0 = [
    -0.33200568, -0.47191036, -0.77869707, -1.00974083, -0.88235259, 0.10393481, 1.64328432, 1.65250707,
    0.68307811, -0.34263751, -1.52143085, -1.10398400, -0.01709391, 1.01466799, 0.62358630, -0.02391367,
    0.25410828, 0.86739260, 0.93541008, 1.03587401, 1.59348798, 1.23684168, 0.41019851, -0.21979299,
    0.09805559, 0.53016371, 0.52027822, 0.18998057, 0.07043655, 0.32433057, 0.26860833, -0.57907736,
    -1.09348571, -0.86458045, -0.11352962, 0.01950092, -0.32821417, -0.71673048, -0.96195823, -0.89016640,
]  # fmt: skip


@pytest.mark.slow
def test_mnist1d_shapes_and_determinism(tmp_path):
    d = D.load_arrays("mnist1d", str(tmp_path / "unused"), download=True)
    assert not (tmp_path / "unused").exists()  # generated, never downloaded or cached on disk
    assert d["x_train"].shape == (4000, 1, 40) and d["x_test"].shape == (1000, 1, 40)
    assert d["x_train"].dtype == np.float32
    assert d["y_train"].shape == (4000,) and d["y_test"].shape == (1000,)
    assert d["y_train"].dtype == np.int64 and d["num_classes"] == 10
    counts = np.bincount(d["y_train"], minlength=10)
    assert len(counts) == 10 and counts.min() > 350 and counts.max() < 450
    assert set(np.unique(d["y_test"])) == set(range(10))
    x_all = np.concatenate([d["x_train"], d["x_test"]]).astype(np.float64)
    assert abs(x_all.mean()) < 1e-6 and abs(x_all.std() - 1) < 1e-6

    again = D.load_arrays("mnist1d", "", download=False)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(d[k], again[k])


@pytest.mark.slow
def test_mnist1d_matches_reference():
    d = D.load_arrays("mnist1d", "", download=False)
    assert d["y_train"][:20].tolist() == REF_Y_TRAIN_HEAD
    assert d["y_test"][:10].tolist() == REF_Y_TEST_HEAD
    assert np.bincount(d["y_train"]).tolist() == REF_TRAIN_COUNTS
    np.testing.assert_allclose(d["x_train"][0, 0], REF_X_TRAIN_0, rtol=0, atol=1e-6)


def test_gaussian_filter_matches_direct_convolution():
    x = np.random.default_rng(0).standard_normal(72)
    k = D._gaussian_kernel(2)
    assert len(k) == 17 and abs(k.sum() - 1) < 1e-15 and np.array_equal(k, k[::-1])
    direct = np.convolve(np.pad(x, 8, mode="symmetric"), k, mode="valid")
    np.testing.assert_allclose(D._gaussian_filter_reflect(x, k), direct, rtol=0, atol=1e-14)
