"""DeLeakerFluxPipeline as a drop-in FluxPipeline (issue #25 items 9-11): the same call signature, the same scalars,
text-encoder-only pipelines, IP-Adapters, attention backends; with entities, what DeLeaker cannot compute is refused;
non-finite latents are refused before work and a non-finite result is a NonFiniteError, never a black image."""

from __future__ import annotations

import copy
import inspect
from decimal import Decimal

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.embeddings import ImageProjection
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

from deleaker.errors import ConfigError, NonFiniteError
from deleaker.pipeline import DeLeakerFluxPipeline
from deleaker.processor import DeLeakerFluxAttnProcessor, install_deleaker_processors
# The processor tests' prompt and knobs: windows inside the first steps of the 4-block tiny model, no smoothing.
from test_processor_pipeline import CONFIG, ENTITIES, PROMPT, TEXT_LEN

# The parameters DeLeakerFluxPipeline.__call__ adds to FluxPipeline's, keyword-only, after FluxPipeline's own.
DELEAKER_PARAMETERS = ("entities", "deleaker_config", "max_entities")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _copy(components: dict) -> dict:
    return {name: copy.deepcopy(c) for name, c in components.items()}


@pytest.fixture
def ours(tiny_components) -> DeLeakerFluxPipeline:
    return DeLeakerFluxPipeline(**_copy(tiny_components))


@pytest.fixture
def stock(tiny_components) -> FluxPipeline:
    return FluxPipeline(**_copy(tiny_components))


def _args(**kwargs) -> dict:
    args = dict(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=TEXT_LEN,
        output_type="np",
        generator=torch.Generator().manual_seed(7),
    )
    args.update(kwargs)
    return args


def _count_work(pipe) -> list:
    calls: list = []
    for module in (pipe.transformer, pipe.text_encoder_2, pipe.vae):
        if module is not None:
            module.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


# --- item 11: the call signature ---------------------------------------------------------------------------------


def test_call_signature_is_flux_pipelines_plus_keyword_only_deleaker_options():
    """Tools that read the signature (diffusers' own tests, UIs, servers) see every FluxPipeline parameter, in the
    same order, kind and default; no **kwargs hides them; DeLeaker's own options follow, keyword-only."""
    theirs = inspect.signature(FluxPipeline.__call__).parameters
    mine = inspect.signature(DeLeakerFluxPipeline.__call__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine.values())
    flux_part = [p for name, p in mine.items() if name not in DELEAKER_PARAMETERS]
    assert [(p.name, p.kind, p.default) for p in flux_part] == [(p.name, p.kind, p.default) for p in theirs.values()]
    assert list(mine)[-len(DELEAKER_PARAMETERS):] == list(DELEAKER_PARAMETERS)
    assert all(mine[name].kind is inspect.Parameter.KEYWORD_ONLY for name in DELEAKER_PARAMETERS)
    bound = inspect.signature(DeLeakerFluxPipeline(**_none_components()).__call__).parameters
    for name in ("num_images_per_prompt", "guidance_scale", "ip_adapter_image", "ip_adapter_image_embeds"):
        assert name in bound


def _none_components() -> dict:
    return dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                transformer=None)


def test_flux_parameters_passed_by_position_mean_what_they_mean_in_flux_pipeline(ours, stock):
    """The parameters are FluxPipeline's own, in its order: ``pipe(prompt, prompt_2)`` is the same call."""
    args = _args()
    del args["prompt"]
    mine = ours(PROMPT, "a cheetah in a river", **args).images
    theirs = stock(PROMPT, "a cheetah in a river", **args | {"generator": torch.Generator().manual_seed(7)}).images
    np.testing.assert_array_equal(mine, theirs)
    assert np.abs(mine - ours(**_args()).images).max() > 0  # prompt_2 did reach T5


def test_num_images_per_prompt_makes_that_many_images_as_flux_pipeline(ours, stock):
    mine = ours(**_args(num_images_per_prompt=2)).images
    theirs = stock(**_args(num_images_per_prompt=2)).images
    assert mine.shape[0] == 2
    np.testing.assert_array_equal(mine, theirs)


# --- item 11: transformer=None ------------------------------------------------------------------------------------


