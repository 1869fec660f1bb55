"""Build the DeLeaker FLUX transformer: ONNX export, optional FP8 Q/DQ, TensorRT engine, manifests.

`build_engines(BuildRequest) -> BuildResult` is the one library call behind ``deleaker-trt build``. Stages:

0. unless ``onnx_only``: TensorRT imports, can host the plugin library, and (TensorRT proper) has a GPU, with FP8
   for fp8: checked before any work;
1. load the model (``tiny`` or a diffusers folder) and make its I/O contract (`FluxTransformerIO`);
2. export the ONNX (one ``DeLeakerAttention`` node per joint attention) in the engine's float dtype, or reuse the
   ONNX already in the output folder when its manifest matches (same weights, contract, knobs, plugin, precision);
3. fp8: calibrate per-tensor E4M3 scales on prompts and insert Q/DQ (`deleaker.engines.fp8`);
4. write the ONNX and its manifest (temp file, then rename);
5. unless ``onnx_only``: TensorRT (``tensorrt``, else ``tensorrt_rtx``), with the plugin library
   (``plugin_library``, built by ``deleaker-trt plugin``) copied into the output folder and loaded into TensorRT's
   plugin registry from there. Polygraphy's loaders build it (`deleaker.engines.loaders`), composed as
   ``save_engine(build_serialized_engine(network_from_onnx(path, trt, plugin), io, ...), path)``; the network is
   strongly typed (precision comes from the ONNX's dtypes and Q/DQ nodes), with one optimization profile (the
   contract's batch min/opt/max) and a timing cache kept in the output folder. TensorRT proper builds on the GPU
   the engine is for; TensorRT-RTX builds without a GPU (its engines are portable across the GPUs it supports).
6. the engine's manifest: the TensorRT release, the GPU (TensorRT proper) and the plugin library's record
   (file name, SHA-256, build info), which ``run --engines`` checks before any work.

One folder holds one plugin library (TensorRT's registry takes one per plugin name and process): a build refuses
to replace the folder's library while another engine of the folder was built with it.

Every failure is a typed `DeLeakerError` raised after cleaning up: no half-written engine is ever left behind.

Over 400 lines, one job: the stages above in their order, each a short function; the folder's names and checks
(`deleaker.engines.folder`), the loaders (`deleaker.engines.loaders`), FP8 (`deleaker.engines.fp8`) and the
manifests (`deleaker.engines.manifest`) already live apart, and what is left is the sequence a reader follows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from deleaker.config import DeLeakerConfig
from deleaker.geometry import vae_scale_factor
from deleaker.errors import ConfigError

from deleaker.locks import exclusive_lock
from deleaker.folders import make_output_folder
from deleaker.lora import lora_records
from deleaker.staging import make_staging_dir, publish_staged
from deleaker.export.limits import PRECISIONS  # noqa: F401 (API)
from deleaker.plugins.trt_library import (
    check_tensorrt_can_host,
    import_tensorrt,
    inspect_plugin_library,
    tensorrt_release,
)

from . import fp8 as fp8_lib
from .folder import (  # noqa: F401 (API: the folder's names and checks, used here and by the tests)
    BUILD_LOCK_NAME,
    FOLDER_INVARIANTS,
    TIMING_CACHE_NAME,
    DiskFullError,
    check_folder_agrees,
    check_plugin_slot,
    disk_guard,
    install_plugin_library,
    remove_stale_staging,
    reusable_onnx,
    save_engine,
)
from .loaders import BuildError, Network, build_serialized_engine, network_from_onnx, polygraphy_backend  # noqa: F401
from .request import DEFAULT_CALIBRATION_PROMPTS, DEFAULT_CALIBRATION_SIGMAS, BuildRequest  # noqa: F401 (API)
from .manifest import (
    ONNX_DTYPES,
    EngineManifest,
    cuda_environment,
    plugin_node,
    sha256_file,
)


class ModelNotFoundError(ConfigError):
    """``--model`` is neither ``tiny`` nor a loadable diffusers FLUX folder."""


@dataclass(frozen=True)
class BuildResult:
    """Paths written and seconds per stage. ``engine_path`` is None for ``onnx_only``."""

    onnx_path: Path
    onnx_manifest: Path
    engine_path: Optional[Path]
    engine_manifest: Optional[Path]
    timings_s: Dict[str, float]
    reused_onnx: bool


Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------------------------


class _Stages:
    """Times named stages and reports them through ``progress``."""

    def __init__(self, progress: Optional[Progress]) -> None:
        self.progress = progress
        self.timings: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        if self.progress:
            self.progress(f"{what}...")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        if self.progress:
            self.progress(f"{what}: done in {self.timings[name]:.1f} s")


def load_model(model: str) -> Tuple[Dict[str, Any], str]:
    """``(FluxPipeline components, model id)`` of ``tiny`` or a diffusers folder; raises `ModelNotFoundError`."""
    from deleaker.models import load_components

    try:
        return load_components(model)
    except ConfigError as err:
        raise ModelNotFoundError(f"--model: {err}") from err


def export_onnx(transformer: torch.nn.Module, io: Any, config: DeLeakerConfig, path: Path) -> Path:
    """Export the DeLeaker transformer (custom ``DeLeakerAttention`` nodes, ``io.dtype``) to ``path`` (atomic).

    The export helper's `export_transformer_onnx` (checked, optimized, batch axis kept dynamic).
    """
    from deleaker.export.exporter import export_transformer_onnx

    return export_transformer_onnx(transformer, io, path, config=config).onnx_path


def export_fp8_onnx(
    transformer: torch.nn.Module,
    io: Any,
    config: DeLeakerConfig,
    scales: Mapping[str, "fp8_lib.LinearScales"],
    path: Path,
) -> Any:
    """Export like `export_onnx`, insert the E4M3 Q/DQ nodes, write ``path``; returns the Q/DQ ``ModelProto``."""
    import onnx

    staging = make_staging_dir(path)
    try:
        plain = export_onnx(transformer, io, config, staging / path.name)
        weights = {name: layer.weight for name, layer in fp8_lib.quantizable_linears(transformer).items()}
        model = fp8_lib.insert_fp8_qdq(onnx.load(str(plain)), scales, weights)
        save_onnx(model, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def save_onnx(model: Any, path: Path) -> None:
    """Write ``model`` at ``path`` atomically; weights go to ``<name>.data`` beside it when the model is large."""
    import onnx

    from deleaker.export.exporter import EXTERNAL_DATA_THRESHOLD

    tmp_dir = make_staging_dir(path)
    with disk_guard(tmp_dir):
        large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD  # the exporter's: one protobuf limit, one threshold
        data_name = path.name + ".data"
        try:
            onnx.save_model(model, str(tmp_dir / path.name), save_as_external_data=large, location=data_name)
            publish_staged(tmp_dir, path)  # the data file first, the model last
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def calibration_batches(
    components: Mapping[str, Any], io: Any, prompts: Sequence[str], sigmas: Sequence[float], seed: int = 0
) -> List[Dict[str, torch.Tensor]]:
    """Contract inputs for FP8 calibration: each prompt, encoded by the model's own text encoders, at each sigma.

    Latents are seeded standard normal (what the denoiser sees at sigma 1, roughly its input scale later); the
    step index follows the sigma's position, so DeLeaker's windows behave as in a real run.
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        **{
            k: components[k]
            for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
        }
    )
    batches = []
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=io.text_len)
            for k, sigma in enumerate(sigmas):
                batch = io.sample_inputs(batch=io.batch_min, seed=seed + 1000 * p + k, step=k)
                batch["encoder_hidden_states"] = prompt_embeds.to(batch["encoder_hidden_states"].dtype)
                batch["pooled_projections"] = pooled.to(batch["pooled_projections"].dtype)
                batch["timestep"] = torch.full_like(batch["timestep"], float(sigma))
                batches.append(batch)
    return batches


