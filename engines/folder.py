"""The engine folder a build writes: its fixed names, what may share it, and writes that leave nothing partial.

- `BUILD_LOCK_NAME`, `TIMING_CACHE_NAME` (and the plugin library's `LIBRARY_NAME`): the names a build writes besides
  its artifacts and their manifests; `remove_stale_staging` removes what a killed build left, by our staging form;
- `check_folder_agrees`: every artifact of a folder shares the model, T, E_max and knobs (`FOLDER_INVARIANTS`), or
  ``run --engines`` could not serve the folder; `reusable_onnx`: the folder's ONNX can stand for this request;
- `check_plugin_slot` / `install_plugin_library`: one plugin library per folder (TensorRT's registry takes one per
  plugin name and process), copied in atomically;
- `disk_guard` / `save_engine`: ENOSPC as `DiskFullError`, partial files removed.

`deleaker.engines.build.build_engines` calls these holding the folder's build lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

from deleaker.errors import ConfigError, DeLeakerError
from deleaker.plugins.trt_library import PluginLibrary
from deleaker.plugins.trt_plugin_build import LIBRARY_NAME
from deleaker.staging import staged_name, write_atomically

from .loaders import BuildError
from .manifest import MANIFEST_SUFFIX, EngineManifest, ManifestError, sha256_file

TIMING_CACHE_NAME = "timing.cache"
#: Held by a build while it writes into its output folder.
BUILD_LOCK_NAME = ".build.lock"


class DiskFullError(DeLeakerError, OSError):
    """No space left while writing an artifact (partial files were removed)."""


@contextlib.contextmanager
def disk_guard(*cleanup: Path) -> Iterator[None]:
    """Turn ENOSPC into `DiskFullError`, removing ``cleanup`` paths (files or folders) on any error."""
    try:
        yield
    except BaseException as err:
        for path in cleanup:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            written = ", ".join(str(path) for path in cleanup) or "artifacts"
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {written}") from err
        raise


def save_engine(data: bytes, path: Path) -> Path:
    """Write the serialized engine atomically (temp file in the same folder, then rename)."""
    with disk_guard():
        write_atomically({path: data})
    return path


def check_plugin_slot(out_dir: Path, library: PluginLibrary, engine_name: str) -> None:
    """Refuse to replace ``out_dir``'s plugin library by ``library`` while an engine of the folder other than
    ``engine_name`` (which the build replaces) was built with the library there now."""
    current_path = out_dir / LIBRARY_NAME
    if not current_path.is_file():
        return
    current = sha256_file(current_path)
    if current == library.sha256:
        return
    users = []
    for path in sorted(out_dir.glob("*" + MANIFEST_SUFFIX)):
        try:
            manifest = EngineManifest.read(path)
        except ManifestError:
            continue  # not an engine this folder can run anyway
        if manifest.artifact != engine_name and manifest.plugin_library == LIBRARY_NAME:
            if manifest.plugin["sha256"] == current:
                users.append(manifest.artifact)
    if users:
        raise BuildError(
            f"{out_dir} holds engines built with another plugin library ({', '.join(users)}); a folder holds one "
            f"plugin library: build into another folder, or rebuild those engines with {library.path}"
        )


def _copy_into(source: Path, handle: Any) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, handle)


def install_plugin_library(library: PluginLibrary, out_dir: Path) -> PluginLibrary:
    """``library`` copied into ``out_dir`` as `LIBRARY_NAME` (atomically, unless the same bytes are there already);
    returns the copy. A process that loaded the file it replaces keeps its own (a new file, not a rewrite)."""
    target = out_dir / LIBRARY_NAME
    if not (target.is_file() and sha256_file(target) == library.sha256):
        with disk_guard():
            write_atomically({target: lambda handle: _copy_into(library.path, handle)})
        if sha256_file(target) != library.sha256:
            raise BuildError(f"{library.path} changed while it was copied to {target}; build again")
    return dataclasses.replace(library, path=target)


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove what interrupted builds left in ``out_dir``: the staging files and folders that artifacts,
    manifests, the timing cache and the plugin library are written through, recognised by their whole form
    (``.<final name>.deleaker-tmp-<pid>-<token>``, `deleaker.staging`) for a final name a build writes. A user's
    ``.transformer.notes`` or ``.timing.cache.bak`` is not ours and stays. Only call it holding the folder's build
    lock."""
    removed = []
    for path in sorted(out_dir.iterdir()):
        final = staged_name(path.name)
        if final is not None and (final.startswith("transformer.") or final in (TIMING_CACHE_NAME, LIBRARY_NAME)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def reusable_onnx(onnx_path: Path, expected: Mapping[str, Any]) -> bool:
    """True when ``onnx_path`` exists, hashes to its manifest and the manifest matches ``expected``."""
    try:
        manifest = EngineManifest.read(onnx_path)
        manifest.check_artifact(onnx_path.parent)
    except DeLeakerError:
        return False
    return all(
        json.dumps(getattr(manifest, k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in expected.items()
    )


#: What every artifact of one folder must share for `run --engines` to serve them together.
FOLDER_INVARIANTS = ("model_id", "model_sha256", "text_len", "max_entities", "deleaker_config", "loras")


def check_folder_agrees(out_dir: Path, artifact_stem: str, wanted: Mapping[str, Any]) -> None:
    """Raise `ConfigError` when ``out_dir`` holds an artifact (other than this request's own, ``artifact_stem``)
    whose `FOLDER_INVARIANTS` are not ``wanted``'s: `run --engines` would refuse the folder once this one is
    added. Before any export."""
    for path in sorted(out_dir.glob("*" + MANIFEST_SUFFIX)):
        if path.name.startswith(artifact_stem + "."):
            continue  # this request's own ONNX or engine: replaced or reused
        other = EngineManifest.read(path)
        for what in FOLDER_INVARIANTS:
            if json.dumps(getattr(other, what), sort_keys=True) != json.dumps(wanted[what], sort_keys=True):
                raise ConfigError(
                    f"{out_dir} holds {other.artifact}, built with another {what} ({getattr(other, what)!r:.120}, "
                    f"this build: {wanted[what]!r:.120}); `run --engines` serves one model, T, E_max and set of "
                    "knobs per folder: build into another --out"
                )
