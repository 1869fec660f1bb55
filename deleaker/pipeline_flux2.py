"""``DeLeakerFlux2Pipeline`` / ``DeLeakerFlux2KleinPipeline``: diffusers' FLUX.2 [dev] and [klein] pipelines with
DeLeaker attention, the per-call state owned by each call (as `deleaker.pipeline.DeLeakerFluxPipeline`).

Without entities each is its stock pipeline (the same parameters, in the same order, with the same defaults, and
bit-equal output); what would silently make a black image is refused as in FLUX.1 (non-finite scalars or latents
before any work, non-finite latents or a non-finite decoded image as `NonFiniteError`). With entities the prompt's
entity tokens are found in the chat-templated text the text encoder reads (`deleaker.chat_entities`), and every
joint attention of the ``Flux2Transformer2DModel`` runs DeLeaker (`deleaker.processor_flux2`).

FLUX.2-specific decisions:

- [klein] with true CFG (``guidance_scale > 1`` on a model that is not step-distilled) runs the transformer twice
  per step; DeLeaker acts on the conditional pass only (the entities are words of the prompt, not of the empty
  negative one), and the unconditional pass is the stock model. The passes are told apart by their order in the
  stock denoising loop (conditional first), which the step callback checks every step.
- Reference images (``image=``) add image tokens outside the generated grid, and caption upsampling
  (``caption_upsample_temperature``) rewrites the prompt the entities were found in: both are refused with
  entities.
- The knobs' defaults are FLUX.1-dev's scaled to the block count (`DeLeakerConfig.for_model`): unvalidated on
  FLUX.2, for which no weights exist here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

from .chat_entities import ChatPrompt, chat_entity_token_mask, flux2_dev_chat, flux2_klein_chat
from .config import REFERENCE_NUM_BLOCKS, DeLeakerConfig
from .entities import DEFAULT_MAX_ENTITIES, check_entity_rows
from .errors import ConfigError
from .geometry import latent_grid
from .guidance import check_guidance, real_scalar
from .pipeline import (
    check_user_latents,
    one_prompt,
    refuse_non_finite_decode,
    checked_step_callback,
    new_deleaker_state,
    place_unparallel_processors,
)
from .processor import DeLeakerProcessorBase, DeLeakerState
from .processor_flux2 import install_deleaker_flux2_processors, misplaced_flux2_processors


class _DeLeakerFlux2Calls:
    """What both FLUX.2 pipelines add to their stock class (placed before it in the MRO)."""

    num_blocks: Optional[int]

    def _install_deleaker(self) -> None:
        # A pipeline of the text encoder only (transformer=None) is a stock use too; entities need a transformer.
        self.num_blocks = None if self.transformer is None else install_deleaker_flux2_processors(self.transformer)

    def _chat(self) -> ChatPrompt:  # pragma: no cover - each pipeline defines it
        raise NotImplementedError

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
        if self.num_blocks is None:
            raise ConfigError("entities need a transformer; this pipeline was made with transformer=None")
        config = DeLeakerConfig.resolve(deleaker_config, self.num_blocks)
        mask = chat_entity_token_mask(
            self.tokenizer, prompt, entities, self._chat(),
            max_sequence_length=max_sequence_length, max_entities=max_entities,
        )
        grid = latent_grid(height, width, self.vae_scale_factor)
        return new_deleaker_state(mask, grid, config, self._execution_device)

    def _checked_config(
        self, latents: Any, deleaker_config: DeLeakerConfig | Mapping[str, Any] | None, max_entities: int
    ) -> DeLeakerConfig:
        """What both FLUX.2 calls check before any work, in this order: the caller's latents, the DeLeaker config
        (resolved for this transformer), the entity-row count; returns the resolved config."""
        check_user_latents(latents)
        config = DeLeakerConfig.resolve(deleaker_config, self.num_blocks or REFERENCE_NUM_BLOCKS)
        check_entity_rows(max_entities)
        return config

    def _check_processors(self) -> None:
        """Raise `ConfigError` unless every joint attention still runs a DeLeaker processor, without
        parallelism; processors diffusers rebuilt without arguments get their place in the block order here."""
        processors = self.transformer.attn_processors
        others = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, DeLeakerProcessorBase)})
        if others:
            raise ConfigError(
                f"the transformer's attention processors were replaced ({others}); entities need DeLeaker's: call "
                "deleaker.processor_flux2.install_deleaker_flux2_processors(pipe.transformer)"
            )
        misplaced = misplaced_flux2_processors(self.transformer)
        if misplaced:
            raise ConfigError(
                f"blocks {misplaced[:4]} hold the DeLeaker processor of the other block kind (double-stream vs "
                "parallel single-stream); call deleaker.processor_flux2.install_deleaker_flux2_processors"
                "(pipe.transformer)"
            )
        place_unparallel_processors(self.transformer)

    def _entity_state(
        self,
        stock_args: dict[str, Any],
        entities: Sequence[str],
        config: DeLeakerConfig,
        max_entities: int,
    ) -> DeLeakerState:
        """Check what DeLeaker cannot combine with entities, then build this call's state; updates ``stock_args``
        (its height, width and attention kwargs)."""
        prompt = one_prompt("prompt", stock_args["prompt"])
        if stock_args.get("image") is not None:
            raise ConfigError(
                "DeLeaker cannot combine entities with reference images (image=...): their tokens join the image "
                "tokens the entity masks and history are computed over; call without entities or without images"
            )
        if stock_args.get("caption_upsample_temperature"):
            raise ConfigError(
                "DeLeaker cannot combine entities with caption upsampling (caption_upsample_temperature): the text "
                "encoder would rewrite the prompt the entities were found in; call without one or the other"
            )
        attention_kwargs = stock_args.get("attention_kwargs")
        if attention_kwargs and "deleaker_state" in attention_kwargs:
            raise ConfigError("pass entities=..., not a deleaker_state: the pipeline owns the per-call state")
        if self.transformer is None:
            raise ConfigError("entities need a transformer; this pipeline was made with transformer=None")
        self._check_processors()
        height = stock_args["height"] or self.default_sample_size * self.vae_scale_factor
        width = stock_args["width"] or self.default_sample_size * self.vae_scale_factor
        state = self.deleaker_state(
            prompt, entities, height=height, width=width, max_sequence_length=stock_args["max_sequence_length"],
            max_entities=max_entities, deleaker_config=config,
        )
        stock_args.update(
            height=height, width=width, attention_kwargs={**(attention_kwargs or {}), "deleaker_state": state}
        )
        return state

    def _call_checked(
        self,
        stock_args: dict[str, Any],
        user_callback: Callable | None,
        user_tensor_inputs: list[str] | None,
        state: DeLeakerState | None,
        passes_per_step: int = 1,
    ):
        """The stock ``__call__(**stock_args)`` with a step callback that checks the latents (and advances the
        DeLeaker ``state``) before the user's callback, and a check of what the VAE decodes. With a state and
        ``passes_per_step == 2`` (true CFG), the second transformer call of each step runs without DeLeaker."""
        calls = [0]

        def count_then_advance(step_index: int) -> None:
            if calls[0] != (step_index + 1) * passes_per_step:
                raise ConfigError(
                    f"the denoising loop called the transformer {calls[0]} times by step {step_index + 1}, not "
                    f"{passes_per_step} per step: DeLeaker cannot tell its passes apart in this diffusers version"
                )
            state.advance()

        callback, tensor_inputs = checked_step_callback(
            user_callback, user_tensor_inputs, None if state is None else count_then_advance
        )

        def conditional_pass_only(module, args, kwargs):
            calls[0] += 1
            if passes_per_step > 1 and calls[0] % passes_per_step != 1:
                joint = {k: v for k, v in (kwargs.get("joint_attention_kwargs") or {}).items() if k != "deleaker_state"}
                return args, {**kwargs, "joint_attention_kwargs": joint or None}
            return None

        hooks = []
        decoder = getattr(self.vae, "decoder", None)
        if isinstance(decoder, torch.nn.Module):
            hooks.append(decoder.register_forward_hook(refuse_non_finite_decode))
        if state is not None:
            hooks.append(self.transformer.register_forward_pre_hook(conditional_pass_only, with_kwargs=True))
        try:
            return super().__call__(
                **stock_args,
                callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=tensor_inputs,
            )
        finally:
            for hook in hooks:
                hook.remove()


def _plain_ints(*values: Any) -> tuple[Any, ...]:
    """NumPy integers as Python ints (the stock pipelines compute with them; our int checks take them too)."""
    return tuple(int(v) if isinstance(v, np.integer) else v for v in values)


def _no_entities(entities: Any) -> bool:
    return entities is None or (isinstance(entities, (list, tuple)) and len(entities) == 0)


class DeLeakerFlux2Pipeline(_DeLeakerFlux2Calls, Flux2Pipeline):
    """``Flux2Pipeline`` (FLUX.2 [dev], Mistral 3 text encoder) that mitigates leakage between the ``entities``
    named in the prompt. Loads and runs like ``Flux2Pipeline``; see the module docstring."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self._install_deleaker()

    # diffusers reads the component classes from __init__'s annotations (`from_pipe`, loading): Flux2Pipeline's.
    __init__.__annotations__ = dict(Flux2Pipeline.__init__.__annotations__)

    def _chat(self) -> ChatPrompt:
        return flux2_dev_chat(self.system_message)

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int] = (10, 20, 30),
        caption_upsample_temperature: float = None,
        *,
        entities: Optional[Sequence[str]] = None,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
        max_entities: int = DEFAULT_MAX_ENTITIES,
    ) -> Flux2PipelineOutput | tuple:
        """``Flux2Pipeline.__call__`` (same parameters, order and defaults) plus ``entities`` (2 to
        ``max_entities`` words of the prompt) and ``deleaker_config`` (a `DeLeakerConfig`, a mapping of overrides
        of the model-scaled defaults, or None). Without entities it computes what ``Flux2Pipeline`` computes."""
        # FLUX.2 [dev] embeds the guidance x 1000 in the transformer's dtype, as FLUX.1-dev: a NaN or an overflow
        # there is a black image.
        guided = self.transformer is not None and bool(getattr(self.transformer.config, "guidance_embeds", False))
        guidance_scale = real_scalar("guidance_scale", guidance_scale)
        check_guidance("guidance_scale", guidance_scale, self.transformer.dtype if guided else torch.float64)
        height, width, num_inference_steps, num_images_per_prompt, max_sequence_length, max_entities = _plain_ints(
            height, width, num_inference_steps, num_images_per_prompt, max_sequence_length, max_entities
        )
        config = self._checked_config(latents, deleaker_config, max_entities)
        stock_args = dict(
            image=image, prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            sigmas=sigmas, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds, output_type=output_type,
            return_dict=return_dict, attention_kwargs=attention_kwargs, max_sequence_length=max_sequence_length,
            text_encoder_out_layers=text_encoder_out_layers, caption_upsample_temperature=caption_upsample_temperature,
        )
        if _no_entities(entities):
            return self._call_checked(stock_args, callback_on_step_end, callback_on_step_end_tensor_inputs, None)
        state = self._entity_state(stock_args, entities, config, max_entities)
        return self._call_checked(stock_args, callback_on_step_end, callback_on_step_end_tensor_inputs, state)


