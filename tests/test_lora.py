"""LoRA adapters (`deleaker.lora`, `deleaker.lora_fusion`; issue #24 item 1): an adapter made here with peft on the
tiny transformer gives, through every path (torch backend, ONNX Runtime, an engine folder in ONNX Runtime,
`DeLeakerFluxPipeline`), the image diffusers' own LoRA loading gives; adapters compose as diffusers composes them;
the ONNX cache never serves an export made with other adapters; a bad adapter is refused before any work."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from deleaker.engines import build as build_lib
from deleaker.engines.manifest import EngineManifest, ManifestError
from deleaker.errors import DeLeakerError
from deleaker.lora import LoraAdapter, LoraError, check_loras, parse_lora_option
from deleaker.lora_fusion import fuse_loras
from deleaker.pipeline import DeLeakerFluxPipeline
from deleaker.processor import DeLeakerFluxAttnProcessor
from deleaker.runtime.images import psnr
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest

from hostile_use import ENTITIES, KNOBS, PROMPT, TEXT_LEN, invoke_cli

STEPS = 2
#: Layers the adapters change: attention of both block kinds, the single blocks' MLP, the text encoder's attention.
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "proj_mlp", "ff.net.2"]


def _copy(components):
    return {name: copy.deepcopy(part) for name, part in components.items()}


def make_adapter(folder: Path, components, *, seed: int, rank: int = 4, text_encoder: bool = False) -> Path:
    """A LoRA made with peft on the tiny model (random A and B, so it changes the image), saved by diffusers'
    ``FluxPipeline.save_lora_weights``; returns the .safetensors file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TRANSFORMER_TARGETS, init_lora_weights=False)
        transformer = inject_adapter_in_model(config, copy.deepcopy(components["transformer"]))
        layers = {"transformer_lora_layers": get_peft_model_state_dict(transformer)}
        if text_encoder:
            te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            encoder = inject_adapter_in_model(te_config, copy.deepcopy(components["text_encoder"]))
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(folder, weight_name="adapter.safetensors", **layers)
    return folder / "adapter.safetensors"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_components) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": make_adapter(root / "a", tiny_components, seed=1),
        "b": make_adapter(root / "b", tiny_components, seed=2, rank=2),
        "te": make_adapter(root / "te", tiny_components, seed=3, text_encoder=True),
    }


def diffusers_latents(pipe, *, seed: int = 3, **extra) -> tuple[list[torch.Tensor], object]:
    """Every step's latents and the image of ``pipe`` (a FluxPipeline or DeLeakerFluxPipeline)."""
    latents = []

    def keep(_pipe, _i, _t, kwargs):
        latents.append(kwargs["latents"].clone())
        return {}

    out = pipe(
        PROMPT, height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=TEXT_LEN,
        generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=keep, output_type="pil", **extra,
    )
    return latents, out.images[0]


def diffusers_lora_pipeline(components, loaded: list[tuple[Path, float]], cls=FluxPipeline):
    """diffusers' own LoRA loading, unfused: ``load_lora_weights`` per file, then ``set_adapters``."""
    pipe = cls(**_copy(components))
    names = []
    for index, (path, _) in enumerate(loaded):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"user_{index}")
        names.append(f"user_{index}")
    pipe.set_adapters(names, [scale for _, scale in loaded])
    return pipe


