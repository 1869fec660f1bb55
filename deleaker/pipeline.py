"""``DeLeakerFluxPipeline``: diffusers' ``FluxPipeline`` with DeLeaker attention, state owned per call."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from .config import REFERENCE_NUM_BLOCKS, DeLeakerConfig
from .entities import DEFAULT_MAX_ENTITIES, check_entity_rows, entity_token_mask
from .errors import ConfigError, NonFiniteError
from .geometry import latent_grid
from .guidance import check_guidance, real_scalar
from .processor import (
    DeLeakerFluxAttnProcessor,
    DeLeakerState,
    install_deleaker_processors,
    place_deleaker_processors,
)


def new_deleaker_state(
    entity_mask: torch.Tensor, grid: tuple[int, int], config: DeLeakerConfig, device: torch.device
) -> DeLeakerState:
    """A fresh per-call `DeLeakerState` on ``device`` (step 0, no history yet); FLUX.1 and FLUX.2 pipelines."""
    return DeLeakerState(
        entity_mask=entity_mask.to(device),
        grid=grid,
        config=config,
        step=torch.zeros((), dtype=torch.int64, device=device),
    )


def place_unparallel_processors(transformer) -> None:
    """Raise `ConfigError` if ``transformer`` runs with parallelism, else give its DeLeaker processors their place
    in the block order (`place_deleaker_processors`); the last check of FLUX.1's and FLUX.2's pipelines."""
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ConfigError(
            "the transformer runs with parallelism (enable_parallelism), and DeLeaker's entity masks and history "
            "are computed over every head and image token of a block: call without entities, or load the "
            "transformer without parallelism"
        )
    place_deleaker_processors(transformer)


class DeLeakerFluxPipeline(FluxPipeline):
    """``FluxPipeline`` that mitigates leakage between the ``entities`` named in the prompt.

    Loads like ``FluxPipeline`` (``from_pretrained`` on a local diffusers folder, or built from components, with
    ``transformer=None`` too). Called without entities it is ``FluxPipeline``, with its call signature, IP-Adapters,
    attention backends and parallelism, except that what would silently make a black image is refused: non-finite
    scalars or user latents before any work, non-finite latents or decoded images as a `NonFiniteError`. With
    entities, each call builds its own `DeLeakerState` (entity mask, grid, config, step, history) and passes it to
    every joint attention; what DeLeaker cannot compute (true CFG, IP-Adapters, parallelism) is refused.
    """

    def __init__(
        self,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer,
        image_encoder=None,
        feature_extractor=None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        # A pipeline of text encoders only (transformer=None) is a FluxPipeline use too; entities need a transformer.
        self.num_blocks = None if self.transformer is None else install_deleaker_processors(self.transformer)

    # diffusers reads the component classes from __init__'s annotations (`from_pipe`, loading): FluxPipeline's.
    __init__.__annotations__ = dict(FluxPipeline.__init__.__annotations__)

    def deleaker_state(
        self,
        prompt: str,
        entities: Sequence[str],
        *,
        height: int,
        width: int,
        max_sequence_length: int = 512,
        max_entities: int = DEFAULT_MAX_ENTITIES,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
    ) -> DeLeakerState:
        """The per-call state for ``prompt`` and its ``entities`` (raises `EntityError` before any work)."""
        config = DeLeakerConfig.resolve(deleaker_config, self.num_blocks)
        mask = entity_token_mask(
            self.tokenizer_2, prompt, entities, max_sequence_length=max_sequence_length, max_entities=max_entities
        )
        grid = latent_grid(height, width, self.vae_scale_factor)
        return new_deleaker_state(mask, grid, config, self._execution_device)

    def _check_processors(self) -> None:
        """Raise `ConfigError` unless every joint attention still runs DeLeaker's processor, unfused and without
        parallelism: entities would otherwise be ignored (a replaced processor), computed wrongly (an IP-Adapter,
        heads or tokens split across GPUs) or refused deep in the first attention (fused projections). Processors
        that diffusers rebuilt without arguments get their place in the block order here."""
        processors = self.transformer.attn_processors
        if any(isinstance(p, FluxIPAdapterAttnProcessor) for p in processors.values()):
            raise ConfigError(
                "an IP-Adapter is loaded (its processors replace DeLeaker's on the double-stream blocks), and DeLeaker "
                "cannot combine entities with it: call pipe.unload_ip_adapter(), then "
                "deleaker.processor.install_deleaker_processors(pipe.transformer)"
            )
        others = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, DeLeakerFluxAttnProcessor)})
        if others:
            raise ConfigError(
                f"the transformer's attention processors were replaced ({others}); entities need DeLeaker's: call "
                "deleaker.processor.install_deleaker_processors(pipe.transformer)"
            )
        if any(getattr(module, "fused_projections", False) for module in self.transformer.modules()):
            raise ConfigError(
                "DeLeaker attention needs unfused projections; call pipe.transformer.unfuse_qkv_projections()"
            )
        place_unparallel_processors(self.transformer)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: PipelineImageInput | None = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        *,
        entities: Optional[Sequence[str]] = None,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
        max_entities: int = DEFAULT_MAX_ENTITIES,
    ) -> FluxPipelineOutput | tuple:
        """``FluxPipeline.__call__`` (the same parameters, in the same order, with the same defaults) plus
        ``entities`` (strings of the prompt, 2 to ``max_entities``) and ``deleaker_config`` (a `DeLeakerConfig`
        used as is, a mapping of overrides of the model-scaled defaults, or None for those defaults).

        Without entities it computes what ``FluxPipeline.__call__`` computes. Scalars may be any finite real number
        ``FluxPipeline`` takes (NumPy scalars, 0-d tensors); non-finite ones and non-finite ``latents`` raise
        `ConfigError` before any work, and latents that become non-finite during denoising, or a decoded image that
        is, raise `NonFiniteError` (FluxPipeline would return a black image).
        """
        # Checked with or without entities, before any work: a NaN guidance, or one that overflows the embedding
        # (x 1000 in the transformer's dtype), gives a NaN (black) image silently in FluxPipeline, and DeLeaker's own
        # options are checked even when they are not used.
        guided = self.transformer is not None and bool(getattr(self.transformer.config, "guidance_embeds", False))
        embedding_dtype = self.transformer.dtype if guided else torch.float64
        guidance_scale = real_scalar("guidance_scale", guidance_scale)
        check_guidance("guidance_scale", guidance_scale, embedding_dtype)
        true_cfg_scale = real_scalar("true_cfg_scale", true_cfg_scale)
        # NumPy integers are what they hold: FluxPipeline computes with them, and our own int checks take them too.
        height, width, num_inference_steps, num_images_per_prompt, max_sequence_length, max_entities = (
            int(v) if isinstance(v, np.integer) else v
            for v in (height, width, num_inference_steps, num_images_per_prompt, max_sequence_length, max_entities)
        )
        check_user_latents(latents)
        config = DeLeakerConfig.resolve(deleaker_config, self.num_blocks or REFERENCE_NUM_BLOCKS)
        check_entity_rows(max_entities)

        flux_args = dict(
            prompt=prompt,
            prompt_2=prompt_2,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            true_cfg_scale=true_cfg_scale,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            output_type=output_type,
            return_dict=return_dict,
            joint_attention_kwargs=joint_attention_kwargs,
            max_sequence_length=max_sequence_length,
        )
        if entities is None or (isinstance(entities, (list, tuple)) and len(entities) == 0):
            return self._call_checked(flux_args, callback_on_step_end, callback_on_step_end_tensor_inputs, None)

        one_prompt("prompt", prompt)
        # The entity mask indexes T5's tokens, and T5 reads prompt_2 when it is given (FluxPipeline.encode_prompt:
        # ``prompt_2 or prompt``): entities are looked up in that text, or they would mark unrelated tokens.
        t5_text = one_prompt("prompt_2", prompt_2 or prompt)
        if (negative_prompt is not None or negative_prompt_embeds is not None) and true_cfg_scale > 1:
            raise ConfigError("DeLeaker does not support true CFG (negative prompts): its history is per pass")
        ip_inputs = dict(
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
        )
        given = [name for name, value in ip_inputs.items() if value is not None]
        if given:
            raise ConfigError(
                f"DeLeaker cannot combine entities with an IP-Adapter ({', '.join(given)}): the adapter's processors "
                "replace DeLeaker's attention on the double-stream blocks; call without entities or without the image"
            )
        if joint_attention_kwargs and "deleaker_state" in joint_attention_kwargs:
            raise ConfigError("pass entities=..., not a deleaker_state: the pipeline owns the per-call state")
        if self.transformer is None:
            raise ConfigError("entities need a transformer; this pipeline was made with transformer=None")
        self._check_processors()

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        state = self.deleaker_state(
            t5_text,
            entities,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            max_entities=max_entities,
            deleaker_config=config,
        )
        flux_args.update(
            height=height,
            width=width,
            joint_attention_kwargs={**(joint_attention_kwargs or {}), "deleaker_state": state},
        )
        return self._call_checked(flux_args, callback_on_step_end, callback_on_step_end_tensor_inputs, state)

    def _call_checked(
        self,
        flux_args: dict[str, Any],
        user_callback: Callable | None,
        user_tensor_inputs: list[str] | None,
        state: DeLeakerState | None,
    ):
        """``FluxPipeline.__call__(**flux_args)`` with a step callback that checks the latents (and advances the
        DeLeaker ``state``, when there is one) before the user's callback, and a check of what the VAE decodes."""
        callback, tensor_inputs = checked_step_callback(
            user_callback, user_tensor_inputs, None if state is None else (lambda step_index: state.advance())
        )
        hook = None
        decoder = getattr(self.vae, "decoder", None)
        if isinstance(decoder, torch.nn.Module):
            hook = decoder.register_forward_hook(refuse_non_finite_decode)
        try:
            return super().__call__(
                **flux_args,
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=tensor_inputs,
            )
        finally:
            if hook is not None:
                hook.remove()


