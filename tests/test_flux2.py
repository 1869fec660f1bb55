"""FLUX.2 [dev] and [klein]: DeLeaker processors == the op on the model's own projections, the pipelines == the
stock ones without entities, and with entities an image DeLeaker changed (tiny models of deleaker.tiny_flux2)."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.models.transformers import transformer_flux2

from deleaker import DeLeakerConfig
from deleaker.chat_entities import chat_entity_token_mask
from deleaker.errors import ConfigError, EntityError
from deleaker.geometry import latent_grid
from deleaker.pipeline_flux2 import DeLeakerFlux2KleinPipeline, DeLeakerFlux2Pipeline
from deleaker.processor import DeLeakerProcessorBase, DeLeakerState, place_deleaker_processors
from deleaker.processor_flux2 import (
    DeLeakerFlux2AttnProcessor,
    DeLeakerFlux2ParallelAttnProcessor,
    install_deleaker_flux2_processors,
)
from deleaker.tiny_flux2 import build_tiny_flux2_components, build_tiny_flux2_klein_components
# FLUX.1's prompt, entities and DeLeaker windows (inside the first steps of the 4-block tiny model, smoothing off so
# random weights' scattered masks survive and the edits really happen) serve FLUX.2's tiny models too.
from test_processor_pipeline import CONFIG, ENTITIES, PROMPT, OpAttention, assert_stock_with_op_equals, run_with_state

# The [dev] chat puts FLUX.2's system message (about 45 tokens here) before the prompt.
TEXT_LEN = {"dev": 96, "klein": 40}
KINDS = {
    "dev": (build_tiny_flux2_components, Flux2Pipeline, DeLeakerFlux2Pipeline),
    "klein": (build_tiny_flux2_klein_components, Flux2KleinPipeline, DeLeakerFlux2KleinPipeline),
}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def built():
    return {kind: build() for kind, (build, _, _) in KINDS.items()}


def _components(built, kind):
    return copy.deepcopy(built[kind])


def _transformer_inputs(pipe, kind, batch=1, height=64, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    gh, gw = latent_grid(height, width, pipe.vae_scale_factor)
    cfg = pipe.transformer.config
    text = torch.randn(batch, TEXT_LEN[kind], cfg.joint_attention_dim, generator=g)
    latents = torch.randn(batch, cfg.in_channels, gh, gw, generator=g)
    return dict(
        hidden_states=pipe._pack_latents(latents),
        encoder_hidden_states=text,
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 4.0) if cfg.guidance_embeds else None,
        txt_ids=pipe._prepare_text_ids(text),
        img_ids=pipe._prepare_latent_ids(latents),
        return_dict=False,
    ), (gh, gw)


def _mask(pipe, kind):
    return chat_entity_token_mask(pipe.tokenizer, PROMPT, ENTITIES, pipe._chat(), max_sequence_length=TEXT_LEN[kind])


def _stock_copy(transformer):
    """A copy of ``transformer`` with diffusers' own FLUX.2 processors."""
    stock = copy.deepcopy(transformer)
    for block in stock.transformer_blocks:
        block.attn.set_processor(transformer_flux2.Flux2AttnProcessor())
    for block in stock.single_transformer_blocks:
        block.attn.set_processor(transformer_flux2.Flux2ParallelSelfAttnProcessor())
    return stock


@pytest.mark.parametrize("kind,batch", [("dev", 1), ("klein", 2)])
def test_processors_equal_the_op_called_on_stock_projections(built, monkeypatch, kind, batch):
    """Ours inside FLUX.2 == diffusers' own processors (double-stream and parallel single-stream) with their
    attention call replaced by deleaker_attention, block steps counted from the call order."""
    _, _, ours_class = KINDS[kind]
    pipe = ours_class(**_components(built, kind))
    transformer = pipe.transformer
    inputs, grid = _transformer_inputs(pipe, kind, batch=batch)
    mask = _mask(pipe, kind)
    steps = 3

    state = DeLeakerState(entity_mask=mask, grid=grid, config=CONFIG)
    ours, histories = run_with_state(transformer, inputs, state, steps)

    op = OpAttention(mask, grid, CONFIG)
    stock = _stock_copy(transformer)
    assert not any(isinstance(p, DeLeakerProcessorBase) for p in stock.attn_processors.values())
    monkeypatch.setattr(transformer_flux2, "dispatch_attention_fn", op)
    assert_stock_with_op_equals(stock, inputs, op, ours, histories)
    assert op.calls == steps * pipe.num_blocks

    monkeypatch.undo()
    plain = stock(**inputs)[0]
    assert (ours[-1] - plain).abs().max() > 1e-3  # the case exercised the edits


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_processors_without_state_are_stock_flux2(built, kind):
    _, _, ours_class = KINDS[kind]
    pipe = ours_class(**_components(built, kind))
    inputs, _ = _transformer_inputs(pipe, kind)
    stock = _stock_copy(pipe.transformer)
    assert torch.equal(pipe.transformer(**inputs)[0], stock(**inputs)[0])