def torch_runtime(components, loras, **kwargs) -> DeLeakerRuntime:
    return DeLeakerRuntime.from_components(
        _copy(components), model_id="tiny", backend="torch", text_len=TEXT_LEN, deleaker_config=KNOBS,
        default_size=(64, 64), loras=loras, **kwargs,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_same_run(got, want_latents, want_image) -> None:
    # The torch backend's tolerances against the pipelines (tests/test_runtime.py), fused against unfused weights.
    assert len(got.latents) == len(want_latents) == STEPS
    for ours, ref in zip(got.latents, want_latents):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert psnr(got.image, want_image) > 40


# --- torch backend and the pipeline == diffusers' LoRA loading -----------------------------------------------------


def test_torch_backend_with_a_lora_gives_diffusers_image(tiny_components, adapters):
    rt = torch_runtime(tiny_components, [LoraAdapter(adapters["te"], 0.8)])
    request = GenerationRequest(PROMPT, ENTITIES, seed=3, steps=STEPS, deleaker=False)
    got = rt.generate(request, record_latents=True)
    want_latents, want_image = diffusers_latents(diffusers_lora_pipeline(tiny_components, [(adapters["te"], 0.8)]))
    _assert_same_run(got, want_latents, want_image)

    # The adapter acted (far beyond fused-vs-unfused rounding): the match is not the trivial one.
    plain = torch_runtime(tiny_components, None).generate(request, record_latents=True)
    assert _rel(plain.latents[-1], got.latents[-1]) > 1e-2
    assert rt.lora_records[0]["name"] == "adapter.safetensors" and rt.lora_records[0]["scale"] == 0.8


def test_two_adapters_compose_as_diffusers_set_adapters(tiny_components, adapters):
    loras = [(adapters["a"], 0.7), (adapters["b"], -0.5)]
    rt = torch_runtime(tiny_components, loras)
    got = rt.generate(GenerationRequest(PROMPT, ENTITIES, seed=3, steps=STEPS, deleaker=False), record_latents=True)
    want_latents, want_image = diffusers_latents(diffusers_lora_pipeline(tiny_components, loras))
    _assert_same_run(got, want_latents, want_image)
    # Both adapters count: either alone gives another result.
    alone = torch_runtime(tiny_components, loras[:1]).generate(
        GenerationRequest(PROMPT, ENTITIES, seed=3, steps=STEPS, deleaker=False), record_latents=True
    )
    assert _rel(alone.latents[-1], got.latents[-1]) > 1e-3


def test_pipeline_keeps_load_lora_weights_with_deleaker_processors(tiny_components, adapters):
    """``DeLeakerFluxPipeline.load_lora_weights`` is FluxPipeline's; every joint attention keeps DeLeaker's
    processor, and with entities the pipeline equals the torch backend with the adapter fused."""
    pipe = diffusers_lora_pipeline(tiny_components, [(adapters["a"], 0.9)], cls=DeLeakerFluxPipeline)
    processors = pipe.transformer.attn_processors
    assert processors and all(isinstance(p, DeLeakerFluxAttnProcessor) for p in processors.values())
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert [block.attn.processor.block_offset for block in blocks] == list(range(len(blocks)))

    want_latents, want_image = diffusers_latents(pipe, entities=list(ENTITIES), deleaker_config=KNOBS)
    rt = torch_runtime(tiny_components, [(adapters["a"], 0.9)])
    got = rt.generate(GenerationRequest(PROMPT, ENTITIES, seed=3, steps=STEPS), record_latents=True)
    _assert_same_run(got, want_latents, want_image)
    # DeLeaker acted on the adapted model.
    plain = rt.generate(GenerationRequest(PROMPT, ENTITIES, seed=3, steps=STEPS, deleaker=False), record_latents=True)
    assert _rel(plain.latents[-1], got.latents[-1]) > 1e-5

    # Fused too (diffusers' fuse_lora), the processors stay DeLeaker's.
    pipe.fuse_lora()
    assert all(isinstance(p, DeLeakerFluxAttnProcessor) for p in pipe.transformer.attn_processors.values())


def test_fusing_keeps_deleaker_processors_in_place(tiny_components, adapters):
    pipe = DeLeakerFluxPipeline(**_copy(tiny_components))
    fuse_loras(pipe.components, [LoraAdapter(adapters["a"])])
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(isinstance(block.attn.processor, DeLeakerFluxAttnProcessor) for block in blocks)
    assert [block.attn.processor.block_offset for block in blocks] == list(range(len(blocks)))
    # Plain layers again (fused, not wrapped by peft): what exports to ONNX and builds into engines.
    assert type(blocks[0].attn.to_q) is torch.nn.Linear


# --- ONNX Runtime: the export holds the fused weights; the cache key holds the adapters ----------------------------


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-onnx-cache")


def _onnx_runtime(components, loras, cache: Path) -> DeLeakerRuntime:
    return DeLeakerRuntime.from_components(
        _copy(components), model_id="tiny", backend="onnxruntime", text_len=TEXT_LEN, deleaker_config=KNOBS,
        default_size=(64, 64), cache_dir=cache, loras=loras,
    )


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "onnx").iterdir() if p.is_dir() and not p.name.startswith("."))


