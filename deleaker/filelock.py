"""An exclusive lock on a file, shared by threads and processes (``flock``), released when its holder dies.

Used where several runtimes or builds may write the same folder at once (the ONNX cache, an engine directory).
On systems without ``fcntl`` the lock is a no-op (writes stay atomic; concurrent writers may duplicate work).
"""

from __future__ import annotations

import contextlib
import os
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
        fd = os.open(Path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc}") from exc
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
