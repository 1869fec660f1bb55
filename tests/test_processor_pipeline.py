"""The diffusers integration: processor == op, pipeline == FluxPipeline when off, per-call state, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers import transformer_flux

from deleaker import DeLeakerConfig, EntityError, deleaker_attention
from deleaker.errors import ConfigError
from deleaker.geometry import latent_grid
from deleaker.guidance import max_guidance
from deleaker.pipeline import DeLeakerFluxPipeline
from deleaker.processor import DeLeakerFluxAttnProcessor, DeLeakerState, install_deleaker_processors

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
ENTITIES = ["cat", "cheetah"]
TEXT_LEN = 32
# Windows inside the first steps of the 4-block tiny model. Random weights give scattered entity masks that the
# 3x3 opening would erase, so smoothing is off here (the op tests cover it) and the edits really happen.
CONFIG = DeLeakerConfig(
    do_smoothing=False,
    start_aggregating_from=1,
    stop_aggregating_at=9,
    start_intervention_from=2,
    stop_intervention_at=40,
    std_mul_text=0.5,
    std_mul_image_image=0.5,
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def components(tiny_components):
    # Pipelines install processors on their transformer: give each test its own copy of the modules.
    return {name: copy.deepcopy(c) for name, c in tiny_components.items()}


def _transformer_inputs(pipe, height=64, width=96, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    gh, gw = latent_grid(height, width, pipe.vae_scale_factor)
    cfg = pipe.transformer.config
    return dict(
        hidden_states=torch.randn(batch, gh * gw, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 3.5),
        txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, gh, gw, "cpu", torch.float32),
        return_dict=False,
    ), (gh, gw)


def _entity_mask(pipe):
    from deleaker.entities import entity_token_mask

    return entity_token_mask(pipe.tokenizer_2, PROMPT, ENTITIES, max_sequence_length=TEXT_LEN, max_entities=4)


class OpAttention:
    """The independent path the processors are checked against: diffusers' attention call (``dispatch_attention_fn``
    in a stock processor) replaced by the functional op, block steps counted from the call order (every block of every
    step runs, in order) and the history carried from call to call. Also used by tests/test_flux2.py and
    tests/test_schnell.py."""

    def __init__(self, entity_mask: torch.Tensor, grid: tuple[int, int], config: DeLeakerConfig) -> None:
        self.entity_mask, self.grid, self.config = entity_mask, grid, config
        self.calls = 0
        self.history: torch.Tensor | None = None

    def __call__(self, query, key, value, attn_mask=None, **_):
        out, self.history = deleaker_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.entity_mask,
            grid=self.grid,
            block_step=self.calls,
            history=self.history,
            config=self.config,
        )
        self.calls += 1
        return out.transpose(1, 2)


def run_with_state(transformer, inputs: dict, state: DeLeakerState, steps: int) -> tuple[list, list]:
    """``steps`` calls of ``transformer`` with our processors acting on ``state``: each call's output and the history
    the state holds after it."""
    outputs, histories = [], []
    for _ in range(steps):
        outputs.append(transformer(**inputs, joint_attention_kwargs={"deleaker_state": state})[0])
        histories.append(state.history.clone())
        state.advance()
    return outputs, histories


def assert_stock_with_op_equals(stock, inputs: dict, op: OpAttention, ours: list, histories: list) -> None:
    """``stock`` (diffusers' processors, its attention patched to ``op``) called once per step gives ``ours`` and the
    op carries ``histories``."""
    for step in range(len(ours)):
        theirs = stock(**inputs)[0]
        torch.testing.assert_close(ours[step], theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(histories[step], op.history, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 2])
def test_processor_equals_the_op_called_on_stock_projections(components, monkeypatch, batch):
    """Our processor inside FLUX == diffusers' own processor with its attention replaced by deleaker_attention."""
    pipe = DeLeakerFluxPipeline(**components)
    transformer = pipe.transformer
    inputs, grid = _transformer_inputs(pipe, batch=batch)
    mask = _entity_mask(pipe)
    steps = 3

    state = DeLeakerState(entity_mask=mask, grid=grid, config=CONFIG)
    ours, histories = run_with_state(transformer, inputs, state, steps)

    # Independent path: stock FluxAttnProcessor everywhere, its attention call replaced by the functional op.
    op = OpAttention(mask, grid, CONFIG)
    stock = copy.deepcopy(transformer)
    stock.set_attn_processor(transformer_flux.FluxAttnProcessor())
    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", op)
    assert_stock_with_op_equals(stock, inputs, op, ours, histories)
    assert op.calls == steps * pipe.num_blocks

    # The case exercised the edits: the output differs from the same model without DeLeaker.
    monkeypatch.undo()
    plain = stock(**inputs)[0]
    assert (ours[-1] - plain).abs().max() > 1e-3


def test_processor_without_state_is_stock_flux(components):
    pipe = DeLeakerFluxPipeline(**components)
    inputs, _ = _transformer_inputs(pipe)
    stock = copy.deepcopy(pipe.transformer)
    stock.set_attn_processor(transformer_flux.FluxAttnProcessor())
    assert torch.equal(pipe.transformer(**inputs)[0], stock(**inputs)[0])


def test_block_offsets_follow_execution_order(components):
    transformer = components["transformer"]
    num_blocks = install_deleaker_processors(transformer)
    assert num_blocks == transformer.config.num_layers + transformer.config.num_single_layers
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    offsets = [b.attn.processor.block_offset for b in blocks]
    assert offsets == list(range(num_blocks))
    assert all(isinstance(b.attn.processor, DeLeakerFluxAttnProcessor) for b in blocks)


def _call(pipe, **kwargs):
    args = dict(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=TEXT_LEN,
        output_type="np",
        generator=torch.Generator().manual_seed(7),
    )
    args.update(kwargs)
    return pipe(**args).images


def test_pipeline_without_entities_is_exactly_flux_pipeline(tiny_components, components):
    plain = FluxPipeline(**{n: copy.deepcopy(c) for n, c in tiny_components.items()})
    ours = DeLeakerFluxPipeline(**components)
    np.testing.assert_array_equal(_call(plain), _call(ours))
    np.testing.assert_array_equal(_call(plain), _call(ours, entities=[]))


def test_pipeline_with_entities_makes_an_image_that_deleaker_changed(components):
    pipe = DeLeakerFluxPipeline(**components)
    seen_steps = []

    def user_callback(p, i, t, kwargs):
        seen_steps.append(i)
        return {}

    image = pipe(
        PROMPT,
        entities=ENTITIES,
        deleaker_config=CONFIG,
        height=64,
        width=96,
        num_inference_steps=3,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(7),
        callback_on_step_end=user_callback,
    ).images[0]
    assert image.size == (96, 64)
    assert seen_steps == [0, 1, 2]  # the user's callback still runs after the pipeline's own

    edited = _call(pipe, entities=ENTITIES, deleaker_config=CONFIG)
    plain = _call(pipe)
    assert np.abs(edited - plain).max() > 1e-3
    # A second call starts from a fresh state: same inputs, same image.
    np.testing.assert_array_equal(edited, _call(pipe, entities=ENTITIES, deleaker_config=CONFIG))


def test_pipeline_scales_default_windows_to_the_model(components):
    pipe = DeLeakerFluxPipeline(**components)
    state = pipe.deleaker_state(PROMPT, ENTITIES, height=64, width=96, max_sequence_length=TEXT_LEN)
    assert state.config == DeLeakerConfig.for_model(pipe.num_blocks)
    assert state.grid == latent_grid(64, 96, pipe.vae_scale_factor)
    overridden = pipe.deleaker_state(
        PROMPT, ENTITIES, height=64, width=64, max_sequence_length=TEXT_LEN, deleaker_config={"k_strength": 2.0}
    )
    assert overridden.config.k_strength == 2.0
    assert overridden.config.stop_intervention_at == round(1140 * pipe.num_blocks / 57)


@pytest.mark.parametrize(
    "entities, message",
    [
        (["cat", "dog"], "dog"),
        (["cat"], "at least 2|fewer than 2|at least two"),
        (["cat", "cheetah", "water", "river", "shallow"], "at most|more than"),
        (["cat", "Cat"], "duplicate"),
    ],
)
def test_pipeline_rejects_bad_entities_before_any_work(components, entities, message):
    pipe = DeLeakerFluxPipeline(**components)
    calls = _count_work(pipe)
    with pytest.raises(EntityError, match=message):
        _call(pipe, entities=entities)
    assert calls == []


def test_pipeline_finds_entities_in_prompt_2_which_t5_reads(components, monkeypatch):
    """FluxPipeline gives T5 ``prompt_2`` when it is set: the mask must index those tokens (it used to mark the
    tokens at the positions the entities had in ``prompt``: here "big" and a piece of "sits")."""
    pipe = DeLeakerFluxPipeline(**components)
    masks = []
    make_state = DeLeakerFluxPipeline.deleaker_state

    def spy(self, *args, **kwargs):
        state = make_state(self, *args, **kwargs)
        masks.append(state.entity_mask)
        return state

    monkeypatch.setattr(DeLeakerFluxPipeline, "deleaker_state", spy)
    prompt_2 = "the big dog sits here with a small cat"
    _call(pipe, prompt="a cat and a dog", prompt_2=prompt_2, entities=["cat", "dog"], num_inference_steps=1)
    ids = pipe.tokenizer_2(prompt_2, padding="max_length", max_length=TEXT_LEN, truncation=True).input_ids
    spelled = [pipe.tokenizer_2.convert_ids_to_tokens([ids[i] for i in row.nonzero().flatten()]) for row in masks[0]]
    assert spelled[:2] == [["▁cat"], ["▁dog"]]
    # An entity of prompt that T5 does not read is refused, before any work.
    calls = _count_work(pipe)
    with pytest.raises(EntityError, match=r"not found in the prompt: \['cheetah'\]"):
        _call(pipe, prompt_2="a cat and a dog", entities=ENTITIES)
    with pytest.raises(ConfigError, match="one prompt; got a list of 2 different prompt_2s"):
        _call(pipe, prompt_2=["a cat and a cheetah", "a cheetah and a cat"], entities=ENTITIES)
    assert calls == []


def _count_work(pipe) -> list:
    calls: list = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    pipe.text_encoder_2.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_pipeline_rejects_unsupported_combinations(components):
    pipe = DeLeakerFluxPipeline(**components)
    calls = _count_work(pipe)
    # ConfigError, a ValueError like FluxPipeline's own argument errors.
    with pytest.raises(ConfigError, match="one prompt; got a list of 2 different prompts"):
        _call(pipe, prompt=[PROMPT, "A dog and a cat"], entities=ENTITIES)
    with pytest.raises(ConfigError, match="one prompt; got a list of 0"):
        _call(pipe, prompt=[], entities=ENTITIES)
    with pytest.raises(ConfigError, match="true CFG"):
        _call(pipe, entities=ENTITIES, true_cfg_scale=2.0, negative_prompt="blurry")
    with pytest.raises(ConfigError, match="true_cfg_scale must be a finite number, got None"):
        _call(pipe, entities=ENTITIES, true_cfg_scale=None, negative_prompt="blurry")
    with pytest.raises(ConfigError, match="prompt text"):
        _call(pipe, prompt=None, prompt_embeds=torch.zeros(1, TEXT_LEN, 32), entities=ENTITIES)
    assert calls == []


@pytest.mark.parametrize("entities", [np.array(ENTITIES), "", "cat", 0])
def test_pipeline_refuses_entities_that_are_not_a_list(components, entities):
    """Only None or an empty list means 'no entities'; anything else is checked (an array, an empty string...)."""
    pipe = DeLeakerFluxPipeline(**components)
    calls = _count_work(pipe)
    with pytest.raises(EntityError, match="entities must be a list of strings"):
        _call(pipe, entities=entities)
    assert calls == []


@pytest.mark.parametrize("entities", [None, ENTITIES], ids=["plain", "entities"])
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        # Finite, but x 1000 overflows float32 in the guidance embedding: FluxPipeline's image is black.
        (dict(guidance_scale=1e36), r"guidance_scale 1e\+36 overflows FLUX's guidance embedding in float32"),
        (dict(deleaker_config="garbage"), "deleaker_config must be"),
        (dict(deleaker_config={"nope": 1}), "unknown DeLeaker option"),
        (dict(max_entities="x"), "max_entities must be an int"),
    ],
)
def test_pipeline_checks_its_options_with_or_without_entities(components, entities, options, message):
    """A NaN guidance gives a black image in FluxPipeline; DeLeaker's own options are checked even unused."""
    pipe = DeLeakerFluxPipeline(**components)
    calls = _count_work(pipe)
    with pytest.raises(ConfigError, match=message):
        _call(pipe, entities=entities, **options)
    assert calls == []