def calibrate_fp8(
    transformer: torch.nn.Module, io: Any, config: DeLeakerConfig, batches: Sequence[Dict[str, torch.Tensor]]
) -> Dict[str, "fp8_lib.LinearScales"]:
    """Per-tensor E4M3 scales of the quantizable linears, from the DeLeaker model run on ``batches``.

    ``io`` must have the transformer's current dtype (calibrate in float32, before casting for export).
    """
    from deleaker.export.wrapper import make_wrapper

    wrapper = make_wrapper(transformer, io, config).eval()
    return fp8_lib.calibrate(transformer, lambda batch: wrapper(*batch.values()), batches)


def quantization_record(scales: Mapping[str, "fp8_lib.LinearScales"], model: Any, batches: int) -> Dict[str, Any]:
    """What the manifest records about the FP8 quantization."""
    return {
        "format": "float8_e4m3fn",
        "granularity": "per-tensor",
        "high_precision_modules": list(fp8_lib.HIGH_PRECISION_MODULES),
        "calibration_batches": batches,
        "scales": {name: dataclasses.asdict(s) for name, s in scales.items()},
        "qdq": fp8_lib.qdq_summary(model),
    }


# ---------------------------------------------------------------------------------------------------------------
# The one call
# ---------------------------------------------------------------------------------------------------------------


