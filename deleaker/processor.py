"""DeLeaker in diffusers' FLUX transformers: the processor machinery every model shares (`DeLeakerProcessorBase`),
FLUX.1's ``FluxTransformer2DModel`` processor, and the per-call state they read (FLUX.2's processors live in
`deleaker.processor_flux2`).

FLUX.1's processor does what diffusers' ``FluxAttnProcessor`` does (projections, QK-norm, text-first concatenation,
RoPE) and replaces only the attention by ``torch.ops.deleaker.attention``. It holds no per-call state: the pipeline
passes a `DeLeakerState` through ``joint_attention_kwargs={"deleaker_state": state}``; without one, the stock
``FluxAttnProcessor`` runs, so the model is exactly diffusers' FLUX.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .config import DeLeakerConfig, num_joint_blocks
from .errors import ConfigError, ShapeError
from .library import call_attention

Tensor = torch.Tensor


@dataclass
class DeLeakerState:
    """What one generation call threads through every joint attention of the transformer.

    Attributes:
        entity_mask: ``(E_max, T)`` bool, the entities' text tokens, on the model's device.
        grid: ``(gh, gw)``, the latent patch grid of this call.
        config: the knobs, already scaled to the model (`DeLeakerConfig.for_model`).
        step: int64 scalar tensor, the denoising step index; the caller advances it after each step.
        history: ``(B, E_max, gh * gw)`` float32 running mean of entity affinities; ``None`` until the first
            block allocates zeros for the batch it sees. Each block replaces it with its updated history.
    """

    entity_mask: Tensor
    grid: Tuple[int, int]
    config: DeLeakerConfig
    step: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    history: Optional[Tensor] = None

    def advance(self) -> None:
        """Move to the next denoising step (in place, so a captured graph sees the new value)."""
        self.step.add_(1)


class DeLeakerProcessorBase:
    """What every DeLeaker attention processor shares, whatever the model (FLUX.1, FLUX.2): its place in the block
    order, the stock processor it runs without a state (``_plain``, made from `stock_processor_class`), and the
    attention itself on text-first ``(B, N, H, D)`` projections (`_deleaker_attention`).

    It constructs without arguments, as diffusers rebuilds processors (``processor.__class__()`` in
    ``load_ip_adapter``/``unload_ip_adapter``); such a processor has no place in the block order yet
    (`place_deleaker_processors` gives it one) and refuses a state until it has.
    """

    #: The diffusers processor this one is without a `DeLeakerState`; set by each subclass.
    stock_processor_class: type = FluxAttnProcessor

    def __init__(self, block_offset: Optional[int] = None, num_blocks: Optional[int] = None) -> None:
        if (block_offset is None) != (num_blocks is None):
            raise ValueError("give both block_offset and num_blocks, or neither")
        if num_blocks is not None and not 0 <= block_offset < num_blocks:
            raise ValueError(f"block_offset must be in [0, {num_blocks}), got {block_offset}")
        self.block_offset = block_offset
        self.num_blocks = num_blocks
        self._plain = self.stock_processor_class()

    # diffusers configures processors through these two attributes; they belong to the stock processor that runs
    # without a state, so they are forwarded to it rather than kept on ours, where nothing would read them.
    @property
    def _attention_backend(self):
        return self._plain._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self._plain._attention_backend = backend

    @property
    def _parallel_config(self):
        return self._plain._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self._plain._parallel_config = config

    def _check_state_allowed(self, attn, attention_mask: Optional[Tensor]) -> None:
        """Raise unless DeLeaker can run here: a place in the block order, no parallelism, no mask, unfused."""
        if self.num_blocks is None:
            raise ConfigError(
                "this DeLeaker processor has no place in the block order (it was built without arguments, as "
                "diffusers rebuilds processors); call deleaker.processor.place_deleaker_processors(transformer)"
            )
        if self._parallel_config is not None:
            raise ConfigError(
                "DeLeaker attention cannot run under context parallelism: each rank would see only part of the image "
                "tokens its entity masks and history are computed over; run without entities, or without parallelism"
            )
        if attention_mask is not None:
            raise ShapeError("DeLeaker attention takes no attention_mask (FLUX passes none)")
        if getattr(attn, "fused_projections", False):
            raise ShapeError("DeLeaker attention needs unfused projections; call transformer.unfuse_qkv_projections()")

    def _check_text_len(self, state: DeLeakerState, text_len: int) -> None:
        """Raise unless the entity mask covers the ``text_len`` text tokens of the prompt embedding."""
        if text_len != state.entity_mask.shape[1]:
            raise ShapeError(
                f"the entity mask covers T = {state.entity_mask.shape[1]} text tokens but the prompt embedding has "
                f"{text_len}; build the mask with the pipeline's max_sequence_length"
            )

    @staticmethod
    def _rotate(
        query: Tensor, key: Tensor, image_rotary_emb: Optional[Tuple[Tensor, Tensor]]
    ) -> Tuple[Tensor, Tensor]:
        """``query`` and ``key`` (B, N, H, D) with the rotary embedding applied, when there is one."""
        if image_rotary_emb is None:
            return query, key
        return (
            apply_rotary_emb(query, image_rotary_emb, sequence_dim=1),
            apply_rotary_emb(key, image_rotary_emb, sequence_dim=1),
        )

    def _text_first_projections(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor],
        image_rotary_emb: Optional[Tuple[Tensor, Tensor]],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Query, key and value (B, N, H, D) of an attention with unfused projections, after QK-norm and RoPE.

        With ``encoder_hidden_states`` (a double-stream block, FLUX.1 or FLUX.2) the text tokens' own projections
        are put first, ``[text, image]``; without, ``hidden_states`` already holds the whole sequence.
        """
        query, key, value = (
            proj(hidden_states).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:  # double-stream block: text tokens come in separately
            text_query, text_key, text_value = (
                proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        query, key = self._rotate(query, key, image_rotary_emb)
        return query, key, value

    def _deleaker_attention(self, attn, query: Tensor, key: Tensor, value: Tensor, state: DeLeakerState) -> Tensor:
        """DeLeaker attention of text-first ``(B, N, H, D)`` projections (after QK-norm and RoPE), as
        ``(B, N, H * D)`` in the query's dtype; replaces ``state.history`` with the block's updated history."""
        if query.shape[2] != attn.heads:
            raise ConfigError(
                f"DeLeaker attention needs all {attn.heads} heads of the block but this rank holds {query.shape[2]} "
                "(tensor parallelism): its entity affinities are means over every head; run without parallelism"
            )
        # (B, N, H, D) -> (B, H, N, D), the op's layout.
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        text_len = state.entity_mask.shape[1]
        if state.history is None:
            state.history = query.new_zeros(
                query.shape[0], state.entity_mask.shape[0], query.shape[2] - text_len, dtype=torch.float32
            )
        out, state.history = call_attention(
            query,
            key,
            value,
            state.entity_mask,
            state.history,
            state.step,
            block_offset=self.block_offset,
            num_blocks=self.num_blocks,
            grid=state.grid,
            config=state.config,
        )
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class DeLeakerFluxAttnProcessor(DeLeakerProcessorBase):
    """Attention processor of one FLUX joint attention, at ``block_offset`` of ``num_blocks`` blocks per step.

    Without a `DeLeakerState` it is diffusers' ``FluxAttnProcessor``: the stock processor it holds runs, and the
    attention backend and parallel config that diffusers sets on processors (``set_attention_backend``,
    ``enable_parallelism``) are that stock processor's. Constructs without arguments (see `DeLeakerProcessorBase`).
    """

    stock_processor_class = FluxAttnProcessor

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

        query, key, value = self._text_first_projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        state = deleaker_state
        text_len = state.entity_mask.shape[1]
        if encoder_hidden_states is not None:
            self._check_text_len(state, encoder_hidden_states.shape[1])
        hidden_states = self._deleaker_attention(attn, query, key, value, state)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def joint_attention_blocks(transformer) -> list:
    """The blocks of ``transformer`` that hold a joint attention, in execution order (double, then single)."""
    num_blocks = num_joint_blocks(transformer.config)
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    if len(blocks) != num_blocks:
        raise ShapeError(f"transformer has {len(blocks)} blocks but its config says {num_blocks}")
    return blocks


def install_deleaker_processors(transformer) -> int:
    """Give every joint attention of ``transformer`` a `DeLeakerFluxAttnProcessor`; returns ``num_blocks``.

    Double-stream blocks get offsets ``0 .. num_layers - 1``, single-stream blocks follow, in execution order.
    """
    blocks = joint_attention_blocks(transformer)
    for offset, block in enumerate(blocks):
        block.attn.set_processor(DeLeakerFluxAttnProcessor(offset, len(blocks)))
    return len(blocks)


def place_deleaker_processors(transformer) -> int:
    """Give each DeLeaker processor (`DeLeakerProcessorBase`: FLUX.1's and FLUX.2's) of ``transformer`` its block's place in execution order (in place,
    keeping its attention backend and parallel config); returns ``num_blocks``. Processors of other classes are
    left alone.

    diffusers rebuilds processors without arguments (``processor.__class__()``), and ``set_attn_processor`` with
    one processor shares that object between every block: such processors get their place here, a shared one as
    a copy per block, so no block runs with another block's offset.
    """
    blocks = joint_attention_blocks(transformer)
    seen: set[int] = set()
    for offset, block in enumerate(blocks):
        processor = block.attn.processor
        if not isinstance(processor, DeLeakerProcessorBase):
            continue
        if id(processor) in seen:
            processor = copy.copy(processor)
            processor._plain = copy.copy(processor._plain)
            block.attn.set_processor(processor)
        seen.add(id(processor))
        processor.block_offset, processor.num_blocks = offset, len(blocks)
    return len(blocks)
