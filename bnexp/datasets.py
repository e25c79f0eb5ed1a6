"""Real datasets as numpy arrays: MNIST-1D (generated), MNIST, Fashion-MNIST, CIFAR-10.

Only numpy is imported here, so ``import bnexp.datasets`` stays cheap; gzip, tarfile,
pickle and urllib come in when a loader actually needs them.

Every problem with data files (missing, corrupt, wrong checksum, failed download) is a
:class:`DataError` whose message is one line saying which file, what is wrong and what
to do, because it is shown to the user as is.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["DataError", "REAL_DATASETS", "required_files", "check_available", "source_key", "load_arrays", "file_md5", "md5_cache_path"]


class DataError(Exception):
    """User-facing problem with data files (missing, corrupt, checksum mismatch). str(e) is ONE clear line."""

    def __init__(self, message: str):
        # Messages often embed OS or library error text; keep them on one line whatever it holds.
        super().__init__(" ".join(str(message).split()))


REAL_DATASETS = ("mnist1d", "mnist", "fashion_mnist", "cifar10")

_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR_TARBALL = "cifar-10-python.tar.gz"

# Published MD5s (the ones torchvision checks; also in shared/data/*/SOURCES.md).
# Order of each dict is the order of required_files().
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": dict(
        zip(
            _IDX_FILES,
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        )
    ),
    "fashion_mnist": dict(
        zip(
            _IDX_FILES,
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        )
    ),
    "cifar10": {_CIFAR_TARBALL: "c58f30108f718f92721af3b95e74349a"},
    "mnist1d": {},
}

# Base URLs tried in order; a file's URL is base + file name. Module-level so tests
# (and users behind a proxy cache) can point them elsewhere.
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}

_DISPLAY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "mnist1d": "MNIST-1D"}
_DOWNLOAD_TIMEOUT_S = 60


def _check_name(name: str) -> None:
    if name not in REAL_DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(REAL_DATASETS)}")


def required_files(name: str) -> list[str]:
    """File names expected in data.root ([] for mnist1d, which is generated)."""
    _check_name(name)
    return list(CHECKSUMS[name])


def _abs(root: str | os.PathLike) -> Path:
    # Absolute so messages say exactly where we looked (Hydra may have changed the cwd).
    return Path(root).expanduser().resolve()


def _missing_message(name: str, folder: Path, missing: list[str]) -> str:
    expected = required_files(name)
    also = "" if missing == expected else f" (of the expected {', '.join(expected)})"
    return (
        f"{_DISPLAY[name]} files missing in {folder}: {', '.join(missing)}{also}; "
        f"set data.download=true to fetch them, or put the files there yourself"
    )


def check_available(name: str, root: str, download: bool) -> None:
    """Raise DataError if a file is missing (and download is off) or a present one is
    not the published file (MD5, remembered per file: see :func:`file_md5`).

    This is what ``bnexp train`` checks before it creates a run directory, so a
    truncated file, a file of another dataset or anything else under a right
    name is refused there, not in the middle of setting up a run.
    """
    files = required_files(name)
    folder = _abs(root)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not download:
        raise DataError(_missing_message(name, folder, missing))
    if missing:
        _check_folder(folder)
    for f in files:
        if f not in missing:
            _verify(name, folder / f)


def source_key(name: str, root: str, download: bool) -> dict | None:
    """What a dataset's arrays are made from, for bnexp.data_cache's key: the MD5s
    of its files, checked against the published ones (DataError if one is not;
    None while a file is still to be downloaded), or MNIST-1D's generator
    parameters. Cheap: a file's MD5 is remembered (:func:`file_md5`)."""
    _check_name(name)
    if name == "mnist1d":
        return {"dataset": name, "generator": _M1D}
    check_available(name, root, download)
    folder = _abs(root)
    if not all((folder / f).is_file() for f in required_files(name)):
        return None
    return {"dataset": name, "files": {f: file_md5(folder / f) for f in required_files(name)}}