def _build_target(request: BuildRequest, library: Any) -> Tuple[Any, Optional[str], Optional[Tuple[int, int]]]:
    """``(tensorrt module, GPU name, compute capability)`` an engine of ``request`` is built with; the GPU is None
    for TensorRT-RTX, which builds without one for every GPU it supports. Raises `TensorRTUnavailableError`,
    `PluginLibraryError` (this TensorRT cannot host ``library``) or `BuildError` (no GPU, or no FP8 on it)."""
    trt = import_tensorrt()
    check_tensorrt_can_host(library, trt)
    polygraphy_backend(trt)  # Polygraphy's loaders build it: installed, and driving this TensorRT
    gpu_name, capability = None, None
    if trt.__name__ == "tensorrt":  # TensorRT proper builds for the GPU it runs on
        gpu_name, capability = cuda_environment()
        if capability is None:
            raise BuildError("building a TensorRT engine needs a CUDA GPU; none is visible")
        if request.precision == "fp8":
            try:
                fp8_lib.check_fp8_capable(capability)
            except ConfigError as err:
                raise BuildError(str(err)) from err
    return trt, gpu_name, capability


def build_engines(request: BuildRequest, progress: Optional[Progress] = None) -> BuildResult:
    """Build what ``request`` asks for into ``request.out_dir`` (see the module docstring for the stages).

    Raises:
        ModelNotFoundError: bad ``model``. ConfigError: bad sizes for the model.
        PluginLibraryError: ``plugin_library`` is not a DeLeaker plugin library (before any work), or this TensorRT
            cannot load it.
        TensorRTUnavailableError: TensorRT is not importable (before any work, unless ``onnx_only``).
        BuildError: no GPU for TensorRT proper, the GPU lacks FP8 (both before any work), TensorRT cannot
            parse/build, or the folder's plugin library belongs to other engines.
        DiskFullError: no space left (partial files removed).
    """
    from deleaker.export.contract import FluxTransformerIO, dtype_name
    from deleaker.export.limits import check_size

    from deleaker.models import is_flux2_model

    if request.precision == "fp8" and is_flux2_model(request.model):
        # The calibration encodes prompts with FLUX.1's CLIP and T5 (`calibration_batches`).
        raise ConfigError(
            f"--precision fp8 calibrates on prompts encoded as FLUX.1 encodes them; {request.model} is a FLUX.2 "
            "model: build it in fp16 or bf16"
        )
    stage = _Stages(progress)
    out_dir = Path(request.out_dir)
    library = None if request.plugin_library is None else inspect_plugin_library(request.plugin_library)
    # TensorRT, the GPU it builds for and the library's fit, before the model loads and the ONNX exports (minutes
    # for FLUX.1-dev): an engine that cannot be built is answered first.
    target = None if request.onnx_only else _build_target(request, library)
    with stage("load", f"loading model {request.model}"):
        components, model_id = load_model(request.model)
        transformer = components["transformer"].eval()
        dtype = ONNX_DTYPES[request.precision]
        # The model's multiple, before any export (the request checked every bound that needs no model).
        check_size(request.height, request.width, 2 * vae_scale_factor(components["vae"].config))
        io = FluxTransformerIO.from_transformer(
            transformer,
            height=request.height,
            width=request.width,
            text_len=request.text_len,
            max_entities=request.max_entities,
            vae_scale_factor=vae_scale_factor(components["vae"].config),
            batch=request.batch,
            dtype=dtype,
        )
        config = DeLeakerConfig.resolve(request.deleaker_config, io.num_blocks)
        from deleaker.models import transformer_sha256  # the hash the runtime's ONNX cache uses too

        model_hash = transformer_sha256(transformer)  # the model's own weights; the adapters are recorded apart
    if request.loras:
        with stage("lora", f"fusing {len(request.loras)} LoRA adapter(s) into the transformer"):
            from deleaker.lora_fusion import fuse_loras

            # The transformer only: the text encoders run outside the engine, from the model folder.
            fuse_loras(components, request.loras, targets=("transformer",))
    make_output_folder(out_dir, "the output folder (--out)")

    # One build at a time per folder: a second one waits, then reuses what the first wrote. Holding the lock
    # also means every staging file or folder of ours in it is stale (a build that was killed): removed here.
    with exclusive_lock(out_dir / BUILD_LOCK_NAME):
        remove_stale_staging(out_dir)
        onnx_path = out_dir / f"{request.artifact_stem}.onnx"
        engine_path = out_dir / f"{request.artifact_stem}.plan"
        if library is not None:
            check_plugin_slot(out_dir, library, engine_path.name)
        expected = {
            "model_sha256": model_hash,
            "precision": request.precision,
            "io": io.to_dict(),
            "deleaker_config": dataclasses.asdict(config),
            "plugin": plugin_node(),
            "loras": lora_records(request.loras),
        }
        check_folder_agrees(
            out_dir,
            request.artifact_stem,
            {**expected, "model_id": model_id, "text_len": request.text_len, "max_entities": request.max_entities},
        )
        reused = reusable_onnx(onnx_path, expected)
        if reused:
            if progress:
                progress(f"reusing {onnx_path} (its manifest matches this request)")
            onnx_manifest = EngineManifest.read(onnx_path)
        else:
            scales, quantization = None, None
            if request.precision == "fp8":
                with stage("calibrate", f"calibrating FP8 scales on {len(request.calibration_prompts)} prompts"):
                    # Calibrate in the loaded precision (float32 for diffusers' default), before the cast for export.
                    calib_io = dataclasses.replace(io, dtype=dtype_name(next(transformer.parameters()).dtype))
                    batches = calibration_batches(
                        components, calib_io, request.calibration_prompts, request.calibration_sigmas
                    )
                    scales = calibrate_fp8(transformer, calib_io, config, batches)
            data_path = onnx_path.with_name(onnx_path.name + ".data")  # external weights of a > 2 GB model
            # An ONNX without its manifest is an artifact nothing may use: any failure or interrupt from the export
            # to the manifest's write (the last, atomic step) removes both files.
            with disk_guard(onnx_path, data_path):
                with stage("export", f"exporting ONNX ({dtype})"):
                    # a stale manifest must not outlive its ONNX
                    EngineManifest.path_for(onnx_path).unlink(missing_ok=True)
                    transformer.to(io.spec("hidden_states").torch_dtype)
                    if scales is None:
                        export_onnx(transformer, io, config, onnx_path)
                    else:
                        model = export_fp8_onnx(transformer, io, config, scales, onnx_path)
                        quantization = quantization_record(scales, model, len(batches))
                with stage("manifest", f"hashing {onnx_path.name}, writing its manifest"):
                    onnx_hash = sha256_file(onnx_path)
                    data_files = {data_path.name: sha256_file(data_path)} if data_path.is_file() else {}
                    onnx_manifest = EngineManifest(
                        kind="onnx",
                        artifact=onnx_path.name,
                        artifact_sha256=onnx_hash,
                        model_id=model_id,
                        onnx_sha256=onnx_hash,
                        quantization=quantization,
                        data_files=data_files,
                        timings_s=dict(stage.timings),
                        **expected,
                    )
                    onnx_manifest.write(out_dir)
        onnx_manifest_path = EngineManifest.path_for(onnx_path)
        if request.onnx_only:
            return BuildResult(onnx_path, onnx_manifest_path, None, None, dict(stage.timings), reused)

        trt, gpu_name, capability = target
        with stage("engine", "building the TensorRT engine"):
            # This engine's old manifest may name the library about to be replaced: it must not outlive the swap.
            EngineManifest.path_for(engine_path).unlink(missing_ok=True)
            library = install_plugin_library(library, out_dir)
            net = network_from_onnx(onnx_path, trt, library)
            with disk_guard():  # the timing cache and the engine are written atomically: nothing partial to remove
                data = build_serialized_engine(
                    net,
                    io.profiles(),
                    # TensorRT-RTX has no timing cache (its cache calls are deprecated no-ops)
                    timing_cache=None if trt.__name__ == "tensorrt_rtx" else out_dir / TIMING_CACHE_NAME,
                    workspace_bytes=request.workspace_bytes,
                )
        # As the ONNX: the engine file is removed unless its manifest (checked when made) is written.
        with disk_guard(engine_path):
            save_engine(data, engine_path)
            manifest = dataclasses.replace(
                onnx_manifest,
                kind="engine",
                data_files={},
                artifact=engine_path.name,
                artifact_sha256=sha256_file(engine_path),
                plugin=library.record(),
                tensorrt_version=tensorrt_release(trt),
                gpu_name=gpu_name,
                compute_capability=capability,
                timings_s=dict(stage.timings),
            )
            engine_manifest = manifest.write(out_dir)
        return BuildResult(onnx_path, onnx_manifest_path, engine_path, engine_manifest, dict(stage.timings), reused)
