"""Making a `DeLeakerRuntime` from a model in memory (`runtime_from_checked_components`, behind ``from_model`` and
``from_components``) and the checks of a model's options made before it loads (`check_model_options`,
`model_device`, `check_offload`). A runtime from built engines is `deleaker.runtime.engine_dir`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch

from deleaker.config import DeLeakerConfig, num_joint_blocks
from deleaker.errors import ConfigError
from deleaker.export.limits import check_max_entities, check_text_len
from deleaker.fp8_linear import quantize_transformer_fp8
from deleaker.geometry import vae_scale_factor
from deleaker.lora import LoraAdapter, lora_records
from deleaker.lora_fusion import fuse_loras
from deleaker.models import FLUX2_RUNTIME_MESSAGE, transformer_sha256

from .backend_options import check_backend_options
from .backends import TorchBackend, TransformerBackend, resolve_device
from .defaults import MODEL_BACKENDS
from .memory import AttentionMemory
from .onnx_cache import default_cache_dir
from .schedule import ShiftConfig
from .sources import AnyResolution, PerResolution, TransformerSource
from .text import TextEncoders

#: The runtime class `runtime_from_checked_components` makes (`DeLeakerRuntime`; passed in, so this module does not
#: import it).
RuntimeT = TypeVar("RuntimeT")


def runtime_from_checked_components(
    cls: Callable[..., RuntimeT],
    components: Mapping[str, Any],
    *,
    model_id: str,
    backend: str,
    text_len: int,
    max_entities: int,
    deleaker_config: DeLeakerConfig | Mapping[str, Any] | None,
    cache_dir: str | Path | None,
    device: torch.device,
    dtype: torch.dtype | None,
    ort_providers: Optional[list[str]],
    default_size: tuple[int, int],
    started_at: float,
    compile: bool,
    fp8: Optional[str],
    weights_key: Optional[str],
    offload_encoders: bool,
    loras: Sequence[LoraAdapter],
) -> RuntimeT:
    """`DeLeakerRuntime.from_components` after its checks (`check_model_options`, `check_loras`, `model_device`,
    `check_offload`), which `from_model` makes once, before the model loads: LoRA adapters fused, the modules cast and
    placed, FP8 linears, and the transformer source (torch, or an ONNX Runtime export per resolution); ``cls`` is
    the runtime class to make (passed in, so this module does not import it)."""
    start = started_at
    adapters = list(loras)
    components = dict(components)
    transformer = components["transformer"]
    if type(transformer).__name__ == "Flux2Transformer2DModel":
        raise ConfigError(f"model {model_id!r} {FLUX2_RUNTIME_MESSAGE}")
    # Fused before the cast to ``dtype`` (in the weights' loaded precision) and before any backend sees them;
    # a bad adapter is refused here, before any generation.
    fuse_loras(components, adapters)
    records = lora_records(adapters)
    num_blocks = num_joint_blocks(transformer.config)
    config = DeLeakerConfig.resolve(deleaker_config, num_blocks)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        module = components[name]
        # Casting only when needed: diffusers warns on every dtype cast of a loaded model.
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)
        if offload_encoders and name in ("text_encoder", "text_encoder_2"):
            module.to("cpu")  # moved to the GPU for each new prompt only (`TextEncoders.offload_to`)
        else:
            module.to(device)
    scale = vae_scale_factor(components["vae"].config)
    patch = 2 * scale
    memory = AttentionMemory.of(transformer.config, text_len=text_len, max_entities=max_entities, patch=patch)
    if fp8 is not None:
        quantize_transformer_fp8(transformer, fp8)  # after the cast: FP8 weights from the model's dtype
    if backend == "torch":
        source: TransformerSource = AnyResolution(
            TorchBackend(transformer, config, compile=compile), patch, memory=memory if device.type == "cpu" else None
        )
    else:
        from .onnx_cache import model_backend  # onnx/onnxscript are optional: import on use

        model_key = _model_key(transformer, weights_key, dtype, records)

        def export_for(height: int, width: int) -> TransformerBackend:
            return model_backend(
                transformer,
                model_key=model_key(),
                model_id=model_id,
                height=height,
                width=width,
                text_len=text_len,
                max_entities=max_entities,
                vae_scale_factor=scale,
                config=config,
                cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                providers=ort_providers,
            )

        source = PerResolution("onnxruntime", patch, {}, factory=export_for, memory=memory)
    return cls(
        text=TextEncoders(
            components["tokenizer"],
            components["text_encoder"],
            components["tokenizer_2"],
            components["text_encoder_2"],
            offload_to=device if offload_encoders else None,
        ),
        vae=components["vae"],
        transformer_config=transformer.config,
        source=source,
        shift=ShiftConfig.from_scheduler_config(components["scheduler"].config),
        text_len=text_len,
        max_entities=max_entities,
        default_size=default_size,
        dtype=dtype,
        device=device,
        load_seconds=time.perf_counter() - start,
        model_source=model_id,
        deleaker_config=dataclasses.asdict(config),
        compiled=compile,
        fp8=fp8,
        lora_records=records,
    )


def _model_key(
    transformer: torch.nn.Module,
    weights_key: Optional[str],
    dtype: torch.dtype,
    loras: Sequence[Mapping[str, Any]] = (),
) -> Callable[[], str]:
    """The ONNX cache's key of the weights, computed once per runtime on first use: ``weights_key`` (what the
    folder's files say) with the dtype the weights were cast to, else the hash of every weight; with each fused LoRA
    adapter's content hash and scale, in order (so an export made with other adapters is never served)."""
    key: list[str] = []

    def once() -> str:
        if not key:
            if weights_key is None:
                base = transformer_sha256(transformer)
            else:
                base = hashlib.sha256(f"{weights_key}:{dtype}".encode()).hexdigest()
            if loras:
                adapters = json.dumps([[record["sha256"], float(record["scale"])] for record in loras])
                base = hashlib.sha256(f"{base}:loras:{adapters}".encode()).hexdigest()
            key.append(base)
        return key[0]

    return once



