"""``FluxDeLeakerWrapper``: the FLUX transformer (FLUX.1 or FLUX.2) with DeLeaker state as plain tensors, for export.

The wrapper's ``forward`` takes exactly the contract's inputs (`FluxTransformerIO.input_names`, in order) and
returns ``(noise_pred, history_out)``. Nothing in it branches on input values, so ``torch.export`` sees one graph
in which every joint attention is one ``torch.ops.deleaker.attention`` call, with the history threaded through
them in block order.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Tuple

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from torch import nn

from deleaker.config import DeLeakerConfig, model_family
from deleaker.errors import ShapeError
from deleaker.processor import (
    DeLeakerFluxAttnProcessor,
    DeLeakerState,
    install_deleaker_processors,
    place_deleaker_processors,
)
from deleaker.processor_flux2 import (
    DeLeakerFlux2AttnProcessor,
    DeLeakerFlux2ParallelAttnProcessor,
    install_deleaker_flux2_processors,
)

from .contract import FluxTransformerIO

Tensor = torch.Tensor


def float32_rotary_embedding(ids: Tensor, axes_dim: Sequence[int], theta: int) -> Tuple[Tensor, Tensor]:
    """``(cos, sin)`` of the rotary embedding of ``ids`` (``(..., len(axes_dim))``: one position per axis, the last
    dimension), the axes concatenated, as diffusers' ``FluxPosEmbed``/``Flux2PosEmbed`` but with float32 angles."""
    pos = ids.float()
    cos_out, sin_out = [], []
    for axis, dim in enumerate(axes_dim):
        cos, sin = get_1d_rotary_pos_embed(
            dim, pos[..., axis], theta=theta, repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float32,
        )
        cos_out.append(cos)
        sin_out.append(sin)
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