def test_a_pipeline_without_transformer_encodes_prompts_as_flux_pipeline(tiny_components):
    """A text-encoder-only pipeline (transformer=None) is a FluxPipeline use: it builds and encodes; only entities
    need the transformer, and they are refused naming it."""
    parts = _copy(tiny_components) | {"transformer": None}
    ours = DeLeakerFluxPipeline(**parts)
    stock = FluxPipeline(**_copy(tiny_components) | {"transformer": None})
    assert ours.transformer is None and ours.num_blocks is None
    mine = ours.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=TEXT_LEN)
    theirs = stock.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=TEXT_LEN)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    calls = _count_work(ours)
    with pytest.raises(ConfigError, match="entities need a transformer; this pipeline was made with transformer=None"):
        ours(**_args(entities=ENTITIES))
    assert calls == []


# --- item 9: scalars --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance",
    [np.float32(3.5), np.float64(3.5), np.float16(3.5), torch.tensor(3.5), torch.tensor(3.5, dtype=torch.float64)],
    ids=["np.float32", "np.float64", "np.float16", "tensor32", "tensor64"],
)
def test_guidance_takes_every_real_number_flux_pipeline_takes(ours, stock, guidance):
    want = stock(**_args(guidance_scale=3.5)).images
    np.testing.assert_array_equal(ours(**_args(guidance_scale=guidance)).images, want)


def test_integer_scalars_take_numpy_integers_with_and_without_entities(ours, stock):
    numpy_ints = dict(height=np.int64(64), width=np.int32(64), num_inference_steps=np.int64(2),
                      max_sequence_length=np.int64(TEXT_LEN), guidance_scale=np.int64(3))
    np.testing.assert_array_equal(ours(**_args(**numpy_ints)).images, stock(**_args(guidance_scale=3)).images)
    with_entities = dict(entities=ENTITIES, deleaker_config=CONFIG)
    np.testing.assert_array_equal(
        ours(**_args(**numpy_ints, max_entities=np.int64(4), **with_entities)).images,
        ours(**_args(guidance_scale=3, max_entities=4, **with_entities)).images,
    )


def test_a_bool_guidance_is_taken_as_flux_pipeline_takes_it(ours, stock):
    """FluxPipeline embeds guidance True as 1.0 (torch.full): a drop-in computes the same, not an error."""
    np.testing.assert_array_equal(ours(**_args(guidance_scale=True)).images, stock(**_args(guidance_scale=1.0)).images)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(guidance_scale=np.float32("nan")), "guidance_scale must be a finite number, got (np.float32\\()?nan"),
        (dict(guidance_scale=torch.tensor(float("inf"))), "guidance_scale must be a finite number, got inf"),
        (dict(guidance_scale=torch.tensor([3.5, 4.0])), r"guidance_scale must be a real number .* \(2,\) float32"),
        (dict(guidance_scale=Decimal("3.5")), "guidance_scale must be a finite number, got Decimal"),
        (dict(guidance_scale="3.5"), "guidance_scale must be a finite number, got '3.5'"),
        (dict(true_cfg_scale=np.float64("nan")), "true_cfg_scale must be a finite number, got (np.float64\\()?nan"),
    ],
    ids=["nan32", "inf-tensor", "vector", "decimal", "text", "true-cfg-nan"],
)
def test_scalars_that_are_not_finite_real_numbers_are_refused_before_work(ours, options, message):
    calls = _count_work(ours)
    with pytest.raises(ConfigError, match=message):
        ours(**_args(**options))
    assert calls == []


# --- item 10: non-finite latents --------------------------------------------------------------------------------


def _packed_latents(pipe, height=64, width=64, fill=None) -> torch.Tensor:
    latents, _ = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, height, width, torch.float32,
                                      torch.device("cpu"), torch.Generator().manual_seed(3))
    if fill is not None:
        latents[0, 0, 0] = fill
    return latents


