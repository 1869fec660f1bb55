"""Engines: the manifest and its compatibility checks (the plugin library's record included), the build CLI
(``deleaker-trt build``) on the tiny model, failure paths (no TensorRT, bad model, bad precision, bad or missing
plugin library, a folder whose library belongs to other engines, disk full), and the TensorRT loaders against
TensorRT-RTX's real builder where it imports (CPU-only engine build of a plugin-free graph; nothing is executed).
Engine builds with the plugin library, and ``run --engines`` on them, are in test_trt_plugin_library.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from deleaker.config import DeLeakerConfig
from deleaker.engines import build as build_lib
from deleaker.errors import ConfigError
from deleaker.runtime.cli.build_command import build as build_command
from deleaker.export.contract import FluxTransformerIO
from deleaker.engines.manifest import (
    EngineCompatibilityError,
    EngineManifest,
    Environment,
    ManifestError,
    plugin_node,
    sha256_file,
)
from deleaker.plugins import trt_library
from deleaker.plugins.trt_plugin_build import LIBRARY_NAME
from deleaker.staging import staging_name, write_atomically

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
#: What a library built against TensorRT 10.13's headers with cuDNN's attention says of itself.
BUILD_INFO = (
    "deleaker_trt_plugin 0.1.0; plugin deleaker::DeLeakerAttention v1; tensorrt_headers 10.13.0; attention cuDNN SDPA "
    "through cudnn-frontend 1.32.0 (cuDNN headers 9.28, libcudnn.so.9 loaded at run time); kernel_abi 2"
)
PLUGIN_RECORD = {
    **plugin_node(),
    "library": LIBRARY_NAME,
    "sha256": "3" * 64,
    "build_info": BUILD_INFO,
    "tensorrt_headers": "10.13.0",
}


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
        plugin=PLUGIN_RECORD,
        tensorrt_version="tensorrt==10.13.0.35",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
    )
    return dataclasses.replace(base, **changes)


MATCHING_ENV = Environment(
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    tensorrt_version="tensorrt==10.13.0.35",
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
    # A bf16 label on a float16 graph (edited by hand) used to load, and `--precision bf16` then picked it.
    with pytest.raises(ManifestError, match="precision bf16 needs io.dtype bfloat16, got float16"):
        EngineManifest.from_json(json.dumps({**data, "precision": "bf16"}))
    with pytest.raises(ManifestError, match="not valid JSON"):
        EngineManifest.from_json("{")
    # json.loads refuses an int of more than 4300 digits with a ValueError, not a JSONDecodeError.
    with pytest.raises(ManifestError, match="not valid JSON"):
        EngineManifest.from_json(json.dumps(data)[:-1] + ', "x": 1' + "0" * 5000 + "}")
    # A key given twice (the last one won silently) is refused, at any depth.
    with pytest.raises(ManifestError, match="duplicate key 'precision'"):
        EngineManifest.from_json(json.dumps(data)[:-1] + ', "precision": "fp16"}')
    with pytest.raises(ManifestError, match="duplicate key 'batch_min'"):
        EngineManifest.from_json(json.dumps(data).replace('"batch_min":', '"batch_min": 1, "batch_min":', 1))


@pytest.mark.parametrize(
    ("env_change", "reason", "message"),
    [
        (
            {"compute_capability": (8, 9)},
            "compute_capability",
            r"built for compute capability 9\.0 .* this GPU is 8\.9",
        ),
        ({"gpu_name": "NVIDIA H200"}, "gpu", "built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200"),
        (
            {"tensorrt_version": "tensorrt==10.14.1.48"},
            "tensorrt_version",
            "built with tensorrt==10.13.0.35, this machine has tensorrt==10.14.1.48",
        ),
        (
            {"tensorrt_version": "tensorrt_rtx==1.7.1.116"},
            "tensorrt_version",
            "built with tensorrt==10.13.0.35, this machine has tensorrt_rtx==1.7.1.116",
        ),
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
    onnx_manifest = _engine_manifest(kind="onnx", tensorrt_version=None, plugin=plugin_node())
    with pytest.raises(EngineCompatibilityError, match="is an onnx artifact, not an engine") as info:
        onnx_manifest.check_compatible(MATCHING_ENV)
    assert info.value.reason == "not_an_engine"


def test_tensorrt_rtx_engines_are_not_bound_to_a_gpu():
    """TensorRT-RTX builds portable engines (no GPU recorded): any GPU passes, the release must still match."""
    rtx = _engine_manifest(tensorrt_version="tensorrt_rtx==1.7.1.116", gpu_name=None, compute_capability=None)
    rtx.check_compatible(Environment(gpu_name="NVIDIA GeForce RTX 4090", compute_capability=(8, 9),
                                     tensorrt_version="tensorrt_rtx==1.7.1.116"))
    with pytest.raises(EngineCompatibilityError, match="this machine has tensorrt_rtx==1.8.0.0") as info:
        rtx.check_compatible(Environment(tensorrt_version="tensorrt_rtx==1.8.0.0"))
    assert info.value.reason == "tensorrt_version"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"plugin": plugin_node()}, r"plugin record of an engine: missing \['build_info', 'library', 'sha256'"),
        ({"plugin": {**PLUGIN_RECORD, "source_sha256": "0" * 64}}, r"unknown \['source_sha256'\]"),
        ({"plugin": {**PLUGIN_RECORD, "name": "Attention"}}, "plugin name must be 'DeLeakerAttention'"),
        ({"plugin": {**PLUGIN_RECORD, "library": "/lib/x.so"}}, "plugin.library must name a file relative"),
        ({"plugin": {**PLUGIN_RECORD, "sha256": "x"}}, "plugin.sha256 must be a hex SHA-256"),
        ({"plugin": {**PLUGIN_RECORD, "build_info": "libz 1.3"}}, "not the build info of a DeLeaker plugin library"),
        ({"plugin": {**PLUGIN_RECORD, "tensorrt_headers": "stand-in"}}, "disagrees with its build_info"),
        ({"tensorrt_version": "10.13.0"}, "tensorrt_version of an engine: expected '<package>==<version>'"),
        ({"tensorrt_version": None}, "tensorrt_version of an engine"),
        ({"kind": "onnx", "tensorrt_version": None}, r"plugin record of an onnx: missing \[\], unknown \['build_info'"),
    ],
)
def test_manifest_refuses_a_bad_plugin_record(changes, message):
    """An engine's manifest names its plugin library (file, sha256, build info, TensorRT headers), consistent with
    what the library says of itself; an ONNX manifest names only the node's plugin."""
    with pytest.raises(ManifestError, match=message):
        _engine_manifest(**changes)


