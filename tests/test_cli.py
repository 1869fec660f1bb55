"""``deleaker-trt`` through click's CliRunner with the tiny model: run (ONNX Runtime by default), --compare,
--json, a resumable --prompts batch, verify, and every bad input (exit code, message, no output file)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

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
        assert strict.exit_code == 1 and "beyond tolerance" in strict.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--entities", "cat,dog"], "not found in the prompt: ['dog']"),
        (["--entities", "cat,cheetah,water,river,shallow"], "at most max_entities=4"),
        (["--entities", "cat"], "at least 2"),
        (["--height", "60"], "height 60 is not allowed: it must be a multiple of 8"),
        (["--width", "4096"], "between 8 and 2048"),
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


def _engine_dir(root, tiny_components, sizes=((64, 64),), text_lens=None, model_sha256=None, precisions=None):
    """A directory of engine artifacts with real manifests. The engine bytes are placeholders: TensorRT is not
    installed here, so only the checks before deserialization (manifest, hashes, shapes) can run."""
    import dataclasses

    from deleaker.config import DeLeakerConfig
    from deleaker.engines.manifest import EngineManifest, sha256_file
    from deleaker.export.contract import FluxTransformerIO
    from deleaker.runtime.onnx_cache import transformer_sha256

    root.mkdir(exist_ok=True)
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
            plugin={"name": "DeLeakerAttention", "version": "1"},
            tensorrt_version="10.8.0",
            gpu_name="NVIDIA H100 80GB HBM3",
            compute_capability=(9, 0),
        ).write(root)
    return root


def _has_tensorrt() -> bool:
    """A TensorRT that can run our engines (TensorRT-RTX cannot host the plugin, so it does not count)."""
    from deleaker.plugins.trt_plugin import TensorRTUnavailableError, import_plugin_capable_tensorrt

    try:
        import_plugin_capable_tensorrt()
        return True
    except TensorRTUnavailableError:
        return False


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
    ],
)
def test_engine_dir_is_checked_before_any_work(tiny_components, tmp_path, setup, extra, message):
    engines = tmp_path / "engines"
    if setup == "disagree":
        _engine_dir(engines, tiny_components, sizes=((64, 64), (128, 128)), text_lens=[32, 64])
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


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed: the engine would be deserialized")
def test_engine_dir_without_tensorrt_says_so_before_generating(tiny_components, tmp_path):
    engines = _engine_dir(tmp_path / "engines", tiny_components)
    out = tmp_path / "x.png"
    result = invoke("run", "--engines", engines, "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", out)
    assert result.exit_code == 1 and "TensorRT" in result.stderr
    assert "not importable" in result.stderr or "cannot host the DeLeaker plugin" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--model", "tiny", "--engines", "x", "--prompt", "p", "--entities", "a,b"], "exactly one of"),
        (["run", "--model", "tiny", "--entities", "a,b"], "give --prompt and --entities"),
        (["run", "--model", "tiny", "--prompt", "p", "--entities", "a,b", "--backend", "cuda"], "Invalid value"),
        (["run", "--model", "tiny", "--prompt", "p", "--entities", "a,b", "--steps", "0"], "Invalid value"),
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
