"""DeLeakerFluxAttnProcessor as diffusers configures processors: built without arguments (``__class__()``), its
attention backend and parallel config reaching the stock processor inside it, its place in the block order."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName

from deleaker import DeLeakerConfig
from deleaker.entities import entity_token_mask
from deleaker.errors import ConfigError
from deleaker.processor import (
    DeLeakerFluxAttnProcessor,
    DeLeakerState,
    install_deleaker_processors,
    place_deleaker_processors,
)
from deleaker.pipeline import DeLeakerFluxPipeline

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
TEXT_LEN = 32


@pytest.fixture
def transformer(tiny_components):
    with torch.no_grad():
        yield copy.deepcopy(tiny_components["transformer"])


def test_constructs_without_arguments_as_diffusers_rebuilds_processors():
    processor = DeLeakerFluxAttnProcessor()
    assert processor.block_offset is None and processor.num_blocks is None
    assert type(processor)().num_blocks is None  # what load_ip_adapter does: processor.__class__()
    with pytest.raises(ValueError, match="give both block_offset and num_blocks, or neither"):
        DeLeakerFluxAttnProcessor(3)
    with pytest.raises(ValueError, match=r"block_offset must be in \[0, 4\), got 4"):
        DeLeakerFluxAttnProcessor(4, 4)


def test_backend_and_parallel_config_are_the_stock_processors():
    """diffusers sets ``processor._attention_backend`` / ``._parallel_config`` on every processor that has them;
    ours hands both to the stock processor that computes its attention without a state."""
    processor = DeLeakerFluxAttnProcessor(0, 4)
    assert processor._attention_backend is None and processor._parallel_config is None
    processor._attention_backend = AttentionBackendName._NATIVE_MATH
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    processor._parallel_config = config
    assert processor._plain._attention_backend is AttentionBackendName._NATIVE_MATH
    assert processor._plain._parallel_config is config
    assert "_attention_backend" not in vars(processor) and "_parallel_config" not in vars(processor)


def _state(tiny_components, transformer) -> DeLeakerState:
    """A fresh per-call state for a 64x64 image (what the pipeline builds), without touching the processors."""
    mask = entity_token_mask(tiny_components["tokenizer_2"], PROMPT, ["cat", "cheetah"], max_sequence_length=TEXT_LEN,
                             max_entities=4)
    config = DeLeakerConfig(do_smoothing=False, start_aggregating_from=1, stop_aggregating_at=9,
                            start_intervention_from=2, stop_intervention_at=40)
    return DeLeakerState(entity_mask=mask, grid=(8, 8), config=config)


def _inputs(transformer):
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, 64, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT_LEN, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 0.7),
        guidance=torch.full((1,), 3.5),
        txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=DeLeakerFluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
        return_dict=False,
    )


def test_a_processor_without_a_place_refuses_a_state_until_placed(tiny_components, transformer):
    install_deleaker_processors(transformer)
    state = _state(tiny_components, transformer)
    want = transformer(**_inputs(transformer), joint_attention_kwargs={"deleaker_state": state})[0]
    transformer.set_attn_processor({name: DeLeakerFluxAttnProcessor() for name in transformer.attn_processors})
    state = _state(tiny_components, transformer)
    with pytest.raises(ConfigError, match="no place in the block order .*place_deleaker_processors"):
        transformer(**_inputs(transformer), joint_attention_kwargs={"deleaker_state": state})
    assert place_deleaker_processors(transformer) == 4
    state = _state(tiny_components, transformer)
    got = transformer(**_inputs(transformer), joint_attention_kwargs={"deleaker_state": state})[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_placing_keeps_each_processors_backend_and_splits_a_shared_one(transformer):
    shared = DeLeakerFluxAttnProcessor()
    shared._attention_backend = AttentionBackendName._NATIVE_MATH
    transformer.set_attn_processor(shared)
    place_deleaker_processors(transformer)
    processors = list(transformer.attn_processors.values())
    assert [p.block_offset for p in processors] == [0, 1, 2, 3]
    assert len({id(p) for p in processors}) == 4 and len({id(p._plain) for p in processors}) == 4
    assert all(p._attention_backend is AttentionBackendName._NATIVE_MATH for p in processors)


def test_a_state_under_context_parallelism_is_refused(tiny_components, transformer):
    """Context parallelism gives each rank part of the image tokens: entity masks over part of the image would be
    computed wrongly, so the processor refuses (the pipeline refuses earlier, before any work)."""
    install_deleaker_processors(transformer)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    for processor in transformer.attn_processors.values():
        processor._parallel_config = config
    state = _state(tiny_components, transformer)
    with pytest.raises(ConfigError, match="cannot run under context parallelism"):
        transformer(**_inputs(transformer), joint_attention_kwargs={"deleaker_state": state})
