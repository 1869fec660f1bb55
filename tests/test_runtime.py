"""The lean runtime: schedule and latent layout equal diffusers', the torch backend equals DeLeakerFluxPipeline,
ONNX Runtime equals PyTorch, engine directories are checked before use, one instance serves many calls."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from deleaker import DeLeakerConfig, EntityError
from deleaker.errors import ConfigError, DeLeakerError, ShapeError
from deleaker.geometry import latent_grid
from deleaker.pipeline import DeLeakerFluxPipeline
from deleaker.runtime import onnx_cache as onnx_cache_mod
from deleaker.runtime import schedule as sched
from deleaker.runtime.images import psnr
from deleaker.runtime.request import MAX_PROMPT_CHARS, EntitiesTypeError
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest, NonFiniteError
from deleaker.runtime.text import PromptError
from test_processor_pipeline import CONFIG as PIPELINE_CONFIG

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
ENTITIES = ("cat", "cheetah")
TEXT_LEN = 32
# tests/test_processor_pipeline.py's windows inside the first steps of the 4-block tiny model and thresholds that
# give masks on random weights, so DeLeaker changes the image (the spec defaults scaled to 4 blocks find no masks on
# random weights); smoothing stays on (the default) here.
CONFIG = dataclasses.replace(PIPELINE_CONFIG, do_smoothing=DeLeakerConfig().do_smoothing)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


# --- schedule and latent layout: diffusers' numbers exactly ---------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 20, 28, 50])
@pytest.mark.parametrize(
    "height,width,vae_scale", [(64, 64, 4), (512, 512, 8), (1024, 1024, 8), (768, 1360, 8), (2048, 2048, 8)]
)
def test_schedule_equals_flux_pipeline_and_scheduler(steps, height, width, vae_scale):
    gh, gw = latent_grid(height, width, vae_scale)
    seq_len = gh * gw
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    mu = diffusers_calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    ours = sched.flux_schedule(steps, seq_len, sched.ShiftConfig.from_scheduler_config(scheduler.config))

    assert sched.calculate_shift(seq_len) == mu
    np.testing.assert_array_equal(ours.timesteps, timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, scheduler.sigmas.numpy())
    assert ours.sigmas.dtype == np.float32 and ours.sigmas[-1] == 0 and ours.num_steps == steps


def test_euler_step_equals_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    steps, seq_len = 4, 64
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=sched.calculate_shift(seq_len))
    scheduler.set_begin_index(0)
    ours = sched.flux_schedule(steps, seq_len)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq_len, 16, generator=g)
    ref = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(1, seq_len, 16, generator=g)
        ref = scheduler.step(v, t, ref, return_dict=False)[0]
        x = sched.euler_step(x, v, ours, i)
        torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_scheduler_config_without_dynamic_shifting_is_a_fixed_shift():
    """FLUX.1-schnell's scheduler (tests/test_schnell.py runs it end to end); a shift it cannot use is refused."""
    shift = sched.ShiftConfig.from_scheduler_config({"use_dynamic_shifting": False, "shift": 1.0})
    assert not shift.use_dynamic_shifting and shift.shift == 1.0
    with pytest.raises(DeLeakerError, match="shift must be a finite number > 0"):
        sched.ShiftConfig.from_scheduler_config({"use_dynamic_shifting": False, "shift": 0.0})


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (8, 6)])
def test_latent_layout_equals_flux_pipeline(grid):
    gh, gw = grid
    latents = torch.randn(2, 16, 2 * gh, 2 * gw)
    packed = sched.pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 2 * gh, 2 * gw), rtol=0, atol=0)
    torch.testing.assert_close(sched.unpack_latents(packed, grid), latents, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(1, gh, gw, "cpu", torch.float32)
    torch.testing.assert_close(sched.image_ids(grid), ids, rtol=0, atol=0)


# --- torch backend == DeLeakerFluxPipeline -------------------------------------------------------------------


@pytest.fixture
def torch_runtime(tiny_components):
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    return DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=TEXT_LEN, deleaker_config=CONFIG, default_size=(64, 64)
    )


def _pipeline_latents(components, *, entities, seed, steps, height=64, width=64, deleaker=True):
    pipe_cls = DeLeakerFluxPipeline if deleaker else FluxPipeline
    pipe = pipe_cls(**{k: copy.deepcopy(v) for k, v in components.items()})
    latents = []

    def keep(_pipe, _i, _t, kwargs):
        latents.append(kwargs["latents"].clone())
        return {}

    extra = {"entities": list(entities), "deleaker_config": CONFIG} if deleaker else {}
    out = pipe(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=keep,
        output_type="pil",
        **extra,
    )
    return latents, out.images[0]