def _check_folder(folder: Path) -> None:
    """A folder the download can write into: one that is a directory, or can be made."""
    nearest = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if nearest is None or not nearest.is_dir():
        raise DataError(f"cannot download into {folder}: {nearest} is not a directory; set data.root to a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise DataError(f"cannot download into {folder}: {nearest} is not writable by this user; set data.root to a folder you can write to")


def load_arrays(name: str, root: str, download: bool) -> dict:
    """Arrays of a real dataset in its raw dtype.

    Returns {"x_train", "y_train", "x_test", "y_test", "num_classes"}: images uint8
    [N, C, H, W] (MNIST and Fashion-MNIST [N, 1, 28, 28], CIFAR-10 [N, 3, 32, 32]),
    MNIST-1D float32 [N, 1, 40]; labels int64.
    """
    _check_name(name)
    if name == "mnist1d":
        return _mnist1d()
    check_available(name, root, download)  # names every missing file at once
    folder = _abs(root)
    paths = {f: _ensure_file(name, folder, f, download) for f in required_files(name)}
    if name == "cifar10":
        return _read_cifar10_tar(paths[_CIFAR_TARBALL])
    x_train = _read_idx(paths["train-images-idx3-ubyte.gz"], images=True)
    y_train = _read_idx(paths["train-labels-idx1-ubyte.gz"], images=False)
    x_test = _read_idx(paths["t10k-images-idx3-ubyte.gz"], images=True)
    y_test = _read_idx(paths["t10k-labels-idx1-ubyte.gz"], images=False)
    for split, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(
                f"{folder}: {split}-images has {len(x)} images but {split}-labels has {len(y)} labels; "
                f"the files do not belong together: delete them and re-download (data.download=true)"
            )
    return {
        "x_train": x_train[:, None],  # [N, 28, 28] -> [N, 1, 28, 28]
        "y_train": y_train.astype(np.int64),
        "x_test": x_test[:, None],
        "y_test": y_test.astype(np.int64),
        "num_classes": 10,
    }


# --------------------------------------------------------------------------- files


def _md5(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def md5_cache_path() -> Path:
    """Where MD5s of dataset files are remembered: ``$XDG_CACHE_HOME/bnexp/md5.json``
    (``~/.cache/bnexp/md5.json``). Per user, not in the data folder: data folders
    are often shared and read-only (this project's is), and a file there would
    be written by whoever ran first."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnexp" / "md5.json"


def file_md5(path: Path) -> str:
    """MD5 of ``path``, read from the cache while the file's size, mtime, ctime and
    inode are those it was hashed at (ctime too: copying with ``cp -p`` or
    ``touch -r`` keeps an mtime, but only a change of the clock sets a ctime;
    the inode, because a file moved over another within one tick of a coarse
    ctime clock keeps none of the first's), else computed and remembered.

    Hashing costs ~0.03 s for MNIST, ~0.06 s for Fashion-MNIST and ~0.2 s for
    CIFAR-10 on every run (and twice a run: before the run dir, then at load);
    the cache makes a repeated check a stat and a small JSON read. A cache that
    cannot be read or written is no error: the file is hashed, as without one.
    """
    from bnexp.io import atomic_write, read_json

    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    cache_file = md5_cache_path()
    cache = read_json(cache_file)
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(str(path))
    if isinstance(entry, list) and len(entry) == len(stamp) + 1 and entry[:-1] == stamp:
        return entry[-1]
    digest = _md5(path)
    # Forget files that are gone (temporary copies), so the cache does not grow without end.
    cache = {p: e for p, e in cache.items() if os.path.exists(p)}
    cache[str(path)] = [*stamp, digest]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, lambda f: json.dump(cache, f))
    except OSError:
        pass
    return digest


def _verify(name: str, path: Path) -> None:
    """Raise DataError unless ``path`` is the published file of ``name`` (by MD5)."""
    expected = CHECKSUMS[name][path.name]
    try:
        actual = file_md5(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if actual == expected:
        return
    for other, sums in CHECKSUMS.items():
        if other != name and sums.get(path.name) == actual:
            raise DataError(
                f"{path} is the {_DISPLAY[other]} file, not the {_DISPLAY[name]} one (same file name); "
                f"point data.root at a folder of {_DISPLAY[name]} files"
            )
    raise DataError(
        f"{path} has MD5 {actual}, expected {expected} for {_DISPLAY[name]}; "
        f"the file is damaged or not the published one: delete it and re-download (data.download=true)"
    )


def _ensure_file(name: str, folder: Path, fname: str, download: bool) -> Path:
    """Path of a verified file, downloading it first if allowed and missing.

    Files already on disk are MD5-checked on every load (through the cache of
    :func:`file_md5`): it catches truncated copies and the easy mix-up of MNIST
    and Fashion-MNIST, whose files have the same names.
    """
    path = folder / fname
    if not path.is_file():
        if not download:
            raise DataError(_missing_message(name, folder, [fname]))
        _download(name, folder, fname)
        return path  # verified while streaming
    _verify(name, path)
    return path


def _download(name: str, folder: Path, fname: str) -> None:
    """Fetch fname into folder from the first mirror that serves it with the right MD5.

    Streams through bnexp.io.atomic_write (a unique hidden temporary file in the same
    folder, renamed into place only if writing succeeds), and fails the write when the
    MD5 differs, so an interrupted or corrupt download never looks like a real file and
    parallel runs (Hydra multirun) downloading the same file do not clobber each other.
    """
    expected = CHECKSUMS[name][fname]
    mirrors = MIRRORS.get(name) or []
    if not mirrors:
        raise DataError(f"no download mirror configured for {_DISPLAY[name]}; put {fname} in {folder} yourself")
    made = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first: taken back if the download fails
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _fetch(name, folder, fname, expected, mirrors)
    except BaseException as e:
        for d in made:
            try:
                d.rmdir()  # only if empty: a parallel run's file stays
            except OSError:
                break
        if isinstance(e, OSError) and not isinstance(e, DataError):
            raise DataError(f"cannot create data folder {folder}: {e.strerror or e}") from None
        raise


def _fetch(name: str, folder: Path, fname: str, expected: str, mirrors: list[str]) -> None:
    import hashlib
    import urllib.request

    from bnexp.io import atomic_write

    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + fname

        def fetch(out) -> None:
            h = hashlib.md5()
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != expected:
                raise ValueError(f"gave MD5 {h.hexdigest()}, expected {expected}")

        try:
            atomic_write(folder / fname, fetch, mode="wb")
            return
        except Exception as e:  # network, HTTP, disk, checksum: try the next mirror, report them all
            failures.append(f"{url}: {e}")
    raise DataError(
        f"could not download {fname} for {_DISPLAY[name]} into {folder}: {'; '.join(failures)}; "
        f"check the network, or put the file there yourself"
    )


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def _read_idx(path: Path, images: bool) -> np.ndarray:
    """uint8 array from a gzipped IDX file: [N, rows, cols] images (magic 2051) or [N] labels (2049).

    IDX: 2 zero bytes, a type byte (0x08 = uint8), a dims byte, then each dim as a
    big-endian uint32, then the payload in C order.
    """
    import gzip
    import zlib

    fix = "delete it and re-download (data.download=true)"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise DataError(f"{path} is not a readable gzip file ({e or type(e).__name__}); {fix}") from None
    want_magic, want_ndim = (2051, 3) if images else (2049, 1)
    kind = "images" if images else "labels"
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an IDX file ({len(raw)} bytes); {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != want_magic:
        raise DataError(f"{path} has IDX magic number {magic}, expected {want_magic} ({kind}); {fix}")
    header = 4 + 4 * want_ndim
    if len(raw) < header:
        raise DataError(f"{path} ends inside its IDX header ({len(raw)} bytes); {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=want_ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of {kind} data, expected {expected} for dims {dims}; {fix}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if not images and arr.size and arr.max() > 9:
        raise DataError(f"{path} has label {int(arr.max())}, expected labels 0..9; {fix}")
    return arr


# --------------------------------------------------------------------------- CIFAR-10


_CIFAR_TRAIN = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "cifar-10-batches-py/test_batch"


def _restricted_unpickler():
    import pickle

    # The batches are pickled dicts holding one numpy array plus lists and bytes.
    # Allow exactly what rebuilding such an array needs, so a doctored tarball cannot
    # run code through pickle (the MD5 check already guards the genuine file).
    allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2; a pure codec call
    }

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
            return super().find_class(module, name)

    return Unpickler


def _read_cifar10_tar(path: Path) -> dict:
    """CIFAR-10 arrays read straight from the python-version tarball, without extracting it.

    Members are read in one sequential pass (random access into a .tar.gz would
    decompress it again from the start), and only the six batch members are unpickled.
    """
    import pickle
    import tarfile
    import zlib

    fix = "delete it and re-download (data.download=true)"
    wanted = set(_CIFAR_TRAIN) | {_CIFAR_TEST}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    Unpickler = _restricted_unpickler()
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted or not member.isfile():
                    continue
                with tar.extractfile(member) as f:
                    try:
                        d = Unpickler(f, encoding="bytes").load()
                    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError, ImportError) as e:
                        raise DataError(f"{path}: member {member.name} is not a CIFAR-10 batch ({e}); {fix}") from None
                batches[member.name] = _cifar_batch(path, member.name, d, fix)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .tar.gz file ({e or type(e).__name__}); {fix}") from None
    missing = sorted(wanted - batches.keys())
    if missing:
        raise DataError(f"{path} lacks the CIFAR-10 members {', '.join(missing)}; {fix}")
    x_train = np.concatenate([batches[m][0] for m in _CIFAR_TRAIN])
    y_train = np.concatenate([batches[m][1] for m in _CIFAR_TRAIN])
    x_test, y_test = batches[_CIFAR_TEST]
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "num_classes": 10}


def _cifar_batch(path: Path, member: str, d, fix: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{path}: member {member} lacks the keys b'data' and b'labels'; {fix}")
    data, labels = d[b"data"], np.asarray(d[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: member {member} has data of shape {shape}, expected uint8 [N, 3072]; {fix}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: member {member} has {labels.size} labels for {len(data)} images or labels outside 0..9; {fix}")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --------------------------------------------------------------------------- MNIST-1D

# MNIST-1D, Greydanus 2020, "Scaling down deep learning" (arXiv:2011.14439),
# https://github.com/greydanus/mnist1d: mnist1d/data.py (get_dataset_args, get_templates,
# make_dataset) and mnist1d/transform.py (transform and its helpers), re-done in numpy with
# the same arithmetic and the same calls, in the same order, on the legacy global-seed RNG
# (np.random.seed(42) there, RandomState(42) here). Checked against the reference package
# (mnist1d 0.0.2.post1 from PyPI with scipy 1.17): x, x_test, y, y_test are bit-identical.
_M1D = dict(
    num_samples=5000,
    train_split=0.8,
    template_len=12,
    padding=(36, 60),
    scale_coeff=0.4,
    max_translation=48,
    corr_noise_scale=0.25,
    iid_noise_scale=2e-2,
    shear_scale=0.75,
    final_seq_length=40,
    seed=42,
)


def _mnist1d_templates() -> np.ndarray:
    d = np.asarray(
        [
            [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
            [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
            [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
            [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
            [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
            [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
            [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
            [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
        ]
    )
    d -= d.mean(1, keepdims=True)
    d /= d.std(1, keepdims=True)
    d -= d[:, :1]  # each digit starts and ends at 0
    return d / 6.0


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    # As scipy.ndimage.gaussian_filter1d builds it (radius = int(truncate*sigma + 0.5)).
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def _gaussian_filter_reflect(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(x, sigma) for 1-D x, mode='reflect', bit for bit.

    scipy's 'reflect' repeats the edge sample (d c b a | a b c d), numpy's 'symmetric'.
    For a symmetric kernel scipy's C loop sums center*w[0] first, then the pairs
    (x[i-j] + x[i+j]) * w[j] from the outermost j inwards; float addition is not
    associative, so the same order is kept to get the same bits.
    """
    r = len(kernel) // 2
    xp = np.pad(x, r, mode="symmetric")
    n = len(x)
    out = xp[r : r + n] * kernel[r]
    for j in range(r, 0, -1):
        out += (xp[r - j : r - j + n] + xp[r + j : r + j + n]) * kernel[r - j]
    return out


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    # scipy's interp1d(kind='linear') on float64 1-D data delegates to np.interp.
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _mnist1d() -> dict:
    a = _M1D
    xs, ys = _make_mnist1d()
    split = int(len(ys) * a["train_split"])
    xs = xs.astype(np.float32)[:, None, :]  # [N, 1, 40]: one channel, like an image's C
    ys = ys.copy()
    return {"x_train": xs[:split], "y_train": ys[:split], "x_test": xs[split:], "y_test": ys[split:], "num_classes": 10}


@functools.lru_cache(maxsize=1)  # once a process (0.26-2.8 s on the 2-core box, by load); _mnist1d() copies
def _make_mnist1d() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 float64 signals [N, 40] and int64 labels, in the published (shuffled) order."""
    a = _M1D
    rng = np.random.RandomState(a["seed"])
    templates = _mnist1d_templates()
    kernel = _gaussian_kernel(2)
    low, high = a["padding"]
    dilated_len = a["template_len"] + high
    shear_ramp = np.linspace(-0.5, 0.5, dilated_len)
    eps = 1e-8
    per_class = a["num_samples"] // len(templates)
    xs, ys = [], []
    for label in range(len(templates)):
        for _ in range(per_class):
            # transform(): pad, dilate, scale, translate, noise, shear, subsample.
            p = low + int(rng.rand() * (high - low + 1))
            x = np.concatenate([templates[label] + eps, np.zeros(p)])
            x = _resample(x, dilated_len)
            x *= 1 + a["scale_coeff"] * (rng.rand() - 0.5)
            k = rng.choice(a["max_translation"])
            x = np.concatenate([x[-k:], x[:-k]])  # k == 0 keeps x as is, as in the original
            corr = _gaussian_filter_reflect(a["corr_noise_scale"] * rng.randn(dilated_len), kernel)
            # eps above keeps the digit itself nonzero, so only the padding gets the smooth noise.
            x = np.where(x != 0, x, corr)
            x = x + a["iid_noise_scale"] * rng.randn(dilated_len)
            x = x - a["shear_scale"] * (rng.rand() - 0.5) * shear_ramp
            xs.append(_resample(x, a["final_seq_length"]))
            ys.append(label)
    order = rng.permutation(len(ys))
    xs = np.stack(xs)[order]
    ys = np.asarray(ys, dtype=np.int64)[order]
    xs = (xs - xs.mean()) / xs.std()  # whole-dataset centering, as published
    return xs, ys
