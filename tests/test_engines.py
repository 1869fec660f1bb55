"""Engines: the manifest and its compatibility checks, the build CLI (``deleaker-trt build``) on the tiny model,
failure paths (no TensorRT, bad model, bad precision, disk full), and the TensorRT loaders against TensorRT-RTX's
real builder where it imports (CPU-only engine build of a plugin-free graph; nothing is executed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from deleaker.config import DeLeakerConfig
from deleaker.engines import build as build_lib
from deleaker.engines.cli import build as build_command
from deleaker.export.contract import FluxTransformerIO
from deleaker.engines.manifest import (
    EngineCompatibilityError,
    EngineManifest,
    Environment,
    ManifestError,
    atomic_write_bytes,
    plugin_info,
    sha256_file,
)
from deleaker.plugins import trt_plugin

#: The tiny model's contract at 64x64, T = 16, E_max = 4, batch 1..4 (what its fp16 build declares).
TINY_IO = FluxTransformerIO(
    in_channels=16,
    out_channels=16,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    num_blocks=4,
    height=64,
    width=64,
    vae_scale_factor=4,
    text_len=16,
    max_entities=4,
    batch_min=1,
    batch_opt=2,
    batch_max=4,
    dtype="float16",
)
TINY_ARGS = ["--model", "tiny", "--height", "64", "--width", "64", "--text-len", "16", "--max-entities", "4"]


def _engine_manifest(**changes) -> EngineManifest:
    base = EngineManifest(
        kind="engine",
        artifact="transformer.64x64.fp16.plan",
        artifact_sha256="0" * 64,
        model_id="tiny",
        model_sha256="1" * 64,
        precision="fp16",
        io=TINY_IO.to_dict(),
        deleaker_config=dataclasses.asdict(DeLeakerConfig.for_model(4)),
        onnx_sha256="2" * 64,
        plugin={"name": "DeLeakerAttention", "namespace": "deleaker", "version": "1", "sha256": "3" * 64},
        tensorrt_version="10.13.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
    )
    return dataclasses.replace(base, **changes)


MATCHING_ENV = Environment(
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    tensorrt_version="10.13.0",
    plugin_version="1",
    plugin_sha256="3" * 64,
    batch=4,
    height=64,
    width=64,
    text_len=16,
    max_entities=4,
)


# --- manifest -------------------------------------------------------------------------------------------------


def test_manifest_json_round_trip_and_write_read(tmp_path):
    manifest = _engine_manifest(quantization={"scales": {"a": {"input_scale": 0.5, "weight_scale": 0.25}}})
    again = EngineManifest.from_json(manifest.to_json())
    assert again == manifest and again.compute_capability == (9, 0)
    path = manifest.write(tmp_path)
    assert path.name == "transformer.64x64.fp16.plan.manifest.json"
    assert EngineManifest.read(tmp_path / manifest.artifact) == manifest == EngineManifest.read(path)
    assert (manifest.height, manifest.width, manifest.text_len, manifest.max_entities) == (64, 64, 16, 4)
    assert manifest.batch_range == (1, 2, 4)


def test_manifest_rejects_malformed_json():
    data = json.loads(_engine_manifest().to_json())
    with pytest.raises(ManifestError, match="format 0 is not 1"):
        EngineManifest.from_json(json.dumps({**data, "format": 0}))
    with pytest.raises(ManifestError, match=r"unknown \['extra'\]"):
        EngineManifest.from_json(json.dumps({**data, "extra": 1}))
    with pytest.raises(ManifestError, match=r"missing \['precision'\]"):
        EngineManifest.from_json(json.dumps({k: v for k, v in data.items() if k != "precision"}))
    with pytest.raises(ManifestError, match="precision must be one of"):
        EngineManifest.from_json(json.dumps({**data, "precision": "int8"}))
    with pytest.raises(ManifestError, match="not valid JSON"):
        EngineManifest.from_json("{")


@pytest.mark.parametrize(
    ("env_change", "reason", "message"),
    [
        (
            {"compute_capability": (8, 9)},
            "compute_capability",
            r"built for compute capability 9\.0 .* this GPU is 8\.9",
        ),
        ({"gpu_name": "NVIDIA H200"}, "gpu", "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200"),
        ({"tensorrt_version": "10.14.1"}, "tensorrt_version", "TensorRT 10.13.0, this is TensorRT 10.14.1"),
        ({"plugin_version": "2"}, "plugin_version", "plugin DeLeakerAttention v1, this runtime registers v2"),
        ({"plugin_sha256": "4" * 64}, "plugin_hash", "other plugin sources"),
        ({"batch": 5}, "shape", r"batch 5 is outside .* profile \[1, 4\]"),
        ({"height": 128}, "shape", "height 128 differs from .* 64"),
        ({"text_len": 32}, "shape", "text_len 32 differs"),
        ({"max_entities": 6}, "shape", "max_entities 6 differs"),
    ],
)
def test_check_compatible_names_the_reason(env_change, reason, message):
    manifest = _engine_manifest()
    manifest.check_compatible(MATCHING_ENV)  # the matching environment passes
    with pytest.raises(EngineCompatibilityError, match=message) as info:
        manifest.check_compatible(dataclasses.replace(MATCHING_ENV, **env_change))
    assert info.value.reason == reason


def test_check_compatible_skips_unknowns_and_refuses_onnx():
    _engine_manifest().check_compatible(Environment())  # nothing known: nothing to refuse
    with pytest.raises(EngineCompatibilityError, match="is an onnx artifact, not an engine") as info:
        _engine_manifest(kind="onnx", tensorrt_version=None).check_compatible(MATCHING_ENV)
    assert info.value.reason == "not_an_engine"


def test_check_artifact_refuses_a_changed_file(tmp_path):
    artifact = tmp_path / "transformer.64x64.fp16.plan"
    artifact.write_bytes(b"engine bytes")
    manifest = _engine_manifest(artifact_sha256=sha256_file(artifact))
    assert manifest.check_artifact(tmp_path) == artifact
    artifact.write_bytes(b"engine bytez")
    with pytest.raises(EngineCompatibilityError, match="does not match its manifest's hash") as info:
        manifest.check_artifact(tmp_path)
    assert info.value.reason == "artifact_hash"
    # External data files are checked too (an ONNX above 2 GB keeps its weights in <name>.data).
    data = tmp_path / "model.onnx.data"
    data.write_bytes(b"weights")
    with_data = _engine_manifest(artifact_sha256=sha256_file(artifact), data_files={data.name: sha256_file(data)})
    assert with_data.check_artifact(tmp_path) == artifact
    data.write_bytes(b"weightz")
    with pytest.raises(EngineCompatibilityError, match="model.onnx.data, needed by .* has changed"):
        with_data.check_artifact(tmp_path)


def test_plugin_info_hashes_the_plugin_sources():
    info = plugin_info()
    assert (info["name"], info["namespace"], info["version"]) == ("DeLeakerAttention", "deleaker", "1")
    assert len(info["sha256"]) == 64 and info == plugin_info()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_disk_full_is_a_typed_error_and_partial_files_are_removed(tmp_path):
    partial = tmp_path / "engine.plan.part"
    partial.write_bytes(b"half")
    with pytest.raises(build_lib.DiskFullError, match="no space left"):
        with build_lib.disk_guard(partial):
            with open("/dev/full", "wb") as full:  # the kernel answers every write with ENOSPC
                full.write(b"x" * 4096)
                full.flush()
    assert not partial.exists()


def test_atomic_write_leaves_no_temp_file_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"one")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails inside the write
    assert target.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# --- CLI on the tiny model ------------------------------------------------------------------------------------


def test_cli_rejects_bad_precision_and_bad_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(build_command, ["--model", "tiny", "--precision", "int8", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "Invalid value for '--precision'" in result.output
    assert "'fp16', 'bf16', 'fp8'" in result.output or "fp16, bf16, fp8" in result.output
    missing = tmp_path / "no-such-model"
    result = runner.invoke(
        build_command, ["--model", str(missing), "--precision", "fp16", "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 1
    assert f"error: --model: model '{missing}' is neither 'tiny' nor a directory" in result.output
    assert not (tmp_path / "b").exists()  # nothing written for a model that does not load


@pytest.fixture(scope="module")
def onnx_only_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    result = CliRunner().invoke(build_command, TINY_ARGS + ["--precision", "fp16", "--out", str(out), "--onnx-only"])
    return out, result


def test_cli_onnx_only_writes_onnx_and_manifest(onnx_only_build):
    out, result = onnx_only_build
    assert result.exit_code == 0, result.output
    onnx_path = out / "transformer.64x64.fp16.onnx"
    assert f"onnx: {onnx_path}" in result.output and "exporting ONNX (float16): done in" in result.output
    assert "timings: load" in result.output
    manifest = EngineManifest.read(onnx_path)
    assert (manifest.kind, manifest.precision, manifest.model_id) == ("onnx", "fp16", "tiny")
    assert manifest.artifact_sha256 == manifest.onnx_sha256 == sha256_file(onnx_path)
    assert (manifest.height, manifest.width, manifest.text_len, manifest.max_entities) == (64, 64, 16, 4)
    assert manifest.batch_range == (1, 1, 4) and manifest.io["dtype"] == "float16"
    assert {k: manifest.plugin[k] for k in ("name", "namespace", "version")} == {
        "name": "DeLeakerAttention",
        "namespace": "deleaker",
        "version": "1",
    }
    assert len(manifest.plugin["sha256"]) == 64 and manifest.tensorrt_version is None
    assert {"load", "export"} <= set(manifest.timings_s)
    model = onnx.load(str(onnx_path))
    nodes = [n for n in model.graph.node if n.op_type == "DeLeakerAttention"]
    assert len(nodes) == 4 and all(n.domain == "deleaker" for n in nodes)  # 2 double + 2 single blocks
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["hidden_states"].elem_type == onnx.TensorProto.FLOAT16
    assert inputs["entity_mask"].elem_type == onnx.TensorProto.INT32
    assert inputs["hidden_states"].shape.dim[0].dim_param  # the batch axis stays dynamic (the engine's profile)
    assert not list(out.glob("*.plan")) and [p.name for p in out.glob(".*")] == [build_lib.BUILD_LOCK_NAME]


def test_cli_full_build_without_usable_tensorrt_keeps_the_onnx_and_writes_no_engine(onnx_only_build):
    out, first = onnx_only_build
    assert first.exit_code == 0, first.output
    onnx_path = out / "transformer.64x64.fp16.onnx"
    before = sha256_file(onnx_path)
    result = CliRunner().invoke(build_command, TINY_ARGS + ["--precision", "fp16", "--out", str(out)])
    try:
        trt = trt_plugin.import_tensorrt()
    except trt_plugin.TensorRTUnavailableError:
        trt = None
    if trt is not None and trt.__name__ == "tensorrt":
        pytest.skip("a full TensorRT is installed here: this test is about machines without one")
    assert result.exit_code == 1
    assert "reusing" in result.output  # the ONNX of the first build is reused, not exported again
    if trt is None:
        assert "TensorRT's Python package is not importable" in result.output
        assert "Install TensorRT >= 10.8" in result.output and "The ONNX and its manifest are written" in result.output
    else:  # TensorRT-RTX only
        assert "its Python API cannot host the DeLeaker plugin" in result.output
    assert sha256_file(onnx_path) == before and EngineManifest.read(onnx_path).kind == "onnx"
    assert not list(out.glob("*.plan")) and not list(out.glob("*.plan.manifest.json"))
    assert [p.name for p in out.glob(".*")] == [build_lib.BUILD_LOCK_NAME]  # the build's lock, no staging left


# --- TensorRT loaders against TensorRT(-RTX)'s real builder ----------------------------------------------------


@pytest.fixture(scope="module")
def trt():
    try:
        return trt_plugin.import_tensorrt()
    except trt_plugin.TensorRTUnavailableError as err:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx imports ({type(err).__name__})")


def _matmul_onnx(path: Path) -> Path:
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["batch", 3, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["batch", 3, 4])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_loaders_build_a_strongly_typed_engine_with_profile_and_timing_cache(trt, tmp_path):
    net = build_lib.network_from_onnx(_matmul_onnx(tmp_path / "mm.onnx"), trt, plugins=False)
    assert net.network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert tuple(net.network.get_input(0).shape) == (-1, 3, 8)
    cache = tmp_path / build_lib.TIMING_CACHE_NAME
    data = build_lib.build_serialized_engine(net, {"x": ((1, 3, 8), (2, 3, 8), (4, 3, 8))}, timing_cache=cache)
    assert len(data) > 1000 and cache.stat().st_size > 0
    engine = build_lib.save_engine(data, tmp_path / "mm.plan")
    assert engine.read_bytes() == data and not list(tmp_path.glob(".*"))


def test_tensorrt_parses_the_exported_graph_up_to_our_plugin(trt, onnx_only_build):
    """TensorRT's ONNX parser reads the exported tiny transformer and creates our plugin for the first
    DeLeakerAttention node with that block's fields (the child process leaves right after; see test_trt_plugin)."""
    from test_trt_plugin import PARSER_SCRIPT  # tests/ is on sys.path (pytest's default import mode)

    out, result = onnx_only_build
    assert result.exit_code == 0, result.output
    path = out / "transformer.64x64.fp16.onnx"
    run = subprocess.run([sys.executable, "-c", PARSER_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no plugin was created (rc {run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}"
    decoded = json.loads(lines[0])["decoded"]
    expected = trt_plugin.PluginFields(0, 4, 8, 8, DeLeakerConfig.for_model(4)).as_attributes()
    assert decoded == pytest.approx(expected)  # block 0 of 4, the 8x8 token grid of 64x64 pixels


def test_loader_parse_failure_is_a_build_error(trt, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")],
        "bad",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [2])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("nowhere", 1)]),
        str(path),
    )
    with pytest.raises(build_lib.BuildError, match="could not parse .* NoSuchOp"):
        build_lib.network_from_onnx(path, trt, plugins=False)


def test_fp8_needs_compute_capability_8_9():
    from deleaker.engines.fp8 import check_fp8_capable
    from deleaker.errors import ConfigError

    check_fp8_capable((8, 9))
    check_fp8_capable((9, 0))
    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9 .* this GPU is 8\.6: build fp16 or bf16"):
        check_fp8_capable((8, 6))
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        check_fp8_capable(None)