def test_onnxruntime_exports_the_fused_weights_and_keys_the_cache_by_adapter(tiny_components, adapters, onnx_cache):
    request = GenerationRequest(PROMPT, ENTITIES, seed=5, steps=STEPS)
    made = {}
    for label, loras in (("a", [(adapters["a"], 1.0)]), ("a/2", [(adapters["a"], 0.5)])):
        got = _onnx_runtime(tiny_components, loras, onnx_cache).generate(request, record_latents=True)
        want = torch_runtime(tiny_components, loras).generate(request, record_latents=True)
        assert max(_rel(o, r) for o, r in zip(got.latents, want.latents)) < 1e-4
        assert psnr(got.image, want.image) > 40
        made[label] = got
    # Another scale is another export: the cache did not serve the first adapter's graph for the second scale.
    assert len(_entries(onnx_cache)) == 2
    assert _rel(made["a"].latents[-1], made["a/2"].latents[-1]) > 1e-3


def test_the_cache_key_holds_each_adapters_hash_and_scale(tiny_components, adapters, tmp_path):
    """The key of an export (weights as the folder's files say, plus adapters): another file, another scale or
    another order is another key; the same adapters, copied elsewhere, the same key."""
    from deleaker.runtime.model_loading import _model_key

    transformer = tiny_components["transformer"]

    def key(*loras):
        records = [LoraAdapter(path, scale).record() for path, scale in loras]
        return _model_key(transformer, "folder-fingerprint", torch.float32, records)()

    copied = tmp_path / "renamed.safetensors"
    copied.write_bytes(adapters["a"].read_bytes())
    a, b = adapters["a"], adapters["b"]
    keys = [key(), key((a, 1.0)), key((a, 0.5)), key((b, 1.0)), key((a, 1.0), (b, 1.0)), key((b, 1.0), (a, 1.0))]
    assert len(set(keys)) == len(keys)
    assert key((copied, 1.0)) == key((a, 1.0))
    assert key() == _model_key(transformer, "folder-fingerprint", torch.float32)()  # no adapter: the key as before


# --- engines: build --lora bakes them in; the manifest records them ------------------------------------------------


@pytest.fixture(scope="module")
def lora_engines(tmp_path_factory, adapters) -> Path:
    out = tmp_path_factory.mktemp("lora-engines")
    result = invoke_cli(
        "build", "--model", "tiny", "--precision", "fp16", "--height", "64", "--width", "64", "--text-len", TEXT_LEN,
        "--onnx-only", "--out", out, "--lora", f"{adapters['a']}:0.75",
        *[arg for name, value in KNOBS.items() for arg in ("--set", f"{name}={value}")],
    )
    assert result.exit_code == 0, result.output
    return out