class Float32FluxPosEmbed(FluxPosEmbed):
    """``FluxPosEmbed`` with its rotary angles in float32 instead of float64.

    TensorRT has no float64 tensors; diffusers computes FLUX's RoPE angles in float64 on CUDA/CPU. Angles are at most
    ``max(ids)`` radians (~128 at 2048 px), so float32 changes cos/sin by ~1e-5 at worst: far below fp16/bf16
    engines' rounding, and within the fp32 ORT-vs-PyTorch tolerance of the tests.
    """

    def forward(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        return float32_rotary_embedding(ids, self.axes_dim, self.theta)


class Float32Flux2PosEmbed(Flux2PosEmbed):
    """``Flux2PosEmbed`` (FLUX.2: one axis per entry of ``axes_dim``) with float32 rotary angles, for the reasons
    of `Float32FluxPosEmbed`."""

    def forward(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        return float32_rotary_embedding(ids, self.axes_dim, self.theta)


@contextlib.contextmanager
def float32_rope(transformer: nn.Module) -> Iterator[None]:
    """Within the block, ``transformer.pos_embed`` computes in float32 (`Float32FluxPosEmbed`, or
    `Float32Flux2PosEmbed` for FLUX.2); restored after."""
    original = transformer.pos_embed
    kind = Float32Flux2PosEmbed if isinstance(original, Flux2PosEmbed) else Float32FluxPosEmbed
    replacement = kind(theta=original.theta, axes_dim=original.axes_dim)
    transformer.pos_embed = replacement
    try:
        yield
    finally:
        transformer.pos_embed = original


def has_deleaker_processors(transformer: nn.Module) -> bool:
    """True when every joint attention of ``transformer`` already runs the DeLeaker processor of its block: a
    `DeLeakerFluxAttnProcessor` (FLUX.1), or FLUX.2's double-stream and parallel single-stream ones."""
    double, single = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    if isinstance(transformer.pos_embed, Flux2PosEmbed):
        kinds = [DeLeakerFlux2AttnProcessor] * len(double) + [DeLeakerFlux2ParallelAttnProcessor] * len(single)
    else:
        kinds = [DeLeakerFluxAttnProcessor] * (len(double) + len(single))
    return all(isinstance(block.attn.processor, kind) for block, kind in zip(double + single, kinds))


class FluxDeLeakerWrapper(nn.Module):
    """Fixed-signature ``FluxTransformer2DModel`` + DeLeaker (use `make_wrapper` to get the right subclass).

    Installs the DeLeaker processors on ``transformer`` unless they are there (they behave as stock FLUX when no
    state is passed, so this does not change the transformer's other uses). ``config`` is used as given (already
    scaled to the model, see `DeLeakerConfig.for_model`).
    """

    def __init__(self, transformer: nn.Module, io: FluxTransformerIO, config: DeLeakerConfig) -> None:
        super().__init__()
        if not isinstance(config, DeLeakerConfig):
            raise TypeError(f"config must be a DeLeakerConfig, got {type(config).__name__}")
        if not has_deleaker_processors(transformer):
            install = install_deleaker_flux2_processors if io.family == "flux2" else install_deleaker_processors
            install(transformer)
        # Processors diffusers rebuilt without arguments (load/unload_ip_adapter) need their block offsets back.
        place_deleaker_processors(transformer)
        self.transformer = transformer
        self.io = io
        self.config = config

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor,
        entity_mask: Tensor,
        history: Tensor,
        step: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """One denoising evaluation of a model with guidance embeddings (FLUX.1-dev).

        Args (shapes as in `FluxTransformerIO`): ``hidden_states (B, Nimg, C_in)``, ``encoder_hidden_states
        (B, T, joint_dim)``, ``pooled_projections (B, pooled_dim)``, ``timestep (B,)``, ``img_ids (Nimg, 3)``,
        ``txt_ids (T, 3)``, ``guidance (B,)``, ``entity_mask (E_max, T)`` int, ``history (B, E_max, Nimg)``
        float32, ``step ()`` int.

        Returns: ``noise_pred (B, Nimg, C_out)`` and ``history_out (B, E_max, Nimg)`` float32.
        """
        return self._run(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
            entity_mask, history, step,
        )

    def _run(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Optional[Tensor],
        entity_mask: Tensor,
        history: Tensor,
        step: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        # The node takes a bool mask and an int64 step (the kernels' ABI); the graph inputs are int32.
        state = DeLeakerState(
            entity_mask=entity_mask.to(torch.bool),
            grid=self.io.grid,
            config=self.config,
            step=step.to(torch.int64).reshape(()),
            history=history,
        )
        # FLUX.2's transformer takes no pooled projection (its wrappers pass None).
        pooled = {} if pooled_projections is None else {"pooled_projections": pooled_projections}
        noise_pred = self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            **pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs={"deleaker_state": state},
            return_dict=False,
        )[0]
        return noise_pred, state.history


class FluxDeLeakerWrapperNoGuidance(FluxDeLeakerWrapper):
    """`FluxDeLeakerWrapper` of a model without guidance embeddings (FLUX.1-schnell): no ``guidance`` input."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        entity_mask: Tensor,
        history: Tensor,
        step: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """As `FluxDeLeakerWrapper.forward`, without ``guidance``."""
        return self._run(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, None,
            entity_mask, history, step,
        )


class Flux2DeLeakerWrapper(FluxDeLeakerWrapper):
    """`FluxDeLeakerWrapper` of a ``Flux2Transformer2DModel`` with guidance embeddings (FLUX.2 [dev]): no
    ``pooled_projections`` input; ids have 4 RoPE axes."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor,
        entity_mask: Tensor,
        history: Tensor,
        step: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """As `FluxDeLeakerWrapper.forward`, without ``pooled_projections``."""
        return self._run(
            hidden_states, encoder_hidden_states, None, timestep, img_ids, txt_ids, guidance, entity_mask, history,
            step,
        )


class Flux2DeLeakerWrapperNoGuidance(FluxDeLeakerWrapper):
    """`Flux2DeLeakerWrapper` of a model without guidance embeddings (FLUX.2 [klein]): no ``guidance`` input."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        entity_mask: Tensor,
        history: Tensor,
        step: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """As `Flux2DeLeakerWrapper.forward`, without ``guidance``."""
        return self._run(
            hidden_states, encoder_hidden_states, None, timestep, img_ids, txt_ids, None, entity_mask, history, step
        )


def make_wrapper(transformer: nn.Module, io: FluxTransformerIO, config: DeLeakerConfig) -> FluxDeLeakerWrapper:
    """The wrapper whose ``forward`` takes ``io.input_names`` in order (FLUX.1 or FLUX.2, with or without
    ``guidance``)."""
    if bool(transformer.config.guidance_embeds) != io.guidance_embeds:
        raise ShapeError(
            f"the contract says guidance_embeds={io.guidance_embeds} but the transformer's config says "
            f"{transformer.config.guidance_embeds}; build the contract from this transformer"
        )
    family = model_family(transformer.config)
    if family != io.family:
        raise ShapeError(
            f"the contract is for family {io.family!r} but the transformer is {family!r}; build the contract from "
            "this transformer"
        )
    if family == "flux2":
        cls = Flux2DeLeakerWrapper if io.guidance_embeds else Flux2DeLeakerWrapperNoGuidance
    else:
        cls = FluxDeLeakerWrapper if io.guidance_embeds else FluxDeLeakerWrapperNoGuidance
    return cls(transformer, io, config)