def test_block_offsets_follow_execution_order_and_survive_rebuilt_processors(built):
    transformer = _components(built, "dev")["transformer"]
    num_blocks = install_deleaker_flux2_processors(transformer)
    assert num_blocks == transformer.config.num_layers + transformer.config.num_single_layers == 4
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    assert [b.attn.processor.block_offset for b in blocks] == list(range(num_blocks))
    assert [type(b.attn.processor) for b in blocks] == [DeLeakerFlux2AttnProcessor] * 2 + [
        DeLeakerFlux2ParallelAttnProcessor
    ] * 2
    # diffusers rebuilds processors without arguments (processor.__class__()): placing gives them their offsets.
    for block in blocks:
        block.attn.set_processor(type(block.attn.processor)())
    assert place_deleaker_processors(transformer) == num_blocks
    assert [b.attn.processor.block_offset for b in blocks] == list(range(num_blocks))
    assert DeLeakerConfig.for_model(num_blocks).stop_intervention_at == round(1140 * 4 / 57)


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_call_signature_is_the_stock_one_plus_deleakers_keywords(kind):
    _, stock_class, ours_class = KINDS[kind]
    stock = list(inspect.signature(stock_class.__call__).parameters.values())
    ours = list(inspect.signature(ours_class.__call__).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[: len(stock)]] == [(p.name, p.default, p.kind) for p in stock]
    assert [p.name for p in ours[len(stock):]] == ["entities", "deleaker_config", "max_entities"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(stock):])


def _call(pipe, kind, **kwargs):
    args = dict(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=3,
        max_sequence_length=TEXT_LEN[kind],
        output_type="np",
        generator=torch.Generator().manual_seed(7),
    )
    args.update(kwargs)
    return pipe(**args).images


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_pipeline_without_entities_is_exactly_the_stock_pipeline(built, kind):
    _, stock_class, ours_class = KINDS[kind]
    plain = _call(stock_class(**_components(built, kind)), kind)
    ours = ours_class(**_components(built, kind))
    np.testing.assert_array_equal(plain, _call(ours, kind))
    np.testing.assert_array_equal(plain, _call(ours, kind, entities=[]))


@pytest.mark.parametrize("kind,guidance", [("dev", 4.0), ("klein", 4.0), ("klein", 1.0)])
def test_pipeline_with_entities_makes_an_image_that_deleaker_changed(built, monkeypatch, kind, guidance):
    _, _, ours_class = KINDS[kind]
    pipe = ours_class(**_components(built, kind))
    seen_steps = []
    deleaker_calls = {"n": 0}
    original = DeLeakerProcessorBase._deleaker_attention

    def counted(self, *args, **kwargs):
        deleaker_calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeLeakerProcessorBase, "_deleaker_attention", counted)
    with_state = []
    # What the first attention of each transformer call receives.
    pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda m, args, kwargs: with_state.append(kwargs.get("deleaker_state") is not None), with_kwargs=True
    )

    def user_callback(p, i, t, kwargs):
        seen_steps.append(i)
        return {}

    edited = _call(pipe, kind, entities=ENTITIES, deleaker_config=CONFIG, callback_on_step_end=user_callback,
                   guidance_scale=guidance)
    assert seen_steps == [0, 1, 2]  # the user's callback still runs after the pipeline's own
    # [klein] runs true CFG at its default guidance 4.0 (two transformer calls a step, the conditional one first):
    # DeLeaker runs in the conditional one only.
    assert deleaker_calls["n"] == 3 * pipe.num_blocks
    assert with_state == ([True, False] * 3 if kind == "klein" and guidance > 1 else [True] * 3)
    assert np.isfinite(edited).all()
    plain = _call(pipe, kind, guidance_scale=guidance)
    assert np.abs(edited - plain).max() > 1e-4  # random tiny weights: small edits, far above float noise
    # A second call starts from a fresh state: same inputs, same image.
    again = _call(pipe, kind, entities=ENTITIES, deleaker_config=CONFIG, guidance_scale=guidance)
    np.testing.assert_array_equal(edited, again)