def test_check_artifact_refuses_a_changed_file(tmp_path):
    artifact = tmp_path / "transformer.64x64.fp16.plan"
    artifact.write_bytes(b"engine bytes")
    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"library bytes")
    record = {**PLUGIN_RECORD, "sha256": sha256_file(library)}
    manifest = _engine_manifest(artifact_sha256=sha256_file(artifact), plugin=record)
    assert manifest.check_artifact(tmp_path) == artifact
    artifact.write_bytes(b"engine bytez")
    with pytest.raises(EngineCompatibilityError, match="does not match its manifest's hash") as info:
        manifest.check_artifact(tmp_path)
    assert info.value.reason == "artifact_hash"
    # External data files are checked too (an ONNX above 2 GB keeps its weights in <name>.data).
    data = tmp_path / "model.onnx.data"
    data.write_bytes(b"weights")
    with_data = _engine_manifest(
        artifact_sha256=sha256_file(artifact), plugin=record, data_files={data.name: sha256_file(data)}
    )
    assert with_data.check_artifact(tmp_path) == artifact
    data.write_bytes(b"weightz")
    with pytest.raises(EngineCompatibilityError, match="model.onnx.data, needed by .* has changed"):
        with_data.check_artifact(tmp_path)


def test_check_artifact_refuses_a_missing_or_changed_plugin_library(tmp_path):
    artifact = tmp_path / "transformer.64x64.fp16.plan"
    artifact.write_bytes(b"engine bytes")
    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"library bytes")
    manifest = _engine_manifest(artifact_sha256=sha256_file(artifact),
                                plugin={**PLUGIN_RECORD, "sha256": sha256_file(library)})
    assert set(manifest.named_files) == {artifact.name, LIBRARY_NAME}
    manifest.check_artifact(tmp_path)
    library.write_bytes(b"library bytez")
    with pytest.raises(EngineCompatibilityError, match=f"{LIBRARY_NAME} is not the plugin library .* was built with"):
        manifest.check_artifact(tmp_path)
    library.unlink()
    with pytest.raises(EngineCompatibilityError, match=r"\(plugin library of the manifest\) does not exist") as info:
        manifest.check_artifact(tmp_path)
    assert info.value.reason == "plugin_library"
    library.symlink_to(tmp_path.parent)  # a library that resolves outside the folder is refused before any read
    with pytest.raises(ManifestError, match="plugin library .* resolves to .* outside"):
        manifest.check_artifact(tmp_path)


