"""``deleaker-trt`` through click's CliRunner with the tiny model: run (ONNX Runtime by default), --compare,
--json, a resumable --prompts batch, verify, and every bad input (exit code, message, no output file)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from deleaker.errors import ConfigError
from deleaker.runtime.jobs import RuntimeSpec
from deleaker.runtime.cli import main
from deleaker.runtime.images import is_valid_png

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
# Knobs that make DeLeaker act on the tiny model's random weights (as tests/test_runtime.py's CONFIG): the same
# knobs, T and resolution give the same ONNX cache key, so the session exports the tiny transformer once.
KNOBS = [
    "--set", "start_aggregating_from=1", "--set", "stop_aggregating_at=9", "--set", "start_intervention_from=2",
    "--set", "stop_intervention_at=40", "--set", "std_mul_text=0.5", "--set", "std_mul_image_image=0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # One folder per session, shared with tests/test_runtime.py: the ONNX export is keyed by a hash.
    return tmp_path_factory.getbasetemp() / "deleaker-onnx-cache"


@pytest.fixture
def tiny(cache_dir):
    """Options every run shares: the tiny model, T = 32, 2 steps, 64x64, no progress bar."""
    return [
        "--model",
        "tiny",
        "--text-len",
        "32",
        "--steps",
        "2",
        "--no-progress",
        "--cache-dir",
        str(cache_dir),
        *KNOBS,
    ]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_default_backend_json(tiny, tmp_path):
    out = tmp_path / "out" / "img.png"  # as the README's command: the folder is created
    result = invoke("run", *tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--seed", 7, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "onnxruntime"  # the embedded default
    assert report["generated"] == 1 and report["skipped"] == 0
    image = report["images"][0]
    assert image["out"] == str(out) and image["entities"] == ["cat", "cheetah"] and image["seed"] == 7
    assert image["height"] == image["width"] == 64
    assert set(image["timings"]) >= {"encode", "denoise", "decode", "total"}
    assert is_valid_png(out) and Image.open(out).size == (64, 64)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img.png"]  # no temp file left behind


def test_run_compare_human_output(tiny, tmp_path):
    out = tmp_path / "pair.png"
    with_progress = [a for a in tiny if a != "--no-progress"]
    result = invoke(
        "run",
        *with_progress,
        "--backend",
        "torch",
        "--prompt",
        PROMPT,
        "--entities",
        "cat, cheetah",
        "--out",
        out,
        "--compare",
    )
    assert result.exit_code == 0, result.output
    assert "DeLeaker" in result.stderr and "FLUX" in result.stderr and "2/2" in result.stderr  # tqdm, on stderr
    assert f"{out}: 64x64, 2 steps, torch, compare {tmp_path / 'pair_compare.png'}" in result.stdout
    assert "denoise" in result.stdout
    side = Image.open(tmp_path / "pair_compare.png").convert("RGB")
    assert side.width == 128 and side.height > 64 + 12  # two images, caption underneath
    # The right half is the DeLeaker image written to --out.
    assert np.array_equal(np.asarray(side)[:64, 64:], np.asarray(Image.open(out).convert("RGB")))


def test_batch_resumes_where_it_stopped(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {
            "prompt": "A bat and an owl are perched side by side on a tree branch.",
            "entities": ["bat", "owl"],
            "subset": "pairs",
        },
        {"prompt": "A cow and a horse in a farm", "entities": ["cow", "horse"], "seed": 5},
        {
            "prompt": "A strawberry, a radish, and a cherry sit together.",
            "entities": ["strawberry", "radish", "cherry"],
        },
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out_dir = tmp_path / "images"
    args = ("run", *tiny, "--prompts", prompts, "--out-dir", out_dir, "--json")

    first = invoke(*args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["generated"] == 3 and [i["seed"] for i in report["images"]] == [0, 5, 0]
    names = ["0000.png", "0001.png", "0002.png"]
    assert sorted(p.name for p in out_dir.iterdir()) == names
    before = {n: (out_dir / n).read_bytes() for n in names}
    mtimes = {n: os.stat(out_dir / n).st_mtime_ns for n in names}

    (out_dir / "0001.png").unlink()
    (out_dir / "0002.png").write_bytes(before["0002.png"][:100])  # a truncated file is not a valid output
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout)
    assert [i["skipped"] for i in report["images"]] == [True, False, False]
    assert os.stat(out_dir / "0000.png").st_mtime_ns == mtimes["0000.png"]  # untouched
    assert all((out_dir / n).read_bytes() == before[n] for n in names)  # same seed, same image

    third = invoke(*args[:-1])  # human output
    assert third.exit_code == 0 and third.stdout.count("exists, skipped") == 3


def test_verify_onnxruntime_against_torch(tiny):
    result = invoke(
        "verify", *tiny, "--backend", "onnxruntime", "--prompt", PROMPT, "--entities", "cat,cheetah", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and len(report["step_rel_err"]) == 2 and report["max_step_rel_err"] < 1e-4
    assert report["identical_images"] or report["psnr_db"] > 40

    strict = invoke("verify", *tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--max-rel-err", "1e-30")
    if report["max_step_rel_err"] > 1e-30:
        assert strict.exit_code == 1 and "verify: FAIL" in strict.stderr and "max rel. error" in strict.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--entities", "cat,dog"], "not found in the prompt: ['dog']"),
        (["--entities", "cat,cheetah,water,river,shallow"], "at most max_entities=4"),
        (["--entities", "cat"], "at least 2"),
        (["--height", "60"], "height 60 and width 60 are not allowed: each side must be a multiple of 8"),
        (["--width", "4096"], "width must be an int in [1, 2048] pixels, got 4096"),
        (["--width", "4"], "and width 4 are not allowed: each side must be a multiple of 8 (2 x the VAE scale factor) "
                           "between 8 and 2048"),
        (["--height", "64", "--width", "36"], "error: width 36 is not allowed"),
        (["--width", "0"], "width must be an int in [1, 2048] pixels, got 0"),
        (["--prompt", "a cat and a cheetah" + " and a cat" * 30], "T5 tokens but the model takes at most 32"),
        (["--backend", "tensorrt"], "tensorrt backend runs built engines"),
        (["--set", "k_strengthh=2"], "unknown DeLeaker option"),
        (["--set", "use_history=3"], "use_history must be a bool"),
    ],
)
def test_bad_input_fails_before_any_work(tiny, tmp_path, extra, message):
    out = tmp_path / "x.png"
    args = {"--prompt": PROMPT, "--entities": "cat,cheetah"}
    rest = []
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[extra[i]] = extra[i + 1]
        else:
            rest += extra[i : i + 2]
    flat = [x for kv in args.items() for x in kv]
    result = invoke("run", *tiny, *flat, *rest, "--out", out)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "out,message",
    [
        ("a_file/x.png", "a_file is not a directory"),
        ("x.jpg", "must end in .png"),
        ("a_dir.png", "is a directory"),
    ],
)
def test_unwritable_output_fails_before_any_work(tiny, tmp_path, out, message):
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    result = invoke("run", *tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", tmp_path / out)
    assert result.exit_code == 1 and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.png", "a_file"]
    assert list((tmp_path / "a_dir.png").iterdir()) == []


@pytest.mark.parametrize(
    "line,message",
    [
        (
            '{"prompt": "A cow and a horse", "entities": ["cow", "pig"]}',
            "line 2: entities not found in the prompt: ['pig']",
        ),
        ('{"prompt": "A cow and a horse", "entities": "cow,horse"}', "line 2: 'entities' must be a list"),
        ("not json", "line 2: not JSON"),
    ],
)
def test_bad_batch_line_fails_before_any_image(tiny, tmp_path, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "A bat and an owl", "entities": ["bat", "owl"]}) + "\n" + line + "\n")
    result = invoke("run", *tiny, "--prompts", prompts, "--out-dir", tmp_path / "out")
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_engine_dir_errors(tmp_path):
    missing = invoke(
        "run",
        "--engines",
        tmp_path / "nope",
        "--prompt",
        PROMPT,
        "--entities",
        "cat,cheetah",
        "--out",
        tmp_path / "x.png",
    )
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    empty = invoke(
        "run", "--engines", tmp_path, "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", tmp_path / "x.png"
    )
    assert empty.exit_code == 1 and "no *.manifest.json" in empty.stderr
    overrides = invoke("run", "--engines", tmp_path, "--set", "k_strength=2", "--prompt", PROMPT, "--entities", "a,b")
    assert overrides.exit_code == 1 and "built into engines" in overrides.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "given", [["--text-len", "256"], ["--max-entities", "8"], ["--text-len", "32", "--max-entities", "2"]]
)
def test_engines_refuse_text_len_and_max_entities(tmp_path, given):
    """Engines fix T and E_max: --text-len/--max-entities with --engines were ignored silently (even the default
    value, given explicitly, is refused: it says what the user expects), in the CLI and in `RuntimeSpec` alike."""
    result = invoke("run", "--engines", tmp_path, *given, "--prompt", PROMPT, "--entities", "cat,cheetah",
                    "--out", tmp_path / "x.png")
    named = [g[2:].replace("-", "_") for g in given if g.startswith("--")]
    assert result.exit_code == 1 and "only to a model (--model); engines are built for one T" in result.stderr
    assert " and ".join(named) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="only to a model"):
        RuntimeSpec(engines=tmp_path, **{name: int(value) for name, value in zip(named, given[1::2])})


def _local_tensorrt_release() -> str:
    """The TensorRT release importable here (the engines' manifests must name it), or one that is not."""
    from deleaker.plugins.trt_library import TensorRTUnavailableError, import_tensorrt, tensorrt_release

    try:
        return tensorrt_release(import_tensorrt())
    except TensorRTUnavailableError:
        return "tensorrt==10.8.0"


def _engine_dir(root, tiny_components, sizes=((64, 64),), text_lens=None, model_sha256=None, precisions=None,
                batch=(1, 1, 4)):
    """A directory of engine artifacts with real manifests. The engine and plugin library bytes are placeholders:
    no GPU here, so only the checks before deserialization (manifest, hashes, shapes) can run."""
    import dataclasses

    from deleaker.config import DeLeakerConfig
    from deleaker.engines.manifest import EngineManifest, sha256_file
    from deleaker.export.contract import FluxTransformerIO
    from deleaker.runtime.onnx_cache import transformer_sha256

    root.mkdir(exist_ok=True)
    library = root / "libdeleaker_trt_plugin.so"
    library.write_bytes(b"plugin library placeholder")
    build_info = (
        "deleaker_trt_plugin 0.1.0; plugin deleaker::DeLeakerAttention v1; tensorrt_headers 10.8.0; attention cuDNN "
        "SDPA (placeholder); kernel_abi 2"
    )
    transformer = tiny_components["transformer"]
    for i, (height, width) in enumerate(sizes):
        precision = (precisions or ["fp16"] * len(sizes))[i]
        artifact = root / f"transformer.{height}x{width}.{precision}.plan"
        artifact.write_bytes(b"engine bytes %d" % i * 64)
        io = FluxTransformerIO.from_transformer(
            transformer,
            height=height,
            width=width,
            text_len=(text_lens or [32] * len(sizes))[i],
            max_entities=4,
            vae_scale_factor=4,
            batch=batch,
            dtype="float16",
        )
        EngineManifest(
            kind="engine",
            artifact=artifact.name,
            artifact_sha256=sha256_file(artifact),
            model_id="tiny",
            model_sha256=model_sha256 or transformer_sha256(transformer),
            precision=precision,
            io=io.to_dict(),
            deleaker_config=dataclasses.asdict(DeLeakerConfig.for_model(4)),
            onnx_sha256="0" * 64,
            plugin={"name": "DeLeakerAttention", "namespace": "deleaker", "version": "1", "library": library.name,
                    "sha256": sha256_file(library), "build_info": build_info, "tensorrt_headers": "10.8.0"},
            tensorrt_version=_local_tensorrt_release(),
            gpu_name="NVIDIA H100 80GB HBM3",
            compute_capability=(9, 0),
        ).write(root)
    return root


def _has_tensorrt() -> bool:
    """TensorRT and a CUDA GPU: what a TensorRT backend needs before it deserializes an engine."""
    import torch

    from deleaker.plugins.trt_library import TensorRTUnavailableError, import_tensorrt

    try:
        import_tensorrt()
    except TensorRTUnavailableError:
        return False
    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "setup,extra,message",
    [
        ("intact", ["--height", "128"], "no tensorrt engine for 128x128; this directory has: 64x64"),
        ("intact", ["--prompt", "a cat and a cheetah" + " and a cat" * 30], "T5 tokens but the model takes at most 32"),
        ("intact", ["--backend", "onnxruntime"], "has no onnx artifacts"),
        ("intact", ["--backend", "torch"], "cannot run an engine directory"),
        ("truncated", [], "does not match its manifest's hash"),
        ("disagree", [], "disagree on text_len"),
        ("other_weights", [], "built from other weights"),
        ("bad_json", [], "manifest is not valid JSON"),
        ("two_precisions", [], "2 engine artifacts for 64x64 (fp16, fp8); choose one with --precision"),
        ("two_precisions", ["--precision", "bf16"], "has no bf16 engine artifacts (it has: ['fp16', 'fp8'])"),
        ("two_precisions", ["--precision", "fp8", "--height", "128"], "no tensorrt engine for 128x128"),
        ("batch_from_2", [], "has the batch profile (2, 2, 4); this runtime runs batch 1"),
    ],
)
def test_engine_dir_is_checked_before_any_work(tiny_components, tmp_path, setup, extra, message):
    engines = tmp_path / "engines"
    if setup == "disagree":
        _engine_dir(engines, tiny_components, sizes=((64, 64), (128, 128)), text_lens=[32, 64])
    elif setup == "batch_from_2":
        _engine_dir(engines, tiny_components, batch=(2, 2, 4))
    elif setup == "two_precisions":
        _engine_dir(engines, tiny_components, sizes=((64, 64), (64, 64)), precisions=["fp16", "fp8"])
    else:
        _engine_dir(engines, tiny_components, model_sha256="f" * 64 if setup == "other_weights" else None)
    plan = engines / "transformer.64x64.fp16.plan"
    if setup == "truncated":
        plan.write_bytes(plan.read_bytes()[:10])
    if setup == "bad_json":
        (engines / "transformer.64x64.fp16.plan.manifest.json").write_text("{not json")
    out = tmp_path / "x.png"
    args = {"--prompt": PROMPT, "--entities": "cat,cheetah", "--steps": "2", "--no-progress": None}
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    flat = [x for kv in args.items() for x in kv if x is not None]
    result = invoke("run", "--engines", engines, *flat, "--out", out)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT and a GPU are here: the engine would be deserialized")
