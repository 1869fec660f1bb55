"""An exclusive lock on a file, shared by threads and processes (``flock``), released when its holder dies.

Used where several runtimes or builds may write the same folder at once (the ONNX cache, an engine directory).
On systems without ``fcntl`` the lock is a no-op (writes stay atomic; concurrent writers may duplicate work).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

from .errors import DeLeakerError

try:
    import fcntl
except ImportError:  # pragma: no cover  (not POSIX)
    fcntl = None  # type: ignore[assignment]


class LockError(DeLeakerError, OSError):
    """A lock file cannot be created or opened (a read-only folder, a folder in its place)."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """Hold ``path`` (created if missing) exclusively while in the block.

    Yields True once held; with ``blocking=False`` yields False at once when someone else holds it. Each call
    opens the file anew, so two threads of one process exclude each other too. Raises `LockError` when the file
    cannot be opened.
    """
    try:
        # Not through a link, never blocking: a FIFO or a link put at a lock's name is refused, not opened.
        fd = os.open(Path(path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                     0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockError(f"the lock file {path} is not a regular file; remove it or choose another folder")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        os.close(fd)  # releases the lock