def test_pipeline_refuses_a_guidance_a_float16_transformer_cannot_embed(tiny_components):
    """float16 holds at most 65504: guidance 66 (x 1000) is inf in the embedding, and the image black."""
    pipe = DeLeakerFluxPipeline(**{n: copy.deepcopy(c) for n, c in tiny_components.items()})
    pipe.transformer.to(torch.float16)
    calls = _count_work(pipe)
    with pytest.raises(ConfigError, match=r"at most 65\.504 in magnitude"):
        _call(pipe, guidance_scale=66.0)
    assert calls == []
    assert max_guidance(torch.float16) == pytest.approx(65.504) and max_guidance(torch.bfloat16) > 1e35


def test_pipeline_refuses_entities_without_its_attention_processors(components):
    pipe = DeLeakerFluxPipeline(**components)
    calls = _count_work(pipe)
    pipe.transformer.set_attn_processor(transformer_flux.FluxAttnProcessor())
    with pytest.raises(ConfigError, match=r"processors were replaced \(\['FluxAttnProcessor'\]\)"):
        _call(pipe, entities=ENTITIES)
    install_deleaker_processors(pipe.transformer)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ConfigError, match="needs unfused projections"):
        _call(pipe, entities=ENTITIES)
    assert calls == []


def test_from_pipe_makes_a_deleaker_pipeline(tiny_components):
    """diffusers' from_pipe reads the component classes from __init__'s annotations (FluxPipeline's)."""
    plain = FluxPipeline(**{n: copy.deepcopy(c) for n, c in tiny_components.items()})
    want = _call(plain)
    ours = DeLeakerFluxPipeline.from_pipe(plain)
    assert isinstance(ours, DeLeakerFluxPipeline) and ours.num_blocks == plain.transformer.config.num_layers + \
        plain.transformer.config.num_single_layers
    np.testing.assert_array_equal(_call(ours), want)
    assert np.isfinite(_call(ours, entities=ENTITIES)).all()