def test_pipeline_with_entities_takes_several_images_per_prompt(built):
    pipe = DeLeakerFlux2KleinPipeline(**_components(built, "klein"))
    images = _call(pipe, "klein", entities=ENTITIES, deleaker_config=CONFIG, num_images_per_prompt=2,
                   guidance_scale=1.0)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    plain = _call(pipe, "klein", num_images_per_prompt=2, guidance_scale=1.0)
    assert np.abs(images - plain).max() > 1e-4


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_state_scales_default_windows_to_the_model(built, kind):
    _, _, ours_class = KINDS[kind]
    pipe = ours_class(**_components(built, kind))
    state = pipe.deleaker_state(PROMPT, ENTITIES, height=64, width=96, max_sequence_length=TEXT_LEN[kind])
    assert state.config == DeLeakerConfig.for_model(pipe.num_blocks)
    assert state.grid == latent_grid(64, 96, pipe.vae_scale_factor) == (8, 12)
    assert state.entity_mask.shape == (4, TEXT_LEN[kind])


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_what_deleaker_cannot_combine_is_refused_before_any_work(built, kind):
    _, _, ours_class = KINDS[kind]
    pipe = ours_class(**_components(built, kind))
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    import PIL.Image

    with pytest.raises(ConfigError, match="reference images"):
        _call(pipe, kind, entities=ENTITIES, image=PIL.Image.fromarray(image))
    with pytest.raises(ConfigError, match="not a deleaker_state"):
        _call(pipe, kind, entities=ENTITIES, attention_kwargs={"deleaker_state": None})
    with pytest.raises(ConfigError, match="prompt text"):
        _call(pipe, kind, prompt=None, prompt_embeds=torch.zeros(1, TEXT_LEN[kind], 48), entities=ENTITIES)
    with pytest.raises(EntityError, match="not found"):
        _call(pipe, kind, entities=["cat", "zebra"])
    cheetah_end = int(_mask(pipe, kind)[1].nonzero().max())
    with pytest.raises(EntityError, match=r"cut off by max_sequence_length=.*'cheetah'"):
        _call(pipe, kind, entities=ENTITIES, max_sequence_length=cheetah_end)
    with pytest.raises(ConfigError, match="latents hold NaN"):
        _call(pipe, kind, latents=torch.full((1, 64, 16), float("nan")))
    pipe.transformer.single_transformer_blocks[1].attn.set_processor(DeLeakerFlux2AttnProcessor())
    with pytest.raises(ConfigError, match=r"blocks \['single_transformer_blocks.1'\] hold the DeLeaker processor of"):
        _call(pipe, kind, entities=ENTITIES)
    pipe.transformer.transformer_blocks[0].attn.set_processor(transformer_flux2.Flux2AttnProcessor())
    with pytest.raises(ConfigError, match="processors were replaced"):
        _call(pipe, kind, entities=ENTITIES)
    if kind == "dev":
        with pytest.raises(ConfigError, match="caption upsampling"):
            _call(pipe, kind, entities=ENTITIES, caption_upsample_temperature=0.15)
        with pytest.raises(ConfigError, match="guidance_scale"):
            _call(pipe, kind, guidance_scale=float("nan"))


def test_pipelines_save_and_reload_offline(built, tmp_path):
    for kind in ("dev", "klein"):
        _, stock_class, ours_class = KINDS[kind]
        stock_class(**_components(built, kind)).save_pretrained(tmp_path / kind)
        reloaded = ours_class.from_pretrained(tmp_path / kind)
        assert isinstance(reloaded.transformer.transformer_blocks[0].attn.processor, DeLeakerFlux2AttnProcessor)
        np.testing.assert_array_equal(
            _call(reloaded, kind, num_inference_steps=2), _call(stock_class(**_components(built, kind)), kind,
                                                                 num_inference_steps=2)
        )