def test_torch_backend_equals_deleaker_pipeline(torch_runtime, tiny_components):
    result = torch_runtime.generate(GenerationRequest(PROMPT, ENTITIES, seed=3, steps=3), record_latents=True)
    ref_latents, ref_image = _pipeline_latents(tiny_components, entities=ENTITIES, seed=3, steps=3)

    assert len(result.latents) == 3
    for ours, ref in zip(result.latents, ref_latents):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert np.array_equal(np.asarray(result.image), np.asarray(ref_image))
    assert result.image.size == (64, 64)
    assert set(result.timings) >= {"encode", "denoise", "decode", "total"}

    # DeLeaker intervened: plain FLUX from the same seed differs (slightly: random weights), and equals FluxPipeline.
    plain = torch_runtime.generate(
        GenerationRequest(PROMPT, ENTITIES, seed=3, steps=3, deleaker=False), record_latents=True
    )
    assert (plain.latents[-1] - result.latents[-1]).abs().max() > 1e-5
    plain_latents, plain_image = _pipeline_latents(tiny_components, entities=ENTITIES, seed=3, steps=3, deleaker=False)
    torch.testing.assert_close(plain.latents[-1], plain_latents[-1], rtol=0, atol=1e-5)
    assert np.array_equal(np.asarray(plain.image), np.asarray(plain_image))


def test_one_instance_serves_concurrent_calls(torch_runtime):
    request = GenerationRequest(PROMPT, ENTITIES, seed=1, steps=1)
    expected = np.asarray(torch_runtime.generate(request).image)
    images = []
    threads = [
        threading.Thread(target=lambda: images.append(np.asarray(torch_runtime.generate(request).image)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(images) == 2 and all(np.array_equal(img, expected) for img in images)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(entities=("cat", "cheetah", "river", "water", "shallow")), EntityError, "4"),
        (dict(prompt="a cat and a cheetah " + "very " * 40), PromptError, "T5 tokens"),
        (dict(height=60), ShapeError, "multiple of 8"),
        (dict(width=4), ShapeError, "between 8 and 2048"),
    ],
)
def test_bad_requests_fail_before_any_work(torch_runtime, change, error, message):
    request = GenerationRequest(**{**dict(prompt=PROMPT, entities=ENTITIES, steps=1), **change})
    # `resolve` is the validation `generate` runs first; it touches no model.
    with pytest.raises(error, match=message):
        torch_runtime.resolve(request)
    with pytest.raises(error, match=message):
        torch_runtime.generate(request)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(entities=("cat", "dog")), EntityError, "not found in the prompt: \\['dog'\\]"),
        (dict(entities="cd"), EntitiesTypeError, "split into letters"),
        (dict(entities={"cat", "cheetah"}), EntitiesTypeError, "list or tuple of strings, got set"),
        (dict(entities=None), EntitiesTypeError, "got NoneType"),
        (dict(entities=b"cat"), EntitiesTypeError, "got bytes"),
        (dict(entities=("cat", 3)), EntityError, "the 2nd entity must be a str"),
        (dict(prompt=""), PromptError, "non-empty"),
        (dict(prompt=None), PromptError, "non-empty"),
        (dict(prompt="a cat and a cheetah " + "x" * MAX_PROMPT_CHARS), PromptError, "at most 20000"),
        (dict(prompt="a cat and a cheetah \ud800"), PromptError, "not valid Unicode"),
        (dict(guidance=float("inf")), ConfigError, "guidance must be a finite number in \\[0, 100\\]"),
        (dict(guidance=float("-inf")), ConfigError, "guidance"),
        (dict(guidance=float("nan")), ConfigError, "guidance"),
        (dict(guidance=3e38), ConfigError, "guidance"),
        (dict(guidance=1e308), ConfigError, "guidance"),
        (dict(guidance=-0.5), ConfigError, "guidance"),
        (dict(guidance=100.5), ConfigError, "guidance"),
        (dict(guidance="3.5"), ConfigError, "guidance"),
        (dict(seed=-1), ConfigError, "seed"),
        (dict(seed=2**63), ConfigError, "seed"),
        (dict(seed=1.0), ConfigError, "seed"),
        (dict(seed=True), ConfigError, "seed"),
        (dict(steps=0), ConfigError, "steps"),
        (dict(steps=1001), ConfigError, "steps"),
        (dict(steps=2.0), ConfigError, "steps"),
        (dict(height=0), ShapeError, "height must be an int in \\[1, 2048\\]"),
        (dict(width=0), ShapeError, "width must be an int in \\[1, 2048\\]"),
        (dict(width=4096), ShapeError, "width"),
        (dict(height=64.0), ShapeError, "height"),
        (dict(height=10**30), ShapeError, "height"),
        (dict(deleaker="yes"), ConfigError, "deleaker must be a bool"),
        (dict(seed=10**5000), ConfigError, "got an int of 16610 bits"),  # too long for repr(): still a message
        (dict(guidance=10**400), ConfigError, "guidance must be a finite number"),  # isfinite() would overflow
    ],
)
def test_request_is_checked_when_made_without_a_model(change, error, message):
    with pytest.raises(error, match=message):
        GenerationRequest(**{**dict(prompt=PROMPT, entities=ENTITIES), **change})


