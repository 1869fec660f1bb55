"""``Flux2Runtime``: the runtime of a FLUX.2 [dev] or [klein] diffusers folder (torch backend), what
`DeLeakerRuntime.from_model` gives for such a folder.

It drives DeLeaker's FLUX.2 pipeline (`deleaker.pipeline_flux2`): text encoding through the chat template, the
latents, the schedule, the denoising loop and the decode are diffusers' own, not re-implemented here (FLUX.2 encodes
with stacked hidden states of Mistral 3 / Qwen3, packs its latents with a batch-norm of the VAE, and [klein] runs
true CFG). What it keeps of the runtime's contract: a request is resolved once, before any work (a non-empty prompt
that fits ``text_len`` tokens of the chat-templated text, entities found in it, a resolution that is a multiple of
``2 * vae_scale_factor`` within the size limit, a guidance the transformer can embed); the seed makes the initial
noise as the stock pipeline makes it from ``torch.Generator("cpu").manual_seed(seed)``; non-finite latents or a
non-finite decoded image raise `NonFiniteError` (with the steps' latents when recorded); progress, recorded
latents, per-stage timings and the `GenerationResult` are the runtime's. ``deleaker=False`` runs the stock pipeline.

What it does not do (refused before the model loads, `check_flux2_options`): other backends than torch (ONNX
Runtime, engines), ``compile``, ``fp8``, ``offload_encoders``, LoRA adapters. ``generate_batch`` runs its requests
one after another (each image is the request's alone). ``entity_masks`` of a result are None: the FLUX.2 pipeline
does not keep DeLeaker's history.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from deleaker.chat_entities import chat_entity_token_mask, templated_prompt, text_tokenizer
from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError, NonFiniteError
from deleaker.export.limits import check_size
from deleaker.guidance import check_guidance
from deleaker.models import load_components, pipeline_class_name
from deleaker.pipeline_flux2 import DeLeakerFlux2KleinPipeline, DeLeakerFlux2Pipeline

from .request import (
    GenerationRequest, PromptError, ResolvedRequest, require_request, require_requests,
)
from .results import CallableRuntime, GenerationResult

#: The DeLeaker pipeline of each FLUX.2 pipeline class (``model_index.json``'s ``_class_name``).
DELEAKER_PIPELINES = {"Flux2Pipeline": DeLeakerFlux2Pipeline, "Flux2KleinPipeline": DeLeakerFlux2KleinPipeline}


class Flux2Runtime(CallableRuntime):
    """FLUX.2 [dev] or [klein] with DeLeaker, loaded once (`load`); called like `DeLeakerRuntime`
    (``rt(prompt, entities, ...)``, `generate`, `generate_batch`, `resolve`, `prepare`). Calls on one instance are
    serialised by a lock."""

    #: The runtime's backend (what `run` reports and records in its PNGs).
    backend_name = "torch"
    #: FLUX.1's torch-backend variants, never set here (read by the job records and `verify`).
    compiled = False
    fp8: Optional[str] = None

    def __init__(
        self,
        pipeline: DeLeakerFlux2Pipeline | DeLeakerFlux2KleinPipeline,
        *,
        model_source: str,
        text_len: int,
        max_entities: int,
        deleaker_config: DeLeakerConfig,
        dtype: torch.dtype,
        device: torch.device,
        load_seconds: float = 0.0,
        default_size: tuple[int, int] = (512, 512),
    ) -> None:
        self.pipeline = pipeline
        #: The model folder (resolved path) the runtime was loaded from.
        self.model_source = model_source
        self.text_len = int(text_len)
        self.max_entities = int(max_entities)
        self._config = deleaker_config
        #: The DeLeaker knobs the pipeline runs with (every field of `DeLeakerConfig`, scaled to the model).
        self.deleaker_config = dataclasses.asdict(deleaker_config)
        self.dtype = dtype
        self.device = torch.device(device)
        self.load_seconds = load_seconds
        self.default_size = default_size
        self.vae_scale_factor = int(pipeline.vae_scale_factor)
        self.transformer_config = dict(pipeline.transformer.config)
        #: No adapters: refused for FLUX.2 (`check_flux2_options`).
        self.lora_records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._resolver_id = uuid.uuid4().hex

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        text_len: int,
        max_entities: int,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None,
        device: torch.device,
        dtype: Optional[torch.dtype],
        started_at: Optional[float] = None,
    ) -> "Flux2Runtime":
        """The runtime of the FLUX.2 folder ``model`` on ``device`` (checked by the caller) in ``dtype`` (None:
        bfloat16 on CUDA, float32 on the CPU); the options were checked by `DeLeakerRuntime.from_model`."""
        start = time.perf_counter() if started_at is None else started_at
        pipeline_class = DELEAKER_PIPELINES.get(pipeline_class_name(model) or "")
        if pipeline_class is None:
            raise ConfigError(f"{model} is not a FLUX.2 folder (model_index.json names {pipeline_class_name(model)})")
        components, model_id = load_components(model)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        for name in ("text_encoder", "vae", "transformer"):
            module = components[name]
            if next(module.parameters()).dtype != dtype:  # diffusers warns on every cast of a loaded model
                module.to(dtype=dtype)
            module.to(device)
        pipeline = pipeline_class(**components)
        pipeline.set_progress_bar_config(disable=True)  # progress is the caller's (`generate`'s ``progress``)
        config = DeLeakerConfig.resolve(deleaker_config, pipeline.num_blocks)
        return cls(
            pipeline, model_source=model_id, text_len=text_len, max_entities=max_entities, deleaker_config=config,
            dtype=dtype, device=device, load_seconds=time.perf_counter() - start,
        )

    # --- validation -------------------------------------------------------------------------------------------

    def text_token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` in the chat-templated text the text encoder reads (as the pipeline tokenizes it)."""
        tokenizer = self.pipeline.tokenizer
        chat = self.pipeline._chat()
        templated, _, _ = templated_prompt(tokenizer, prompt, chat)
        add_special = chat.add_special_tokens(tokenizer, templated)
        encoded = text_tokenizer(tokenizer)(templated, add_special_tokens=add_special)
        return len(encoded["input_ids"])

    @property
    def uses_guidance(self) -> bool:
        """Always: FLUX.2 [dev] embeds guidance, and [klein] runs classifier-free guidance with it."""
        return True

    @property
    def default_steps(self) -> int:
        """The step count a request without one gets: the pipeline's own default (diffusers' ``num_inference_steps``,
        50 in diffusers 0.42)."""
        return self._call_default("num_inference_steps")

    @property
    def default_guidance(self) -> float:
        """The guidance a request without one gets: the pipeline's own default (diffusers' ``guidance_scale``, 4.0
        in diffusers 0.42)."""
        return self._call_default("guidance_scale")

    def _call_default(self, name: str) -> Any:
        # The DeLeaker pipelines keep the stock ``__call__`` signature, so its defaults are diffusers' own.
        return inspect.signature(type(self.pipeline).__call__).parameters[name].default

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """``request`` checked against this model, the default size, steps (`default_steps`) and guidance
        (`default_guidance`) filled in (a `ResolvedRequest`); raises a typed error for anything that cannot run,
        before any model runs (see the module docstring)."""
        request = require_request(request)
        if request.steps is None or request.guidance is None:  # the defaults, then resolved as any request
            request = dataclasses.replace(
                request,
                steps=self.default_steps if request.steps is None else request.steps,
                guidance=self.default_guidance if request.guidance is None else request.guidance,
            )
        if isinstance(request, ResolvedRequest) and request.is_resolved_by(self._resolver_id):
            return request
        height, width = request.size_or(self.default_size)
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise PromptError("the prompt must be a non-empty string")
        count = self.text_token_count(request.prompt)
        if count > self.text_len:
            raise PromptError(
                f"the prompt has {count} tokens in the chat-templated text the FLUX.2 text encoder reads, but the "
                f"model takes at most {self.text_len} (max_sequence_length); shorten the prompt"
            )
        mask = chat_entity_token_mask(
            self.pipeline.tokenizer, request.prompt, list(request.entities), self.pipeline._chat(),
            max_sequence_length=self.text_len, max_entities=self.max_entities,
        )
        check_size(height, width, 2 * self.vae_scale_factor)
        if self.transformer_config.get("guidance_embeds", False):
            check_guidance("guidance", request.guidance, self.dtype)
        return ResolvedRequest.of(
            request, self._resolver_id, height=height, width=width, t5_tokens=count, entity_mask=mask
        )

    # --- generation -------------------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> float:
        """Validate ``request``; 0 seconds: the one backend is loaded with the model."""
        with self._lock:
            self.resolve(request)
            return 0.0

    def generate(
        self,
        request: GenerationRequest,
        *,
        record_latents: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> GenerationResult:
        """Run ``request`` through the DeLeaker FLUX.2 pipeline. Timings (seconds): ``backend_load`` (0),
        ``encode`` (until the transformer's first call), ``denoise`` (until the last step), ``decode``,
        ``total``. ``record_latents``: every step's packed latents, as the pipeline's step callback sees them."""
        with self._lock:
            return self._generate(request, record_latents, progress)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """The requests one after another (each image is the request's alone); all are resolved first, so a bad
        one is refused before any work."""
        requests = require_requests(requests)
        with self._lock:
            resolved = [self.resolve(request) for request in requests]
            return [self._generate(request, False, None) for request in resolved]

    def _generate(self, request, record_latents, progress) -> GenerationResult:
        start = time.perf_counter()
        request = self.resolve(request)
        marks: dict[str, float] = {}
        recorded: list[torch.Tensor] = []

        def first_transformer_call(module, args, kwargs):
            marks.setdefault("denoise_start", time.perf_counter())

        def after_step(pipe, step_index, timestep, callback_kwargs):
            if record_latents:
                recorded.append(callback_kwargs["latents"].detach().to("cpu", torch.float32).clone())
            if progress is not None:
                progress(step_index + 1, request.steps)
            marks["denoise_end"] = time.perf_counter()
            return {}

        gpu = self.device if self.device.type == "cuda" else None
        if gpu is not None:
            torch.cuda.reset_peak_memory_stats(gpu)
        entities = list(request.entities) if request.deleaker else None
        hook = self.pipeline.transformer.register_forward_pre_hook(first_transformer_call, with_kwargs=True)
        try:
            image = self.pipeline(
                prompt=request.prompt,
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps,
                guidance_scale=float(request.guidance),
                generator=torch.Generator("cpu").manual_seed(request.seed),
                max_sequence_length=self.text_len,
                output_type="pil",
                callback_on_step_end=after_step,
                entities=entities,
                deleaker_config=self._config,
                max_entities=self.max_entities,
            ).images[0]
        except NonFiniteError as exc:
            raise NonFiniteError(
                f"{exc} (torch, FLUX.2, {request.height}x{request.width}, guidance {request.guidance})",
                latents=recorded if record_latents else None,
            ) from None
        finally:
            hook.remove()
        end = time.perf_counter()
        denoise_start = marks.get("denoise_start", start)
        denoise_end = marks.get("denoise_end", denoise_start)
        timings = {
            "backend_load": 0.0,
            "encode": denoise_start - start,
            "denoise": denoise_end - denoise_start,
            "decode": end - denoise_end,
            "total": end - start,
        }
        return GenerationResult(
            image=image, timings=timings, request=request, latents=recorded if record_latents else None,
            entity_masks=None,
            peak_gpu_gib=None if gpu is None else torch.cuda.max_memory_allocated(gpu) / 2**30,
        )
