"""The names we write through before a rename, recognisably ours, so that cleanup removes only what we made.

Every file or folder deleaker-trt stages in a user's folder (an image of a batch, an engine folder's ONNX, plan,
manifest, timing cache and plugin library, the runtime's and the kernels' caches) is named
``.<final name>.deleaker-tmp-<pid>-<12 hex digits>``: hidden, beside the file it becomes, with a marker and a
random token no one would type. Stale-staging cleanup removes only names of this form (`staged_name`), never a
file that merely starts like one of our artifacts.

Every file we write goes through one of two functions here: `write_atomically` (one file or a group, from bytes or
a writer of a file object) and `publish_staged` (a staging folder's files, e.g. an ONNX model and its external
data, or the folder itself). Both fsync what they write, rename it into place with ``os.replace``, and leave
nothing half-written: on any failure or interruption the staging files are removed.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional, Union

#: What `write_atomically` writes: the bytes, or a function writing them to a binary file object.
Content = Union[bytes, Callable[[BinaryIO], object]]

#: The marker in every staging name.
MARKER = "deleaker-tmp"
_TOKEN_DIGITS = 12
_STAGING = re.compile(rf"\.(?P<final>.+)\.{MARKER}-(?P<pid>[0-9]{{1,10}})-[0-9a-f]{{{_TOKEN_DIGITS}}}")
#: Most bytes a staging name adds to its final name (Linux pids have at most 7 digits; we allow 10).
STAGING_EXTRA = len(".") + len(f".{MARKER}--") + 10 + _TOKEN_DIGITS


def staging_name(final_name: str) -> str:
    """A new staging name for ``final_name`` (unique: the process id and a random token)."""
    return f".{final_name}.{MARKER}-{os.getpid()}-{uuid.uuid4().hex[:_TOKEN_DIGITS]}"


def staging_path(final: Path) -> Path:
    """A new staging path beside ``final`` (nothing is created)."""
    return final.with_name(staging_name(final.name))


def staged_name(name: str) -> Optional[str]:
    """The final name a staging name of ours stands for, or None when ``name`` is not one of ours."""
    match = _STAGING.fullmatch(name)
    return match.group("final") if match else None


def writer_is_gone(name: str) -> bool:
    """True when ``name`` is a staging name of ours whose writing process no longer exists (killed before it could
    remove it). False for a live writer, for a process id now used by another process, and for other names."""
    match = _STAGING.fullmatch(name)
    if match is None:
        return False
    try:
        os.kill(int(match.group("pid")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):  # alive under another user, or no valid process id
        return False
    return False


def make_staging_dir(final: Path) -> Path:
    """Create (exclusively) and return a new staging folder beside ``final``; its parent must exist."""
    path = staging_path(final)
    path.mkdir(mode=0o755)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(files: Mapping[str | os.PathLike, Content]) -> None:
    """Write each ``{path: content}`` through a staging file beside it (fsynced), then rename all into
    place: all or none. ``content`` is bytes or ``write(handle)`` writing to a binary file object.

    On any error or interruption (a full disk, Ctrl-C, ``content`` raising) the staging files and the files this
    call renamed already are removed and the error is re-raised; paths not reached are untouched. An ``OSError``
    without a file name (a write to a full disk) gets the path being written as ``filename``, so callers can name
    it. The folders must exist.
    """
    staged: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    target = None
    try:
        for target, content in files.items():
            target = Path(target)
            tmp = staging_path(target)  # a name of ours: stale-staging cleanup may remove it
            # Created exclusively, with the umask's mode (as open() would), unlike mkstemp's 0o600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                if isinstance(content, (bytes, bytearray, memoryview)):
                    handle.write(content)
                elif callable(content):
                    content(handle)
                else:
                    raise TypeError(f"content for {target} must be bytes or a writer, got {type(content).__name__}")
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, target in staged:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.filename is None and target is not None:
            exc.filename = str(target)
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for target in placed:
            target.unlink(missing_ok=True)
        raise


def publish_staged(folder: Path, final: Path, *, whole: bool = False) -> None:
    """Move what was written into the staging ``folder`` (`make_staging_dir`) into place, each file fsynced first.

    ``whole=False``: ``folder`` holds ``final.name`` and files that go beside it (an ONNX model's external data);
    those move into ``final``'s folder first and ``final`` last, after an older ``final`` is removed, so ``final``
    never stands beside files of another write. If a rename fails, the files this call moved are removed and the
    error re-raised. ``whole=True``: ``folder`` itself becomes ``final`` (which must not exist, or be an empty
    folder). Callers remove ``folder`` afterwards whatever happens (it is empty after success).
    """
    folder, final = Path(folder), Path(final)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    if whole:
        os.rename(folder, final)
        return
    others = [p for p in sorted(folder.iterdir()) if p.name != final.name]
    placed: list[Path] = []
    try:
        if others and final.is_file() and not final.is_symlink():
            final.unlink()
        for path in others:
            os.replace(path, final.parent / path.name)
            placed.append(final.parent / path.name)
        os.replace(folder / final.name, final)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
