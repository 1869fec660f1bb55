"""The runtime's ONNX cache: graphs made on first use for ONNX Runtime, under ``<cache_dir>/onnx/<key[:32]>/``.

Two kinds of entries, each a ``transformer.onnx`` (and its ``.data`` when large) with ``cache_manifest.json``:

- the export of a model at one resolution (`model_backend`, behind ``DeLeakerRuntime.from_model(...,
  backend="onnxruntime")``), in float32 with DeLeaker as standard ONNX operators (``decompose=True``). The key
  hashes everything the graph depends on: the transformer's config and weights, the I/O contract (resolution, T,
  E_max, dtype), the DeLeaker knobs and the versions of torch, diffusers, onnx and this package;
- the portable form of an engine directory's ONNX (`portable_backend`, behind ``from_engines`` with ONNX
  Runtime): float32, the custom nodes replaced by their decomposition (`deleaker.export.portable`), keyed by the
  hashes of the artifact and its data files.

Either way nothing runs in Python inside ONNX Runtime.

Writers: an entry is made in a staging folder ``.<key>.deleaker-tmp-<pid>-<token>`` beside it and renamed into place, so readers never
see half an entry. Whoever makes or repairs an entry holds an exclusive lock on ``.<key>.lock`` (``flock``: threads
and processes alike), so N runtimes starting together with a cold cache export once and the others wait and reuse
it; exports in one process are also serialised by the exporter (``torch.export`` is not thread-safe). A staging
folder whose key lock is free belongs to a writer that died (SIGKILL, power loss): the next writer removes it.

Readers check the entry's files against its manifest's hashes and the loaded graph against the contract; an
entry that fails either (truncated, edited, edited and re-hashed into a graph that does not load or does not fit
the contract) is removed and made again, once. What still fails after that names the folder to delete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import DeLeakerError
from deleaker.jsonio import loads_strict
from deleaker.staging import make_staging_dir, publish_staged, staged_name
from deleaker.locks import exclusive_lock
from deleaker.hashing import sha256_file
from deleaker.models import transformer_sha256

from .backends import BackendError, OnnxRuntimeBackend

ARTIFACT_NAME = "transformer.onnx"
#: The cache entry's manifest: key, file hashes, and what the entry was made from.
MANIFEST_NAME = "cache_manifest.json"
#: Bumped when what an entry holds changes for the same inputs (e.g. the export's graph form).
CACHE_FORMAT = 2
_CACHE_HINT = "choose another folder with --cache-dir or DELEAKER_CACHE"
#: Characters of the key that name an entry's folder.
_NAME_LEN = 32
_ENTRY_NAME = re.compile(f"[0-9a-f]{{{_NAME_LEN}}}")

#: Says when an export starts and why (the CLI shows ``deleaker.*`` INFO records on stderr).
logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$DELEAKER_CACHE`` or ``$XDG_CACHE_HOME/deleaker-trt`` (``~/.cache/deleaker-trt``)."""
    import os

    if os.environ.get("DELEAKER_CACHE"):
        return Path(os.environ["DELEAKER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deleaker-trt"


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "diffusers", "onnx", "onnxscript", "deleaker-trt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "none"
    return versions


def _key(payload: Mapping[str, Any]) -> str:
    full = {**payload, "cache_format": CACHE_FORMAT, "versions": _versions()}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()


# --- the two kinds of entries ---------------------------------------------------------------------------------


def model_backend(
    transformer: torch.nn.Module,
    *,
    model_key: Optional[str] = None,
    model_id: str,
    height: int,
    width: int,
    text_len: int,
    max_entities: int,
    vae_scale_factor: int,
    config: DeLeakerConfig,
    cache_dir: Path,
    providers: Optional[list[str]] = None,
) -> OnnxRuntimeBackend:
    """An ONNX Runtime backend for ``transformer`` at ``height x width``, exported into ``cache_dir`` unless a
    valid entry is there (float32, DeLeaker decomposed into standard ONNX operators). ``model_key`` identifies the
    weights (a runtime computes it once); None hashes them here (`deleaker.models.transformer_sha256`)."""
    from deleaker.export.contract import FluxTransformerIO

    io = FluxTransformerIO.from_transformer(
        transformer,
        height=height,
        width=width,
        text_len=text_len,
        max_entities=max_entities,
        vae_scale_factor=vae_scale_factor,
        batch=(1, 1, 4),
    )
    # The key of one export: weights, contract, knobs, graph form (and, in `_key`, tool versions).
    payload = {
        "kind": "export",
        # Recorded under its first name (the cache's format): the weights' key, a hash of them or of their files.
        "model_sha256": model_key if model_key is not None else transformer_sha256(transformer),
        "io": io.to_dict(),
        "deleaker_config": dataclasses.asdict(config),
        "decomposed": True,
    }
    key = _key(payload)

    def export(path: Path) -> None:
        from deleaker.export.exporter import export_transformer_onnx

        logger.info(
            "exporting the ONNX for %dx%d, T=%d, E_max=%d into the cache (once per weights, size and knobs) ...",
            height, width, text_len, max_entities,
        )
        export_transformer_onnx(transformer, io, path, config=config, decompose=True)

    return _load_cached(
        Path(cache_dir),
        key,
        export,
        {**payload, "model_id": model_id},
        lambda path: OnnxRuntimeBackend(path, io, providers=providers, config=config),
        still_failing="this is a bug: please report it",
    )


def portable_backend(
    artifact: Path,
    *,
    artifact_sha256: str,
    data_files: Mapping[str, str],
    io: Any,
    config: DeLeakerConfig,
    cache_dir: Path,
    providers: Optional[list[str]] = None,
) -> OnnxRuntimeBackend:
    """An ONNX Runtime backend for an engine directory's ONNX ``artifact`` (hashes already checked against its
    manifest): its portable form (`deleaker.export.portable.make_portable`), made into ``cache_dir`` on first use.
    ``io`` is the artifact's contract (the backend's is the same in float32), ``config`` its manifest's knobs."""
    portable_io = dataclasses.replace(io, dtype="float32")
    key = _key(
        {
            "kind": "portable",
            "artifact_sha256": artifact_sha256,
            "data_files": dict(sorted(data_files.items())),
            "io": portable_io.to_dict(),
            "deleaker_config": dataclasses.asdict(config),
        }
    )

    def convert(path: Path) -> None:
        from deleaker.export.portable import make_portable

        logger.info("converting %s for ONNX Runtime (float32, DeLeaker decomposed; once per artifact)", artifact.name)
        try:
            make_portable(artifact, path, work_dir=path.parent)
        except DeLeakerError as exc:
            raise BackendError(f"{artifact} cannot run in ONNX Runtime: {exc}; rebuild it") from exc

    described = {
        "kind": "portable",
        "source": str(artifact),
        "source_sha256": artifact_sha256,
        "io": portable_io.to_dict(),
    }
    return _load_cached(
        Path(cache_dir),
        key,
        convert,
        described,
        lambda path: OnnxRuntimeBackend(path, portable_io, providers=providers, config=config),
        still_failing=f"{artifact} does not fit its manifest: rebuild it",
    )


# --- entries ----------------------------------------------------------------------------------------------------


def _load_cached(
    cache_dir: Path,
    key: str,
    make: Callable[[Path], None],
    described: Mapping[str, Any],
    load: Callable[[Path], OnnxRuntimeBackend],
    *,
    still_failing: str,
) -> OnnxRuntimeBackend:
    """``load(artifact)`` of a valid entry for ``key``; an entry that does not load is made again once, and if
    the new one fails too the error says ``still_failing`` (what to do about it)."""
    artifact = cached_artifact(cache_dir, key, make, described)
    try:
        return load(artifact)
    except DeLeakerError as first:
        logger.warning("the cached %s does not load (%s); making it again", artifact.parent, first)
        discard_entry(cache_dir, key)
    artifact = cached_artifact(cache_dir, key, make, described)
    try:
        return load(artifact)
    except DeLeakerError as exc:
        raise BackendError(
            f"{exc} (the cache entry {artifact.parent} was made again and still fails; {still_failing})"
        ) from exc


def cached_artifact(cache_dir: Path, key: str, make: Callable[[Path], None], described: Mapping[str, Any]) -> Path:
    """The path of ``transformer.onnx`` in a valid entry for ``key``; ``make(path)`` writes the artifact (and any
    data file beside it) into a staging folder when there is no valid entry. Raises `BackendError` when the cache
    cannot be written; what ``make`` raises otherwise."""
    root = _cache_root(cache_dir)
    name = key[:_NAME_LEN]
    entry = root / name
    with _lock(root, name):
        if entry.is_dir() and not entry.is_symlink():
            if is_valid_entry(entry, key):
                return entry / ARTIFACT_NAME
        _remove(entry)  # damaged, another layout, or not a folder: made again
        remove_stale_staging(root, holding=name)
        try:
            staging = make_staging_dir(entry)
        except OSError as exc:
            raise BackendError(f"cannot write the ONNX cache in {root}: {exc} ({_CACHE_HINT})") from exc
        try:
            start = time.perf_counter()
            try:
                make(staging / ARTIFACT_NAME)
                files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
                manifest = {
                    **described,
                    "key": key,
                    "artifact": ARTIFACT_NAME,
                    "files": files,
                    "versions": _versions(),
                    "seconds": time.perf_counter() - start,
                }
                (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
                publish_staged(staging, entry, whole=True)
            except OSError as exc:  # a full disk, a read-only folder: nothing half-written stays
                raise BackendError(f"cannot write the ONNX cache entry {entry}: {exc}") from exc
        except BaseException:
            _remove(staging)
            raise
    return entry / ARTIFACT_NAME


def discard_entry(cache_dir: Path, key: str) -> None:
    """Remove the entry for ``key`` (under its lock), so the next `cached_artifact` makes it again."""
    root = _cache_root(cache_dir)
    name = key[:_NAME_LEN]
    with _lock(root, name):
        _remove(root / name)


def is_valid_entry(entry: Path, key: str) -> bool:
    """True when ``entry``'s manifest is for ``key`` and every file it lists, and only those, is a regular file in
    the entry that hashes to the recorded value."""
    try:
        manifest = loads_strict((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"]
        present = {p.name for p in entry.iterdir()} - {MANIFEST_NAME}
        return (
            manifest.get("key") == key
            and ARTIFACT_NAME in files
            and set(files) == present
            and all(
                not (entry / name).is_symlink() and (entry / name).is_file() and sha256_file(entry / name) == digest
                for name, digest in files.items()
            )
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False


def remove_stale_staging(root: Path, *, holding: Optional[str] = None) -> list[Path]:
    """Remove the staging folders of writers that are gone; returns what was removed.

    A staging folder (``.<name>.deleaker-tmp-<pid>-<token>``, `deleaker.staging`, for an entry ``name`` of
    `_NAME_LEN` hex digits) is stale when nobody holds ``.<name>.lock`` (writers hold it while they write), or when
    ``holding`` is ``name`` (the caller holds that lock itself). Folders of live writers, and anything not named
    like ours, stay.
    """
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for path in candidates:
        name = staged_name(path.name)
        if name is None or not _ENTRY_NAME.fullmatch(name):
            continue  # not ours
        if name == holding:
            _remove(path)
            removed.append(path)
            continue
        with _lock(root, name, blocking=False) as free:
            if free:
                _remove(path)
                removed.append(path)
    if removed:
        logger.info("removed %d staging folder(s) left by interrupted exports in %s", len(removed), root)
    return removed


def _cache_root(cache_dir: Path) -> Path:
    root = Path(cache_dir) / "onnx"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"cannot write the ONNX cache in {cache_dir}: {exc} ({_CACHE_HINT})") from exc
    if not root.is_dir():
        raise BackendError(f"the ONNX cache {root} is not a folder ({_CACHE_HINT})")
    return root


def _lock(root: Path, name: str, *, blocking: bool = True) -> ContextManager[bool]:
    """The lock of entry ``name``: ``root/.<name>.lock`` (`deleaker.locks.exclusive_lock`)."""
    return exclusive_lock(root / f".{name}.lock", blocking=blocking)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
