"""``deleaker-trt triton-repo`` (`deleaker.runtime.triton_repo`, `deleaker.runtime.triton_model`):

- the python-backend generation model served by a REAL ``tritonserver`` (the ``nvidia-pytriton`` wheel's binary, in
  an environment of its own: tests/triton_server.py) on 127.0.0.1: images equal to `DeLeakerRuntime`'s for the same
  requests, fetched over Triton's HTTP/REST protocol; dynamic batching observed in Triton's own statistics; bad
  requests answered with the CLI's messages while the model keeps serving;
- the ``tensorrt_plan`` models generated from fp16, bf16 and fp8 engine folders that TensorRT-RTX built (CPU-only),
  parsed with Triton's model-config schema and checked against each engine's manifest (TensorRT cannot run an
  engine here, so no server loads them);
- bad input to the command: one ``error:`` line, exit 1, nothing written.

Where the server cannot be set up (no network for the first install, say) the server tests skip, except in CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import triton_server
from deleaker.runtime import DeLeakerRuntime
from deleaker.runtime.cli import main
from deleaker.runtime.images import RECORD_KEY
from deleaker.runtime.jobs import output_record
from deleaker.runtime.request import GenerationRequest

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
KNOBS = {"std_mul_text": 0.5, "start_aggregating_from": 1, "start_intervention_from": 2}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def server_root():
    try:
        return triton_server.server_environment()
    except (triton_server.TritonSetupError, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Triton tests: {exc}")
        pytest.skip(f"cannot set up the Triton server environment here: {exc}")


@pytest.fixture(scope="module")
def served(server_root, tmp_path_factory):
    """A repository for the tiny model (torch backend, see the README's Triton section) and a server on it."""
    work = tmp_path_factory.mktemp("triton")
    checkout = triton_server.checkout_folder(work)
    repo = work / "repo"
    knobs = [x for name, value in KNOBS.items() for x in ("--set", f"{name}={value}")]
    result = invoke("triton-repo", "--model", "tiny", "--backend", "torch", "--text-len", 32, *knobs,
                    "--max-batch", 4, "--queue-delay-us", 300_000,
                    "--python-path", server_root / "stub-site", "--python-path", checkout, "--out", repo)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"model: {repo / 'deleaker'}", f"serve: tritonserver --model-repository="
                                          f"{repo.resolve()}"]
    try:
        server = triton_server.TritonServer(server_root, repo, work).__enter__()
    except triton_server.TritonSetupError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def runtime(tiny_components):
    return DeLeakerRuntime.from_components(tiny_components, model_id="tiny", backend="torch", text_len=32,
                                           deleaker_config=KNOBS, default_size=(64, 64))


