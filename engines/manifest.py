"""The manifest (JSON) written beside every built artifact (ONNX file or TensorRT engine).

An engine is only usable with the TensorRT release, the GPU (TensorRT proper; TensorRT-RTX engines are portable) and
the plugin library it was built with, and only for the shapes of its profile. Its manifest names the plugin library
(copied into the engine folder) with its SHA-256 and build info; `EngineManifest.check_artifact` checks the
engine's and the library's bytes, and `EngineManifest.check_compatible` checks an `Environment` of what the runtime
has and wants, raising `EngineCompatibilityError` with a machine-readable ``reason`` instead of letting TensorRT
fail (or silently mis-run) later. Hashes let a cache tell a stale artifact from a fresh one without trusting file
names or times.

Over 400 lines, one job: a manifest is untrusted input (``run --engines`` reads folders it did not write), so every
field is checked where the record is made, before anything is sized or loaded from it; the checks are most of the
module and belong beside the fields they guard.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

from deleaker.errors import ConfigError, DeLeakerError, ShapeError
from deleaker.jsonio import loads_strict
from deleaker.staging import write_atomically
from deleaker.hashing import sha256_file
from deleaker.lora import check_lora_records
from deleaker.plugins.kernels import MAX_ENTITIES
from deleaker.export.limits import MAX_SIDE, MAX_TEXT_LEN, PRECISIONS

#: Bumped when the manifest's fields change incompatibly. 2: ``loras`` (the LoRA adapters fused into the weights).
MANIFEST_FORMAT = 2
#: Formats this version reads; an older one is migrated on reading (`migrate_manifest`).
READABLE_FORMATS = (1, 2)
#: ``<artifact file name><MANIFEST_SUFFIX>``, e.g. ``transformer.fp16.plan.manifest.json``.
MANIFEST_SUFFIX = ".manifest.json"

ARTIFACT_KINDS = ("onnx", "engine")
#: A manifest is a few KB (FP8 scales included); anything much larger is not one.
MAX_MANIFEST_BYTES = 16 * 2**20
#: Limits on the shapes a manifest may declare, checked before anything is allocated for them: the runtime's own
#: (``MAX_TEXT_LEN``, ``MAX_SIDE``; E_max up to the kernels' ``MAX_ENTITIES``, as `run` and `build` take it) and
#: the batch.
MAX_BATCH = 64
#: The graph's float dtype (the contract's ``io.dtype``) per precision. FP8 keeps fp16 outside the quantized linears.
ONNX_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp8": "float16"}


class ManifestError(DeLeakerError, ValueError):
    """A manifest file is missing, unreadable or malformed."""


class EngineCompatibilityError(DeLeakerError):
    """The engine does not fit this machine or this request.

    ``reason`` is one of: ``not_an_engine``, ``gpu``, ``compute_capability``, ``tensorrt_version``,
    ``plugin_library`` (the engine folder's plugin library is missing or not a file), ``plugin_hash`` (it is not the
    library the engine was built with), ``shape``, ``artifact_hash``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Environment:
    """What the runtime has (GPU, TensorRT release) and what it wants to run (shapes); ``None`` = do not check.

    ``tensorrt_version`` is a `deleaker.plugins.trt_library.tensorrt_release` string. ``batch`` is checked against
    the engine's profile range; ``height, width, text_len, max_entities`` must be the engine's (they are fixed per
    engine).
    """

    gpu_name: Optional[str] = None
    compute_capability: Optional[Tuple[int, int]] = None
    tensorrt_version: Optional[str] = None
    batch: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    text_len: Optional[int] = None
    max_entities: Optional[int] = None


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
        plugin: the ``DeLeakerAttention`` node's plugin (name, namespace, version; `plugin_node`); an engine's also
        names the plugin library it was built with, a file of its folder (`PLUGIN_RECORD_KEYS`: library, sha256,
        build_info, tensorrt_headers).
        tensorrt_version: the TensorRT release that built the engine (``tensorrt==10.13.0.35``,
        ``tensorrt_rtx==1.7.1.116``); gpu_name, compute_capability: the GPU it was built for (None for TensorRT-RTX,
        whose engines are portable, and for an ONNX manifest).
        quantization: the FP8 record (scales, recipe) or None. loras: the LoRA adapters fused into the weights
        before the export, in order (``{name, sha256, scale}`` each, `deleaker.lora.LoraAdapter.record`). data_files: ``{file name: sha256}`` of files the
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
    loras: list = field(default_factory=list)
    data_files: Dict[str, str] = field(default_factory=dict)
    timings_s: Dict[str, float] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in ARTIFACT_KINDS:
            raise ManifestError(f"manifest kind must be one of {ARTIFACT_KINDS}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"manifest precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.format, bool) or self.format != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format {self.format!r} is not {MANIFEST_FORMAT}; rebuild the artifact")
        _check_file_name("artifact", self.artifact)
        for name in ("artifact_sha256", "model_sha256", "onnx_sha256"):
            _check_sha256(name, getattr(self, name))
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ManifestError(f"manifest model_id must be a non-empty string, got {self.model_id!r}")
        if not isinstance(self.data_files, dict):
            raise ManifestError(f"manifest data_files must be an object {{file name: sha256}}, got {self.data_files!r}")
        for name, digest in self.data_files.items():
            _check_file_name("data_files", name)
            _check_sha256(f"data_files[{name!r}]", digest)
        self._check_plugin()
        for name in ("tensorrt_version", "gpu_name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ManifestError(f"manifest {name} must be a string or null, got {getattr(self, name)!r}")
        if self.compute_capability is not None:
            cc = self.compute_capability
            if not isinstance(cc, (list, tuple)) or len(cc) != 2 or not all(_is_int(x) and x >= 0 for x in cc):
                raise ManifestError(f"manifest compute_capability must be [major, minor], got {cc!r}")
            self.compute_capability = (int(cc[0]), int(cc[1]))
        if self.quantization is not None and not isinstance(self.quantization, dict):
            kind = type(self.quantization).__name__
            raise ManifestError(f"manifest quantization must be an object or null, got {kind}")
        try:
            check_lora_records(self.loras, "manifest loras")
        except ConfigError as err:
            raise ManifestError(str(err)) from err
        if not isinstance(self.timings_s, dict):
            raise ManifestError(f"manifest timings_s must be an object, got {type(self.timings_s).__name__}")
        self._check_io()
        self._check_deleaker_config()

    def _check_plugin(self) -> None:
        from deleaker.plugins.trt_library import PLUGIN_RECORD_KEYS, PluginLibrary, PluginLibraryError, release_module

        if not isinstance(self.plugin, dict) or not all(isinstance(v, str) for v in self.plugin.values()):
            raise ManifestError(f"manifest plugin must be an object of strings, got {self.plugin!r}")
        node = plugin_node()
        keys = PLUGIN_RECORD_KEYS if self.kind == "engine" else tuple(node)
        missing, unknown = sorted(set(keys) - set(self.plugin)), sorted(set(self.plugin) - set(keys))
        if missing or unknown:
            raise ManifestError(
                f"manifest plugin record of an {self.kind}: missing {missing}, unknown {unknown} (written by another "
                "version of deleaker-trt: rebuild the artifact)"
            )
        for key, value in node.items():
            if self.plugin[key] != value:
                raise ManifestError(
                    f"manifest plugin {key} must be {value!r} (the exporter's node), got {self.plugin[key]!r}"
                )
        if self.kind != "engine":
            return
        _check_file_name("plugin.library", self.plugin["library"])
        _check_sha256("plugin.sha256", self.plugin["sha256"])
        try:
            said = PluginLibrary.from_record(self.plugin, Path(".")).record()
        except PluginLibraryError as err:
            raise ManifestError(f"manifest plugin.build_info: {err}") from err
        for key in ("name", "namespace", "version", "tensorrt_headers"):
            if said[key] != self.plugin[key]:
                raise ManifestError(
                    f"manifest plugin {key} {self.plugin[key]!r} disagrees with its build_info ({said[key]!r})"
                )
        try:
            release_module(self.tensorrt_version)
        except ValueError as err:
            raise ManifestError(f"manifest tensorrt_version of an engine: {err}") from err

    def _check_io(self) -> None:
        from deleaker.export.contract import FluxTransformerIO

        if not isinstance(self.io, dict):
            raise ManifestError(f"manifest io must be a JSON object, got {type(self.io).__name__}")
        try:
            # The fields first, so a size over the limits is named as such (the stored tensor lists follow it).
            fields = {k: v for k, v in self.io.items() if k in FluxTransformerIO.__dataclass_fields__}
            io = FluxTransformerIO.from_dict(fields)
        except (ConfigError, ShapeError) as err:
            raise ManifestError(f"manifest io: {err}") from err
        limits = {
            "height": (io.height, MAX_SIDE),
            "width": (io.width, MAX_SIDE),
            "text_len": (io.text_len, MAX_TEXT_LEN),
            "max_entities": (io.max_entities, MAX_ENTITIES),
            "batch_max": (io.batch_max, MAX_BATCH),
        }
        for name, (value, limit) in limits.items():
            if value > limit:
                raise ManifestError(f"manifest io.{name} is {value}; at most {limit} is allowed")
        try:
            FluxTransformerIO.from_dict(self.io)
        except (ConfigError, ShapeError) as err:
            raise ManifestError(f"manifest io: {err}") from err
        # `run --engines --precision` picks artifacts by this field: it must be what the graph computes in.
        if io.dtype != ONNX_DTYPES[self.precision]:
            raise ManifestError(
                f"manifest precision {self.precision} needs io.dtype {ONNX_DTYPES[self.precision]}, got {io.dtype}"
            )

    def _check_deleaker_config(self) -> None:
        from deleaker.config import DeLeakerConfig

        fields = {f.name for f in dataclasses.fields(DeLeakerConfig)}
        if not isinstance(self.deleaker_config, dict):
            raise ManifestError(f"manifest deleaker_config must be an object, got {self.deleaker_config!r}")
        missing, unknown = sorted(fields - set(self.deleaker_config)), sorted(set(self.deleaker_config) - fields)
        if missing or unknown:
            raise ManifestError(f"manifest deleaker_config: missing {missing}, unknown {unknown}")
        try:
            DeLeakerConfig(**self.deleaker_config)
        except ConfigError as err:
            raise ManifestError(f"manifest deleaker_config: {err}") from err

    @property
    def plugin_library(self) -> Optional[str]:
        """The file name of an engine's plugin library in its folder (None for an ONNX manifest)."""
        return self.plugin["library"] if self.kind == "engine" else None

    @property
    def named_files(self) -> Dict[str, str]:
        """Every file the manifest names, relative to its directory: ``{name: role}`` (the artifact, its data
        files, an engine's plugin library). The one list that `resolve_files` checks; a new kind of file goes here."""
        files = {self.artifact: "artifact"}
        files.update({name: "data file" for name in self.data_files})
        if self.plugin_library is not None:
            files[self.plugin_library] = "plugin library"
        return files

    def resolve_files(self, directory: str | os.PathLike) -> Dict[str, Path]:
        """``{name: resolved path}`` for every file in `named_files`, each of which must exist and resolve, after
        symlinks, inside ``directory``. Raises `ManifestError` for one that escapes before anything is read."""
        root = Path(directory).resolve()
        resolved = {}
        for name, role in self.named_files.items():
            candidate = root / name
            reason = "plugin_library" if role == "plugin library" else "artifact_hash"
            try:
                path = candidate.resolve(strict=True)
            except (OSError, RuntimeError):  # missing, or a symlink loop
                advice = (
                    f": put the library {self.artifact} was built with back, or rebuild the engine"
                    if role == "plugin library" else ""
                )
                raise EngineCompatibilityError(reason, f"{candidate} ({role} of the manifest) does not exist{advice}")
            if path == root or root not in path.parents:
                raise ManifestError(
                    f"the manifest's {role} {name!r} resolves to {path}, outside {root}; every file a manifest names "
                    "must be inside its directory"
                )
            if not path.is_file():
                raise EngineCompatibilityError(reason, f"{candidate} ({role} of the manifest) is not a file")
            resolved[name] = path
        return resolved

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
            data = loads_strict(text)
        except (ValueError, RecursionError) as err:  # ValueError: also a number of more than 4300 digits
            raise ManifestError(f"manifest is not valid JSON: {str(err):.200}") from None
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        data = migrate_manifest(data)
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
        write_atomically({target: self.to_json().encode()})
        return target

    @classmethod
    def read(cls, path: str | os.PathLike) -> "EngineManifest":
        """Read a manifest file, or the manifest beside an artifact when given the artifact's path."""
        path = Path(path)
        if not path.name.endswith(MANIFEST_SUFFIX):
            path = cls.path_for(path)
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as err:
            raise ManifestError(f"cannot read manifest {path}: {err}") from err
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB: not a manifest")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ManifestError(f"manifest {path} is not UTF-8 text: {err}") from err
        try:
            return cls.from_json(text)
        except ManifestError as err:
            raise ManifestError(f"{path}: {err}") from err

    # --- compatibility ------------------------------------------------------------------------------------------

    def check_compatible(self, current_env: Environment) -> None:
        """Raise `EngineCompatibilityError` (with ``reason``) unless this engine can run in ``current_env``.

        Checked: the artifact is an engine; GPU compute capability and name (engines of TensorRT proper; TensorRT-RTX
        engines are portable and record no GPU); the exact TensorRT release (engines are not portable across
        releases, nor between TensorRT and TensorRT-RTX); batch within the profile; height, width, text length and
        E_max equal to the engine's. Fields of ``current_env`` that are None are not checked. The plugin library is
        checked by `check_artifact`.
        """
        env = current_env
        if self.kind != "engine":
            raise EngineCompatibilityError(
                "not_an_engine", f"{self.artifact} is an {self.kind} artifact, not an engine"
            )
        gpu_bound = self.compute_capability is not None  # TensorRT-RTX engines record no GPU: they are portable
        here = None if env.compute_capability is None else tuple(env.compute_capability)
        if gpu_bound and here is not None and here != self.compute_capability:
            raise EngineCompatibilityError(
                "compute_capability",
                f"engine {self.artifact} was built for compute capability {_cc(self.compute_capability)} "
                f"({self.gpu_name}), this GPU is {_cc(env.compute_capability)} ({env.gpu_name}); rebuild it here",
            )
        if gpu_bound and env.gpu_name is not None and env.gpu_name != self.gpu_name:
            raise EngineCompatibilityError(
                "gpu",
                f"engine {self.artifact} was built on {self.gpu_name}, this GPU is {env.gpu_name}; rebuild it here",
            )
        if env.tensorrt_version is not None and env.tensorrt_version != self.tensorrt_version:
            raise EngineCompatibilityError(
                "tensorrt_version",
                f"engine {self.artifact} was built with {self.tensorrt_version}, this machine has "
                f"{env.tensorrt_version}; rebuild it here (or install {self.tensorrt_version})",
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
        """The artifact's path, after checking that every named file is inside ``directory`` (`resolve_files`,
        before any file is read) and hashes to the manifest's value (reason ``artifact_hash``; ``plugin_hash`` for
        an engine's plugin library)."""
        files = self.resolve_files(directory)
        path = files[self.artifact]
        if sha256_file(path) != self.artifact_sha256:
            raise EngineCompatibilityError("artifact_hash", f"{path} does not match its manifest's hash; rebuild it")
        for name, digest in self.data_files.items():
            if sha256_file(files[name]) != digest:
                raise EngineCompatibilityError("artifact_hash", f"{files[name]}, needed by {path.name}, has changed")
        if self.plugin_library is not None and sha256_file(files[self.plugin_library]) != self.plugin["sha256"]:
            raise EngineCompatibilityError(
                "plugin_hash",
                f"{files[self.plugin_library]} is not the plugin library {path.name} was built with (its sha256 "
                f"differs from the manifest's {self.plugin['sha256'][:12]}...): put that library back, or rebuild the "
                "engine with this one (deleaker-trt build --plugin)",
            )
        return path


def migrate_manifest(data: Dict[str, Any]) -> Dict[str, Any]:
    """A manifest's JSON object in the current format: format 1 (before LoRA adapters) gains ``loras: []``, its
    artifact having been built from the model's own weights. Raises `ManifestError` for a format this version does
    not read."""
    found = data.get("format")
    if isinstance(found, bool) or found not in READABLE_FORMATS:
        readable = " or ".join(str(f) for f in READABLE_FORMATS)
        raise ManifestError(f"manifest format {found!r} is not {readable}; rebuild the artifact")
    if found == 1:
        if "loras" in data:
            raise ManifestError("manifest fields: format 1 has no loras; rebuild the artifact")
        data = {**data, "loras": [], "format": MANIFEST_FORMAT}
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_file_name(field_name: str, name: Any) -> None:
    """A name a manifest may use for a file: a non-empty relative path without NUL (where it resolves is
    checked against the directory by `EngineManifest.resolve_files`)."""
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute() or name.startswith("~"):
        raise ManifestError(f"manifest {field_name} must name a file relative to its directory, got {name!r}")


def _check_sha256(field_name: str, digest: Any) -> None:
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"manifest {field_name} must be a hex SHA-256 (64 lowercase hex digits), got {digest!r}")


def _cc(cc: Optional[Iterable[int]]) -> str:
    return "unknown" if cc is None else ".".join(str(x) for x in cc)


def plugin_node() -> Dict[str, str]:
    """Name, namespace and version of the plugin the exporter's ``DeLeakerAttention`` node asks TensorRT for."""
    from deleaker.export.node_names import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

    return {"name": OP_TYPE, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION}
