"""The FLUX.1 model a runtime or an engine build starts from: its diffusers components, loaded once. A FLUX.2
folder (`is_flux2_model`, told by its ``model_index.json``) loads for an engine build and for the runtime's
torch backend (`deleaker.runtime.flux2_runtime`).

Only the string ``"tiny"`` names the built-in offline test model (`deleaker.tiny`, random weights); anything else,
a `Path("tiny")` or ``"./tiny"`` included, is a local diffusers folder. The string ``"tiny"`` where ``./tiny`` is a
model folder is ambiguous, and refused: random weights must never silently stand in for a model the user meant.
A light module until a model loads (no torch at import), so the CLI checks a model source before torch loads.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .errors import ConfigError
from .export_lock import torch_work
from .jsonio import loads_strict

if TYPE_CHECKING:  # pragma: no cover  (torch loads with the model, not with this module)
    import torch

#: The name of the built-in model: `deleaker.tiny.TINY_MODEL_NAME`, spelled out (that module imports torch).
TINY_MODEL_NAME = "tiny"


def names_builtin_tiny(model: Any) -> bool:
    """True when ``model`` is the string ``"tiny"`` (not a `Path`, not ``"./tiny"``).

    Raises `ConfigError` when it is, but ``./tiny`` holds a diffusers model (``model_index.json``) or a transformer
    (``config.json``): say which is meant."""
    if not (isinstance(model, str) and model == TINY_MODEL_NAME):
        return False
    folder = Path(TINY_MODEL_NAME)
    if (folder / "model_index.json").exists() or (folder / "config.json").exists():
        raise ConfigError(
            f"model 'tiny' names the built-in model (random weights), but ./tiny here is a model folder: pass "
            f"./tiny (or {folder.resolve()}) to load the folder, or run from another folder for the built-in model"
        )
    return True


def check_model_source(model: Any) -> None:
    """Raise `ConfigError` unless ``model`` is the string ``"tiny"`` (the built-in model, `names_builtin_tiny`) or
    names a directory (a `Path("tiny")` is a folder)."""
    if not names_builtin_tiny(model) and not Path(model).is_dir():
        raise ConfigError(f"model {str(model)!r:.200} is neither 'tiny' nor a directory")


#: The diffusers pipelines of FLUX.2 ([dev], [klein]), by ``model_index.json``'s ``_class_name``.
FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")
#: What the parts of the runtime that run FLUX.1 only (engines, ONNX Runtime, verify, serve, triton-repo) say of a
#: FLUX.2 model.
FLUX2_RUNTIME_MESSAGE = (
    "is a FLUX.2 model; the runtime runs FLUX.2 from its diffusers folder with the torch backend only (run --model "
    "DIR); its engines and ONNX files, verify, serve and triton-repo run FLUX.1 (dev, schnell) only so far"
)


def pipeline_class_name(model: str | Path) -> str | None:
    """``model_index.json``'s ``_class_name`` of a diffusers folder (no torch, no weights); None for ``"tiny"``, a
    folder without a readable one, or one that is not a JSON object."""
    if isinstance(model, str) and model == TINY_MODEL_NAME:
        return None
    try:
        index = loads_strict((Path(model) / "model_index.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else None


def is_flux2_model(model: str | Path) -> bool:
    """True when ``model`` is a FLUX.2 [dev] or [klein] diffusers folder (`FLUX2_PIPELINES`)."""
    return pipeline_class_name(model) in FLUX2_PIPELINES


#: Serialises builds of the tiny model (see `load_components`).
_TINY_BUILD_LOCK = threading.Lock()


def load_components(model: str | Path, *, with_transformer: bool = True) -> tuple[dict[str, Any], str]:
    """FluxPipeline components of ``model`` (``"tiny"`` or a local diffusers folder) and a stable model id; a FLUX.2
    folder (`is_flux2_model`) gives its own pipeline's components (``Flux2Pipeline``, ``Flux2KleinPipeline``).

    The id is ``"tiny"`` or the folder's resolved path; caches also hash the weights, so a changed folder never
    reuses an old export. ``with_transformer=False`` skips loading a folder's transformer weights (engines
    replace them): ``components["transformer"]`` is then None (see `transformer_config`).
    """
    from .tiny import build_tiny_flux_components

    if names_builtin_tiny(model):  # the string "tiny" only: Path("tiny") is a folder
        # The tiny model seeds torch's process-wide generator while it builds: two builds at once would interleave
        # their draws and get different weights (and so different caches). One at a time.
        with _TINY_BUILD_LOCK, torch_work():
            return build_tiny_flux_components(0), TINY_MODEL_NAME
    check_model_source(model)
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"{path} is not a diffusers model folder (no model_index.json)")
    import diffusers

    # FLUX.2 folders load with their own pipeline class (`build` exports their transformer); anything else as FLUX.1.
    name = pipeline_class_name(path)
    pipeline_class = getattr(diffusers, name) if name in FLUX2_PIPELINES else diffusers.FluxPipeline
    try:
        if with_transformer:
            pipe = pipeline_class.from_pretrained(path, local_files_only=True)
        else:
            pipe = pipeline_class.from_pretrained(path, transformer=None, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the FLUX model in {path}: {exc}") from exc
    return dict(pipe.components), str(path.resolve())


def transformer_config(model: str | Path, components: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's config: from the loaded module, else from ``<model>/transformer/config.json``."""
    if components.get("transformer") is not None:
        return dict(components["transformer"].config)
    path = Path(model) / "transformer" / "config.json"
    try:
        return loads_strict(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read the transformer config {path}: {str(exc):.200}") from None


def embeds_guidance(model: str | Path) -> bool:
    """Whether ``model``'s transformer takes a guidance value (FLUX.1-dev: True; FLUX.1-schnell, distilled without
    a guidance embedding: False), from its ``transformer/config.json``, without loading weights or torch. The
    built-in ``"tiny"`` is FLUX.1-dev-shaped. Raises `ConfigError` where the config cannot be read."""
    if names_builtin_tiny(model):
        return True
    return bool(transformer_config(model, {}).get("guidance_embeds", False))


def transformer_sha256(transformer: "torch.nn.Module") -> str:
    """Hex SHA-256 of a transformer's config and weights (names, dtypes, shapes and bytes, in state-dict order)."""
    import torch

    digest = hashlib.sha256()
    digest.update(json.dumps(dict(transformer.config), sort_keys=True, default=str).encode())
    with torch_work():
        for name, tensor in transformer.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_fingerprint(model: str | Path) -> Optional[str]:
    """What identifies a diffusers folder's transformer weights without reading them: hex SHA-256 of every file under
    ``<model>/transformer/`` (its config and weight files) by relative name, size and modification time. None for
    ``"tiny"`` or a folder without a ``transformer/`` subfolder (their weights are hashed, `transformer_sha256`).

    Replacing or editing a file changes its size or time, so a changed folder never reuses an export made from the
    old weights; only ``stat`` is called (no weight byte is read: FLUX.1-dev's transformer is 24-48 GB).
    """
    folder = Path(model) / "transformer"
    if (isinstance(model, str) and model == TINY_MODEL_NAME) or not folder.is_dir():
        return None
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    if not files:
        return None
    return hashlib.sha256(json.dumps({"transformer_files": files}, sort_keys=True).encode()).hexdigest()
