"""Loading a directory of built artifacts (TensorRT engines or ONNX files, each with its manifest).

A directory holds one artifact per resolution, each beside ``<artifact>.manifest.json``
(``deleaker.engines.manifest.EngineManifest``). Loading checks, before any generation:

- the directory exists and has at least one manifest of the wanted kind;
- every manifest parses and is well-formed (types, knobs validated like `--set`, shapes within the runtime's
  limits), and all agree on the model, ``T``, ``E_max`` and DeLeaker knobs (one runtime, one model); each
  manifest's contract is the one the model's transformer config gives for its sizes; an ONNX's
  ``DeLeakerAttention`` nodes carry its manifest's knobs, grid and block count, one node per block;
- every file a manifest names resolves, after symlinks, inside the directory (checked before any file is read),
  and an ONNX's external data files are all named by its manifest;
- each artifact's bytes hash to its manifest's ``artifact_sha256`` (a truncated or corrupted file is refused);
- engines: the plugin library they were built with is in the directory, unchanged (its SHA-256 is the manifest's)
  and able to run (not a check build without cuDNN's attention); all engines name the same library and TensorRT
  release; the TensorRT importable here is that release, and a GPU visible here is the one TensorRT proper built
  for (``EngineManifest.check_compatible``). Without TensorRT or a GPU the directory still loads, so requests can
  be validated (resolution, prompt, entities); the first generation then raises their absence before any model
  runs. The TensorRT backend loads the directory's plugin library into TensorRT before it deserializes an engine.

ONNX files run in ONNX Runtime on the CPU in their portable form (`deleaker.export.portable`: float32, DeLeaker as
standard ONNX operators), made once per artifact into the runtime's ONNX cache: what ``deleaker-trt build
--onnx-only`` writes (fp16/bf16/fp8, with the TensorRT plugin's custom nodes) runs on a machine without TensorRT,
and needs no plugin library.

Text encoders and the VAE come from the model the manifests name (``tiny`` or a diffusers folder).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError, DeLeakerError, ShapeError
from deleaker.geometry import vae_scale_factor
from deleaker.lora import check_loras, describe_records, lora_records, same_adapters

from deleaker.models import load_components, transformer_config, transformer_sha256

from .backends import OnnxRuntimeBackend, TransformerBackend, resolve_device
from .memory import AttentionMemory
from .onnx_cache import default_cache_dir
from .schedule import ShiftConfig
from .sources import PerResolution
from .tensorrt_backend import TensorRTBackend
from .text import TextEncoders

#: The runtime class `load_engine_dir` makes (`DeLeakerRuntime`; passed in, so this module does not import it).
RuntimeT = TypeVar("RuntimeT")

#: Manifest kind -> backend that runs it.
KIND_BACKENDS = {"engine": "tensorrt", "onnx": "onnxruntime"}


class EngineDirError(DeLeakerError, ValueError):
    """An engine directory is missing, empty, or its manifests disagree."""


def _manifest_module():
    from deleaker.engines import manifest

    return manifest


def read_manifests(engine_dir: Path) -> list[Any]:
    """Every ``*.manifest.json`` of ``engine_dir``, parsed (raises `EngineDirError` / ``ManifestError``)."""
    manifest = _manifest_module()
    if not engine_dir.exists():
        raise EngineDirError(f"engine directory {engine_dir} does not exist")
    if not engine_dir.is_dir():
        raise EngineDirError(f"{engine_dir} is not a directory")
    paths = sorted(engine_dir.glob("*" + manifest.MANIFEST_SUFFIX))
    if not paths:
        raise EngineDirError(
            f"{engine_dir} has no *{manifest.MANIFEST_SUFFIX} files: build engines with `deleaker-trt build`"
        )
    return [manifest.EngineManifest.read(p) for p in paths]


def current_environment(built_with: str) -> Any:
    """The `Environment` of this process: the TensorRT release importable here (``built_with``'s package first, a
    `tensorrt_release` string) and the GPU. Either is None where there is none: engines cannot run here then, the
    directory still loads so requests can be validated, and the first generation raises the reason."""
    from deleaker.plugins.trt_library import TensorRTUnavailableError, import_tensorrt, release_module, tensorrt_release

    manifest = _manifest_module()
    try:
        release = tensorrt_release(import_tensorrt(prefer=release_module(built_with)))
    except TensorRTUnavailableError:
        release = None
    gpu_name, capability = manifest.cuda_environment()
    return manifest.Environment(gpu_name=gpu_name, compute_capability=capability, tensorrt_version=release)


def load_engine_dir(
    cls: Callable[..., RuntimeT],
    engine_dir: str | Path,
    *,
    backend: Optional[str] = None,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    cuda_graph: bool = True,
    ort_providers: Optional[list[str]] = None,
    cache_dir: str | Path | None = None,
    loras: Optional[Sequence[Any]] = None,
) -> RuntimeT:
    """``cls`` (a `DeLeakerRuntime`) for ``engine_dir``; ``backend`` picks the artifact kind when both exist
    (default: TensorRT engines if there are any, else ONNX files), ``precision`` (fp16, bf16, fp8) the artifacts
    when the directory has several precisions of one resolution. ``device``: the GPU of TensorRT engines
    (``cuda[:N]``); ONNX files run on the CPU. ``cache_dir``: where ONNX files are converted for ONNX Runtime
    (default `deleaker.runtime.onnx_cache.default_cache_dir`). ``loras``: None runs the engines as built (with the
    LoRA adapters their manifests record, fused in); a list (`deleaker.lora.check_loras`) must be those adapters, in
    order, with their scales (content hashes compared), else `EngineDirError`: engines bake their adapters in."""

    adapters = None if loras is None else check_loras(loras)
    start = time.perf_counter()
    engine_dir = Path(engine_dir)
    manifests = read_manifests(engine_dir)
    kinds = {m.kind for m in manifests}
    if backend is None:
        backend = "tensorrt" if "engine" in kinds else "onnxruntime"
    wanted_kind = {v: k for k, v in KIND_BACKENDS.items()}.get(backend)
    if wanted_kind is None:
        raise ConfigError(
            f"backend {backend!r} cannot run an engine directory; allowed: {sorted(KIND_BACKENDS.values())}"
        )
    chosen = [m for m in manifests if m.kind == wanted_kind]
    if not chosen:
        raise EngineDirError(
            f"{engine_dir} has no {wanted_kind} artifacts for the {backend} backend (it has: {sorted(kinds)})"
        )
    if wanted_kind == "onnx" and device is not None and str(device) != "cpu":
        raise ConfigError(f"ONNX files run in ONNX Runtime on the CPU; device {str(device)!r} is for TensorRT engines")
    if wanted_kind == "engine" and device is not None:
        device = str(resolve_device(device, default="cuda"))

    if precision is not None:
        available = sorted({m.precision for m in chosen})
        chosen = [m for m in chosen if m.precision == precision]
        if not chosen:
            raise EngineDirError(f"{engine_dir} has no {precision} {wanted_kind} artifacts (it has: {available})")
    sizes = [(m.height, m.width) for m in chosen]
    for size in sorted(set(sizes)):
        if sizes.count(size) > 1:
            precisions = sorted(m.precision for m in chosen if (m.height, m.width) == size)
            raise EngineDirError(
                f"{engine_dir} has {len(precisions)} {wanted_kind} artifacts for {size[0]}x{size[1]} "
                f"({', '.join(precisions)}); choose one with --precision"
            )

    first = chosen[0]
    for m in chosen[1:]:
        for what in (
            "model_id", "model_sha256", "text_len", "max_entities", "deleaker_config", "precision", "plugin",
            "tensorrt_version", "loras",
        ):
            if getattr(m, what) != getattr(first, what):
                raise EngineDirError(
                    f"manifests in {engine_dir} disagree on {what}: {m.artifact} has {getattr(m, what)!r}, "
                    f"{first.artifact} has {getattr(first, what)!r}; keep one model's artifacts per directory"
                )

    if adapters is not None and not same_adapters(first.loras, adapters):
        raise EngineDirError(
            f"the engines in {engine_dir} were built with {describe_records(first.loras)}; --lora gave "
            f"{describe_records(lora_records(adapters))}. Adapters are fused into an engine's weights when it is "
            "built: run it without --lora (as built) or with the same adapters and scales, or build engines with "
            "these (`deleaker-trt build --lora`)"
        )

    from deleaker.export.contract import FluxTransformerIO
    from deleaker.models import FLUX2_RUNTIME_MESSAGE

    if first.io.get("family") == "flux2":  # before any artifact is read
        raise EngineDirError(f"{engine_dir} holds engines of {first.model_id}, which {FLUX2_RUNTIME_MESSAGE}")

    env = current_environment(first.tensorrt_version) if wanted_kind == "engine" else None

    plugin = None
    if wanted_kind == "engine":
        from deleaker.plugins.trt_library import PluginLibrary

        plugin = PluginLibrary.from_record(first.plugin, engine_dir)  # the same for all (checked above)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaders: dict[tuple[int, int], Callable[[], TransformerBackend]] = {}
    contracts = {}
    for m in chosen:
        key = (m.height, m.width)
        path = m.check_artifact(engine_dir)  # paths inside the directory, then hashes: refuses escapes and damage
        if env is not None:
            m.check_compatible(env)
        io = FluxTransformerIO.from_dict(m.io)
        contracts[key] = io
        if wanted_kind == "engine" and io.batch_min > 1:
            # The runtime makes one image per call; TensorRT runs no batch below the profile's minimum (found out
            # at the first step otherwise). ONNX Runtime ignores profiles: an ONNX runs at any batch.
            raise EngineDirError(
                f"{m.artifact} has the batch profile ({io.batch_min}, {io.batch_opt}, {io.batch_max}); this runtime "
                "runs batch 1, which the engine does not take: build it with --batch 1 OPT MAX to serve it here"
            )
        if wanted_kind == "engine":
            loaders[key] = lambda p=path, io=io, built_with=m.tensorrt_version: TensorRTBackend(
                p, io, plugin, built_with, cuda_graph=cuda_graph, device=device or "cuda"
            )
        else:
            portable = _check_onnx(path, m, io)
            loaders[key] = lambda p=path, m=m, io=io, portable=portable: _onnx_backend(
                p, m, io, cache, ort_providers, portable
            )
    if plugin is not None:
        plugin.check_can_run()
    components, _ = load_components(first.model_id, with_transformer=False)
    config_of_transformer = transformer_config(first.model_id, components)
    transformer = components.pop("transformer", None)
    if transformer is not None:  # in memory anyway (the tiny model): check the engines were built from it
        if transformer_sha256(transformer) != first.model_sha256:
            raise EngineDirError(
                f"{first.artifact} was built from other weights than the model {first.model_id!r} loads now; "
                "rebuild the engines"
            )
        del transformer
    # ONNX files run in float32 (their portable form); engines in their own precision.
    dtype = _torch_dtype(first.io["dtype"]) if wanted_kind == "engine" else torch.float32
    # Without CUDA an engine directory still loads on the CPU (requests can be validated); its TensorRT backend
    # then refuses to start with a clear error.
    gpu = wanted_kind == "engine" and torch.cuda.is_available()
    run_device = torch.device(device or "cuda") if gpu else torch.device("cpu")
    # T5 overflows in fp16: the encoders and the VAE run in bf16 on the GPU (as FLUX.1 ships), fp32 on the CPU.
    parts_dtype = torch.bfloat16 if run_device.type == "cuda" else torch.float32
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = components[name]
        if next(module.parameters()).dtype != parts_dtype:
            module.to(dtype=parts_dtype)
        module.to(run_device)
    scale = vae_scale_factor(components["vae"].config)
    for m in chosen:
        io = contracts[(m.height, m.width)]
        try:
            expected = FluxTransformerIO.from_config(
                config_of_transformer,
                height=m.height,
                width=m.width,
                text_len=m.text_len,
                max_entities=m.max_entities,
                vae_scale_factor=scale,
                batch=(io.batch_min, io.batch_opt, io.batch_max),
                dtype=io.dtype,
            )
        except DeLeakerError as exc:
            raise EngineDirError(f"{m.artifact} does not fit the model {first.model_id}: {exc}") from exc
        if expected != io:
            raise EngineDirError(
                f"{m.artifact} was built for another model than {first.model_id}: its contract is {io}, the model's "
                f"{expected}"
            )
    memory = None
    if wanted_kind == "onnx":  # runs on this machine's CPU: refuse sizes that do not fit its memory
        memory = AttentionMemory.of(
            config_of_transformer, text_len=first.text_len, max_entities=first.max_entities, patch=2 * scale
        )
    source = PerResolution(backend, 2 * scale, loaders, memory=memory)
    default_size = min(loaders, key=lambda hw: hw[0] * hw[1])
    runtime = cls(
        text=TextEncoders(
            components["tokenizer"], components["text_encoder"], components["tokenizer_2"], components["text_encoder_2"]
        ),
        vae=components["vae"],
        transformer_config=config_of_transformer,
        source=source,
        shift=ShiftConfig.from_scheduler_config(components["scheduler"].config),
        text_len=first.text_len,
        max_entities=first.max_entities,
        default_size=default_size,
        dtype=dtype,
        device=run_device,
        load_seconds=time.perf_counter() - start,
        model_source=first.model_id,
        deleaker_config=first.deleaker_config,
        lora_records=first.loras,
    )
    return runtime


def _onnx_backend(
    path: Path, manifest: Any, io: Any, cache_dir: Path, providers: Optional[list[str]], portable: bool
) -> TransformerBackend:
    """ONNX Runtime on an engine directory's ONNX: as it is when it is float32 standard ONNX already, else (with
    ``portable``, from `_check_onnx`) its portable form from the cache."""
    from .onnx_cache import portable_backend

    config = DeLeakerConfig(**manifest.deleaker_config)
    if not portable:
        return OnnxRuntimeBackend(path, io, providers=providers, config=config)
    return portable_backend(
        path,
        artifact_sha256=manifest.artifact_sha256,
        data_files=manifest.data_files,
        io=io,
        config=config,
        cache_dir=cache_dir,
        providers=providers,
    )


def _check_onnx(path: Path, manifest: Any, io: Any) -> bool:
    """Refuse an ONNX whose weights live in files its manifest does not name (and so did not check), or whose
    recorded contract or DeLeaker config is not its manifest's; else say whether ONNX Runtime needs its portable
    form (`deleaker.export.portable.needs_portable`). Reads the graph, not the weights: before any conversion."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf's decode errors have no common type)
        raise EngineDirError(f"{path} is not a readable ONNX file: {exc}") from exc
    from deleaker.export.portable import external_data_locations, needs_portable

    named = set(manifest.data_files)
    for location in sorted(external_data_locations(model)):
        if location not in named:
            raise EngineDirError(
                f"{path.name} reads weights from {location!r}, which its manifest does not name (data_files: "
                f"{sorted(named)}); rebuild the directory"
            )
    from deleaker.export.ort_session import check_recorded_contract

    metadata = {p.key: p.value for p in model.metadata_props}
    try:
        check_recorded_contract(metadata, io, path.name, DeLeakerConfig(**manifest.deleaker_config))
    except ShapeError as exc:
        raise EngineDirError(f"{exc}, as its manifest says; rebuild the directory") from None
    _check_node_attributes(model, metadata, path, manifest, io)
    return needs_portable(model)


