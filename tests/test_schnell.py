"""FLUX.1-schnell end to end, on a tiny schnell-shaped model (`deleaker.tiny`, ``schnell=True``: no guidance
embedding, schnell's fixed-shift scheduler) written as the diffusers folder a user brings.

The schedule is FluxPipeline's; without entities DeLeakerFluxPipeline and the runtime equal the stock FluxPipeline
bit for bit (guidance ignored, as diffusers ignores it); with entities every DeLeaker attention equals
`deleaker_attention` on the model's own projections; ONNX Runtime (the export, and ``build``'s engine folder) runs
within the FLUX.1 tolerances of torch; TensorRT-RTX builds its engine with the plugin library; ``run``/``verify``
take the folder and refuse ``--guidance``; the default windows at 1 to 4 steps act as the README says.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.models.transformers import transformer_flux
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from deleaker import DeLeakerConfig
from deleaker import processor as processor_mod
from deleaker.config import REFERENCE_NUM_BLOCKS
from deleaker.errors import ConfigError
from deleaker.geometry import latent_grid
from deleaker.pipeline import DeLeakerFluxPipeline
from deleaker.processor import DeLeakerState, install_deleaker_processors
from deleaker.runtime import onnx_cache as onnx_cache_mod
from deleaker.runtime import schedule as sched
from deleaker.runtime.cli import main as cli_main
from deleaker.runtime.images import psnr, read_png_record
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest
from deleaker.tiny import build_tiny_flux_components, save_tiny_flux
# The plugin library built against the stand-in headers (a session fixture) and the TensorRT-RTX child helpers.
# FLUX.1's prompt, T and DeLeaker windows (inside the first steps of the 4-block tiny model, thresholds that give
# masks on random weights, no smoothing): DeLeaker really edits the tiny schnell too.
from test_processor_pipeline import CONFIG, PROMPT, TEXT_LEN, OpAttention
from test_trt_plugin_library import _rtx_env, deleaker_trt, read_every_plan_fields, stand_in_library  # noqa: F401

ENTITIES = ("cat", "cheetah")
#: A model folder's runtime defaults to 512x512 (the built-in "tiny" to 64x64): every request here says its size.
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def schnell_components():
    """The tiny schnell's components (read-only: tests deep-copy what they change)."""
    return build_tiny_flux_components(0, schnell=True)


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-schnell", schnell=True)


def _copy(components):
    return {name: copy.deepcopy(c) for name, c in components.items()}


def _flux_latents(pipe, steps, seed=3, guidance=3.5, **extra):
    """Every step's latents and the image of ``pipe`` at 64x64."""
    latents = []

    def keep(_pipe, _i, _t, kwargs):
        latents.append(kwargs["latents"].clone())
        return {}

    with torch.no_grad():
        out = pipe(
            PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
            max_sequence_length=TEXT_LEN, generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=keep, output_type="pil", **extra,
        )
    return latents, out.images[0]


# --- the model and its schedule --------------------------------------------------------------------------------