def model_device(backend: str, device: str | torch.device | None) -> torch.device:
    """Where ``backend`` runs a model: the torch backend on ``device`` (default CUDA when available, else the
    CPU; see `resolve_device`), ONNX Runtime on the CPU. Raises `ConfigError` for a device it cannot use."""
    if backend == "torch":
        return resolve_device(device, default="cuda" if torch.cuda.is_available() else "cpu")
    if device is not None and str(device) != "cpu":
        raise ConfigError(f"the {backend} backend runs on the CPU; device {str(device)!r} is for the torch backend")
    return torch.device("cpu")



#: The dtypes a model can run in (``dtype`` of `DeLeakerRuntime.from_model`).
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



def check_offload(offload_encoders: bool, device: torch.device) -> None:
    """Raise `ConfigError` when the text encoders are to be offloaded but the model does not run on a GPU."""
    if offload_encoders and device.type != "cuda":
        raise ConfigError(
            f"offload_encoders (--offload-encoders) keeps the text encoders in CPU memory between prompts for a GPU "
            f"run; the model runs on {device}, where they already are"
        )



def check_model_options(
    backend: Any, *, text_len: Any, max_entities: Any, dtype: Any, compile: Any = False, fp8: Any = None,
    offload_encoders: Any = False,
) -> None:
    """Raise `ConfigError` for options of `DeLeakerRuntime.from_model` out of range (before any work)."""
    if backend not in MODEL_BACKENDS:
        raise ConfigError(
            f"backend {backend!r:.40} cannot load a model; allowed: {MODEL_BACKENDS} "
            "(tensorrt runs prebuilt engines: use --engines DIR / from_engines)"
        )
    check_backend_options(backend, {"compile": compile, "fp8": fp8, "offload_encoders": offload_encoders})
    check_text_len(text_len)
    check_max_entities(max_entities)
    if dtype is not None and dtype not in MODEL_DTYPES:
        raise ConfigError(f"dtype must be None or one of {MODEL_DTYPES}, got {dtype!r:.40}")
