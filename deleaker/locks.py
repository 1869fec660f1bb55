"""An exclusive lock on a file, shared by threads and processes, released when its holder dies: the ``filelock``
package's `filelock.FileLock` (``flock`` on POSIX) behind our refusals.

Used where several runtimes or builds may write the same folder at once (the ONNX cache, an engine directory, the
kernel caches). What we add to ``filelock`` (4.3, read from its source):
- something that is not a regular file at the lock's name (a FIFO, socket, device or symlink) is refused before it
  is opened, and checked again once held: ``filelock`` opens a FIFO, a socket's name or a device and locks it;
- a missing folder is an error: ``filelock`` would create the lock's parent folders, and we create nothing a user
  did not ask for;
- the lock file stays after release (``preserve_lock_file``, as before; the README lists it among the names we
  write), which also turns off ``filelock``'s soft-lock fallback on filesystems without ``flock``: a marker file
  that a killed holder leaves behind would block every later run, so such a filesystem gets a clear error instead;
- errors are a typed `LockError`, and a lock held elsewhere yields False with ``blocking=False``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import filelock

from .errors import DeLeakerError


class LockError(DeLeakerError, OSError):
    """A lock file cannot be created or opened (a read-only folder, a missing folder, a FIFO or link in its place)."""


def _refuse_unless_regular_or_missing(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise LockError(f"cannot open the lock file {path}: its folder {path.parent} does not exist") from None
        return
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc}") from exc
    if not stat.S_ISREG(mode):
        raise LockError(f"the lock file {path} is not a regular file; remove it or choose another folder")


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """Hold ``path`` (created if missing, mode 0o644) exclusively while in the block.

    Yields True once held; with ``blocking=False`` yields False at once when someone else holds it. Each call
    opens the file anew, so two threads of one process exclude each other too. Raises `LockError` when the file
    cannot be opened or is not a regular file.
    """
    path = Path(path)
    _refuse_unless_regular_or_missing(path)
    lock = filelock.FileLock(path, mode=0o644, preserve_lock_file=True)
    try:
        lock.acquire(blocking=blocking)
    except filelock.Timeout:
        yield False
        return
    except OSError as exc:  # a link or FIFO put there since the check (O_NOFOLLOW), a read-only folder
        raise LockError(f"cannot open the lock file {path}: {exc}") from exc
    try:
        # What we locked is what is at the name now and a regular file (not a FIFO swapped in since the check).
        _refuse_unless_regular_or_missing(path)
        yield True
    finally:
        lock.release()