def test_numpy_scalars_become_python_numbers():
    request = GenerationRequest(PROMPT, ENTITIES, seed=np.int64(3), steps=np.int32(2), guidance=np.float32(2.5),
                                height=np.int64(64), width=np.uint16(64))  # fmt: skip
    assert (request.seed, request.steps, request.guidance, request.height, request.width) == (3, 2, 2.5, 64, 64)
    assert all(type(v) is int for v in (request.seed, request.steps, request.height, request.width))
    assert type(request.guidance) is float
    with pytest.raises(ConfigError, match="seed"):
        GenerationRequest(PROMPT, ENTITIES, seed=np.float64(3.0))


def test_generate_refuses_what_is_not_a_request(torch_runtime):
    with pytest.raises(ConfigError, match="expected a GenerationRequest, got str"):
        torch_runtime.generate("a cat and a cheetah")


def test_call_refuses_a_string_of_entities(torch_runtime):
    """``rt("a c and a d", "cd")`` once split "cd" into the entities c and d; a str is not a list of entities."""
    with pytest.raises(TypeError, match="split into letters") as info:
        torch_runtime("a c and a d", "cd", steps=1)
    assert isinstance(info.value, EntityError)


def _overflowing_runtime(components, module_path):
    """A torch runtime of ``components`` deep-copied, with the weight at ``module_path`` scaled so that its output
    overflows float32: a real model whose numbers leave float32's range (as extreme knobs or guidance can)."""
    components = {k: copy.deepcopy(v) for k, v in components.items()}
    owner, _, name = module_path.partition(".")
    with torch.no_grad():
        components[owner].get_submodule(name).weight.mul_(3e38)
    return DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=TEXT_LEN, deleaker_config=CONFIG, default_size=(64, 64)
    )


def test_non_finite_latents_are_an_error_not_an_image(tiny_components):
    rt = _overflowing_runtime(tiny_components, "transformer.proj_out")
    done = []
    with pytest.raises(NonFiniteError, match="after step 1 of 3") as info:
        rt.generate(GenerationRequest(PROMPT, ENTITIES, steps=3), progress=lambda i, n: done.append(i))
    assert isinstance(info.value, DeLeakerError) and done == []  # stopped at the first bad step


def test_a_guidance_a_float16_model_cannot_embed_is_refused_before_the_work(tiny_components):
    """The transformer embeds guidance x 1000 in its dtype: in float16, 66 is inf (every latent NaN)."""
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    rt = DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=TEXT_LEN, default_size=(64, 64), dtype=torch.float16
    )
    encoded = []
    rt.text.encode = lambda *args, **kwargs: encoded.append(args)  # the first step of the work
    with pytest.raises(ConfigError, match=r"guidance 66\.0 overflows FLUX's guidance embedding in float16"):
        rt(PROMPT, list(ENTITIES), steps=1, guidance=66.0)
    assert encoded == []


def test_non_finite_decoded_image_is_an_error(tiny_components):
    rt = _overflowing_runtime(tiny_components, "vae.decoder.conv_out")
    with pytest.raises(NonFiniteError, match="decoded image"):
        rt.generate(GenerationRequest(PROMPT, ENTITIES, steps=1))


# --- ONNX Runtime backend == PyTorch --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    # Shared with tests/test_cli.py (same folder, same key: tiny weights, 64x64, T = 32, CONFIG): one export.
    return tmp_path_factory.getbasetemp() / "deleaker-onnx-cache"


