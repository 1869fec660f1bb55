"""Whether a folder we are asked to write into is one, or can become one: checked before any work, leaving
nothing behind, so that a bad ``--out`` is one clear error instead of a traceback after minutes of work."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a `Path`; raises `ConfigError` naming ``what`` (e.g. "--out") when it is a file, a link to
    nothing, or a path through a file, or when it cannot be created (tried, and undone: nothing is left)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a folder; give a folder (it is created if missing)")
        return path
    if path.is_symlink():
        raise ConfigError(f"{what} {path} is a link to nothing; give a folder")
    ancestor = next((p for p in path.parents if p.exists() or p.is_symlink()), Path("."))
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {ancestor} is not a folder")
    # A real creation, undone at once (os.access says yes to root on /proc or a read-only mount): only the folders
    # made here are removed, and rmdir removes nothing that is not empty.
    missing = [path, *(p for p in path.parents if not (p.exists() or p.is_symlink()))]
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be created: {exc.strerror or exc}") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
    return path


def make_output_folder(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` (and its parents) after `check_output_folder`; what the system refuses (``/proc/x``, a
    read-only mount) is a `ConfigError` naming ``what`` and the system's reason."""
    path = check_output_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be created: {exc.strerror or exc}") from None
    return path
