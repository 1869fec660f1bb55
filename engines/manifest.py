"""The manifest (JSON) written beside every built artifact (ONNX file or TensorRT engine).

An engine is only usable with the GPU (compute capability), TensorRT version and plugin it was built for, and only
for the shapes of its profile. The runtime builds an `Environment` of what it has and wants, and calls
`EngineManifest.check_compatible`, which raises `EngineCompatibilityError` with a machine-readable ``reason``
instead of letting TensorRT fail (or silently mis-run) later. Hashes let a cache tell a stale artifact from a
fresh one without trusting file names or times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

from deleaker.errors import DeLeakerError
from deleaker.hashing import sha256_file

#: Bumped when the manifest's fields change incompatibly.
MANIFEST_FORMAT = 1
#: ``<artifact file name><MANIFEST_SUFFIX>``, e.g. ``transformer.fp16.plan.manifest.json``.
MANIFEST_SUFFIX = ".manifest.json"

PRECISIONS = ("fp16", "bf16", "fp8")
ARTIFACT_KINDS = ("onnx", "engine")


class ManifestError(DeLeakerError, ValueError):
    """A manifest file is missing, unreadable or malformed."""


class EngineCompatibilityError(DeLeakerError):
    """The engine does not fit this machine or this request.

    ``reason`` is one of: ``not_an_engine``, ``gpu``, ``compute_capability``, ``tensorrt_version``,
    ``plugin_version``, ``plugin_hash``, ``shape``, ``artifact_hash``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Environment:
    """What the runtime has (GPU, TensorRT, plugin) and what it wants to run (shapes); ``None`` = do not check.

    ``batch`` is checked against the engine's profile range; ``height, width, text_len, max_entities`` must be the
    engine's (they are fixed per engine).
    """

    gpu_name: Optional[str] = None
    compute_capability: Optional[Tuple[int, int]] = None
    tensorrt_version: Optional[str] = None
    plugin_version: Optional[str] = None
    plugin_sha256: Optional[str] = None
    batch: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    text_len: Optional[int] = None
    max_entities: Optional[int] = None


def sha256_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """One hex SHA-256 over several files: each file's path relative to ``root`` and its bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def cuda_environment() -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """``(gpu name, (major, minor))`` of CUDA device 0, or ``(None, None)`` without a usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))


