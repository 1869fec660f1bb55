"""``deleaker-trt triton-repo``: a Triton Inference Server model repository for DeLeaker.

Two kinds of model, written into a new folder:

- ``deleaker`` (python backend): the whole generation through `DeLeakerRuntime` (prompt and entities in, the image
  as a ``(H, W, 3)`` uint8 tensor and as PNG bytes with its provenance record out), with Triton's dynamic batching;
  its ``1/model.py`` imports `deleaker.runtime.triton_model`, so the Python that runs Triton's python backend stub
  must have deleaker-trt installed. ``1/runtime.json`` says where the runtime loads from (the model or engine
  folder given, as an absolute path).
- ``deleaker_transformer_<H>x<W>_<precision>`` (platform ``tensorrt_plan``), one per TensorRT engine of an engine
  folder: the engine as ``1/model.plan``, the config's inputs and outputs from the engine's manifest (names, Triton
  data types, dims with ``-1`` for the batch axis; the batch profile in ``parameters``), and the plugin library the
  engine was built with beside it. One transformer step per call: the client runs the scheduler and feeds each
  call's ``history_out`` back as ``history``. Triton's TensorRT backend loads the library through
  ``--backend-config=tensorrt,plugins=...`` (`TritonRepository.backend_config`).

Nothing is written unless every check passes, and nothing that exists is replaced: the repository is staged under
a temporary name beside ``out`` and renamed into place at the end (a failure removes the staging folder only).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deleaker.errors import ConfigError, DeLeakerError
from deleaker.staging import publish_staged, staging_path

if TYPE_CHECKING:
    from .spec import RuntimeSpec

#: The python-backend model's name, inputs and outputs (the client's side of the contract).
PYTHON_MODEL = "deleaker"
#: Largest batch Triton's dynamic batcher hands the python model at once, and how long it waits to fill one.
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 100_000
#: Triton's data type of each contract dtype (`deleaker.export.contract`).
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
#: The plugin library's file name in each tensorrt_plan model folder.
PLUGIN_FILE = "libdeleaker_trt_plugin.so"


class TritonRepoError(DeLeakerError, ValueError):
    """The repository cannot be written (an existing ``--out``, an engine folder without engines, ...)."""


@dataclass(frozen=True)
class TritonRepoSpec:
    """What to write: ``out`` (a folder that does not exist yet) and ``runtime``, where the generation model comes
    from (an engine folder xor a model, with the runtime's options, checked as ``run`` checks them); its paths are
    made absolute here (the server's working folder is not the user's)."""

    out: Path
    runtime: "RuntimeSpec"
    max_batch: int = DEFAULT_MAX_BATCH
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    #: Resolution loaded before the model reports ready (None: the runtime's default size).
    warmup_size: Optional[tuple[int, int]] = None
    #: Folders the python backend's stub puts first on its ``sys.path`` before importing deleaker (see `MODEL_PY`).
    python_path: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for name, value, low, high in (("max_batch", self.max_batch, 1, 64),
                                       ("queue_delay_us", self.queue_delay_us, 0, 10_000_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} ({option}) must be an int in [{low}, {high}], got {value!r:.40}")
        for folder in self.python_path:
            if not Path(folder).is_dir():
                raise TritonRepoError(f"--python-path {folder} is not a folder")
        self.runtime.refuse_flux2("triton-repo")  # its server would load what the runtime does not serve
        check_new_folder(self.out)
        object.__setattr__(self, "runtime", _absolute(self.runtime))


def _absolute(runtime: "RuntimeSpec") -> "RuntimeSpec":
    """``runtime`` with its engine folder, model folder (``tiny`` stays) and cache folder as absolute paths."""
    from deleaker.tiny import TINY_MODEL_NAME

    return dataclasses.replace(
        runtime,
        engines=None if runtime.engines is None else Path(runtime.engines).resolve(),
        model=runtime.model if runtime.model in (None, TINY_MODEL_NAME) else str(Path(runtime.model).resolve()),
        cache_dir=None if runtime.cache_dir is None else Path(runtime.cache_dir).resolve(),
        loras=tuple((adapter.path.resolve(), adapter.scale) for adapter in runtime.loras),
    )


def check_new_folder(out: Path) -> None:
    """Raise `TritonRepoError` unless ``out`` does not exist and its parent is (or can be made) a writable folder."""
    from .images import OutputError, check_output_dir

    out = Path(out)
    if out.exists() or out.is_symlink():
        raise TritonRepoError(
            f"--out {out} exists; give a new folder (a repository is written whole, never into or over anything)"
        )
    try:
        check_output_dir(out.parent, create=True)
    except OutputError as exc:
        raise TritonRepoError(f"--out {out}: {exc}") from None


@dataclass
class TritonRepository:
    """What `write_repository` wrote: the folder, its models, and the plugin library TensorRT's backend loads."""

    path: Path
    models: list[str]
    plugin_library: Optional[Path] = None
    engines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def backend_config(self) -> Optional[str]:
        """``tritonserver``'s option that loads the plugin library (None without TensorRT models)."""
        if self.plugin_library is None:
            return None
        return f"--backend-config=tensorrt,plugins={self.plugin_library}"


def engine_models(engine_dir: Path) -> list[tuple[Path, Any]]:
    """``(engine path, manifest)`` of every TensorRT engine in ``engine_dir``, each checked against its manifest
    (files inside the folder, hashes of the engine and its plugin library) before anything is copied."""
    from deleaker.engines.manifest import MANIFEST_SUFFIX, EngineManifest, ManifestError

    engine_dir = Path(engine_dir)
    found = []
    for manifest_path in sorted(engine_dir.glob(f"*{MANIFEST_SUFFIX}")):
        try:
            manifest = EngineManifest.read(manifest_path)
        except ManifestError as exc:
            raise TritonRepoError(str(exc)) from None
        if manifest.kind != "engine":
            continue
        found.append((manifest.check_artifact(engine_dir), manifest))
    return found


def plan_model_name(manifest: Any) -> str:
    return f"deleaker_transformer_{manifest.height}x{manifest.width}_{manifest.precision}"


def plan_config(name: str, manifest: Any) -> str:
    """``config.pbtxt`` of a ``tensorrt_plan`` model for the engine of ``manifest`` (protobuf text format of
    Triton's ``ModelConfig``). ``max_batch_size: 0``: the engine's inputs carry their batch axis themselves (-1),
    and the shared ones (ids, entity mask, step) have none, so Triton must not add or batch one."""
    from deleaker.export.contract import FluxTransformerIO

    io = FluxTransformerIO.from_dict(manifest.io)
    lo, opt, hi = manifest.batch_range

    def tensor(spec) -> str:
        dims = [-1 if isinstance(d, str) else int(d) for d in spec.shape]
        line = f'    {{ name: "{spec.name}" data_type: {TRITON_DTYPES[spec.dtype]} '
        if not dims:  # a scalar (step): Triton has no 0-d tensors; one element, reshaped to () for the engine
            return line + "dims: [ 1 ] reshape: { shape: [ ] } }"
        return line + f"dims: [ {', '.join(map(str, dims))} ] }}"

    inputs = ",\n".join(tensor(spec) for spec in io.inputs)
    outputs = ",\n".join(tensor(spec) for spec in io.outputs)
    return (
        f"# One transformer step of {manifest.model_id} with DeLeaker ({manifest.precision}, "
        f"{manifest.height}x{manifest.width}, T = {manifest.text_len}, E_max = {manifest.max_entities}), written by "
        "deleaker-trt triton-repo from the engine's manifest.\n"
        "# Feed history_out back as the next call's history. The engine takes batches "
        f"{lo} to {hi} (optimised for {opt}).\n"
        f'name: "{name}"\n'
        'platform: "tensorrt_plan"\n'
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "instance_group [ { kind: KIND_GPU count: 1 } ]\n"
        'default_model_filename: "model.plan"\n'
        f'parameters {{ key: "deleaker_batch_min" value: {{ string_value: "{lo}" }} }}\n'
        f'parameters {{ key: "deleaker_batch_opt" value: {{ string_value: "{opt}" }} }}\n'
        f'parameters {{ key: "deleaker_batch_max" value: {{ string_value: "{hi}" }} }}\n'
    )


def python_config(spec: TritonRepoSpec) -> str:
    """``config.pbtxt`` of the python-backend generation model (see `deleaker.runtime.triton_model` for the
    inputs' meaning). Every input has one element per request except ENTITIES (one per entity: ragged, so that
    requests with different entity counts still batch together)."""
    return (
        "# DeLeaker FLUX.1 generation (deleaker.runtime.triton_model), written by deleaker-trt triton-repo.\n"
        f'name: "{PYTHON_MODEL}"\n'
        'backend: "python"\n'
        f"max_batch_size: {spec.max_batch}\n"
        "input [\n"
        '    { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },\n'
        '    { name: "ENTITIES" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true },\n'
        '    { name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] optional: true },\n'
        '    { name: "STEPS" data_type: TYPE_INT32 dims: [ 1 ] optional: true },\n'
        '    { name: "GUIDANCE" data_type: TYPE_FP32 dims: [ 1 ] optional: true },\n'
        '    { name: "HEIGHT" data_type: TYPE_INT32 dims: [ 1 ] optional: true },\n'
        '    { name: "WIDTH" data_type: TYPE_INT32 dims: [ 1 ] optional: true }\n'
        "]\n"
        "output [\n"
        '    { name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] },\n'
        '    { name: "PNG" data_type: TYPE_STRING dims: [ 1 ] }\n'
        "]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {spec.queue_delay_us} }}\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


#: The python backend's entry point: all logic lives in the installed package, so a repository does not go stale.
#: Triton's stub embeds its interpreter in isolated mode (pybind11's default): it ignores ``PYTHONPATH`` and
#: ``PYTHONHOME`` and sees only its libpython's own site-packages. ``runtime.json``'s ``python_path`` (``triton-repo
#: --python-path``) puts other folders first, their ``.pth`` files processed (a venv's site-packages, editable
#: installs included), e.g. a folder with ``numpy<2`` for a stub built before numpy 2.
MODEL_PY = '''"""Triton python-backend model written by deleaker-trt triton-repo: see deleaker.runtime.triton_model."""

import json
import site
import sys
from pathlib import Path

# The stub's interpreter ignores PYTHONPATH: the folders `triton-repo --python-path` named go first.
_FOLDERS = json.loads((Path(__file__).with_name("runtime.json")).read_text()).get("python_path") or []
sys.path[:0] = [folder for folder in _FOLDERS if folder not in sys.path]
for _folder in _FOLDERS:
    site.addsitedir(_folder)

from deleaker.runtime.triton_model import TritonPythonModel  # noqa: E402,F401  (the class Triton looks for)
'''


def write_repository(spec: TritonRepoSpec) -> TritonRepository:
    """Write the repository of ``spec`` (see the module docstring); returns what was written.

    Checks first, writing nothing: ``out`` is new, the runtime options are valid, every engine of an engine folder
    matches its manifest, and all its engines share one plugin library (TensorRT's registry takes one creator per
    plugin name and process, and one server loads them all).
    """
    runtime = spec.runtime
    plans = engine_models(runtime.engines) if runtime.engines is not None else []
    libraries = {manifest.plugin["sha256"] for _, manifest in plans}
    if len(libraries) > 1:
        raise TritonRepoError(
            f"the engines of {runtime.engines} were built with {len(libraries)} different plugin libraries; one "
            "Triton server loads one: rebuild them with one library"
        )
    names = [plan_model_name(manifest) for _, manifest in plans]
    if len(set(names)) != len(names):
        raise TritonRepoError(f"{runtime.engines} has several engines of one resolution and precision: {names}")

    out = Path(spec.out)
    staging = staging_path(out)  # the one form of our staging names (deleaker.staging)
    try:
        staging.mkdir(parents=True)
        model_dir = staging / PYTHON_MODEL
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(python_config(spec))
        (model_dir / "1" / "model.py").write_text(MODEL_PY)
        (model_dir / "1" / "runtime.json").write_text(json.dumps(runtime_record(spec), indent=2) + "\n")
        engines = []
        for (plan, manifest), name in zip(plans, names):
            folder = staging / name
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(plan, folder / "1" / "model.plan")
            shutil.copyfile(Path(runtime.engines) / manifest.plugin_library, folder / PLUGIN_FILE)
            (folder / "config.pbtxt").write_text(plan_config(name, manifest))
            engines.append({"model": name, "engine": str(plan), "precision": manifest.precision,
                            "height": manifest.height, "width": manifest.width})
        if out.exists() or out.is_symlink():  # appeared while we wrote: leave it alone
            raise TritonRepoError(f"--out {out} appeared while the repository was written; nothing was replaced")
        publish_staged(staging, out, whole=True)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise TritonRepoError(f"cannot write the repository {out}: {exc.strerror or exc}") from None
        raise
    library = (out.resolve() / names[0] / PLUGIN_FILE) if names else None
    return TritonRepository(out, [PYTHON_MODEL, *names], library, engines)


def runtime_record(spec: TritonRepoSpec) -> dict[str, Any]:
    """``runtime.json``: the `RuntimeSpec` fields the python model opens its runtime with, paths made absolute."""
    runtime = spec.runtime
    record = {
        "engines": None if runtime.engines is None else str(runtime.engines),
        "model": runtime.model,
        "backend": runtime.backend,
        "text_len": runtime.text_len,
        "max_entities": runtime.max_entities,
        "cache_dir": None if runtime.cache_dir is None else str(runtime.cache_dir),
        "deleaker_overrides": [list(pair) for pair in runtime.deleaker_overrides],
        "precision": runtime.precision,
        "warmup_size": None if spec.warmup_size is None else list(spec.warmup_size),
        "python_path": [str(Path(folder).resolve()) for folder in spec.python_path],
    }
    if runtime.loras:  # only with adapters: the runtime.json of a repository without any keeps its fields
        record["loras"] = [[str(adapter.path), adapter.scale] for adapter in runtime.loras]
    return record
