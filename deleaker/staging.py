"""The names we write through before a rename, recognisably ours, so that cleanup removes only what we made.

Every file or folder deleaker-trt stages in a user's folder (an image of a batch, an engine folder's ONNX, plan,
manifest, timing cache and plugin library, the runtime's and the kernels' caches) is named
``.<final name>.deleaker-tmp-<pid>-<12 hex digits>``: hidden, beside the file it becomes, with a marker and a
random token no one would type. Stale-staging cleanup removes only names of this form (`staged_name`), never a
file that merely starts like one of our artifacts.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Optional

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
