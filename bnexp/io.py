"""Atomic file writes: a reader (a report, a resumed sweep) never sees half a file."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

# A temp file is named .<target>.<pid>.<random>.tmp beside its target, so that
# an orphan (its writer was SIGKILLed mid-write) can be told and removed.
TEMP_SUFFIX = ".tmp"


class NoSpace(OSError):
    """The disk (or quota) is full; ``str()`` says where, in one line."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on {path.parent} (writing {path.name}); the last complete {path.name} is kept")

    def __str__(self) -> str:
        return self.strerror


def _umask() -> int:
    # Linux shows the umask in /proc without changing it; elsewhere os.umask must
    # set it to read it (a moment in which another thread's new file gets 0o000).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    The file gets the permissions any new file gets (0o666 minus the umask):
    mkstemp's 0o600 would make runs on a shared file system unreadable to
    colleagues. A full disk is raised as :class:`NoSpace` and leaves ``path`` as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, NoSpace):
            raise NoSpace(path) from None
        # torch.save's zip writer reports a short write, which for a local file
        # means a full disk or quota, as "unexpected pos N vs M".
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            raise NoSpace(path) from None
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str))


# The most bytes a reader of a run dir takes from one record (metrics.json, a
# .hydra/*.yaml): far above what bnexp writes (a ResNet's metrics.json is ~100 KB),
# far below what would stall a listing of many runs.
READ_LIMIT = 4 << 20


class Unreadable(OSError):
    """A file that a reader of run dirs does not read: not a regular file, or too large."""


def read_bounded(path: str | os.PathLike, limit: int = READ_LIMIT) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes.

    Opened non-blocking: a FIFO, socket or device where a record should be (in a
    runs tree anyone can write into) is refused at once, where ``open()`` on a
    FIFO would wait forever for a writer. Raises :class:`Unreadable` (or the
    OSError of the open) saying why."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise Unreadable(errno.EFBIG, f"{st.st_size} bytes, more than the {limit} a record may have", str(path))
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # grew while read
            raise Unreadable(errno.EFBIG, f"more than the {limit} bytes a record may have", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None if it is missing or unreadable (see :func:`read_bounded`)."""
    try:
        return json.loads(read_bounded(path))
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        return None
