"""``DeLeakerFluxPipeline``: diffusers' ``FluxPipeline`` with DeLeaker attention, state owned per call."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from diffusers import FluxPipeline

from .config import DeLeakerConfig
from .entities import check_entity_rows, entity_token_mask
from .errors import ConfigError
from .geometry import latent_grid
from .guidance import check_finite_number, check_guidance
from .processor import DeLeakerFluxAttnProcessor, DeLeakerState, install_deleaker_processors

#: Entity rows of the mask (the spec's E_max); prompts may name fewer entities.
DEFAULT_MAX_ENTITIES = 4


class DeLeakerFluxPipeline(FluxPipeline):
    """``FluxPipeline`` that mitigates leakage between the ``entities`` named in the prompt.

    Loads like ``FluxPipeline`` (``from_pretrained`` on a local diffusers folder, or built from components).
    Called without entities it is exactly ``FluxPipeline``. With entities, each call builds its own
    `DeLeakerState` (entity mask, grid, config, step, history) and passes it to every joint attention.
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
        self.num_blocks = install_deleaker_processors(self.transformer)

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
        device = self._execution_device
        return DeLeakerState(
            entity_mask=mask.to(device),
            grid=latent_grid(height, width, self.vae_scale_factor),
            config=config,
            step=torch.zeros((), dtype=torch.int64, device=device),
        )

    def _check_processors(self) -> None:
        """Raise `ConfigError` unless every joint attention still runs DeLeaker's processor, unfused: entities would
        otherwise be ignored (a replaced processor) or refused deep in the first attention (fused projections)."""
        processors = self.transformer.attn_processors
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

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        entities: Optional[Sequence[str]] = None,
        deleaker_config: DeLeakerConfig | Mapping[str, Any] | None = None,
        max_entities: int = DEFAULT_MAX_ENTITIES,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        **kwargs: Any,
    ):
        """``FluxPipeline.__call__`` plus ``entities`` (strings of the prompt, 2 to ``max_entities``) and
        ``deleaker_config`` (a `DeLeakerConfig` used as is, a mapping of overrides of the model-scaled defaults,
        or None for those defaults). Without entities, exactly ``FluxPipeline.__call__``.
        """
        common = dict(
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **kwargs,
        )
        # Checked with or without entities, before any work: a NaN guidance, or one that overflows the embedding
        # (x 1000 in the transformer's dtype), gives a NaN (black) image silently in FluxPipeline, and DeLeaker's own
        # options are checked even when they are not used.
        guided = bool(getattr(self.transformer.config, "guidance_embeds", False))
        embedding_dtype = self.transformer.dtype if guided else torch.float64
        check_guidance("guidance_scale", kwargs.get("guidance_scale", 3.5), embedding_dtype)
        config = DeLeakerConfig.resolve(deleaker_config, self.num_blocks)
        check_entity_rows(max_entities)
        if entities is None or (isinstance(entities, (list, tuple)) and len(entities) == 0):
            return super().__call__(
                prompt=prompt,
                joint_attention_kwargs=joint_attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                **common,
            )

        _one_prompt("prompt", prompt)
        # The entity mask indexes T5's tokens, and T5 reads prompt_2 when it is given (FluxPipeline.encode_prompt:
        # ``prompt_2 or prompt``): entities are looked up in that text, or they would mark unrelated tokens.
        t5_text = _one_prompt("prompt_2", kwargs.get("prompt_2") or prompt)
        if kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None:
            true_cfg = kwargs.get("true_cfg_scale", 1.0)
            check_finite_number("true_cfg_scale", true_cfg)
            if true_cfg > 1:
                raise ConfigError("DeLeaker does not support true CFG (negative prompts): its history is per pass")
        if joint_attention_kwargs and "deleaker_state" in joint_attention_kwargs:
            raise ConfigError("pass entities=..., not a deleaker_state: the pipeline owns the per-call state")
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

        def advance_then_user_callback(pipe, step_index, timestep, callback_kwargs):
            state.advance()
            if callback_on_step_end is None:
                return {}
            return callback_on_step_end(pipe, step_index, timestep, callback_kwargs)

        return super().__call__(
            prompt=prompt,
            joint_attention_kwargs={**(joint_attention_kwargs or {}), "deleaker_state": state},
            callback_on_step_end=advance_then_user_callback,
            **{**common, "height": height, "width": width},
        )


def _one_prompt(name: str, prompt: Any) -> str:
    """The one text ``prompt`` holds (a str, or a list of copies of one str); `ConfigError` otherwise."""
    if isinstance(prompt, (list, tuple)):
        if len(prompt) == 0 or len(set(prompt)) != 1:
            raise ConfigError(f"entities apply to one prompt; got a list of {len(set(prompt))} different {name}s")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ConfigError(f"entities need the prompt text ({name}=...), not only prompt embeddings")
    return prompt