def test_onnxruntime_backend_equals_torch(tiny_components, torch_runtime, onnx_cache):
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    rt = DeLeakerRuntime.from_components(
        components,
        model_id="tiny",
        backend="onnxruntime",
        text_len=TEXT_LEN,
        deleaker_config=CONFIG,
        default_size=(64, 64),
        cache_dir=onnx_cache,
    )
    request = GenerationRequest(PROMPT, ENTITIES, seed=5, steps=2)
    got = rt.generate(request, record_latents=True)
    want = torch_runtime.generate(request, record_latents=True)

    assert rt.backend_name == "onnxruntime" and rt.deleaker_config == torch_runtime.deleaker_config
    for ours, ref in zip(got.latents, want.latents):
        assert float((ours - ref).norm() / ref.norm()) < 1e-4
    assert psnr(got.image, want.image) > 40

    # The export is cached under a hash of weights, contract and knobs: one entry, reused by a new runtime.
    entries = [p for p in (onnx_cache / "onnx").iterdir() if not p.name.startswith(".")]
    manifests = [json.loads((p / onnx_cache_mod.MANIFEST_NAME).read_text()) for p in entries]
    assert any(
        m["io"]["height"] == 64 and m["io"]["text_len"] == TEXT_LEN and m["model_id"] == "tiny" for m in manifests
    )
    again = DeLeakerRuntime.from_components(
        {k: copy.deepcopy(v) for k, v in tiny_components.items()},
        model_id="tiny",
        backend="onnxruntime",
        text_len=TEXT_LEN,
        deleaker_config=CONFIG,
        default_size=(64, 64),
        cache_dir=onnx_cache,
    )
    mtimes = {p.name: (p / onnx_cache_mod.ARTIFACT_NAME).stat().st_mtime_ns for p in entries}
    # prepare() loads the resolution's backend (an ORT session over the cached file) once; generate reuses it.
    first_load = again.prepare(request)
    assert again.prepare(request) < first_load
    second = again.generate(request)
    assert second.timings["backend_load"] < first_load
    assert np.array_equal(np.asarray(second.image), np.asarray(got.image))
    assert {p.name: (p / onnx_cache_mod.ARTIFACT_NAME).stat().st_mtime_ns for p in entries} == mtimes
    # Besides the entries, the cache holds only their (empty) lock files: no staging folder is left behind.
    folders = sorted(p.name for p in (onnx_cache / "onnx").iterdir() if p.is_dir())
    assert folders == sorted(p.name for p in entries)


def test_damaged_cache_entry_is_not_reused(onnx_cache, tmp_path):
    entries = [p for p in (onnx_cache / "onnx").iterdir() if (p / onnx_cache_mod.MANIFEST_NAME).is_file()]
    if not entries:
        pytest.skip("needs the export of test_onnxruntime_backend_equals_torch")
    entry = tmp_path / "entry"
    shutil.copytree(entries[0], entry)
    key = json.loads((entry / onnx_cache_mod.MANIFEST_NAME).read_text())["key"]
    assert onnx_cache_mod.is_valid_entry(entry, key)
    assert not onnx_cache_mod.is_valid_entry(entry, "0" * 64)  # another model/contract/knobs
    data = (entry / onnx_cache_mod.ARTIFACT_NAME).read_bytes()
    (entry / onnx_cache_mod.ARTIFACT_NAME).write_bytes(data[: len(data) // 2])  # truncated
    assert not onnx_cache_mod.is_valid_entry(entry, key)


def test_transformer_hash_follows_the_weights(tiny_components):
    transformer = copy.deepcopy(tiny_components["transformer"])
    before = onnx_cache_mod.transformer_sha256(transformer)
    assert before == onnx_cache_mod.transformer_sha256(tiny_components["transformer"])
    with torch.no_grad():
        next(transformer.parameters()).view(-1)[0] += 1e-3
    assert onnx_cache_mod.transformer_sha256(transformer) != before


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(text_len=600), "text_len must be an int in [1, 512]"),
        (dict(text_len=32.5), "text_len must be an int"),
        (dict(text_len=0), "text_len must be an int"),
        (dict(max_entities=20), "max_entities must be an int in [2, 8]"),
        (dict(max_entities=1), "max_entities must be an int in [2, 8]"),
        (dict(dtype=torch.int32), "dtype must be None or one of"),
        (dict(dtype="float16"), "dtype must be None or one of"),
        (dict(model=None), "model must be 'tiny' or a diffusers folder"),
        (dict(backend="tensorrt"), "cannot load a model"),
    ],
    ids=["T-600", "T-float", "T-0", "E-20", "E-1", "dtype-int32", "dtype-str", "model-None", "backend-tensorrt"],
)
def test_from_model_refuses_bad_options_before_loading(monkeypatch, options, message):
    from deleaker.runtime import runtime as runtime_mod

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(runtime_mod, "load_components", must_not_load)
    options = {"model": "tiny", "backend": "torch", **options}
    with pytest.raises(ConfigError) as info:
        DeLeakerRuntime.from_model(options.pop("model"), **options)
    assert message in str(info.value)


def test_from_components_checks_the_same_options(tiny_components):
    with pytest.raises(ConfigError, match=r"max_entities must be an int in \[2, 8\]"):
        DeLeakerRuntime.from_components(tiny_components, model_id="tiny", backend="torch", max_entities=9)