def test_tiny_schnell_folder_is_schnell_shaped(schnell_dir):
    pipe = FluxPipeline.from_pretrained(schnell_dir, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.transformer.time_text_embed.__class__.__name__ == "CombinedTimestepTextProjEmbeddings"
    assert pipe.scheduler.config.use_dynamic_shifting is False and pipe.scheduler.config.shift == 1.0
    dev = json.loads((save_tiny_flux(schnell_dir.parent / "dev") / "transformer" / "config.json").read_text())
    schnell = json.loads((schnell_dir / "transformer" / "config.json").read_text())
    # Only the guidance embedding tells them apart.
    assert {k for k in dev if dev[k] != schnell.get(k) and not k.startswith("_")} == {"guidance_embeds"}


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("height,width,vae_scale", [(64, 64, 4), (512, 512, 8), (1024, 1024, 8), (768, 1360, 8)])
def test_schedule_equals_flux_pipeline_for_schnell(schnell_components, steps, height, width, vae_scale):
    """FluxPipeline passes ``mu`` and a linspace of sigmas; schnell's scheduler ignores ``mu`` (fixed shift 1), so
    4 steps are sigmas 1, 0.75, 0.5, 0.25 at every size."""
    gh, gw = latent_grid(height, width, vae_scale)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(schnell_components["scheduler"].config)
    mu = diffusers_calculate_shift(gh * gw, 256, 4096, 0.5, 1.15)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    shift = sched.ShiftConfig.from_scheduler_config(scheduler.config)
    assert not shift.use_dynamic_shifting and shift.shift == 1.0
    ours = sched.flux_schedule(steps, gh * gw, shift)
    np.testing.assert_array_equal(ours.timesteps, timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, scheduler.sigmas.numpy())
    np.testing.assert_allclose(ours.sigmas, np.append(np.linspace(1.0, 1 / steps, steps), 0.0), rtol=1e-6)


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_a_fixed_shift_that_is_no_positive_number_is_refused(shift):
    with pytest.raises(ConfigError, match="the scheduler's shift must be a finite number > 0"):
        sched.ShiftConfig.from_scheduler_config({"use_dynamic_shifting": False, "shift": shift})
    # With dynamic shifting the fixed shift is never used (FLUX.1-dev's says 3.0): not checked, not kept.
    assert sched.ShiftConfig.from_scheduler_config({"use_dynamic_shifting": True, "shift": shift}) == sched.ShiftConfig()


# --- without entities: the stock FluxPipeline, bit for bit --------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
def test_pipeline_without_entities_is_flux_pipeline_and_ignores_guidance(schnell_components, steps):
    plain_latents, plain_image = _flux_latents(FluxPipeline(**_copy(schnell_components)), steps)
    ours = DeLeakerFluxPipeline(**_copy(schnell_components))
    for guidance in (3.5, 0.0, 9.0):  # schnell has no guidance embedding: FluxPipeline ignores it, and so do we
        latents, image = _flux_latents(ours, steps, guidance=guidance)
        assert all(torch.equal(a, b) for a, b in zip(latents, plain_latents)) and len(latents) == steps
        assert np.array_equal(np.asarray(image), np.asarray(plain_image))


@pytest.fixture(scope="module")
def torch_runtime(schnell_dir):
    return DeLeakerRuntime.from_model(schnell_dir, backend="torch", text_len=TEXT_LEN, deleaker_config=CONFIG)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_runtime_without_deleaker_is_flux_pipeline(schnell_components, torch_runtime, steps):
    plain_latents, plain_image = _flux_latents(FluxPipeline(**_copy(schnell_components)), steps)
    for guidance in (3.5, 7.0):  # the runtime ignores guidance for a model without its embedding, as diffusers
        result = torch_runtime.generate(
            GenerationRequest(PROMPT, ENTITIES, seed=3, steps=steps, guidance=guidance, deleaker=False, **SIZE),
            record_latents=True,
        )
        assert len(result.latents) == steps
        assert all(torch.equal(a, b) for a, b in zip(result.latents, plain_latents))
        assert np.array_equal(np.asarray(result.image), np.asarray(plain_image))


# --- with entities: every DeLeaker attention is the op on the model's own projections -----------------------------


def test_every_deleaker_attention_is_the_op_on_the_models_projections(schnell_components, monkeypatch):
    """DeLeakerFluxPipeline with entities == the stock FluxPipeline whose attention calls are replaced by
    `deleaker_attention` (block steps counted from the call order), over 4 steps; and DeLeaker changed the image."""
    pipe = DeLeakerFluxPipeline(**_copy(schnell_components))
    ours_latents, ours_image = _flux_latents(pipe, 4, entities=list(ENTITIES), deleaker_config=CONFIG)
    state = pipe.deleaker_state(PROMPT, list(ENTITIES), height=64, width=64, max_sequence_length=TEXT_LEN,
                                deleaker_config=CONFIG)

    op = OpAttention(state.entity_mask, state.grid, CONFIG)
    stock = FluxPipeline(**_copy(schnell_components))
    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", op)
    theirs_latents, theirs_image = _flux_latents(stock, 4)
    monkeypatch.undo()
    assert op.calls == 4 * pipe.num_blocks
    for ours, theirs in zip(ours_latents, theirs_latents):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert psnr(ours_image, theirs_image) > 40

    plain_latents, _ = _flux_latents(FluxPipeline(**_copy(schnell_components)), 4)
    assert (plain_latents[-1] - ours_latents[-1]).abs().max() > 1e-4  # the case exercised the edits


def test_runtime_with_entities_equals_the_pipeline(schnell_components, torch_runtime):
    want, want_image = _flux_latents(
        DeLeakerFluxPipeline(**_copy(schnell_components)), 4, entities=list(ENTITIES), deleaker_config=CONFIG
    )
    got = torch_runtime.generate(GenerationRequest(PROMPT, ENTITIES, seed=3, steps=4, **SIZE), record_latents=True)
    for ours, ref in zip(got.latents, want):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert np.array_equal(np.asarray(got.image), np.asarray(want_image))


# --- ONNX Runtime: the export and build's engine folder --------------------------------------------------------


def _rel_errors(got, want):
    return [float((a - b).norm() / b.norm()) for a, b in zip(got.latents, want.latents)]


def test_onnxruntime_backend_matches_torch(schnell_dir, torch_runtime, tmp_path):
    """The exported schnell transformer (no ``guidance`` input) in ONNX Runtime vs torch: FLUX.1's tolerances
    (tests/test_runtime.py: latents within 1e-4 relative per step, PSNR above 40 dB)."""
    rt = DeLeakerRuntime.from_model(
        schnell_dir, backend="onnxruntime", text_len=TEXT_LEN, deleaker_config=CONFIG, cache_dir=tmp_path
    )
    request = GenerationRequest(PROMPT, ENTITIES, seed=5, steps=4, guidance=9.0, **SIZE)
    got, want = rt.generate(request, record_latents=True), torch_runtime.generate(request, record_latents=True)
    assert max(_rel_errors(got, want)) < 1e-4 and psnr(got.image, want.image) > 40
    (manifest,) = [json.loads(p.read_text()) for p in tmp_path.glob(f"onnx/*/{onnx_cache_mod.MANIFEST_NAME}")]
    assert "guidance" not in [spec["name"] for spec in manifest["io"]["inputs"]]
    assert manifest["io"]["guidance_embeds"] is False
    plain = torch_runtime.generate(GenerationRequest(PROMPT, ENTITIES, seed=5, steps=4, deleaker=False, **SIZE),
                                   record_latents=True)
    assert max(_rel_errors(plain, want)) > 1e-3  # DeLeaker changed what was compared


def test_build_onnx_only_then_run_engines_in_onnx_runtime(schnell_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "engines"
    built = runner.invoke(cli_main, [
        "build", "--model", str(schnell_dir), "--height", "64", "--width", "64", "--text-len", str(TEXT_LEN),
        "--onnx-only", "--out", str(out),
    ])
    assert built.exit_code == 0, built.output
    (manifest,) = [json.loads(p.read_text()) for p in out.glob("*.manifest.json")]
    assert manifest["io"]["guidance_embeds"] is False
    assert [spec["name"] for spec in manifest["io"]["inputs"]] == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
        "entity_mask", "history", "step",
    ]
    # No --steps: the engine folder's manifest says the model has no guidance embedding, so 4 steps, no guidance.
    args = ["--prompt", PROMPT, "--entities", "cat,cheetah", "--no-progress", "--height", "64"]
    ran = runner.invoke(cli_main, ["run", "--engines", str(out), *args, "--cache-dir", str(tmp_path / "cache"),
                                   "--out", str(tmp_path / "cat.png")])
    assert ran.exit_code == 0, ran.output
    assert ", 4 steps, onnxruntime" in ran.output
    valid, record = read_png_record(tmp_path / "cat.png")
    assert valid and (record["steps"], record["guidance"]) == (4, None)
    refused = runner.invoke(cli_main, ["run", "--engines", str(out), *args, "--guidance", "5",
                                       "--out", str(tmp_path / "no.png")])
    assert refused.exit_code == 1 and not (tmp_path / "no.png").exists()
    assert "--guidance: the engines in" in refused.output and "no guidance embedding" in refused.output


# --- the command line ----------------------------------------------------------------------------------------


def test_cli_run_and_verify_take_a_schnell_folder(schnell_dir, tmp_path):
    runner = CliRunner()
    args = ["--model", str(schnell_dir), "--prompt", PROMPT, "--entities", "cat,cheetah",  # schnell's 4 steps
            "--height", "64", "--text-len", str(TEXT_LEN), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    ran = runner.invoke(cli_main, ["run", *args, "--json", "--out", str(tmp_path / "cat.png")])
    assert ran.exit_code == 0, ran.output
    assert (tmp_path / "cat.png").is_file()
    assert [(i["steps"], i["guidance"]) for i in json.loads(ran.stdout)["images"]] == [(4, None)]
    verified = runner.invoke(cli_main, ["verify", *args])
    assert verified.exit_code == 0, verified.output
    assert "verify: PASS" in verified.output
    (errors,) = [line for line in verified.output.splitlines() if "latent rel. error per step" in line]
    assert len(errors.split("per step")[1].split()) == 4


@pytest.mark.parametrize("command", ["run", "verify"])
def test_cli_refuses_guidance_for_a_model_without_its_embedding(schnell_dir, tmp_path, command, monkeypatch):
    from deleaker.runtime import runtime as runtime_mod

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --guidance was refused")

    monkeypatch.setattr(runtime_mod, "load_components", must_not_load)
    out = tmp_path / "no.png"
    result = CliRunner().invoke(cli_main, [
        command, "--model", str(schnell_dir), "--prompt", PROMPT, "--entities", "cat,cheetah", "--guidance", "3.5",
        *(["--out", str(out)] if command == "run" else []),
    ])
    assert result.exit_code == 1 and not out.exists()
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: --guidance: the model {schnell_dir} has no guidance embedding (FLUX.1-schnell is distilled without "
        "one), so guidance does not change its images; leave --guidance out"
    ]


# --- the default windows at 1 to 4 steps (what the README says) -------------------------------------------------


def _flux1_shaped_schnell():
    """A schnell transformer with FLUX.1's 19 + 38 blocks (57 per step, the spec defaults' unit), tiny widths."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = transformer_flux.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ).eval()
    install_deleaker_processors(transformer)
    return transformer


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_default_windows_at_one_to_four_steps(monkeypatch, steps):
    """With the spec's defaults a schnell run of 1-4 steps (57 to 228 block steps) never reaches
    stop_aggregating_at (684) or stop_intervention_at (1140): the history is aggregated from block step 12 and
    DeLeaker edits from block 18 of the first step to the last block of the last step. Only the knobs that are not
    windows are changed here, so that the edits show on random weights."""
    transformer = _flux1_shaped_schnell()
    config = DeLeakerConfig(do_smoothing=False, std_mul_text=0.5, std_mul_image_image=0.5)
    assert config == DeLeakerConfig.for_model(REFERENCE_NUM_BLOCKS, do_smoothing=False, std_mul_text=0.5,
                                              std_mul_image_image=0.5)  # the spec defaults, unscaled
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, 1], mask[1, 3] = True, True
    state = DeLeakerState(entity_mask=mask, grid=(4, 4), config=config)
    seen = []
    real_call = processor_mod.call_attention

    def recording(query, key, value, entity_mask, history, step, *, block_offset, num_blocks, **kwargs):
        out, new_history = real_call(query, key, value, entity_mask, history, step, block_offset=block_offset,
                                     num_blocks=num_blocks, **kwargs)
        plain = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        seen.append((int(step) * num_blocks + block_offset, not torch.allclose(out, plain, rtol=0, atol=1e-6),
                     not torch.equal(new_history, history)))
        return out, new_history

    monkeypatch.setattr(processor_mod, "call_attention", recording)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g), pooled_projections=torch.randn(1, 32, generator=g),
        txt_ids=torch.zeros(8, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
    )
    with torch.no_grad():
        for step in range(steps):
            hidden = torch.randn(1, 16, 16, generator=g)
            transformer(hidden_states=hidden, timestep=torch.full((1,), 1 - step / steps),
                        joint_attention_kwargs={"deleaker_state": state}, return_dict=False, **inputs)
            state.advance()
    total = steps * REFERENCE_NUM_BLOCKS
    assert [t for t, _, _ in seen] == list(range(total))
    assert [t for t, edited, _ in seen if edited] == list(range(18, total))
    assert [t for t, _, aggregated in seen if aggregated] == list(range(12, total))


# --- TensorRT-RTX builds the schnell engine with the plugin library ----------------------------------------------


def test_tensorrt_rtx_builds_the_schnell_engine_with_the_plugin_library(schnell_dir, stand_in_library, tmp_path):
    """``deleaker-trt build --plugin`` (TensorRT-RTX, CPU-only, in a child process as test_trt_plugin_library.py
    does): the parser and builder take the schnell graph (no ``guidance`` input, one DeLeakerAttention node per
    block); the manifest's contract has no guidance. Running the engine needs a GPU (not here)."""
    from deleaker.engines.manifest import EngineManifest
    from deleaker.plugins.trt_library import TensorRTUnavailableError, import_tensorrt

    try:
        if import_tensorrt().__name__ != "tensorrt_rtx":
            pytest.skip("TensorRT proper is installed: deleaker-trt build uses it, not TensorRT-RTX")
    except TensorRTUnavailableError:
        pytest.skip("tensorrt-rtx is not installed")
    out = tmp_path / "engines"
    build = deleaker_trt([
        "build", "--model", schnell_dir, "--height", "64", "--width", "64", "--text-len", "16", "--max-entities", "4",
        "--precision", "fp16", "--plugin", stand_in_library, "--out", out,
    ], _rtx_env(tmp_path))
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    engine = out / "transformer.64x64.fp16.plan"
    manifest = EngineManifest.read(engine)
    assert manifest.kind == "engine" and manifest.io["guidance_embeds"] is False
    assert "guidance" not in [spec["name"] for spec in manifest.io["inputs"]]
    layers = read_every_plan_fields(engine.read_bytes())
    assert sorted(fields["block_offset"] for fields in layers) == [0, 1, 2, 3]
    assert all(fields["num_blocks"] == 4 and (fields["grid_h"], fields["grid_w"]) == (8, 8) for fields in layers)


# --- defaults that follow the model: 4 steps and no guidance for schnell ------------------------------------------


def test_requests_without_steps_or_guidance_get_the_models_defaults(torch_runtime, tiny_components):
    """schnell: 4 steps and no guidance (None, whatever was given: it has no embedding); a guided model (the tiny
    dev-shaped one): 20 steps and 3.5. A request's explicit steps are kept; the mask is made once."""
    resolved = torch_runtime.resolve(GenerationRequest(PROMPT, ENTITIES, seed=3, **SIZE))
    assert (resolved.steps, resolved.guidance) == (4, None)
    assert torch_runtime.default_steps == 4 and torch_runtime.uses_guidance is False
    given = torch_runtime.resolve(GenerationRequest(PROMPT, ENTITIES, steps=2, guidance=7.0, **SIZE))
    assert (given.steps, given.guidance) == (2, None)
    again = torch_runtime.resolve(resolved)
    assert again is resolved
    # A resolved request whose steps were reset to None gets them back, keeping its mask (no second lookup).
    reset = torch_runtime.resolve(dataclasses.replace(resolved, steps=None))
    assert reset.steps == 4 and reset.entity_mask is resolved.entity_mask

    dev = DeLeakerRuntime.from_components(tiny_components, model_id="tiny", backend="torch", text_len=TEXT_LEN)
    assert dev.uses_guidance is True and dev.default_steps == 20
    guided = dev.resolve(GenerationRequest(PROMPT, ENTITIES, **SIZE))
    assert (guided.steps, guided.guidance) == (20, 3.5)
    assert dev.resolve(GenerationRequest(PROMPT, ENTITIES, steps=3, guidance=np.float32(5.0), **SIZE)).guidance == 5.0


def test_generate_without_steps_runs_four_steps_as_flux_pipeline(schnell_components, torch_runtime):
    """The default request on schnell is FluxPipeline at schnell's 4 steps, and reports them."""
    plain_latents, plain_image = _flux_latents(FluxPipeline(**_copy(schnell_components)), 4)
    result = torch_runtime.generate(GenerationRequest(PROMPT, ENTITIES, seed=3, deleaker=False, **SIZE),
                                    record_latents=True)
    assert len(result.latents) == 4 and result.request.steps == 4 and result.request.guidance is None
    assert np.array_equal(np.asarray(result.image), np.asarray(plain_image))


@pytest.mark.parametrize("guidance", [np.array(5.0), torch.tensor(5.0), torch.tensor(5, dtype=torch.int64),
                                      np.float32(5.0), np.int16(5), torch.tensor(5.0, dtype=torch.bfloat16)])
def test_request_guidance_takes_the_real_scalars_the_pipeline_takes(guidance):
    request = GenerationRequest(PROMPT, ENTITIES, guidance=guidance)
    assert request.guidance == 5.0 and type(request.guidance) is float


@pytest.mark.parametrize("guidance", [np.array(np.nan), torch.tensor(float("inf")), np.array(True),
                                      torch.tensor(True), np.bool_(True), True, np.array([5.0]), torch.ones(1),
                                      torch.tensor(5 + 0j), np.array(5 + 0j), np.array(101.0), "5"])
def test_request_guidance_still_refuses_what_is_no_finite_real_number(guidance):
    with pytest.raises(ConfigError, match=r"guidance must be a finite number in \[0, 100\]"):
        GenerationRequest(PROMPT, ENTITIES, guidance=guidance)


def test_cli_run_defaults_to_four_steps_and_records_no_guidance(schnell_dir, tmp_path):
    """``run`` without --steps on schnell: 4 steps, its PNG's record and the JSON report say so, and guidance is
    None (it used none). A batch written before (guidance 3.5 recorded for schnell) is resumed, not refused."""
    from deleaker.runtime.images import save_pngs_atomic

    runner = CliRunner()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "entities": list(ENTITIES), "seed": 1}) + "\n")
    args = ["run", "--model", str(schnell_dir), "--prompts", str(prompts), "--out-dir", str(tmp_path / "out"),
            "--height", "64", "--text-len", str(TEXT_LEN), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--backend", "torch", "--json"]
    ran = runner.invoke(cli_main, args)
    assert ran.exit_code == 0, ran.output
    (image,) = json.loads(ran.stdout)["images"]
    assert (image["steps"], image["guidance"]) == (4, None)
    png = tmp_path / "out" / "0000.png"
    valid, record = read_png_record(png)
    assert valid and (record["steps"], record["guidance"]) == (4, None)

    # The record as the previous version wrote it: the unused default guidance.
    from PIL import Image

    with Image.open(png) as old:
        pixels = old.copy()
    save_pngs_atomic([(pixels, png)], {**record, "guidance": 3.5})
    resumed = runner.invoke(cli_main, args)
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert (report["generated"], report["skipped"]) == (0, 1)
    # Other settings still tell images apart: 20 steps is not what this run makes.
    save_pngs_atomic([(pixels, png)], {**record, "guidance": 3.5, "steps": 20})
    refused = runner.invoke(cli_main, args)
    assert refused.exit_code == 1 and "was made with other steps" in refused.output


def test_demo_page_of_schnell_defaults_to_four_steps_and_hides_guidance(torch_runtime):
    pytest.importorskip("gradio")
    from deleaker.runtime.demo import build_demo

    demo = build_demo(torch_runtime)
    fields = {c["props"].get("label"): c["props"] for c in demo.config["components"] if "props" in c}
    assert fields["Steps"]["value"] == 4
    assert fields["Guidance"]["visible"] is False
