"""A disk cache of prepared datasets: the tensors :func:`bnexp.data.load` makes
(read, split, preprocessed with the training split's statistics), so that the
next process loads them in a fraction of the time.

MNIST costs 1.8-2.8 s a process on the 2-core dev box to decompress, split and
standardize (the float64 standard deviation over 43M pixels alone ~0.8 s, the
check for non-finite inputs ~0.5 s). From the cache it is a memory map of the
entry's float32 arrays plus one CRC-32 pass over them: ~0.1 s. Storing the raw
uint8 split (a quarter of the size) and standardizing on load measured
0.5-1.2 s instead on the same loaded box: the float32 result lands in fresh
anonymous memory, and its first-touch page faults alone cost more than
reading it, whereas a map of the file reuses the page cache (which the
processes of a parallel sweep also share).

- **Where**: ``$XDG_CACHE_HOME/bnexp/data/`` (``~/.cache/bnexp/data/``), per
  user, not in ``data.root``, which is often shared and read-only;
  ``BNEXP_DATA_CACHE=DIR`` puts it elsewhere, ``BNEXP_DATA_CACHE=off`` turns it off.
- **Key**: a format version, the dataset, its source files' MD5s (verified
  against the published checksums by :mod:`bnexp.datasets`, which remembers a
  file's MD5 by path, size, mtime, ctime and inode, so a repeated run reads no
  50 MB to hash them; MNIST-1D: its generator's parameters), the split and
  preprocessing config and numpy's version (the statistics are numpy's
  float64 sums). The entry's file name is a hash of the key; the file holds
  the key itself, compared in full on every read.
- **Never trusted blindly**: an entry is a sequence of ``.npy`` records
  (numpy's format: a header with the key and each array's CRC-32, then the
  arrays); a file of the wrong length, an unreadable header or an array whose
  CRC-32 differs is rebuilt (and replaced), never served.
- **Concurrent writers**: each writes its own temp file and renames it into
  place (:func:`bnexp.io.atomic_write`); readers see the old entry or the new
  one, never half of one, and the last rename wins with an equally valid entry.
  bnexp never changes an entry in place (it replaces or removes it), which is
  what makes mapping it safe: a run maps its entry copy-on-write, so nothing a
  run does reaches the file. (Truncating a mapped entry in place, by hand,
  would stop the runs using it with SIGBUS: remove the folder instead.)
- **Bounded**: after a write, the least recently used entries (a hit
  refreshes an entry's mtime) are removed until the cache holds at most
  ``BNEXP_DATA_CACHE_MB`` megabytes (default 2048: MNIST's entry is 220 MB),
  and so are the temp files of writers that died. Only files named
  ``bnexp-data-*`` are ever removed.
- A cache that cannot be read or written is no error: the data is prepared
  as without one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bnexp.io import TEMP_SUFFIX, atomic_write

log = logging.getLogger("bnexp")

FORMAT = 1  # bump when what an entry holds, or how bnexp.data or bnexp.datasets computes it, changes
PREFIX = "bnexp-data-"
_MAP_FROM = 1 << 20  # bytes: larger arrays are mapped, smaller ones read
_TEMP = re.compile(r"^\." + re.escape(PREFIX) + r"[0-9a-f]+\.arrays\.(\d+)\..*" + re.escape(TEMP_SUFFIX) + "$")


def cache_dir() -> Path | None:
    """Where entries live, or None when ``BNEXP_DATA_CACHE=off``."""
    where = os.environ.get("BNEXP_DATA_CACHE", "")
    if where.lower() in ("off", "0", "false", "no"):
        return None
    if where:
        return Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnexp" / "data"


def max_bytes() -> int:
    try:
        return int(float(os.environ.get("BNEXP_DATA_CACHE_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20


def entry_path(key: dict[str, Any]) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]
    return folder / f"{PREFIX}{digest}.arrays"


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps({"format": FORMAT, **key}, sort_keys=True)


def read(key: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key`` (mapped copy-on-write), or None (no entry, another key, a damaged file)."""
    path = entry_path(key)
    if path is None or not path.is_file():
        return None
    try:
        arrays = _read_entry(path, _canonical(key))
    except Exception as e:  # noqa: BLE001  truncated, damaged, unreadable: rebuilt, never trusted
        log.warning("data cache: %s is unreadable (%s: %s); preparing the data again", path, type(e).__name__, e)
        return None
    if arrays is not None:
        try:
            os.utime(path)  # recently used: eviction takes the oldest first
        except OSError:
            pass
    return arrays


def _read_entry(path: Path, key: str) -> dict[str, np.ndarray] | None:
    arrays, mapped = {}, []
    with open(path, "rb") as f:
        meta = json.loads(str(np.load(f, allow_pickle=False)))
        if meta["key"] != key:
            return None  # another key under this name: a hash collision, or renamed by hand
        for name, crc in meta["arrays"]:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{name}: not a C-ordered array of numbers")
            count = math.prod(shape)
            if count * dtype.itemsize < _MAP_FROM:  # labels, statistics: read
                arrays[name] = np.fromfile(f, dtype=dtype, count=count).reshape(shape)
                if arrays[name].size != count:
                    raise ValueError(f"{name}: the file ends inside it")
            else:  # inputs: mapped below, once the whole file is known to be there
                mapped.append((name, shape, dtype, f.tell()))
                f.seek(f.tell() + count * dtype.itemsize)
        if f.tell() != os.fstat(f.fileno()).st_size:
            raise ValueError(f"{os.fstat(f.fileno()).st_size} bytes where the header says {f.tell()}")
    for name, shape, dtype, offset in mapped:
        arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
    for name, crc in meta["arrays"]:
        if zlib.crc32(arrays[name]) != crc:
            raise ValueError(f"{name}: CRC-32 mismatch")
    return {name: arrays[name] for name, _ in meta["arrays"]}


def write(key: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Store ``arrays`` under ``key`` (atomically), then keep the cache within its bound."""
    path = entry_path(key)
    if path is None:
        return
    arrays = {name: np.require(a, requirements="C") for name, a in arrays.items()}
    meta = {"key": _canonical(key), "arrays": [[name, zlib.crc32(a)] for name, a in arrays.items()]}

    def records(f: Any) -> None:
        np.save(f, np.array(json.dumps(meta)), allow_pickle=False)
        for a in arrays.values():
            np.save(f, a, allow_pickle=False)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, records, mode="wb")
    except OSError as e:  # a full disk or a read-only cache dir: the run goes on without it
        log.warning("data cache: could not write %s (%s)", path, e)
        return
    evict(path.parent, keep=path)


def evict(folder: Path, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove the least recently used entries beyond ``limit`` bytes (default :func:`max_bytes`),
    never ``keep``, and the temp files of writers that are gone. Returns what was removed."""
    limit = max_bytes() if limit is None else limit
    removed, entries = [], []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = folder / name
        orphan = _TEMP.match(name)
        try:
            if orphan and not _pid_alive(int(orphan.group(1))):
                path.unlink()
                removed.append(path)
            elif name.startswith(PREFIX) and name.endswith(".arrays"):
                st = path.stat()
                entries.append((st.st_mtime_ns, st.st_size, path))
        except OSError:  # removed by another process meanwhile
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
        total -= size
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, someone else's
        return True
    return True