def test_engine_dir_without_tensorrt_says_so_before_generating(tiny_components, tmp_path):
    engines = _engine_dir(tmp_path / "engines", tiny_components)
    out = tmp_path / "x.png"
    result = invoke("run", "--engines", engines, "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", out)
    assert result.exit_code == 1 and "TensorRT" in result.stderr
    assert "not importable" in result.stderr or "needs a CUDA GPU" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--model", "tiny", "--engines", "x", "--prompt", "p", "--entities", "a,b"], "exactly one of"),
        (["run", "--model", "tiny", "--entities", "a,b"], "give --prompt and --entities"),
        (["run", "--model", "tiny", "--prompt", "p", "--entities", "a,b", "--backend", "cuda"], "Invalid value"),
        # A bad value of a number is exit 1 (tests/test_cli_fast.py); a missing value or option is a usage error.
        (["run", "--model", "tiny", "--prompt", "p", "--entities", "a,b", "--steps"], "requires an argument"),
        (["run", "--model", "tiny", "--prompt", "p", "--entities", "a,b", "--stepz", "3"], "No such option"),
        (["build", "--model", "tiny", "--onnx-only"], "Missing option '--out'"),
        (["run", "--model", "tiny", "--set", "k_strength"], "expected KNOB=VALUE"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("verbose", [[], ["--verbose"]])
def test_library_warnings_hidden_unless_verbose(tiny, tmp_path, verbose):
    """Without --verbose the CLI drops deprecation notices; with it they reach the user. Errors show either way."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(*verbose, "run", *tiny, "--prompt", "A cow and a dog", "--entities", "cow,horse", "--out",
                        tmp_path / "x.png")
        warnings.warn("a library deprecation notice", FutureWarning)
    assert result.exit_code == 1 and "horse" in result.stderr
    assert not (tmp_path / "x.png").exists()
    assert any("deprecation notice" in str(w.message) for w in caught) == bool(verbose)


# --- hardening: numbers, outputs, records, interruption ---------------------------------------------------------


def _strict_json(text: str):
    """Parse as a strict JSON parser would: NaN and Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_gpu_is_one_error_line(tiny, tmp_path):
    result = invoke("run", *tiny, "--backend", "torch", "--device", "cuda:1", "--prompt", PROMPT, "--entities",
                    "cat,cheetah", "--out", tmp_path / "x.png")
    assert result.exit_code == 1
    assert "device 'cuda:1' is not available: this machine has no CUDA device" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _batch(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_batch_resume_refuses_outputs_made_otherwise(tiny, tmp_path):
    """Each image records what made it; a resumed batch keeps matching images, refuses to touch the others before
    any work, and --overwrite makes them again."""
    lines = [
        {"prompt": "A cow and a horse in a farm", "entities": ["cow", "horse"], "seed": 1},
        {"prompt": "A bat and an owl on a branch", "entities": ["bat", "owl"], "seed": 2},
    ]
    prompts, out_dir = _batch(tmp_path / "p.jsonl", lines), tmp_path / "images"
    args = ["run", *tiny, "--prompts", prompts, "--out-dir", out_dir, "--json"]
    assert invoke(*args).exit_code == 0
    first = {n: (out_dir / n).read_bytes() for n in ("0000.png", "0001.png")}
    record = _strict_json(Image.open(out_dir / "0001.png").text["deleaker-trt"])
    assert record["prompt"] == lines[1]["prompt"] and record["entities"] == ["bat", "owl"] and record["seed"] == 2
    assert record["model"] == "tiny" and record["backend"] == "onnxruntime" and record["text_len"] == 32
    assert record["deleaker_config"]["std_mul_text"] == 0.5 and (record["height"], record["width"]) == (64, 64)

    _batch(prompts, [lines[0], {**lines[1], "seed": 3}])
    changed = invoke(*args)
    assert changed.exit_code == 1 and "Traceback" not in changed.output
    assert f"{out_dir / '0001.png'} ({prompts} line 2) was made with other seed" in changed.stderr
    assert "--overwrite" in changed.stderr and "0000.png" not in changed.stderr
    assert {n: (out_dir / n).read_bytes() for n in first} == first  # nothing generated, nothing touched

    other_guidance = invoke(*args, "--guidance", "4")
    assert other_guidance.exit_code == 1 and "was made with other guidance" in other_guidance.stderr

    overwritten = invoke(*args, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    assert _strict_json(overwritten.stdout)["generated"] == 2
    assert (out_dir / "0000.png").read_bytes() == first["0000.png"]  # same line, same image
    assert (out_dir / "0001.png").read_bytes() != first["0001.png"]  # seed 3 now
    assert _strict_json(Image.open(out_dir / "0001.png").text["deleaker-trt"])["seed"] == 3
    resumed = invoke(*args)
    assert resumed.exit_code == 0 and _strict_json(resumed.stdout)["skipped"] == 2


def test_batch_resume_refuses_an_image_without_a_record(tiny, tmp_path):
    prompts = _batch(tmp_path / "p.jsonl", [{"prompt": "A cow and a horse in a farm", "entities": ["cow", "horse"]}])
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "0000.png")  # someone else's image
    result = invoke("run", *tiny, "--prompts", prompts, "--out-dir", tmp_path / "images")
    assert result.exit_code == 1 and "0000.png" in result.stderr and "has no record of its settings" in result.stderr
    assert Image.open(tmp_path / "images" / "0000.png").getextrema() == ((0, 0),) * 3


def test_overwrite_is_for_batches(tiny, tmp_path):
    result = invoke("run", *tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--overwrite",
                    "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "--overwrite applies to --prompts" in result.stderr


def test_json_report_is_strict(tiny, tmp_path):
    result = invoke("run", *tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", tmp_path / "x.png",
                    "--json")
    assert result.exit_code == 0 and _strict_json(result.stdout)["generated"] == 1


def test_verify_report_fails_on_non_finite_numbers_and_flat_images():
    from deleaker.runtime.jobs import VerifyReport

    nan_step = VerifyReport("onnxruntime", [1e-6, float("nan"), 1e-6], 50.0, 1e-2, 30.0)
    assert max(nan_step.step_rel_err) == 1e-6  # why `max` alone said PASS: NaN compares false
    assert not nan_step.passed and "the latent error is not finite at step(s) [2]" in nan_step.failures
    inf_step = VerifyReport("onnxruntime", [float("inf")], 50.0, 1e-2, 30.0)
    assert not inf_step.passed
    nan_psnr = VerifyReport("onnxruntime", [1e-6], float("nan"), 1e-2, 30.0)
    assert not nan_psnr.passed and "the image PSNR is NaN" in nan_psnr.failures
    flat = VerifyReport("onnxruntime", [0.0], float("inf"), 1e-2, 30.0, uniform_images=True)
    assert not flat.passed and any("flat colour" in f for f in flat.failures)
    assert not VerifyReport("onnxruntime", [], 50.0, 1e-2, 30.0).passed
    assert VerifyReport("onnxruntime", [1e-6, 2e-6], float("inf"), 1e-2, 30.0).passed  # identical real images

    report = _strict_json(json.dumps(nan_step.to_dict(), allow_nan=False))
    assert report["step_rel_err"] == [1e-6, None, 1e-6] and report["non_finite_steps"] == [2]
    assert report["max_step_rel_err"] is None and report["passed"] is False and report["failures"]
    flat_dict = _strict_json(json.dumps(flat.to_dict(), allow_nan=False))
    assert flat_dict["psnr_db"] is None and flat_dict["identical_images"] and flat_dict["uniform_images"]


def _torch_runtime(components):
    from deleaker.runtime.runtime import DeLeakerRuntime

    config = {k: json.loads(v) for k, v in (item.split("=") for item in KNOBS[1::2])}
    return DeLeakerRuntime.from_components(
        components, model_id="tiny", backend="torch", text_len=32, deleaker_config=config, default_size=(64, 64)
    )


def _components(tiny_components, edit=None):
    import copy

    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    if edit is not None:
        with torch.no_grad():
            edit(components)
    return components


def _black_vae(components):
    conv = components["vae"].decoder.conv_out
    conv.weight.zero_()
    conv.bias.fill_(-10.0)  # every pixel -10 before (x / 2 + 0.5).clamp(0, 1): black


def test_verify_of_two_black_images_is_a_fail(tiny_components):
    """Two all-black images are equal (infinite PSNR) but compare nothing: FAIL."""
    from deleaker.runtime import jobs
    from deleaker.runtime.request import GenerationRequest

    candidate = _torch_runtime(_components(tiny_components, _black_vae))
    reference = _torch_runtime(_components(tiny_components, _black_vae))
    job = jobs.VerifyJob(jobs.RuntimeSpec(model="tiny", backend="torch"), GenerationRequest(PROMPT, ("cat", "cheetah"),
                         steps=2))
    report = jobs.verify(job, candidate=candidate, reference=reference)
    assert report.psnr_db == float("inf") and report.uniform_images and not report.passed
    assert _strict_json(json.dumps(report.to_dict(), allow_nan=False))["passed"] is False


def test_verify_of_a_non_finite_candidate_is_a_fail(tiny_components):
    from deleaker.runtime import jobs
    from deleaker.runtime.request import GenerationRequest
    def overflow(components):
        components["transformer"].proj_out.weight.mul_(3e38)

    candidate = _torch_runtime(_components(tiny_components, overflow))
    reference = _torch_runtime(_components(tiny_components))
    job = jobs.VerifyJob(jobs.RuntimeSpec(model="tiny", backend="torch"), GenerationRequest(PROMPT, ("cat", "cheetah"),
                         steps=2))
    report = jobs.verify(job, candidate=candidate, reference=reference)
    assert not report.passed and report.failures[0].startswith("the candidate (torch) gave no finite result")
    assert math.isnan(report.psnr_db) and len(report.step_rel_err) == 2
    assert report.to_dict()["non_finite_steps"] == [i + 1 for i, e in enumerate(report.step_rel_err) if e != e]
    assert report.to_dict()["non_finite_steps"][-1] == 2 and report.max_step_rel_err is None
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON


def test_side_by_side_caption_is_bounded():
    """A 20,000-character prompt (the longest allowed) captions the pair in MAX_CAPTION_LINES lines, not thousands."""
    from deleaker.runtime.images import MAX_CAPTION_LINES, side_by_side

    image = Image.new("RGB", (64, 64))
    short = side_by_side(image, image, "a cat", ("FLUX", "DeLeaker"))
    long = side_by_side(image, image, "word " * 4000, ("FLUX", "DeLeaker"))
    assert long.width == 128 and long.height <= short.height + 12 * MAX_CAPTION_LINES
    assert side_by_side(image, image, "猫 and 🐱 " + "x" * 5000, ("FLUX", "DeLeaker")).height < long.height + 12


def test_verify_json_reports_a_non_finite_result(monkeypatch, tmp_path):
    """README: `--json` prints strict JSON also when a result is not finite (null, with `non_finite_steps`), and
    verify still exits 1. A tiny model whose output projection holds NaN goes non-finite at step 1."""
    import deleaker.tiny as tiny

    build = tiny.build_tiny_flux_components

    def poisoned(seed=0):
        components = build(seed)
        components["transformer"].proj_out.weight.data.fill_(float("nan"))
        return components

    monkeypatch.setattr(tiny, "build_tiny_flux_components", poisoned)
    # The candidate is ONNX Runtime: a torch candidate is refused (the reference is torch itself).
    args = ["verify", "--model", "tiny", "--backend", "onnxruntime", "--cache-dir", tmp_path, "--text-len", "32",
            "--steps", "2", "--prompt", PROMPT, "--entities", "cat,cheetah", "--json", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "error: verify: FAIL" in result.stderr, result.stderr
    report = _strict_json(result.stdout)
    assert report["passed"] is False and report["failures"]
    assert report["non_finite_steps"] and report["non_finite_steps"][0] == 1
    assert report["step_rel_err"][0] is None


def test_verify_refuses_to_compare_torch_with_itself(tiny_components):
    """`verify --backend torch` compared PyTorch with PyTorch and said PASS with identical images."""
    from deleaker.runtime import jobs
    from deleaker.runtime.request import GenerationRequest

    job = jobs.VerifyJob(jobs.RuntimeSpec(model="tiny", backend="torch"), GenerationRequest(PROMPT, ("cat", "cheetah"),
                         steps=2))
    with pytest.raises(ConfigError, match="would compare PyTorch with itself"):
        jobs.verify(job)
    with pytest.raises(ConfigError, match="would compare PyTorch with itself"):
        jobs.verify(job, candidate=_torch_runtime(_components(tiny_components)))
    result = invoke("verify", "--model", "tiny", "--backend", "torch", "--prompt", PROMPT, "--entities", "cat,cheetah")
    assert result.exit_code == 1 and "PASS" not in result.output
    assert result.stderr.startswith("error: verify compares a backend with PyTorch"), result.stderr


def test_compile_with_another_backend_fails_before_any_work(tiny, tmp_path):
    out = tmp_path / "x.png"
    result = invoke("run", *tiny, "--compile", "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", out)
    assert result.exit_code == 1, result.output
    assert "error: --compile applies to the torch backend of a model" in result.stderr
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_run_and_verify_compiled_torch_backend(tiny, tmp_path):
    """``--backend torch --compile``: the image records that it was compiled, the first call's compile time is in
    the JSON timings, and verify compares the compiled backend with eager PyTorch (and passes)."""
    out = tmp_path / "img.png"
    torch_tiny = [*tiny, "--backend", "torch", "--device", "cpu", "--compile"]
    result = invoke("run", *torch_tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    image = json.loads(result.stdout)["images"][0]
    assert image["timings"]["compile"] > 0
    from deleaker.runtime.images import read_png_record

    _, record = read_png_record(out)
    assert record["backend"] == "torch" and record["compiled"] == {"compiler": "inductor", "cuda_graphs": False}

    result = invoke("verify", *torch_tiny, "--prompt", PROMPT, "--entities", "cat,cheetah", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "torch compiled" and report["passed"]
    assert len(report["step_rel_err"]) == 2 and max(report["step_rel_err"]) < 1e-5
