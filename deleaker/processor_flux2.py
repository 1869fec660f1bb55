"""DeLeaker in diffusers' ``Flux2Transformer2DModel`` (FLUX.2 [dev] and [klein]): its two attention processors.

FLUX.2's joint attention puts the text tokens first, as FLUX.1's: the double-stream blocks (``Flux2Attention``)
concatenate ``[text, image]`` projections, and the parallel single-stream blocks (``Flux2ParallelSelfAttention``)
see the concatenated ``[text, image]`` sequence, with the QKV projection fused to the MLP's input projection and
the attention output fused to the MLP's output. Each processor here does what diffusers' processor does and
replaces only the attention by ``torch.ops.deleaker.attention``, through `DeLeakerProcessorBase` (shared with
FLUX.1). Without a `DeLeakerState` the stock processor runs, so the model is exactly diffusers' FLUX.2.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)

from .errors import ShapeError
from .processor import DeLeakerProcessorBase, DeLeakerState, joint_attention_blocks

Tensor = torch.Tensor


class DeLeakerFlux2AttnProcessor(DeLeakerProcessorBase):
    """Processor of one FLUX.2 double-stream attention (``Flux2Attention``); without a state, diffusers'
    ``Flux2AttnProcessor``."""

    stock_processor_class = Flux2AttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
        deleaker_state: Optional[DeLeakerState] = None,
    ):
        if deleaker_state is None:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check_state_allowed(attn, attention_mask)
        if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
            raise ShapeError("a FLUX.2 double-stream attention needs the text tokens (encoder_hidden_states)")
        self._check_text_len(deleaker_state, encoder_hidden_states.shape[1])

        query, key, value = self._text_first_projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        hidden_states = self._deleaker_attention(attn, query, key, value, deleaker_state)
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


class DeLeakerFlux2ParallelAttnProcessor(DeLeakerProcessorBase):
    """Processor of one FLUX.2 parallel single-stream attention (``Flux2ParallelSelfAttention``, text tokens
    first in ``hidden_states``); without a state, diffusers' ``Flux2ParallelSelfAttnProcessor``."""

    stock_processor_class = Flux2ParallelSelfAttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
        deleaker_state: Optional[DeLeakerState] = None,
    ) -> Tensor:
        if deleaker_state is None:
            return self._plain(attn, hidden_states, attention_mask, image_rotary_emb)
        self._check_state_allowed(attn, attention_mask)

        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        if projected.shape[-1] != qkv_dim + attn.mlp_hidden_dim * attn.mlp_mult_factor:
            # A column-sharded projection (tensor parallelism) holds a part of the heads; the entity affinities are
            # means over all of them.
            raise ShapeError(
                f"DeLeaker attention needs the whole fused projection ({qkv_dim} QKV columns) but this rank holds "
                f"{projected.shape[-1]} columns (tensor parallelism); run without parallelism"
            )
        qkv, mlp_hidden_states = projected.split([qkv_dim, projected.shape[-1] - qkv_dim], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = self._rotate(attn.norm_q(query), attn.norm_k(key), image_rotary_emb)

        attn_output = self._deleaker_attention(attn, query, key, value, deleaker_state)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([attn_output, mlp_hidden_states], dim=-1))


def misplaced_flux2_processors(transformer: Flux2Transformer2DModel) -> list[str]:
    """Blocks whose DeLeaker processor is of the other block kind (e.g. one processor set on every block with
    ``set_attn_processor``): a double-stream processor cannot run a parallel single-stream attention, nor the
    reverse. Returns their names (``transformer_blocks.0``...), empty when every block has its own kind."""
    wrong = []
    for prefix, blocks, kind in (
        ("transformer_blocks", transformer.transformer_blocks, DeLeakerFlux2ParallelAttnProcessor),
        ("single_transformer_blocks", transformer.single_transformer_blocks, DeLeakerFlux2AttnProcessor),
    ):
        wrong += [f"{prefix}.{i}" for i, block in enumerate(blocks) if isinstance(block.attn.processor, kind)]
    return wrong


def install_deleaker_flux2_processors(transformer: Flux2Transformer2DModel) -> int:
    """Give every joint attention of a ``Flux2Transformer2DModel`` its DeLeaker processor; returns ``num_blocks``.

    Double-stream blocks get `DeLeakerFlux2AttnProcessor` at offsets ``0 .. num_layers - 1``, the single-stream
    blocks `DeLeakerFlux2ParallelAttnProcessor` after them, in execution order (as for FLUX.1).
    """
    blocks = joint_attention_blocks(transformer)
    num_double = len(transformer.transformer_blocks)
    for offset, block in enumerate(blocks):
        kind = DeLeakerFlux2AttnProcessor if offset < num_double else DeLeakerFlux2ParallelAttnProcessor
        block.attn.set_processor(kind(offset, len(blocks)))
    return len(blocks)