def test_plugin_node_is_the_exporters_node():
    from deleaker.export import onnx_node

    attrs = onnx_node.node_attributes(block_offset=0, num_blocks=4, grid=(8, 8), config=DeLeakerConfig())
    assert plugin_node() == {
        "name": onnx_node.OP_TYPE, "namespace": attrs["plugin_namespace"], "version": attrs["plugin_version"]
    } == {"name": "DeLeakerAttention", "namespace": "deleaker", "version": "1"}


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
    write_atomically({target: b"one"})
    with pytest.raises(TypeError):
        write_atomically({target: "not bytes"})  # fails inside the write
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
        build_command, ["--model", str(missing), "--precision", "fp16", "--out", str(tmp_path / "b"), "--onnx-only"]
    )
    assert result.exit_code == 1
    assert f"error: model '{missing}' is neither 'tiny' nor a directory" in result.output
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
    assert manifest.plugin == {"name": "DeLeakerAttention", "namespace": "deleaker", "version": "1"}
    assert manifest.tensorrt_version is None and not (out / LIBRARY_NAME).exists()  # no plugin library needed
    assert {"load", "export"} <= set(manifest.timings_s)
    model = onnx.load(str(onnx_path))
    nodes = [n for n in model.graph.node if n.op_type == "DeLeakerAttention"]
    assert len(nodes) == 4 and all(n.domain == "deleaker" for n in nodes)  # 2 double + 2 single blocks
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["hidden_states"].elem_type == onnx.TensorProto.FLOAT16
    assert inputs["entity_mask"].elem_type == onnx.TensorProto.INT32
    assert inputs["hidden_states"].shape.dim[0].dim_param  # the batch axis stays dynamic (the engine's profile)
    assert not list(out.glob("*.plan")) and [p.name for p in out.glob(".*")] == [build_lib.BUILD_LOCK_NAME]


def _interrupted_hash(path):
    raise KeyboardInterrupt


def _refused_io(self):
    raise ManifestError("manifest io.height is 2056; at most 2048 is allowed")


@pytest.mark.parametrize(
    "target,name,failure",
    [(build_lib, "sha256_file", _interrupted_hash), (EngineManifest, "_check_io", _refused_io)],
    ids=["interrupted-while-hashing", "manifest-refused"],
)
def test_a_build_that_fails_after_its_export_leaves_no_onnx(tmp_path, monkeypatch, target, name, failure):
    """Between the export and its manifest's write, an interrupt or a refused manifest removes the ONNX: an ONNX
    without its manifest is an artifact nothing may use."""
    monkeypatch.setattr(target, name, failure)
    request = build_lib.BuildRequest(
        model="tiny", precision="fp16", out_dir=tmp_path, height=64, width=64, text_len=16, onnx_only=True
    )
    with pytest.raises((KeyboardInterrupt, ManifestError)):
        build_lib.build_engines(request)
    assert [p.name for p in tmp_path.iterdir()] == [build_lib.BUILD_LOCK_NAME]


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        ([], 1, "error: building an engine needs the DeLeaker plugin library (--plugin PATH"),
        (["--onnx-only", "--plugin", "{lib}"], 1, "error: the plugin library is for engine builds; an ONNX-only"),
        (["--plugin", "{lib}"], 1, "is not a DeLeaker TensorRT plugin library: "),
        # A missing library is a bad path like any other: one error line, exit 1 (click's exists=True gave exit 2).
        (["--plugin", "{missing}"], 1, "error: plugin library {missing} does not exist"),
    ],
)
def test_cli_refuses_a_missing_or_bad_plugin_library_before_any_work(tmp_path, options, code, message):
    not_a_library = tmp_path / LIBRARY_NAME
    not_a_library.write_bytes(b"\x7fELF but not really")
    options = [o.format(lib=not_a_library, missing=tmp_path / "nope.so") for o in options]
    message = message.format(missing=tmp_path / "nope.so")
    out = tmp_path / "out"
    result = CliRunner().invoke(build_command, TINY_ARGS + ["--out", str(out), *options])
    assert result.exit_code == code and message in result.output, result.output
    assert "loading model" not in result.output and not out.exists()


def _library_record(path: Path, text: bytes) -> trt_library.PluginLibrary:
    """A `PluginLibrary` of a file holding ``text`` (what the build checks is the file's bytes and name)."""
    path.write_bytes(text)
    return trt_library.PluginLibrary(path=path, sha256=sha256_file(path), build_info=BUILD_INFO)


def test_the_plugin_library_is_installed_atomically_and_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = _library_record(tmp_path / "built.so", b"library one")
    installed = build_lib.install_plugin_library(source, out)
    assert installed.path == out / LIBRARY_NAME and installed.sha256 == source.sha256
    assert installed.path.read_bytes() == b"library one" and installed.record()["library"] == LIBRARY_NAME
    inode = installed.path.stat().st_ino
    assert build_lib.install_plugin_library(source, out).path.stat().st_ino == inode  # same bytes: not rewritten
    other = build_lib.install_plugin_library(_library_record(tmp_path / "other.so", b"library two"), out)
    assert other.path.read_bytes() == b"library two" and other.path.stat().st_ino != inode  # a new file, renamed in
    assert sorted(p.name for p in out.iterdir()) == [LIBRARY_NAME]
    stale = out / staging_name(LIBRARY_NAME)
    stale.write_bytes(b"half a library")  # what a killed copy leaves
    # Names that merely start like our staging names are a user's: the cleanup once removed them too.
    for name in (f".{LIBRARY_NAME}.x1y2.tmp", ".transformer.notes", f".{build_lib.TIMING_CACHE_NAME}.bak",
                 f".{LIBRARY_NAME}.deleaker-tmp-1-xyz", staging_name("notes.txt")):
        (out / name).write_bytes(b"the user's")
    assert build_lib.remove_stale_staging(out) == [stale]
    assert sorted(p.name for p in out.iterdir() if p.read_bytes() == b"the user's") == sorted(
        p.name for p in out.iterdir() if p.name != LIBRARY_NAME)