class DeLeakerFlux2KleinPipeline(_DeLeakerFlux2Calls, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` (FLUX.2 [klein], Qwen3 text encoder) that mitigates leakage between the ``entities``
    named in the prompt. Loads and runs like ``Flux2KleinPipeline``; with true CFG, DeLeaker acts on the
    conditional pass only (see the module docstring)."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, is_distilled: bool = False):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
            is_distilled=is_distilled,
        )
        self._install_deleaker()

    __init__.__annotations__ = dict(Flux2KleinPipeline.__init__.__annotations__)

    def _chat(self) -> ChatPrompt:
        return flux2_klein_chat()

    @torch.no_grad()
    def __call__(
        self,
        image: list[PIL.Image.Image] | PIL.Image.Image | None = None,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: str | list[str] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int, dict], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int] = (9, 18, 27),
        *,
        entities: Optional[Sequence[str]] = None,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
        max_entities: int = DEFAULT_MAX_ENTITIES,
    ) -> Flux2PipelineOutput | tuple:
        """``Flux2KleinPipeline.__call__`` (same parameters, order and defaults) plus ``entities`` and
        ``deleaker_config`` (as `DeLeakerFlux2Pipeline`). Without entities it computes what
        ``Flux2KleinPipeline`` computes."""
        guidance_scale = real_scalar("guidance_scale", guidance_scale)
        height, width, num_inference_steps, num_images_per_prompt, max_sequence_length, max_entities = _plain_ints(
            height, width, num_inference_steps, num_images_per_prompt, max_sequence_length, max_entities
        )
        config = self._checked_config(latents, deleaker_config, max_entities)
        stock_args = dict(
            image=image, prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            sigmas=sigmas, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, output_type=output_type, return_dict=return_dict,
            attention_kwargs=attention_kwargs, max_sequence_length=max_sequence_length,
            text_encoder_out_layers=text_encoder_out_layers,
        )
        if _no_entities(entities):
            return self._call_checked(stock_args, callback_on_step_end, callback_on_step_end_tensor_inputs, None)
        state = self._entity_state(stock_args, entities, config, max_entities)
        passes = 2 if guidance_scale > 1 and not self.config.is_distilled else 1
        return self._call_checked(
            stock_args, callback_on_step_end, callback_on_step_end_tensor_inputs, state, passes_per_step=passes
        )