@dataclass
class EngineManifest:
    """Everything needed to decide whether an artifact can be used, and to rebuild it.

    Attributes:
        kind: "onnx" or "engine". artifact: the artifact's file name (same folder). artifact_sha256: its hash.
        model_id: ``tiny`` or the model path given; model_sha256: hash of the transformer's config and weights.
        precision: fp16 | bf16 | fp8. io: `FluxTransformerIO.to_dict()` (names, dtypes, shapes, batch profile,
        height, width, text_len = T, max_entities = E_max). deleaker_config: the knobs baked into the nodes.
        onnx_sha256: hash of the ONNX the engine was built from (the artifact's own hash for an ONNX manifest).
        plugin: name, namespace, version and sha256 of the plugin's sources.
        tensorrt_version, gpu_name, compute_capability: what built the engine (None for an ONNX manifest).
        quantization: the FP8 record (scales, recipe) or None. data_files: ``{file name: sha256}`` of files the
        artifact needs beside it (an ONNX's external weights). timings_s: seconds per build stage.
    """

    kind: str
    artifact: str
    artifact_sha256: str
    model_id: str
    model_sha256: str
    precision: str
    io: Dict[str, Any]
    deleaker_config: Dict[str, Any]
    onnx_sha256: str
    plugin: Dict[str, str]
    tensorrt_version: Optional[str] = None
    gpu_name: Optional[str] = None
    compute_capability: Optional[Tuple[int, int]] = None
    quantization: Optional[Dict[str, Any]] = None
    data_files: Dict[str, str] = field(default_factory=dict)
    timings_s: Dict[str, float] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in ARTIFACT_KINDS:
            raise ManifestError(f"manifest kind must be one of {ARTIFACT_KINDS}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"manifest precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compute_capability is not None:
            self.compute_capability = tuple(int(x) for x in self.compute_capability)
        for key in ("height", "width", "text_len", "max_entities", "batch_min", "batch_max"):
            if key not in self.io:
                raise ManifestError(f"manifest io lacks {key!r}")

    # --- shapes, read from the I/O contract ---------------------------------------------------------------------

    @property
    def height(self) -> int:
        return int(self.io["height"])

    @property
    def width(self) -> int:
        return int(self.io["width"])

    @property
    def text_len(self) -> int:
        return int(self.io["text_len"])

    @property
    def max_entities(self) -> int:
        return int(self.io["max_entities"])

    @property
    def batch_range(self) -> Tuple[int, int, int]:
        return int(self.io["batch_min"]), int(self.io.get("batch_opt", self.io["batch_min"])), int(self.io["batch_max"])

    # --- JSON ---------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if self.compute_capability is not None:
            data["compute_capability"] = list(self.compute_capability)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngineManifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"manifest is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"manifest format {data.get('format')!r} is not {MANIFEST_FORMAT}; rebuild the artifact"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise ManifestError(f"manifest fields: missing {missing}, unknown {unknown}")
        return cls(**data)

    @staticmethod
    def path_for(artifact: str | os.PathLike) -> Path:
        """Where the manifest of ``artifact`` lives."""
        artifact = Path(artifact)
        return artifact.with_name(artifact.name + MANIFEST_SUFFIX)

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``<artifact>.manifest.json`` in ``directory`` atomically (temp file, then rename)."""
        target = self.path_for(Path(directory) / self.artifact)
        atomic_write_bytes(target, self.to_json().encode())
        return target

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EngineManifest":
        """Read a manifest file, or the manifest beside an artifact when given the artifact's path."""
        path = Path(path)
        if not path.name.endswith(MANIFEST_SUFFIX):
            path = cls.path_for(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ManifestError(f"cannot read manifest {path}: {err}") from err
        return cls.from_json(text)

    # --- compatibility ------------------------------------------------------------------------------------------

    def check_compatible(self, current_env: Environment) -> None:
        """Raise `EngineCompatibilityError` (with ``reason``) unless this engine can run in ``current_env``.

        Checked: the artifact is an engine; GPU compute capability and name; exact TensorRT version (engines are
        not portable across versions); plugin version and source hash; batch within the profile; height, width,
        text length and E_max equal to the engine's. Fields of ``current_env`` that are None are not checked.
        """
        env = current_env
        if self.kind != "engine":
            raise EngineCompatibilityError(
                "not_an_engine", f"{self.artifact} is an {self.kind} artifact, not an engine"
            )
        if env.compute_capability is not None and tuple(env.compute_capability) != tuple(self.compute_capability or ()):
            raise EngineCompatibilityError(
                "compute_capability",
                f"engine {self.artifact} was built for compute capability {_cc(self.compute_capability)} "
                f"({self.gpu_name}), this GPU is {_cc(env.compute_capability)} ({env.gpu_name}); rebuild it here",
            )
        if env.gpu_name is not None and env.gpu_name != self.gpu_name:
            raise EngineCompatibilityError(
                "gpu",
                f"engine {self.artifact} was built on {self.gpu_name}, this GPU is {env.gpu_name}; rebuild it here",
            )
        if env.tensorrt_version is not None and env.tensorrt_version != self.tensorrt_version:
            raise EngineCompatibilityError(
                "tensorrt_version",
                f"engine {self.artifact} was built with TensorRT {self.tensorrt_version}, this is TensorRT "
                f"{env.tensorrt_version}; rebuild it",
            )
        if env.plugin_version is not None and env.plugin_version != self.plugin.get("version"):
            raise EngineCompatibilityError(
                "plugin_version",
                f"engine {self.artifact} uses plugin {self.plugin.get('name')} v{self.plugin.get('version')}, "
                f"this runtime registers v{env.plugin_version}",
            )
        if env.plugin_sha256 is not None and env.plugin_sha256 != self.plugin.get("sha256"):
            raise EngineCompatibilityError(
                "plugin_hash", f"engine {self.artifact} was built with other plugin sources; rebuild it"
            )
        if env.batch is not None:
            lo, _, hi = self.batch_range
            if not lo <= env.batch <= hi:
                raise EngineCompatibilityError(
                    "shape", f"batch {env.batch} is outside engine {self.artifact}'s profile [{lo}, {hi}]"
                )
        for name in ("height", "width", "text_len", "max_entities"):
            wanted = getattr(env, name)
            if wanted is not None and wanted != getattr(self, name):
                raise EngineCompatibilityError(
                    "shape",
                    f"{name} {wanted} differs from engine {self.artifact}'s {getattr(self, name)} "
                    f"(fixed per engine: build one for this {name})",
                )

    def check_artifact(self, directory: str | os.PathLike) -> Path:
        """The artifact's path, after checking its hash and its data files' (reason ``artifact_hash``)."""
        path = Path(directory) / self.artifact
        if not path.is_file():
            raise EngineCompatibilityError("artifact_hash", f"{path} does not exist")
        if sha256_file(path) != self.artifact_sha256:
            raise EngineCompatibilityError("artifact_hash", f"{path} does not match its manifest's hash; rebuild it")
        for name, digest in self.data_files.items():
            data = Path(directory) / name
            if not data.is_file() or sha256_file(data) != digest:
                raise EngineCompatibilityError("artifact_hash", f"{data}, needed by {path.name}, is missing or changed")
        return path


def _cc(cc: Optional[Iterable[int]]) -> str:
    return "unknown" if cc is None else ".".join(str(x) for x in cc)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temp file in the same folder and a rename: no half-written file.

    On any error (ENOSPC included) the temp file is removed and the error re-raised; ``target`` is untouched.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are ordinary readable files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plugin_info() -> Dict[str, str]:
    """Name, namespace, version and source hash (Python plugin + CUDA sources) of the DeLeaker plugin."""
    from deleaker.plugins import trt_plugin

    root = Path(trt_plugin.__file__).parent
    # What decides the plugin's behaviour: its Python layer, the kernels' ctypes bindings and CUDA sources.
    sources = [root / "trt_plugin.py", root / "kernels.py"]
    sources += [p for p in sorted((root / "csrc").iterdir()) if p.suffix in (".h", ".cuh", ".cu")]
    return {
        "name": trt_plugin.PLUGIN_NAME,
        "namespace": trt_plugin.PLUGIN_NAMESPACE,
        "version": trt_plugin.PLUGIN_VERSION,
        "sha256": sha256_files([p for p in sources if p.is_file()], root),
    }
