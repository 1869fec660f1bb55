"""`deleaker.runtime.onnx_cache`: entries made once across threads and processes, checked on reuse, remade when
tampered with, and no partial entry left by a failure, an interrupt or SIGKILL."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deleaker.config import DeLeakerConfig
from deleaker.engines.manifest import sha256_file
from deleaker.errors import DeLeakerError
from deleaker.runtime import onnx_cache
from deleaker.staging import staged_name, staging_name
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest

from hostile_use import ENTITIES, KNOBS, PROMPT, TEXT_LEN, assert_no_abort, entries


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One ONNX cache for the tests that only read exports (each export takes ~8 s on 2 cores)."""
    return tmp_path_factory.mktemp("onnx-cache")


def test_threads_with_a_cold_cache_all_succeed_and_export_once(tmp_path):
    cache = tmp_path / "cache"
    threads, barrier = 3, threading.Barrier(3)
    images: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            rt = DeLeakerRuntime.from_model("tiny", text_len=TEXT_LEN, cache_dir=cache, deleaker_config=KNOBS)
            images[i] = np.asarray(rt(PROMPT, list(ENTITIES), seed=2, steps=2).image)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=600)
    assert not errors, errors
    assert len(images) == threads and all(np.array_equal(images[0], img) for img in images.values())
    (entry,) = entries(cache)  # exported once
    assert onnx_cache.is_valid_entry(entry, json.loads((entry / onnx_cache.MANIFEST_NAME).read_text())["key"])


_COLD_START = r"""
import logging, sys
logging.getLogger("deleaker").addHandler(logging.StreamHandler())
logging.getLogger("deleaker").setLevel(logging.INFO)
from deleaker.runtime.runtime import DeLeakerRuntime
rt = DeLeakerRuntime.from_model("tiny", text_len=16, cache_dir=sys.argv[1])
rt("A cat and a cheetah", ["cat", "cheetah"], seed=2, steps=2).image.save(sys.argv[2])
"""


def test_processes_with_a_cold_cache_all_succeed_and_export_once(tmp_path):
    cache = tmp_path / "cache"
    outs = [tmp_path / f"{i}.png" for i in range(3)]
    log_paths = [tmp_path / f"{i}.log" for i in range(3)]
    procs = []
    for out, log_path in zip(outs, log_paths):
        with open(log_path, "w") as log_file:  # files, not pipes: a full pipe would stall a child holding the lock
            procs.append(subprocess.Popen([sys.executable, "-c", _COLD_START, str(cache), str(out)], stderr=log_file))
    for proc in procs:
        proc.wait(timeout=600)
    logs = [p.read_text() for p in log_paths]
    for proc, log in zip(procs, logs):
        assert_no_abort(proc, log)
        assert proc.returncode == 0, log[-3000:]
    assert sum(log.count("exporting the ONNX for") for log in logs) == 1
    assert len({hashlib.sha256(out.read_bytes()).hexdigest() for out in outs}) == 1
    assert len(entries(cache)) == 1
    assert not [p for p in (cache / "onnx").iterdir() if p.is_dir() and p.name.startswith(".")]


def _model_runtime(cache: Path, knobs: dict = KNOBS) -> DeLeakerRuntime:
    return DeLeakerRuntime.from_model("tiny", text_len=TEXT_LEN, cache_dir=cache, deleaker_config=knobs)


def _entry_for(cache: Path, knobs: dict) -> Path:
    """The cache entry of the tiny model at 64x64 with ``knobs``."""
    config = dataclasses.asdict(DeLeakerConfig.for_model(4, **knobs))
    (entry,) = [
        e
        for e in entries(cache)
        if (m := json.loads((e / onnx_cache.MANIFEST_NAME).read_text()))["io"]["height"] == 64
        and m["io"]["text_len"] == TEXT_LEN
        and m["deleaker_config"] == config
    ]
    return entry


def _replace_and_rehash(entry: Path, data: bytes) -> None:
    """Replace the entry's graph and update its manifest's hash, as a tool (or a person) fixing it up would."""
    (entry / onnx_cache.ARTIFACT_NAME).write_bytes(data)
    manifest = json.loads((entry / onnx_cache.MANIFEST_NAME).read_text())
    manifest["files"][onnx_cache.ARTIFACT_NAME] = sha256_file(entry / onnx_cache.ARTIFACT_NAME)
    (entry / onnx_cache.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert onnx_cache.is_valid_entry(entry, manifest["key"])  # the hashes alone cannot tell


def test_a_tampered_and_rehashed_cache_entry_is_made_again(cache_dir, tmp_path):
    request = GenerationRequest(PROMPT, ENTITIES, seed=4, steps=3)
    first = _model_runtime(cache_dir).generate(request)
    entry = _entry_for(cache_dir, KNOBS)
    # A graph of the same model and contract, exported with other knobs, swapped in.
    other = tmp_path / "other"
    _model_runtime(other, {**KNOBS, "k_strength": 2.0}).prepare(request)
    swapped = (_entry_for(other, {**KNOBS, "k_strength": 2.0}) / onnx_cache.ARTIFACT_NAME).read_bytes()
    _replace_and_rehash(entry, swapped)

    again = _model_runtime(cache_dir).generate(request)
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    assert (entry / onnx_cache.ARTIFACT_NAME).read_bytes() != swapped


def test_a_cache_entry_that_does_not_load_is_made_again(cache_dir):
    request = GenerationRequest(PROMPT, ENTITIES, seed=4, steps=2)
    first = _model_runtime(cache_dir).generate(request)
    _replace_and_rehash(_entry_for(cache_dir, KNOBS), b"not an onnx file")
    again = _model_runtime(cache_dir).generate(request)
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))