def _inputs(prompt: str, entities: list[str], **settings) -> list[dict]:
    types = {"seed": "INT64", "steps": "INT32", "guidance": "FP32", "height": "INT32", "width": "INT32"}
    tensors = [
        {"name": "PROMPT", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
        {"name": "ENTITIES", "shape": [1, len(entities)], "datatype": "BYTES", "data": entities},
    ]
    for name, value in settings.items():
        tensors.append({"name": name.upper(), "shape": [1, 1], "datatype": types[name], "data": [value]})
    return tensors


def _image(reply: dict) -> tuple[np.ndarray, bytes]:
    assert "outputs" in reply, reply
    datatype, shape, raw = reply["outputs"]["IMAGE"]
    assert datatype == "UINT8"
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(shape)[0]
    png_type, png_shape, png_raw = reply["outputs"]["PNG"]
    assert png_type == "BYTES" and png_shape == [1, 1]
    (png,) = triton_server.bytes_elements(png_raw)
    return pixels, png


@pytest.mark.parametrize("entities, settings", [
    (["cat", "cheetah"], {"seed": 3, "steps": 3}),
    (["cheetah", "river"], {"seed": 11, "steps": 2, "guidance": 2.5}),
])
def test_served_image_equals_the_runtimes(served, runtime, entities, settings):
    reply = served.infer("deleaker", _inputs(PROMPT, entities, **settings), ["IMAGE", "PNG"])
    pixels, png = _image(reply)
    request = GenerationRequest(PROMPT, entities, **settings)
    expected = runtime.generate(request)
    assert np.array_equal(pixels, np.asarray(expected.image))
    with Image.open(io.BytesIO(png)) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
        record = json.loads(image.text[RECORD_KEY])
    assert record == json.loads(json.dumps(output_record(runtime, expected.request)))


def test_dynamic_batching_is_observed(served, runtime):
    """Six requests at once: Triton's dynamic batcher hands the model several per `execute` (its statistics count
    executions of batch size > 1), which runs them in one denoising loop (`generate_batch`), and every image is
    still the runtime's for its own request."""
    before = served.get_json("/v2/models/deleaker/stats")["model_stats"][0]
    seeds = [20, 21, 22, 23, 24, 25]
    replies: dict[int, dict] = {}

    def send(seed: int) -> None:
        replies[seed] = served.infer("deleaker", _inputs(PROMPT, ["cat", "cheetah"], seed=seed, steps=1),
                                     ["IMAGE", "PNG"], timeout=300)

    threads = [threading.Thread(target=send, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=360)
    assert not any(thread.is_alive() for thread in threads)
    after = served.get_json("/v2/models/deleaker/stats")["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == len(seeds)
    assert executions < inferences, after  # some execute() calls got several requests
    assert any(int(b["batch_size"]) > 1 for b in after["batch_stats"]), after["batch_stats"]
    for seed in seeds:  # a batch runs in one denoising loop: the request's image alone within one grey level
        pixels, _ = _image(replies[seed])
        expected = runtime.generate(GenerationRequest(PROMPT, ["cat", "cheetah"], seed=seed, steps=1))
        assert np.abs(pixels.astype(int) - np.asarray(expected.image).astype(int)).max() <= 1


@pytest.mark.parametrize("entities, settings, message", [
    (["cat", "dog"], {}, "entities not found in the prompt: ['dog']"),
    (["cat"], {}, "at least 2"),
    (["cat", "cheetah"], {"steps": 0}, "steps"),
    (["cat", "cheetah"], {"height": 60}, "height 60 and width 60 are not allowed: each side must be a multiple of 8"),
    (["cat", "cheetah"], {"guidance": 1000.0}, "guidance"),
])
def test_bad_requests_get_the_clis_message(served, entities, settings, message):
    reply = served.infer("deleaker", _inputs(PROMPT, entities, **settings), ["IMAGE", "PNG"])
    assert message in reply.get("error", ""), reply
    assert reply["status"] == 400
    # The model lives on.
    assert "outputs" in served.infer("deleaker", _inputs(PROMPT, ["cat", "cheetah"], steps=1), ["IMAGE"])


# --- tensorrt_plan models from engine folders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_folder(tmp_path_factory) -> Path:
    """fp16, bf16 and fp8 engines of the tiny model (batch 1 to 2) built by TensorRT-RTX into one folder, with the
    stand-in plugin library (as tests/test_trt_plugin_library.py builds them)."""
    from deleaker.plugins import kernels_build as kernel_build
    from deleaker.plugins import trt_plugin_build as trt_build
    from deleaker.plugins.trt_library import TensorRTUnavailableError, import_tensorrt

    try:
        if import_tensorrt().__name__ != "tensorrt_rtx":
            pytest.skip("TensorRT proper is installed: deleaker-trt build uses it, not TensorRT-RTX")
    except TensorRTUnavailableError:
        pytest.skip("tensorrt-rtx is not installed")
    try:
        kernel_build.find_nvcc()
    except kernel_build.NvccNotFoundError:
        pytest.skip("no nvcc: cannot build the plugin library")
    library = trt_build.build_plugin(trt_build.PluginBuildConfig(
        out_dir=kernel_build.cache_root() / "trt_plugin_stand_in", stand_in_headers=True))
    import tensorrt_rtx

    # TensorRT-RTX's parser opens libtensorrt_rtx.so by its unversioned name; the wheel ships only .so.1.
    links = tmp_path_factory.mktemp("rtx-libs")
    (links / "libtensorrt_rtx.so").symlink_to(
        Path(tensorrt_rtx.__file__).resolve().parent.parent / "tensorrt_rtx_libs" / "libtensorrt_rtx.so.1")
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(links), os.environ.get("LD_LIBRARY_PATH")])))
    out = tmp_path_factory.mktemp("engines")
    for precision in ("fp16", "bf16", "fp8"):
        build = subprocess.run(
            [sys.executable, "-c", "from deleaker.runtime.cli import main; main()", "build", "--model", "tiny",
             "--height", "64", "--width", "64", "--text-len", "16", "--max-entities", "4", "--batch", "1", "1", "2",
             "--precision", precision, "--plugin", str(library), "--out", str(out)],
            capture_output=True, text=True, timeout=900, env=env)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out


TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int32": "TYPE_INT32"}


