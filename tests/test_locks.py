"""deleaker.locks: the ``filelock`` package's lock behind our refusals (nothing but a regular file at the lock's
name, no folder created), with real processes and threads holding real ``flock`` locks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deleaker.locks import LockError, exclusive_lock


def test_lock_is_created_kept_after_release_and_excludes_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / ".x.lock"
    with exclusive_lock(path) as held:
        assert held and path.is_file()
        with exclusive_lock(path, blocking=False) as second:  # a second open of the same file, same thread
            assert second is False
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o644 & ~_umask()
    with exclusive_lock(path, blocking=False) as again:
        assert again is True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_threads_exclude_each_other(tmp_path: Path) -> None:
    path, inside, overlaps = tmp_path / ".x.lock", [0], []

    def work() -> None:
        with exclusive_lock(path):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.05)
            inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert overlaps == [1, 1, 1, 1]


def test_another_process_holds_it_until_it_dies(tmp_path: Path) -> None:
    path = tmp_path / ".x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deleaker.locks import exclusive_lock\n"
         f"with exclusive_lock({str(path)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive_lock(path, blocking=False) as held:
            assert held is False
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(path, blocking=False) as held:  # the kernel released a killed holder's lock
        assert held is True


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "socket", "folder"])
def test_anything_but_a_regular_file_at_the_name_is_refused_unopened(tmp_path: Path, kind: str,
                                                                    make_special_file) -> None:
    path, target = tmp_path / ".x.lock", tmp_path / "target"
    make_special_file(path, kind, target)
    with pytest.raises(LockError, match="is not a regular file"):
        with exclusive_lock(path):
            pass
    assert not target.exists() or target.read_text() == "theirs"  # nothing created or written through a link
    assert os.path.lexists(path)


def test_a_missing_folder_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="does not exist"):
        with exclusive_lock(tmp_path / "missing" / ".x.lock"):
            pass
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_lock_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(LockError, match="cannot open the lock file"):
        with exclusive_lock(folder / ".x.lock"):
            pass
