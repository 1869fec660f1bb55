"""``DeLeakerRuntime``: load once, generate many images; FLUX.1 + DeLeaker with a pluggable transformer backend.

The runtime owns the parts every backend shares -- prompt encoding (CLIP + T5 in PyTorch), the flow-matching
Euler schedule, latent packing and ids, the denoising loop that threads the DeLeaker state (entity mask, history,
step) through the transformer, VAE decode -- and asks a `TransformerBackend` for each transformer call.

Thread safety: an instance holds one set of models and preallocated buffers, so calls on one instance run one at a
time (a lock serialises them; concurrent callers wait). Use one instance per thread for parallel generation. There
is no global state: two instances are independent.
Over 400 lines, one job (the inference runtime, to be read in one sitting): the constructors' documented options,
the request's resolution and the denoising loop with its batching and non-finite checks. Making a runtime from a
model in memory is `deleaker.runtime.model_loading`, from built engines `deleaker.runtime.engine_dir`.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from PIL import Image

from deleaker.config import DeLeakerConfig, num_joint_blocks
from deleaker.geometry import latent_grid, vae_scale_factor
from deleaker.guidance import check_guidance
from deleaker.export_lock import torch_work
from deleaker.errors import ConfigError, NonFiniteError, ShapeError
from deleaker.lora import LoraAdapter, check_loras

from .backend_options import check_flux2_options
from .backends import TransformerBackend
from deleaker.entities import DEFAULT_MAX_ENTITIES
from deleaker.models import folder_fingerprint, is_flux2_model, load_components
from .defaults import DEFAULT_MODEL_BACKEND, DEFAULT_TEXT_LEN, default_guidance, default_steps
from .entity_masks import mask_step, masks_from_history
from .model_loading import check_model_options, check_offload, model_device, runtime_from_checked_components
from .schedule import (
    ShiftConfig,
    euler_step,
    flux_schedule,
    image_ids,
    initial_latents,
    text_ids,
    unpack_latents,
)
from .request import GenerationRequest, ResolvedRequest, require_request, require_requests
from .results import CallableRuntime, GenerationResult
from .sources import TransformerSource
from .text import TextEncoders

Tensor = torch.Tensor


class DeLeakerRuntime(CallableRuntime):
    """FLUX.1 with DeLeaker; load once (`from_model`, `from_engines`), then call ``rt(prompt, entities, ...)``.

    Calls on one instance are serialised by a lock (see the module docstring).
    """

    def __init__(
        self,
        *,
        text: TextEncoders,
        vae: torch.nn.Module,
        transformer_config: Mapping[str, Any],
        source: TransformerSource,
        shift: ShiftConfig = ShiftConfig(),
        text_len: int = DEFAULT_TEXT_LEN,
        max_entities: int = DEFAULT_MAX_ENTITIES,
        default_size: tuple[int, int] = (512, 512),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        load_seconds: float = 0.0,
        model_source: Optional[str] = None,
        deleaker_config: Optional[Mapping[str, Any]] = None,
        compiled: bool = False,
        fp8: Optional[str] = None,
        lora_records: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.text = text
        self.vae = vae.eval()
        self.transformer_config = dict(transformer_config)
        self.source = source
        self.shift = shift
        self.text_len = int(text_len)
        self.max_entities = int(max_entities)
        self.default_size = default_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.vae_scale_factor = vae_scale_factor(vae.config)
        self.load_seconds = load_seconds
        #: ``"tiny"`` or the model folder the runtime was loaded from (what `verify` compares against).
        self.model_source = model_source
        #: The DeLeaker knobs the backend runs with (every field of `DeLeakerConfig`, scaled to the model).
        self.deleaker_config = dict(deleaker_config or {})
        #: The transformer runs through ``torch.compile`` (torch backend, ``compile=True``).
        self.compiled = compiled
        #: FP8 scales of the transformer's linears (``"row"``, ``"tensor"``), None when they keep ``dtype``.
        self.fp8 = fp8
        #: The LoRA adapters fused into the transformer (``{name, sha256, scale}`` each, in order; `deleaker.lora`).
        self.lora_records = [dict(record) for record in lora_records]
        self._lock = threading.Lock()
        #: Names this runtime in the requests it resolves (`ResolvedRequest.resolved_for`): an id, not a reference.
        self._resolver_id = uuid.uuid4().hex

    # --- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: str | Path = "tiny",
        *,
        backend: str = DEFAULT_MODEL_BACKEND,
        text_len: int = DEFAULT_TEXT_LEN,
        max_entities: int = DEFAULT_MAX_ENTITIES,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        ort_providers: Optional[list[str]] = None,
        compile: bool = False,
        fp8: Optional[str] = None,
        offload_encoders: bool = False,
        loras: Optional[Sequence[LoraAdapter | str | Path | tuple]] = None,
    ) -> "DeLeakerRuntime":
        """A runtime for a diffusers FLUX folder (``model`` = path) or the built-in tiny model (``"tiny"``).

        A FLUX.2 [dev] or [klein] folder gives a `deleaker.runtime.flux2_runtime.Flux2Runtime` (called the same
        way), which runs with ``backend="torch"`` only, without ``compile``, ``fp8``, ``offload_encoders`` or
        ``loras`` (each refused with `ConfigError` before the model loads).

        ``backend``: ``"onnxruntime"`` (default) exports the transformer with DeLeaker nodes once per resolution
        into ``cache_dir`` (default `default_cache_dir`), keyed by a hash of the weights, contract and knobs, and
        checked against its manifest on reuse; ``"torch"`` runs the diffusers transformer with DeLeaker
        processors (CUDA kernels on GPU when built). ``device`` defaults to CUDA when available (torch backend
        only; ONNX export and text encoders stay on the CPU for the onnxruntime backend), ``dtype`` to bfloat16
        on CUDA and float32 on the CPU. ``compile=True`` (torch backend only) runs the transformer through
        ``torch.compile`` (inductor; CUDA graphs per shape on CUDA; see `TorchBackend`), compiled on the first
        image of each resolution, batch size and DeLeaker on/off. ``fp8`` (torch backend only): ``"row"`` or
        ``"tensor"`` runs the transformer blocks' linear layers in FP8 E4M3 with row-wise or per-tensor scales
        (`deleaker.fp8_linear`); embedders, norms, the output projection and DeLeaker's attention keep ``dtype``.
        ``offload_encoders`` (torch backend on CUDA only): the text encoders stay in CPU memory and visit the GPU
        only to encode a new prompt (T5-XXL is 9.5 GB in bf16), for GPUs too small for the whole pipeline.
        ``loras``: LoRA adapters (`deleaker.lora.LoraAdapter`, a path, or ``(path, scale)``) fused into the weights
        as diffusers applies them (`deleaker.lora_fusion.fuse_loras`), for every backend; a bad adapter is refused
        before any generation.
        """
        if not isinstance(model, (str, Path)):
            raise ConfigError(f"model must be 'tiny' or a diffusers folder (str or Path), got {type(model).__name__}")
        check_model_options(
            backend, text_len=text_len, max_entities=max_entities, dtype=dtype, compile=compile, fp8=fp8,
            offload_encoders=offload_encoders,
        )
        adapters = check_loras(loras)  # paths and scales, before the model loads
        start = time.perf_counter()
        if is_flux2_model(model):  # before its weights load: the FLUX.2 runtime drives DeLeaker's FLUX.2 pipeline
            check_flux2_options(
                model, backend, {"compile": compile, "fp8": fp8, "offload_encoders": offload_encoders},
                loras=bool(adapters),
            )
            from .flux2_runtime import Flux2Runtime

            return Flux2Runtime.load(  # type: ignore[return-value]  (the same calls; see `Flux2Runtime`)
                model, text_len=text_len, max_entities=max_entities, deleaker_config=deleaker_config,
                device=model_device("torch", device), dtype=dtype, started_at=start,
            )
        # A device this backend cannot use is refused before the model loads.
        device = model_device(backend, device)
        check_offload(offload_encoders, device)
        components, model_id = load_components(model)
        return runtime_from_checked_components(
            cls,
            components,
            model_id=model_id,
            weights_key=folder_fingerprint(model_id),
            backend=backend,
            text_len=text_len,
            max_entities=max_entities,
            deleaker_config=deleaker_config,
            cache_dir=cache_dir,
            device=device,
            dtype=dtype,
            ort_providers=ort_providers,
            default_size=(64, 64) if model_id == "tiny" else (512, 512),
            started_at=start,
            compile=compile,
            fp8=fp8,
            offload_encoders=offload_encoders,
            loras=adapters,
        )

    @classmethod
    def from_components(
        cls,
        components: Mapping[str, Any],
        *,
        model_id: str,
        backend: str = DEFAULT_MODEL_BACKEND,
        text_len: int = DEFAULT_TEXT_LEN,
        max_entities: int = DEFAULT_MAX_ENTITIES,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        ort_providers: Optional[list[str]] = None,
        default_size: tuple[int, int] = (512, 512),
        started_at: Optional[float] = None,
        compile: bool = False,
        fp8: Optional[str] = None,
        weights_key: Optional[str] = None,
        offload_encoders: bool = False,
        loras: Optional[Sequence[LoraAdapter | str | Path | tuple]] = None,
    ) -> "DeLeakerRuntime":
        """A runtime around ``FluxPipeline`` components already in memory (``pipe.components``).

        The modules are used in place (moved to ``device``/``dtype``; the transformer gets DeLeaker processors,
        which act as stock FLUX without a DeLeaker state). ``model_id`` names the model in caches and reports.
        ``weights_key`` identifies the transformer's weights as loaded, without reading them (`from_model` gives
        `deleaker.models.folder_fingerprint`); None: the ONNX cache's key hashes the weights, once per runtime.
        ``loras`` are fused into these modules' weights (in place). Other arguments as `from_model`.
        """
        start = time.perf_counter() if started_at is None else started_at
        check_model_options(
            backend, text_len=text_len, max_entities=max_entities, dtype=dtype, compile=compile, fp8=fp8,
            offload_encoders=offload_encoders,
        )
        adapters = check_loras(loras)
        device = model_device(backend, device)
        check_offload(offload_encoders, device)
        return runtime_from_checked_components(
            cls,
            components, model_id=model_id, backend=backend, text_len=text_len, max_entities=max_entities,
            deleaker_config=deleaker_config, cache_dir=cache_dir, device=device, dtype=dtype,
            ort_providers=ort_providers, default_size=default_size, started_at=start, compile=compile, fp8=fp8,
            weights_key=weights_key, offload_encoders=offload_encoders, loras=adapters,
        )

    @classmethod
    def from_engines(cls, engine_dir: str | Path, **kwargs: Any) -> "DeLeakerRuntime":
        """A runtime for a directory of built transformer engines (TensorRT) or ONNX files with a manifest.

        See `deleaker.runtime.engine_dir.load_engine_dir` for the checks (manifest, versions, hashes) and keyword
        arguments.
        """
        from .engine_dir import load_engine_dir

        return load_engine_dir(cls, engine_dir, **kwargs)

    @property
    def uses_guidance(self) -> bool:
        """True when the transformer embeds guidance (FLUX.1-dev); False for FLUX.1-schnell, which uses none."""
        return bool(self.transformer_config.get("guidance_embeds", False))

    @property
    def default_steps(self) -> int:
        """The step count a request without one gets: 4 without a guidance embedding (schnell), else 20."""
        return default_steps(self.uses_guidance)

    # --- validation -------------------------------------------------------------------------------------------

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """``request`` checked against this model, with the default size filled in and the checks' results kept (a
        `ResolvedRequest`, which is a `GenerationRequest`); raises a typed error for anything that cannot run.

        Checks, without running any model: prompt length in T5 tokens, entities (found, distinct, 2..E_max),
        resolution (multiple of ``2 * vae_scale_factor``, served by the backend). The prompt is tokenized and the
        entity mask made here, once: a request this runtime resolved already is returned as it is, so ``prepare``
        and ``generate`` given it do no work again. Steps None becomes `default_steps`; guidance None becomes 3.5,
        and any guidance becomes None for a model without a guidance embedding (it uses none, as diffusers).
        """
        request = require_request(request)
        steps = self.default_steps if request.steps is None else request.steps
        guidance = default_guidance(self.uses_guidance)
        if self.uses_guidance and request.guidance is not None:
            guidance = request.guidance
        if isinstance(request, ResolvedRequest) and request.is_resolved_by(self._resolver_id):
            if (request.steps, request.guidance) == (steps, guidance):
                return request
            return dataclasses.replace(request, steps=steps, guidance=guidance)  # keeps the mask: same text, size
        height, width = request.size_or(self.default_size)
        self.text.check_prompt(request.prompt, self.text_len)
        mask = self.text.entity_mask(request.prompt, request.entities, text_len=self.text_len,
                                     max_entities=self.max_entities)
        self.source.check_resolution(height, width)
        return ResolvedRequest.of(
            request, self._resolver_id, height=height, width=width, t5_tokens=self.text.t5_token_count(request.prompt),
            entity_mask=mask, steps=steps, guidance=guidance,
        )

    # --- generation -------------------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> float:
        """Validate ``request`` and load the backend for its resolution now (the first use of a resolution may
        export the model or load an engine); returns the seconds that took, 0 when it was loaded already."""
        with self._lock:
            request = self.resolve(request)
            tick = time.perf_counter()
            self.source.backend(request.height, request.width)
            return time.perf_counter() - tick

    def generate(
        self,
        request: GenerationRequest,
        *,
        record_latents: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> GenerationResult:
        """Run ``request``: validate, encode, denoise ``steps`` times, decode.

        ``progress(step_done, steps)`` is called after every step; ``record_latents`` keeps each step's latents.
        Timings (seconds): ``backend_load`` (first use of a resolution: export/engine load), ``encode``,
        ``denoise``, ``decode``, ``total``.
        """
        with self._lock:
            return self._generate([request], record_latents, progress)[0]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run several requests in one denoising loop; ``result[i]`` is ``requests[i]``'s image.

        Every request has its own prompt, entities, seed and guidance; all must have one resolution (after the
        default size is filled in) and one step count (they share the schedule), else `ShapeError` /
        `ConfigError` before any work. Each image equals ``generate(request)``'s within float rounding: prompts are
        encoded and images decoded one by one, and the transformer runs once per step for each group of requests
        whose entity mask is the same (the contract's ``entity_mask`` is one per call, not per sample), in chunks
        of the backend's largest batch. Timings are the whole batch's (each result has the same numbers).
        """
        requests = require_requests(requests)
        with self._lock:
            return self._generate(list(requests), False, None)

    def _generate(self, requests, record_latents, progress) -> list[GenerationResult]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        resolved = [self.resolve(request) for request in requests]
        first = resolved[0]
        for index, request in enumerate(resolved[1:], start=1):
            if (request.height, request.width) != (first.height, first.width):
                raise ShapeError(
                    f"a batch has one resolution: request 0 is {first.height}x{first.width}, request {index} "
                    f"{request.height}x{request.width}"
                )
            if request.steps != first.steps:
                raise ConfigError(
                    f"a batch has one step count: request 0 has {first.steps} steps, request {index} {request.steps}"
                )
        grid = latent_grid(first.height, first.width, self.vae_scale_factor)

        tick = time.perf_counter()
        backend = self.source.backend(first.height, first.width)  # may export: before, not inside, the torch work
        timings["backend_load"] = time.perf_counter() - tick
        with torch_work():
            return self._generate_loaded(resolved, backend, grid, timings, start, record_latents, progress)

    def _generate_loaded(self, requests, backend, grid, timings, start, record_latents, progress):
        """Encode, denoise and decode ``requests`` (one resolution and step count) with a loaded backend (torch
        work: never while this process exports). ``record_latents``: every step's latents ``(B, Nimg, C)``."""
        gpu = backend.device if backend.device.type == "cuda" else None
        if gpu is not None:
            torch.cuda.reset_peak_memory_stats(gpu)  # this generation's peak, reported with its results
        if self.transformer_config.get("guidance_embeds", False):
            # The transformer embeds guidance x 1000 in its dtype: float16 (a model, an fp16/fp8 engine) overflows
            # above 65.5, and every latent would be NaN. Refused before the work, not after it.
            for request in requests:
                check_guidance("guidance", request.guidance, backend.dtype)

        # 1. Text: T5 sequence + CLIP pooled, and the entity mask (all zeros renders plain FLUX). One prompt at a
        # time: a request's embedding is then the same in a batch as alone.
        tick = time.perf_counter()
        embeds, pooled, masks = [], [], []
        for request in requests:
            embed, pool = self.text.encode(request.prompt, text_len=self.text_len, dtype=self.dtype)
            mask = request.entity_mask  # made once, by `resolve`
            embeds.append(embed)
            pooled.append(pool)
            masks.append(mask if request.deleaker else torch.zeros_like(mask))
        timings["encode"] = time.perf_counter() - tick

        # 2. Latents, ids and the schedule; the rows that share an entity mask share the transformer's calls.
        tick = time.perf_counter()
        device = backend.device
        channels = int(self.transformer_config["in_channels"]) // 4
        latents = torch.cat(
            [initial_latents(request.seed, 1, channels, grid, dtype=self.dtype) for request in requests]
        ).to(device)
        schedule = flux_schedule(requests[0].steps, grid[0] * grid[1], self.shift)
        timesteps = torch.from_numpy(schedule.timesteps).to(device)
        rows: dict[bytes, list[int]] = {}
        for index, mask in enumerate(masks):
            rows.setdefault(mask.to("cpu", torch.bool).numpy().tobytes(), []).append(index)
        chunk = backend_max_batch(backend)
        calls = [
            (group[i : i + chunk], masks[group[0]].to(device))
            for group in rows.values()
            for i in range(0, len(group), chunk)
        ]
        batch_inputs: dict[str, Tensor] = {
            "encoder_hidden_states": torch.cat(embeds).to(device),
            "pooled_projections": torch.cat(pooled).to(device),
        }
        if self.transformer_config.get("guidance_embeds", False):
            batch_inputs["guidance"] = torch.tensor(
                [float(request.guidance) for request in requests], dtype=torch.float32, device=device
            )
        shared = {"img_ids": image_ids(grid).to(device), "txt_ids": text_ids(self.text_len).to(device)}
        history = torch.zeros(len(requests), self.max_entities, grid[0] * grid[1], dtype=torch.float32, device=device)

        # 3. Denoising loop: the backend returns the history for the next step.
        recorded: list[Tensor] = []
        any_deleaker = any(request.deleaker for request in requests)
        config = DeLeakerConfig(**self.deleaker_config) if any_deleaker and self.deleaker_config else None
        # The step whose history gives the masks of DeLeaker's last intervening block (kept for the results).
        num_blocks = num_joint_blocks(self.transformer_config)
        masks_at = None if config is None else mask_step(config, num_blocks, requests[0].steps)
        masks_history: Optional[Tensor] = None
        first_calls_before = getattr(backend, "first_call_seconds", 0.0)
        # On a GPU the finiteness of each step is kept on the device and read once after the loop (unless the
        # latents are recorded, which reads them anyway): no host synchronisation per step.
        deferred_finite: Optional[list[Tensor]] = [] if device.type == "cuda" and not record_latents else None
        # Every step index on the device at once: a step reads its own, with no copy from the host per step.
        step_indices = torch.arange(schedule.num_steps, dtype=torch.int64, device=device)
        for i in range(schedule.num_steps):
            noise_pred = torch.empty_like(latents)
            step = step_indices[i]
            for call_rows, mask in calls:
                index = torch.tensor(call_rows, device=device)
                whole = len(call_rows) == len(requests)  # one call for all rows: no gather
                inputs = {name: value if whole else value[index] for name, value in batch_inputs.items()}
                hidden = latents if whole else latents[index]
                inputs.update(shared, entity_mask=mask, hidden_states=hidden, step=step)
                inputs["history"] = history if whole else history[index]
                # As FluxPipeline: the timestep in the latents' dtype, divided by 1000 (sigma).
                inputs["timestep"] = timesteps[i].expand(hidden.shape[0]).to(hidden.dtype) / 1000
                call_noise, call_history = backend(inputs)
                if whole:
                    noise_pred, history = call_noise.to(device), call_history
                else:
                    noise_pred = noise_pred.to(call_noise.dtype)
                    noise_pred[index] = call_noise.to(device)
                    history[index] = call_history.to(history.device, history.dtype)
            if i == masks_at:
                masks_history = history.detach().clone()  # a backend may reuse its output buffer
            latents = euler_step(latents, noise_pred, schedule, i)
            # One reduction per step (read at once on the CPU, after the loop on a GPU): a NaN caught here names
            # its step instead of surfacing as a black image.
            finite = torch.isfinite(latents).flatten(1).all(dim=1)
            if deferred_finite is not None:
                deferred_finite.append(finite)
            elif not bool(finite.all()):
                self._raise_non_finite(i, schedule.num_steps, finite, requests, recorded if record_latents else None)
            if record_latents:
                recorded.append(latents.detach().to("cpu", torch.float32).clone())
            if progress is not None:
                progress(i + 1, schedule.num_steps)
        if deferred_finite:
            finite_per_step = torch.stack(deferred_finite).cpu()  # the one synchronisation of the loop
            for i, finite in enumerate(finite_per_step):
                if not bool(finite.all()):
                    self._raise_non_finite(i, schedule.num_steps, finite, requests, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["denoise"] = time.perf_counter() - tick
        if getattr(backend, "compiled", False):
            # First calls at a new shape (resolution, batch, DeLeaker on/off) compile: part of ``denoise``.
            timings["compile"] = backend.first_call_seconds - first_calls_before

        # 4. VAE decode, one image at a time (as alone).
        tick = time.perf_counter()
        try:
            images = [self.decode(latents[row : row + 1], grid) for row in range(len(requests))]
        except NonFiniteError as exc:
            raise NonFiniteError(str(exc), latents=recorded if record_latents else None) from None
        timings["decode"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - start
        results = []
        for row, (image, request) in enumerate(zip(images, requests)):
            found = None
            if masks_history is not None and request.deleaker:
                found = masks_from_history(
                    masks_history[row : row + 1], masks[row], grid, config, len(request.entities)
                )
            results.append(GenerationResult(
                image=image, timings=dict(timings), request=request, latents=recorded if record_latents else None,
                entity_masks=found,
                peak_gpu_gib=None if gpu is None else torch.cuda.max_memory_allocated(gpu) / 2**30,
            ))
        return results

    def _raise_non_finite(self, i, num_steps, finite, requests, latents) -> None:
        height, width = requests[0].height, requests[0].width
        which = "" if len(requests) == 1 else f" (batch rows {torch.nonzero(~finite).flatten().tolist()})"
        raise NonFiniteError(
            f"the latents hold NaN or inf after step {i + 1} of {num_steps} ({self.backend_name}, "
            f"{height}x{width}, {_guidance_text(requests[0].guidance)}){which}: the model overflowed; no image "
            "was made",
            latents=latents,
        )

    @torch.no_grad()
    def decode(self, latents: Tensor, grid: tuple[int, int]) -> Image.Image:
        """Packed latents ``(1, Nimg, C)`` -> PIL image, as ``FluxPipeline`` (unpack, unscale, decode, to 8 bit).

        Raises `NonFiniteError` when the decoded image is not finite (it would become black or noise in 8 bit)."""
        vae_param = next(self.vae.parameters())
        x = unpack_latents(latents, grid)
        x = (x / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(x.to(vae_param.device, vae_param.dtype), return_dict=False)[0]
        if not bool(torch.isfinite(image).all()):
            raise NonFiniteError("the decoded image holds NaN or inf (the VAE overflowed); no image was made")
        image = (image / 2 + 0.5).clamp(0, 1)
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        return Image.fromarray((array * 255).round().astype("uint8"))

    @property
    def backend_name(self) -> str:
        return self.source.name


def backend_max_batch(backend: TransformerBackend) -> int:
    """The largest batch one call of ``backend`` takes: its contract's profile (ONNX Runtime, TensorRT), else
    unbounded (PyTorch)."""
    io = getattr(backend, "io", None)
    return int(io.batch_max) if io is not None and getattr(io, "batch_max", None) else sys.maxsize


def _guidance_text(guidance: Optional[float]) -> str:
    return "no guidance" if guidance is None else f"guidance {guidance}"