def test_engine_folder_built_with_a_lora_gives_diffusers_image(lora_engines, tiny_components, adapters, tmp_path):
    manifest = EngineManifest.read(lora_engines / "transformer.64x64.fp16.onnx")
    adapter = LoraAdapter(adapters["a"], 0.75)
    assert manifest.loras == [{"name": "adapter.safetensors", "sha256": adapter.sha256, "scale": 0.75}]

    rt = DeLeakerRuntime.from_engines(lora_engines, cache_dir=tmp_path / "cache")
    assert rt.lora_records == manifest.loras
    request = GenerationRequest(PROMPT, ENTITIES, seed=5, steps=STEPS)
    got = rt.generate(request, record_latents=True)
    # The reference: the adapter fused as diffusers does, the weights rounded to the engine's fp16.
    components = _copy(tiny_components)
    fuse_loras(components, [adapter])
    components["transformer"].to(torch.float16).to(torch.float32)
    want = torch_runtime(components, None).generate(request, record_latents=True)
    assert max(_rel(o, r) for o, r in zip(got.latents, want.latents)) < 1e-4
    assert psnr(got.image, want.image) > 40
    plain = torch_runtime(tiny_components, None).generate(request, record_latents=True)
    assert _rel(plain.latents[-1], want.latents[-1]) > 1e-2

    # The same adapters may be named again (a copy is the same adapter); others are refused before any work.
    same = DeLeakerRuntime.from_engines(lora_engines, cache_dir=tmp_path / "cache", loras=[(adapters["a"], 0.75)])
    assert same.lora_records == manifest.loras
    for other in ([(adapters["a"], 1.0)], [(adapters["b"], 0.75)], [(adapters["a"], 0.75), (adapters["b"], 1.0)]):
        with pytest.raises(DeLeakerError, match="were built with adapter.safetensors:0.75"):
            DeLeakerRuntime.from_engines(lora_engines, cache_dir=tmp_path / "cache", loras=other)


def test_cli_run_engines_with_another_lora_is_one_error_line(lora_engines, adapters, tmp_path):
    out = tmp_path / "x.png"
    result = invoke_cli(
        "run", "--engines", lora_engines, "--cache-dir", tmp_path / "cache", "--prompt", PROMPT, "--entities",
        "cat,cheetah", "--steps", "1", "--no-progress", "--out", out, "--lora", f"{adapters['b']}:0.75",
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "built with adapter.safetensors:0.75" in lines[0]
    assert not out.exists()


def test_cli_verify_engines_needs_the_adapters_they_were_built_with(lora_engines, adapters, tmp_path):
    verify = ["verify", "--engines", lora_engines, "--cache-dir", tmp_path / "cache", "--prompt", PROMPT,
              "--entities", "cat,cheetah", "--steps", "1", "--no-progress"]
    result = invoke_cli(*verify)
    assert result.exit_code == 1 and "pass the same --lora" in result.output, result.output
    result = invoke_cli(*verify, "--lora", f"{adapters['a']}:0.75")
    assert result.exit_code == 0 and "verify: PASS" in result.output, result.output


def test_engines_refuse_an_adapter_of_the_text_encoder_before_any_work(adapters, tmp_path):
    request = build_lib.BuildRequest(
        model="tiny", precision="fp16", out_dir=tmp_path / "out", height=64, width=64, text_len=TEXT_LEN,
        onnx_only=True, loras=[adapters["te"]],
    )
    with pytest.raises(LoraError, match="text_encoder.*runs outside an engine"):
        build_lib.build_engines(request)
    assert not (tmp_path / "out").exists()


def test_a_format_1_manifest_is_migrated_to_no_lora(lora_engines):
    data = json.loads((lora_engines / "transformer.64x64.fp16.onnx.manifest.json").read_text())
    old = {**{k: v for k, v in data.items() if k != "loras"}, "format": 1}
    migrated = EngineManifest.from_json(json.dumps(old))
    assert migrated.loras == [] and migrated.format == 2
    with pytest.raises(ManifestError, match="format 1 has no loras"):
        EngineManifest.from_json(json.dumps({**data, "format": 1}))
    with pytest.raises(ManifestError, match="manifest loras"):
        EngineManifest.from_json(json.dumps({**data, "loras": [{"name": "x", "sha256": "0" * 64, "scale": "1"}]}))


# --- bad adapters: a clear error before any work -------------------------------------------------------------------


def test_lora_option_splits_at_the_last_colon_only_before_a_number(tmp_path):
    plain = tmp_path / "x.safetensors"
    colon = tmp_path / "a:b.safetensors"
    for path in (plain, colon):
        path.write_bytes(b"")
    assert parse_lora_option(str(plain)) == LoraAdapter(plain, 1.0)
    assert parse_lora_option(f"{plain}:0.5") == LoraAdapter(plain, 0.5)
    assert parse_lora_option(f"{plain}:-2e-1") == LoraAdapter(plain, -0.2)
    assert parse_lora_option(str(colon)) == LoraAdapter(colon, 1.0)
    assert parse_lora_option(f"{colon}:2") == LoraAdapter(colon, 2.0)
    for scale in ("nan", "inf", "-inf"):
        with pytest.raises(LoraError, match="must be a finite number"):
            parse_lora_option(f"{plain}:{scale}")
    with pytest.raises(LoraError, match="does not exist"):
        parse_lora_option(f"{plain}:x")  # not a number: part of the path, which does not exist
    with pytest.raises(LoraError, match="is not a file"):
        parse_lora_option(str(tmp_path))


@pytest.mark.parametrize(
    "loras, message",
    [
        ("x.safetensors", "a list of adapters"),
        ([3], "a LoraAdapter, a path or"),
        ([("missing.safetensors", 1.0)], "does not exist"),
        ([(__file__, True)], "must be a finite number"),
        ([(__file__, float("nan"))], "must be a finite number"),
        ([(__file__, "1.0")], "must be a finite number"),
    ],
    ids=["one-path", "not-a-path", "missing", "bool-scale", "nan-scale", "str-scale"],
)
def test_bad_adapter_values_are_refused_before_the_model_loads(loras, message, monkeypatch):
    import deleaker.runtime.runtime as runtime_mod

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(runtime_mod, "load_components", no_load)
    with pytest.raises(LoraError, match=message):
        DeLeakerRuntime.from_model("tiny", backend="torch", loras=loras)
    with pytest.raises(LoraError, match=message):
        check_loras(loras)


def _write(path: Path, tensors: dict) -> Path:
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))
    return path


