"""The ONNX export cache behind ``DeLeakerRuntime.from_model(..., backend="onnxruntime")``.

On first use of a resolution the transformer is exported (with ``DeLeakerAttention`` nodes) into
``<cache_dir>/onnx/<key>/transformer.onnx`` with its manifest (``cache_manifest.json``). The key is a
hash of everything the graph depends on: the transformer's config and weights, the I/O contract (resolution,
``T``, ``E_max``, dtype), the DeLeaker knobs and the versions of torch, diffusers, onnx and this package. On reuse
the artifact's bytes are checked against the manifest's hash; a stale or damaged entry is exported again. An
export goes to a temporary folder that is renamed into place, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from deleaker.config import DeLeakerConfig
from deleaker.hashing import sha256_file

from .backends import BackendError

ARTIFACT_NAME = "transformer.onnx"
#: The cache entry's manifest: key, artifact hash, model hash, contract, knobs, versions.
MANIFEST_NAME = "cache_manifest.json"

#: Says when an export starts and why (the CLI shows ``deleaker.*`` INFO records on stderr).
logger = logging.getLogger(__name__)


def transformer_sha256(transformer: torch.nn.Module) -> str:
    """Hex SHA-256 of a transformer's config and weights (names, dtypes, shapes and bytes, in state-dict order)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(transformer.config), sort_keys=True, default=str).encode())
    for name, tensor in transformer.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "diffusers", "onnx", "onnxscript", "deleaker-trt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "none"
    return versions


def cache_key(model_sha256: str, io_dict: dict[str, Any], config: DeLeakerConfig) -> str:
    """Hex key of one export: weights, contract, knobs, tool versions."""
    payload = {
        "model_sha256": model_sha256,
        "io": io_dict,
        "deleaker_config": dataclasses.asdict(config),
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def exported_onnx(
    transformer: torch.nn.Module,
    *,
    model_id: str,
    height: int,
    width: int,
    text_len: int,
    max_entities: int,
    vae_scale_factor: int,
    config: DeLeakerConfig,
    cache_dir: Path,
) -> tuple[Path, Any]:
    """``(path of transformer.onnx, FluxTransformerIO)`` for this transformer at ``height x width``; exports it
    into ``cache_dir`` unless a valid entry is there."""
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
    model_sha = transformer_sha256(transformer)
    key = cache_key(model_sha, io.to_dict(), config)
    entry = Path(cache_dir) / "onnx" / key[:32]
    artifact = entry / ARTIFACT_NAME
    reason = f"no export in the cache yet for these weights, T={text_len}, E_max={max_entities} and knobs"
    if entry.is_dir():
        if is_valid_entry(entry, key):
            return artifact, io
        shutil.rmtree(entry, ignore_errors=True)  # damaged or from another layout: export again
        reason = "the cached export is damaged"
    logger.info("exporting the ONNX for %dx%d (%s) into %s ...", height, width, reason, entry)

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as exc:
        raise BackendError(
            f"cannot write the ONNX cache in {cache_dir}: {exc} (set --cache-dir / DELEAKER_CACHE)"
        ) from exc
    try:
        start = time.perf_counter()
        files = _export(transformer, io, config, tmp / ARTIFACT_NAME)
        manifest = {
            "key": key,
            "artifact": ARTIFACT_NAME,
            "files": {f.name: sha256_file(f) for f in files},
            "model_id": model_id,
            "model_sha256": model_sha,
            "io": io.to_dict(),
            "deleaker_config": dataclasses.asdict(config),
            "versions": _versions(),
            "export_seconds": time.perf_counter() - start,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process exported the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return artifact, io


def is_valid_entry(entry: Path, key: str) -> bool:
    """True when ``entry``'s manifest is for ``key`` and every file it lists hashes to the recorded value."""
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text())
        files = manifest["files"]
        return (
            manifest.get("key") == key
            and ARTIFACT_NAME in files
            and all(sha256_file(entry / name) == digest for name, digest in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _export(transformer: torch.nn.Module, io: Any, config: DeLeakerConfig, path: Path) -> list[Path]:
    """Export with one ``DeLeakerAttention`` node per joint attention; returns the files written (the ``.onnx``,
    and its external data file when the weights are over 2 GB)."""
    from deleaker.export.exporter import export_transformer_onnx

    result = export_transformer_onnx(transformer, io, path, config=config)
    return [result.onnx_path] + ([result.data_path] if result.data_path is not None else [])