def checked_step_callback(
    user_callback: Callable | None,
    user_tensor_inputs: Sequence[str] | None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Callable, list[str]]:
    """The step callback a DeLeaker pipeline gives its stock ``__call__``, and the tensor names to ask for.

    Each step it checks the latents (`NonFiniteError`), runs ``on_step(step_index)`` (DeLeaker's state), then the
    user's callback with the tensors the user named, and checks the latents that callback returns."""
    user_inputs = list(user_tensor_inputs) if user_tensor_inputs is not None else None

    def check_then_user_callback(pipe, step_index, timestep, callback_kwargs):
        steps = getattr(pipe, "num_timesteps", "?")
        _check_step_latents(callback_kwargs["latents"], f"after step {step_index + 1} of {steps}")
        if on_step is not None:
            on_step(step_index)
        if user_callback is None:
            return {}
        outputs = user_callback(pipe, step_index, timestep, {k: callback_kwargs[k] for k in user_inputs or []})
        if isinstance(outputs, Mapping) and outputs.get("latents") is not None:
            _check_step_latents(outputs["latents"], f"returned by the step callback at step {step_index + 1}")
        return outputs

    # The stock pipeline gives the callback only the tensors named here; ours needs the latents. Names it does not
    # know stay in the list, so that its own check refuses them with its own message.
    return check_then_user_callback, list(dict.fromkeys([*(user_inputs or []), "latents"]))