@pytest.mark.parametrize("entities", [None, ENTITIES], ids=["plain", "entities"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_user_latents_are_refused_before_work(ours, entities, bad):
    latents = _packed_latents(ours, fill=bad)
    calls = _count_work(ours)
    with pytest.raises(ConfigError, match="latents hold NaN or inf"):
        ours(**_args(latents=latents, entities=entities))
    assert calls == []
    with pytest.raises(ConfigError, match="latents must be a torch.Tensor"):
        ours(**_args(latents=latents.numpy(), entities=entities))
    assert calls == []


def test_finite_user_latents_give_flux_pipelines_image(ours, stock):
    latents = _packed_latents(ours)
    np.testing.assert_array_equal(ours(**_args(latents=latents.clone())).images,
                                  stock(**_args(latents=latents.clone())).images)


@pytest.mark.parametrize("entities", [None, ENTITIES], ids=["plain", "entities"])
@pytest.mark.parametrize("output_type", ["pil", "latent"])
def test_a_transformer_that_overflows_raises_naming_the_step_never_a_black_image(ours, entities, output_type):
    """A transformer output of inf (here: an inf bias of its output projection, as an fp16 overflow gives) makes
    FluxPipeline return a black image; ours raises after the first step."""
    ours.transformer.proj_out.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="latents hold NaN or inf after step 1 of 2"):
        ours(**_args(entities=entities, deleaker_config=CONFIG, output_type=output_type))


def test_a_vae_that_overflows_raises_never_a_black_image(ours, stock):
    for pipe in (ours, stock):
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    black = stock(**_args(output_type="pil")).images[0]
    assert not np.asarray(black).any()  # what FluxPipeline gives: a black image, no error
    with pytest.raises(NonFiniteError, match="decoded image holds NaN or inf"):
        ours(**_args(output_type="pil"))
    # The latents themselves are fine: output_type="latent" never decodes.
    assert torch.isfinite(ours(**_args(output_type="latent")).images).all()


def test_a_step_callback_that_returns_non_finite_latents_is_caught(ours):
    def poison(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * float("nan")}

    with pytest.raises(NonFiniteError, match="returned by the step callback at step 1"):
        ours(**_args(callback_on_step_end=poison))


def test_the_user_callback_sees_the_tensors_it_asked_for_only(ours, stock):
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(sorted(kwargs))
        return {}

    np.testing.assert_array_equal(
        ours(**_args(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])).images,
        stock(**_args()).images,
    )
    assert seen == [["prompt_embeds"], ["prompt_embeds"]]
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        ours(**_args(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["nope"]))


# --- item 11: IP-Adapter ----------------------------------------------------------------------------------------


def _tiny_ip_adapter(transformer, seed: int = 5) -> dict:
    """An IP-Adapter state dict for ``transformer`` in the layout ``FluxIPAdapterMixin.load_ip_adapter`` reads
    (XLabs' FLUX IP-Adapter: an image projection, and key/value projections for each double-stream block), with
    random weights, built here so that no download is needed."""
    torch.manual_seed(seed)
    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    attn_weights = {}
    for key_id, _ in enumerate(transformer.transformer_blocks):
        sd = FluxIPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=config.joint_attention_dim).state_dict()
        for part in ("to_k_ip", "to_v_ip"):
            for kind in ("weight", "bias"):
                attn_weights[f"{key_id}.{part}.{kind}"] = sd[f"{part}.0.{kind}"]
    projection = ImageProjection(
        cross_attention_dim=config.joint_attention_dim,
        image_embed_dim=config.pooled_projection_dim,
        num_image_text_embeds=4,
    ).state_dict()
    image_proj = {
        "proj.weight": projection["image_embeds.weight"],
        "proj.bias": projection["image_embeds.bias"],
        "norm.weight": projection["norm.weight"],
        "norm.bias": projection["norm.bias"],
    }
    return {"image_proj": image_proj, "ip_adapter": attn_weights}


def test_load_ip_adapter_works_as_in_flux_pipeline_and_entities_are_refused_with_it(ours, stock):
    """diffusers rebuilds every processor with ``processor.__class__()`` when it loads or unloads an IP-Adapter:
    ours constructs without arguments, the adapter's image changes the image exactly as in FluxPipeline, entities
    are refused while the adapter replaces DeLeaker's processors, and work again once it is unloaded."""
    adapter = _tiny_ip_adapter(ours.transformer)
    embeds = [torch.randn(1, 1, ours.transformer.config.pooled_projection_dim, generator=torch.Generator().manual_seed(1))]
    plain = ours(**_args()).images
    images = {}
    for name, pipe in (("ours", ours), ("stock", stock)):
        pipe.load_ip_adapter(copy.deepcopy(adapter), weight_name="", image_encoder_pretrained_model_name_or_path=None)
        pipe.set_ip_adapter_scale(1.0)
        # FluxPipeline encodes a negative (black) image unless negative embeddings are given; no image encoder here.
        images[name] = pipe(**_args(ip_adapter_image_embeds=[e.clone() for e in embeds],
                                    negative_ip_adapter_image_embeds=[torch.zeros_like(e) for e in embeds])).images
    np.testing.assert_array_equal(images["ours"], images["stock"])
    assert np.abs(images["ours"] - plain).max() > 1e-4  # the adapter did change the image

    # The single-stream blocks keep DeLeaker's processor, rebuilt without arguments.
    singles = [b.attn.processor for b in ours.transformer.single_transformer_blocks]
    assert all(type(p) is DeLeakerFluxAttnProcessor and p.num_blocks is None for p in singles)

    calls = _count_work(ours)
    with pytest.raises(ConfigError, match=r"an IP-Adapter is loaded .* pipe.unload_ip_adapter\(\)"):
        ours(**_args(entities=ENTITIES))
    with pytest.raises(ConfigError, match=r"cannot combine entities with an IP-Adapter \(ip_adapter_image_embeds\)"):
        ours(**_args(entities=ENTITIES, ip_adapter_image_embeds=embeds))
    assert calls == []

    ours.unload_ip_adapter()
    install_deleaker_processors(ours.transformer)
    assert np.isfinite(ours(**_args(entities=ENTITIES, deleaker_config=CONFIG)).images).all()