def _check_node_attributes(model: Any, metadata: dict[str, str], path: Path, manifest: Any, io: Any) -> None:
    """Refuse a graph whose ``DeLeakerAttention`` nodes would run other knobs, another grid or other blocks than
    its manifest says: the nodes' attributes are what ONNX Runtime (and TensorRT) run, while the image record and
    the metadata check above read the manifest, so an edited and rehashed graph would otherwise run unnoticed."""
    from deleaker.export.exporter import META_DECOMPOSED
    from deleaker.export.onnx_node import config_from_attributes, node_attributes
    from deleaker.export.portable import check_custom_nodes

    try:
        nodes = check_custom_nodes(model)
    except DeLeakerError as exc:
        raise EngineDirError(f"{path.name}: {exc}; rebuild the directory") from None
    decomposed = metadata.get(META_DECOMPOSED) == "1"
    if not nodes and decomposed:
        return  # standard ONNX already: its knobs are constants, recorded in the metadata checked above
    # The manifest's knobs as the nodes store them (float32 attributes), so equal knobs compare equal.
    config = DeLeakerConfig(**manifest.deleaker_config)
    _, _, grid, wanted = config_from_attributes(node_attributes(block_offset=0, num_blocks=io.num_blocks, grid=io.grid,
                                                                config=config))
    expected = {"num_blocks": io.num_blocks, "grid": grid, **dataclasses.asdict(wanted)}
    for node in nodes:
        got = {"num_blocks": node.num_blocks, "grid": node.grid, **dataclasses.asdict(node.config)}
        differ = [f"{name}={got[name]!r} where its manifest says {value!r}" for name, value in expected.items()
                  if got[name] != value]
        if differ:
            raise EngineDirError(
                f"{path.name}: its DeLeakerAttention node {node.node.name or node.node.output[0]} has "
                f"{', '.join(differ)}; rebuild the directory"
            )
    offsets = sorted(node.block_offset for node in nodes)
    if offsets != list(range(io.num_blocks)):
        raise EngineDirError(
            f"{path.name} has DeLeakerAttention nodes for block offsets {offsets}; the model's {io.num_blocks} "
            "joint attentions need one node each (offsets 0 to num_blocks - 1); rebuild the directory"
        )


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