def check_user_latents(latents: Any) -> None:
    """Raise `ConfigError` unless ``latents`` is None or a tensor of finite values (NaN ones make a black image)."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise ConfigError(f"latents must be a torch.Tensor (packed, as FluxPipeline.prepare_latents makes), got "
                          f"{type(latents).__name__}")
    if latents.is_floating_point() and not bool(torch.isfinite(latents).all()):
        raise ConfigError("latents hold NaN or inf: the image would be black; pass finite latents or none")


def _check_step_latents(latents: torch.Tensor, when: str) -> None:
    """Raise `NonFiniteError` when the denoising latents are not finite: one reduction and one host sync per step,
    cheap next to a transformer call, and the error names the step instead of surfacing as a black image."""
    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteError(f"the latents hold NaN or inf {when}: the model overflowed; no image was made")


def refuse_non_finite_decode(module: torch.nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook of the VAE decoder: `NonFiniteError` when the decoded image is not finite (it would become
    black or noise in 8 bit)."""
    if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
        raise NonFiniteError("the decoded image holds NaN or inf (the VAE overflowed); no image was made")


def one_prompt(name: str, prompt: Any) -> str:
    """The one text ``prompt`` holds (a str, or a list of copies of one str); `ConfigError` otherwise."""
    if isinstance(prompt, (list, tuple)):
        if len(prompt) == 0 or len(set(prompt)) != 1:
            raise ConfigError(f"entities apply to one prompt; got a list of {len(set(prompt))} different {name}s")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ConfigError(f"entities need the prompt text ({name}=...), not only prompt embeddings")
    return prompt