def test_processors_rebuilt_without_arguments_get_their_place_before_entities_run(ours):
    """``unload_ip_adapter`` rebuilds our single-stream processors as ``DeLeakerFluxAttnProcessor()``; a pipeline
    call with entities gives each its block offset, so the image equals the freshly installed pipeline's."""
    want = ours(**_args(entities=ENTITIES, deleaker_config=CONFIG)).images
    ours.transformer.set_attn_processor(
        {name: DeLeakerFluxAttnProcessor() for name in ours.transformer.attn_processors}
    )
    np.testing.assert_array_equal(ours(**_args(entities=ENTITIES, deleaker_config=CONFIG)).images, want)
    blocks = list(ours.transformer.transformer_blocks) + list(ours.transformer.single_transformer_blocks)
    assert [b.attn.processor.block_offset for b in blocks] == list(range(ours.num_blocks))


def test_one_processor_shared_by_every_block_is_split_before_entities_run(ours):
    """``set_attn_processor(one_processor)`` gives every block the same object: each block needs its own offset."""
    want = ours(**_args(entities=ENTITIES, deleaker_config=CONFIG)).images
    ours.transformer.set_attn_processor(DeLeakerFluxAttnProcessor())
    np.testing.assert_array_equal(ours(**_args(entities=ENTITIES, deleaker_config=CONFIG)).images, want)
    processors = list(ours.transformer.attn_processors.values())
    assert len({id(p) for p in processors}) == len(processors)


# --- item 11: attention backend and parallelism -----------------------------------------------------------------


@pytest.fixture
def restore_active_backend():
    """``set_attention_backend`` also sets diffusers' process-wide active backend: put it back for other tests."""
    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def test_set_attention_backend_reaches_the_stock_processor_inside_ours(ours, stock, restore_active_backend):
    """cuDNN attention cannot run on a CPU tensor: with the backend set, our processor fails exactly as the stock
    one does (the backend reached the attention call), and after a reset both run again."""
    for pipe in (ours, stock):
        pipe.transformer.set_attention_backend("_native_cudnn")
    inner = [p._plain for p in ours.transformer.attn_processors.values()]
    assert all(p._attention_backend == AttentionBackendName._NATIVE_CUDNN for p in inner)
    for pipe in (stock, ours):
        with pytest.raises(RuntimeError, match="No viable backend for scaled_dot_product_attention"):
            pipe(**_args())
    for pipe in (ours, stock):
        pipe.transformer.set_attention_backend("_native_math")
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in inner)
    np.testing.assert_array_equal(ours(**_args()).images, stock(**_args()).images)
    ours.transformer.reset_attention_backend()
    assert all(p._attention_backend is None for p in inner)


def test_entities_are_refused_on_a_parallel_transformer(ours):
    """``enable_parallelism`` records its config on the model (and, for context parallelism, on each processor)
    before it shards anything; it needs several ranks of torch.distributed, which this machine has not, so the
    record is set here as it sets it. DeLeaker's masks and history are means over every head and image token of a
    block: with entities that is refused, before any work."""
    from diffusers import ContextParallelConfig, ParallelConfig

    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    ours.transformer._parallel_config = config
    calls = _count_work(ours)
    with pytest.raises(ConfigError, match=r"runs with parallelism \(enable_parallelism\)"):
        ours(**_args(entities=ENTITIES))
    assert calls == []


def test_true_cfg_still_works_without_entities_and_is_refused_with_them(ours, stock):
    true_cfg = dict(negative_prompt="blurry", true_cfg_scale=np.float32(2.0))
    np.testing.assert_array_equal(ours(**_args(**true_cfg)).images,
                                  stock(**_args(negative_prompt="blurry", true_cfg_scale=2.0)).images)
    with pytest.raises(ConfigError, match="true CFG"):
        ours(**_args(entities=ENTITIES, **true_cfg))