def bad_files(tmp_path: Path, adapters) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import load_file

    good = load_file(str(adapters["a"]))
    key_a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    not_safetensors = tmp_path / "noise.safetensors"
    not_safetensors.write_bytes(b"\x00\x01 definitely not a safetensors header" * 10)
    renamed = {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in good.items()}
    wrong = dict(good)
    wrong[key_a] = torch.randn(4, 48)
    nan = dict(good)
    nan[key_a] = torch.full_like(good[key_a], float("nan"))
    return {
        "not-safetensors": (not_safetensors, "not a safetensors file"),
        "not-a-lora": (_write(tmp_path / "weights.safetensors", {"proj.weight": torch.ones(2, 2)}), "holds no LoRA"),
        "other-model": (_write(tmp_path / "other.safetensors", renamed), "does not have: an adapter for another model"),
        "wrong-shapes": (_write(tmp_path / "shapes.safetensors", wrong), "does not fit .*to_q.*another model"),
        "not-finite": (_write(tmp_path / "nan.safetensors", nan), "not finite"),
    }


@pytest.mark.parametrize("case", ["not-safetensors", "not-a-lora", "other-model", "wrong-shapes", "not-finite"])
def test_bad_adapter_files_are_refused_before_any_weight_changes(case, tiny_components, adapters, tmp_path):
    path, message = bad_files(tmp_path, adapters)[case]
    components = _copy(tiny_components)
    before = {name: t.clone() for name, t in components["transformer"].state_dict().items()}
    # The good adapter first: the bad second one is found before either is applied.
    with pytest.raises(LoraError, match=message):
        DeLeakerRuntime.from_components(
            components, model_id="tiny", backend="torch", text_len=TEXT_LEN, loras=[adapters["a"], path]
        )
    after = components["transformer"].state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_an_adapter_for_a_flux2_model_is_refused_before_any_work(adapters):
    from deleaker.tiny_flux2 import build_tiny_flux2_klein_components

    components = build_tiny_flux2_klein_components(0)
    with pytest.raises(LoraError, match="apply to FLUX.1 transformers .* not to Flux2Transformer2DModel"):
        fuse_loras(components, [LoraAdapter(adapters["a"])])


