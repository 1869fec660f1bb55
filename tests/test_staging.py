"""deleaker.staging: our staging names, and the two ways every file we write gets into place (`write_atomically`,
`publish_staged`), on real files in a temporary folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from deleaker.staging import make_staging_dir, publish_staged, staged_name, write_atomically


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomically_writes_bytes_and_writers_and_leaves_no_staging_file(tmp_path: Path) -> None:
    write_atomically({tmp_path / "a.bin": b"one", tmp_path / "b.txt": lambda handle: handle.write(b"two")})
    assert (tmp_path / "a.bin").read_bytes() == b"one" and (tmp_path / "b.txt").read_bytes() == b"two"
    assert _names(tmp_path) == ["a.bin", "b.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file, as open() makes it


def test_a_failing_group_writes_none_and_keeps_what_was_there(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"old")

    def fail(handle) -> None:
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        write_atomically({tmp_path / "a.png": b"first", tmp_path / "b.png": fail})
    assert caught.value.filename == str(tmp_path / "b.png")  # the path being written, for the caller's message
    assert _names(tmp_path) == ["b.png"] and (tmp_path / "b.png").read_bytes() == b"old"


def test_a_failing_rename_removes_the_files_already_placed(tmp_path: Path) -> None:
    (tmp_path / "b.png").mkdir()  # the second rename fails: a folder is in the way
    with pytest.raises(OSError):
        write_atomically({tmp_path / "a.png": b"first", tmp_path / "b.png": b"second"})
    assert _names(tmp_path) == ["b.png"] and not any((tmp_path / "b.png").iterdir())


def test_publish_staged_moves_data_first_and_the_model_last(tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    final.write_bytes(b"old model")
    (tmp_path / "model.onnx.data").write_bytes(b"old data")
    staging = make_staging_dir(final)
    assert staged_name(staging.name) == "model.onnx"
    (staging / "model.onnx").write_bytes(b"new model")
    (staging / "model.onnx.data").write_bytes(b"new data")
    publish_staged(staging, final)
    assert final.read_bytes() == b"new model" and (tmp_path / "model.onnx.data").read_bytes() == b"new data"
    assert not any(staging.iterdir())


def test_publish_staged_failing_last_rename_leaves_no_data_and_no_old_model(tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    final.mkdir()  # not ours to replace: the last rename fails
    (final / "keep").write_text("theirs")
    staging = make_staging_dir(tmp_path / "other")
    (staging / "model.onnx").write_bytes(b"new model")
    (staging / "model.onnx.data").write_bytes(b"new data")
    with pytest.raises(OSError):
        publish_staged(staging, final)
    assert not (tmp_path / "model.onnx.data").exists() and _names(final) == ["keep"]


def test_publish_staged_whole_folder_becomes_the_final_folder(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    staging = make_staging_dir(entry)
    (staging / "transformer.onnx").write_bytes(b"graph")
    publish_staged(staging, entry, whole=True)
    assert _names(tmp_path) == ["entry"] and (entry / "transformer.onnx").read_bytes() == b"graph"