KEY = "c" * 64


def _counting_make(calls: list, *, fail: BaseException | None = None, delay: float = 0.0):
    """A stand-in for an export (the cache's contract: write the artifact at the given path), counting calls."""

    def make(path: Path) -> None:
        calls.append(path)
        time.sleep(delay)
        path.write_bytes(b"graph %d" % len(calls))
        if fail is not None:
            raise fail

    return make


def test_cache_entries_are_made_once_and_checked_on_reuse(tmp_path):
    calls: list = []
    make = _counting_make(calls)
    artifact = onnx_cache.cached_artifact(tmp_path, KEY, make, {})
    assert onnx_cache.cached_artifact(tmp_path, KEY, make, {}) == artifact and len(calls) == 1
    (artifact.parent / "planted.py").write_text("not listed in the manifest")  # an entry holds what it lists only
    assert onnx_cache.cached_artifact(tmp_path, KEY, make, {}) == artifact and len(calls) == 2
    assert not (artifact.parent / "planted.py").exists()
    # An entry that is a symlink to another folder is replaced by a real one.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(artifact.parent, elsewhere)
    artifact.parent.symlink_to(elsewhere, target_is_directory=True)
    assert onnx_cache.cached_artifact(tmp_path, KEY, make, {}) == artifact and len(calls) == 3
    assert not artifact.parent.is_symlink() and (elsewhere / onnx_cache.ARTIFACT_NAME).is_file()


@pytest.mark.parametrize(
    "failure,error",
    [(KeyboardInterrupt(), KeyboardInterrupt), (OSError(28, "No space left on device"), DeLeakerError)],
)
def test_an_interrupted_or_failed_make_leaves_nothing(tmp_path, failure, error):
    with pytest.raises(error):
        onnx_cache.cached_artifact(tmp_path, KEY, _counting_make([], fail=failure), {})
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [f".{KEY[:32]}.lock"]


def test_threads_asking_for_one_entry_make_it_once(tmp_path):
    calls: list = []
    make = _counting_make(calls, delay=0.3)
    results: list = []
    pool = [
        threading.Thread(target=lambda: results.append(onnx_cache.cached_artifact(tmp_path, KEY, make, {})))
        for _ in range(4)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1


def test_cache_dir_that_is_a_file_is_a_clean_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    rt = _model_runtime(blocker)
    with pytest.raises(DeLeakerError, match="cannot write the ONNX cache"):
        rt.generate(GenerationRequest(PROMPT, ENTITIES, steps=1))


_EXPORT_FOREVER = r"""
import sys
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest
rt = DeLeakerRuntime.from_model("tiny", text_len=16, cache_dir=sys.argv[1])
rt.prepare(GenerationRequest("A cat and a cheetah", ("cat", "cheetah"), height=64, width=64))
"""


def _staging(cache: Path) -> list[Path]:
    root = cache / "onnx"
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")] if root.is_dir() else []


def test_sigkill_during_export_leaves_staging_that_the_next_run_removes(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_FOREVER, str(cache)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _staging(cache) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and _staging(cache), "the child must die in the middle of the export"

    rt = DeLeakerRuntime.from_model("tiny", text_len=TEXT_LEN, cache_dir=cache)
    rt.prepare(GenerationRequest(PROMPT, ENTITIES))
    assert _staging(cache) == [] and len(entries(cache)) == 1


def test_staging_of_a_live_writer_stays(tmp_path):
    root = tmp_path / "onnx"
    root.mkdir()
    live, dead = "a" * 32, "b" * 32
    live_staging = root / staging_name(live)
    live_staging.mkdir()
    (root / staging_name(dead)).mkdir()
    # Hidden folders that are not staging names of ours stay, whatever they start with (they were removed too).
    (root / f".{'c' * 32}.x2").mkdir()
    (root / f".{'d' * 32}").mkdir()
    with onnx_cache._lock(root, live):  # another writer is still exporting entry `live`
        removed = onnx_cache.remove_stale_staging(root)
    assert [staged_name(p.name) for p in removed] == [dead]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        [f".{'c' * 32}.x2", f".{'d' * 32}", live_staging.name])