def test_cli_bad_adapter_is_one_error_line_and_no_image(tiny_components, adapters, tmp_path):
    path, _ = bad_files(tmp_path, adapters)["wrong-shapes"]
    out = tmp_path / "x.png"
    for lora in (str(path), f"{adapters['a']}:nan", str(tmp_path / "missing.safetensors")):
        result = invoke_cli(
            "run", "--model", "tiny", "--backend", "torch", "--text-len", TEXT_LEN, "--prompt", PROMPT, "--entities",
            "cat,cheetah", "--steps", "1", "--no-progress", "--out", out, "--lora", lora,
        )
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "LoRA" in lines[0], result.output
        assert not out.exists()


@pytest.mark.parametrize("command", ["run", "verify", "serve", "demo", "build"])
def test_every_command_refuses_a_missing_adapter_in_one_line(command, tmp_path):
    args = {
        "run": ["--prompt", PROMPT, "--entities", "cat,cheetah", "--out", tmp_path / "x.png"],
        "verify": ["--prompt", PROMPT, "--entities", "cat,cheetah"],
        "serve": ["--port", "0"],
        "demo": ["--port", "0"],
        "build": ["--onnx-only", "--out", tmp_path / "engines"],
    }[command]
    result = invoke_cli(command, "--model", "tiny", *args, "--lora", f"{tmp_path / 'missing.safetensors'}:0.5")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: LoRA file '{tmp_path / 'missing.safetensors'}' does not exist"], result.output
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "engines").exists()


def test_triton_repo_records_the_adapters_for_its_generation_model(adapters, tmp_path, monkeypatch):
    from deleaker.runtime.jobs import RuntimeSpec

    monkeypatch.chdir(adapters["a"].parent)  # a relative --lora path is recorded absolute
    result = invoke_cli("triton-repo", "--model", "tiny", "--out", tmp_path / "repo", "--lora", "adapter.safetensors:0.5")
    assert result.exit_code == 0, result.output
    (record_path,) = (tmp_path / "repo").glob("*/1/runtime.json")
    record = json.loads(record_path.read_text())
    assert record["loras"] == [[str(adapters["a"].resolve()), 0.5]]
    # What the python model opens (runtime/triton_model.py reads the pairs back into a RuntimeSpec).
    spec = RuntimeSpec(model="tiny", loras=tuple(tuple(pair) for pair in record["loras"]))
    assert spec.loras == (LoraAdapter(adapters["a"].resolve(), 0.5),)


def test_cli_run_and_verify_with_a_lora(adapters, onnx_cache, tmp_path):
    out = tmp_path / "x.png"
    # The adapter, knobs and T of the ONNX Runtime test above: verify reuses its export from the cache.
    common = ["--model", "tiny", "--text-len", TEXT_LEN, "--prompt", PROMPT, "--entities", "cat,cheetah",
              "--steps", "1", "--no-progress", "--lora", f"{adapters['a']}:1.0",
              *[arg for name, value in KNOBS.items() for arg in ("--set", f"{name}={value}")]]
    result = invoke_cli("run", *common, "--backend", "torch", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    from deleaker.runtime.images import read_png_record

    complete, record = read_png_record(out)
    assert complete
    assert record["loras"] == [LoraAdapter(adapters["a"], 1.0).record()]
    result = invoke_cli("verify", *common, "--cache-dir", onnx_cache, "--json")
    assert result.exit_code == 0, result.output
    report, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])
    assert report["passed"] is True and "verify: PASS" in result.output