def test_a_folder_keeps_the_plugin_library_its_engines_were_built_with(tmp_path):
    first = _library_record(tmp_path / "first.so", b"library one")
    second = _library_record(tmp_path / "second.so", b"library two")
    build_lib.check_plugin_slot(tmp_path, second, "transformer.64x64.fp16.plan")  # no library yet: anything goes
    installed = build_lib.install_plugin_library(first, tmp_path)
    _engine_manifest(plugin=installed.record()).write(tmp_path)  # transformer.64x64.fp16.plan, built with `first`
    build_lib.check_plugin_slot(tmp_path, first, "transformer.128x128.fp16.plan")  # the same library: fine
    build_lib.check_plugin_slot(tmp_path, second, "transformer.64x64.fp16.plan")  # rebuilding that very engine: fine
    with pytest.raises(build_lib.BuildError, match=r"holds engines built with another plugin library "
                                                   r"\(transformer\.64x64\.fp16\.plan\)"):
        build_lib.check_plugin_slot(tmp_path, second, "transformer.128x128.fp16.plan")


# --- TensorRT loaders against TensorRT(-RTX)'s real builder ----------------------------------------------------


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
    net = build_lib.network_from_onnx(_matmul_onnx(tmp_path / "mm.onnx"), trt)
    assert net.network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert tuple(net.network.get_input(0).shape) == (-1, 3, 8)
    cache = tmp_path / build_lib.TIMING_CACHE_NAME
    data = build_lib.build_serialized_engine(net, {"x": ((1, 3, 8), (2, 3, 8), (4, 3, 8))}, timing_cache=cache)
    assert len(data) > 1000 and cache.stat().st_size > 0
    engine = build_lib.save_engine(data, tmp_path / "mm.plan")
    assert engine.read_bytes() == data and not list(tmp_path.glob(".*"))


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
        build_lib.network_from_onnx(path, trt)


def test_fp8_needs_compute_capability_8_9():
    from deleaker.engines.fp8 import check_fp8_capable

    check_fp8_capable((8, 9))
    check_fp8_capable((9, 0))
    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9 .* this GPU is 8\.6: build fp16 or bf16"):
        check_fp8_capable((8, 6))
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        check_fp8_capable(None)


@pytest.mark.parametrize("batch", [5, None, (1, 2), (0, 1, 1), (2, 1, 4), (1, 1, 65), (1, 1.0, 2), (True, 1, 1)])
def test_build_request_refuses_a_bad_batch_profile(tmp_path, batch):
    with pytest.raises(ConfigError, match="batch must be MIN OPT MAX ints"):
        build_lib.BuildRequest(model="tiny", precision="fp16", out_dir=tmp_path, onnx_only=True, batch=batch)


@pytest.mark.parametrize("flag, value, what", [("--text-len", "32", "text_len"), ("--max-entities", "5", "max_entities")])
def test_build_refuses_to_mix_a_folder_that_run_could_not_serve(onnx_only_build, tmp_path, flag, value, what):
    built, result = onnx_only_build
    assert result.exit_code == 0, result.output
    out = tmp_path / "engines"
    shutil.copytree(built, out)
    before = sorted(p.name for p in out.iterdir())
    args = [*TINY_ARGS, "--precision", "bf16", "--out", str(out), "--onnx-only"]
    args[args.index(flag) + 1] = value
    refused = CliRunner().invoke(build_command, args)
    assert refused.exit_code == 1, refused.output
    assert f"holds transformer.64x64.fp16.onnx, built with another {what}" in refused.output
    assert sorted(p.name for p in out.iterdir()) == before
    # Other knobs, through the library: the same refusal.
    request = build_lib.BuildRequest(model="tiny", precision="bf16", out_dir=out, height=64, width=64, text_len=16,
                                     max_entities=4, onnx_only=True, deleaker_config={"k_strength": 1.5})
    with pytest.raises(ConfigError, match="built with another deleaker_config"):
        build_lib.build_engines(request)
    assert sorted(p.name for p in out.iterdir()) == before