def test_plan_models_match_their_manifests(engine_folder, server_root, tmp_path):
    from deleaker.engines.manifest import EngineManifest
    from deleaker.export.contract import FluxTransformerIO

    repo = tmp_path / "repo"
    result = invoke("triton-repo", "--engines", engine_folder, "--out", repo)
    assert result.exit_code == 0, result.output
    library = repo.resolve() / "deleaker_transformer_64x64_bf16" / "libdeleaker_trt_plugin.so"
    assert f"backend-config: --backend-config=tensorrt,plugins={library}" in result.output
    assert f"serve: tritonserver --model-repository={repo.resolve()} --backend-config=tensorrt,plugins={library}" \
        in result.output
    for precision in ("fp16", "bf16", "fp8"):
        plan = engine_folder / f"transformer.64x64.{precision}.plan"
        manifest = EngineManifest.read(plan)
        name = f"deleaker_transformer_64x64_{precision}"
        folder = repo / name
        assert (folder / "1" / "model.plan").read_bytes() == plan.read_bytes()
        assert (folder / "libdeleaker_trt_plugin.so").read_bytes() == \
            (engine_folder / manifest.plugin_library).read_bytes()
        config = triton_server.parse_model_config(server_root, folder / "config.pbtxt")
        assert config["name"] == name and config["platform"] == "tensorrt_plan"
        assert config.get("max_batch_size", 0) == 0
        assert config["default_model_filename"] == "model.plan"
        assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 1}]
        io = FluxTransformerIO.from_dict(manifest.io)
        assert io.dtype == {"fp16": "float16", "bf16": "bfloat16", "fp8": "float16"}[precision]
        for key, specs in (("input", io.inputs), ("output", io.outputs)):
            got = config[key]
            assert [t["name"] for t in got] == [s.name for s in specs]
            for tensor, spec in zip(got, specs):
                assert tensor["data_type"] == TRITON_TYPES[spec.dtype], tensor
                dims = [int(d) for d in tensor["dims"]]
                if spec.shape == ():
                    assert dims == [1] and tensor["reshape"] == {}, tensor  # a scalar: one element, reshaped to ()
                else:
                    assert dims == [-1 if isinstance(d, str) else d for d in spec.shape], tensor
        lo, opt, hi = manifest.batch_range
        assert (lo, opt, hi) == (1, 1, 2)
        assert {k: v["string_value"] for k, v in config["parameters"].items()} == {
            "deleaker_batch_min": "1", "deleaker_batch_opt": "1", "deleaker_batch_max": "2"}
    # The generation model beside them runs from the engine folder.
    record = json.loads((repo / "deleaker" / "1" / "runtime.json").read_text())
    assert record["engines"] == str(engine_folder.resolve()) and record["model"] is None
    config = triton_server.parse_model_config(server_root, repo / "deleaker" / "config.pbtxt")
    assert config["backend"] == "python" and config["max_batch_size"] == 8
    assert [t["name"] for t in config["input"]] == ["PROMPT", "ENTITIES", "SEED", "STEPS", "GUIDANCE", "HEIGHT",
                                                    "WIDTH"]


def test_a_changed_engine_is_refused_before_anything_is_written(engine_folder, tmp_path):
    import shutil

    copy = Path(shutil.copytree(engine_folder, tmp_path / "engines", ignore=shutil.ignore_patterns(".build.lock")))
    with open(copy / "transformer.64x64.bf16.plan", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\0\1\2\3")
    result = invoke("triton-repo", "--engines", copy, "--out", tmp_path / "repo")
    assert result.exit_code == 1
    assert "transformer.64x64.bf16.plan does not match its manifest's hash" in result.output
    assert not (tmp_path / "repo").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no staging folder left


# --- bad input to the command -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--max-batch", 0], "max_batch (--max-batch) must be an int in [1, 64], got 0"),
    (["--model", "tiny", "--text-len", 0], "text_len"),
    (["--model", "tiny", "--set", "k_strength=-1"], "k_strength"),
    (["--model", "/nonexistent/flux"], "/nonexistent/flux"),
    (["--engines", "/nonexistent/engines"], "engine directory /nonexistent/engines does not exist"),
    (["--model", "tiny", "--python-path", "/nonexistent/site"], "--python-path /nonexistent/site is not a folder"),
])
def test_bad_options_exit_1_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "repo"
    result = invoke("triton-repo", *args, "--out", out)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert result.output.count("error:") == 1
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_is_never_touched(tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "mine.txt").write_text("not ours")
    result = invoke("triton-repo", "--model", "tiny", "--out", out)
    assert result.exit_code == 1 and "--out" in result.output and "exists" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "not ours"
    result = invoke("triton-repo", "--model", "tiny", "--out", out / "mine.txt" / "repo")
    assert result.exit_code == 1
    assert (out / "mine.txt").read_text() == "not ours"


def test_exactly_one_source_is_a_usage_error(tmp_path):
    result = invoke("triton-repo", "--out", tmp_path / "repo")
    assert result.exit_code == 2 and "exactly one of --engines DIR or --model" in result.output
