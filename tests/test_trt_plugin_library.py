"""The C++ TensorRT plugin library (``plugins/trt``, ``deleaker-trt plugin``).

What runs here (no TensorRT headers, no GPU): the build, which names every missing piece; the library built against
the test stand-in TensorRT headers (``tests/tensorrt_stand_in``); and TensorRT-RTX 1.7 (real TensorRT-family
libraries, CPU-only) loading it: the creator's name, version, namespace and fields, TensorRT-RTX's ONNX parser
creating our plugin from the exporter's node, the builder building engines with it (fp16 and bf16, static and
dynamic batch) and the fields serialized into the plan. That proves the interface layout (every virtual call
TensorRT-RTX makes lands in the right method), the field handling and the build-time methods. It cannot prove
execution (TensorRT-RTX refuses to run engines without a GPU), anything about sm_90, or TensorRT 10/11 proper.

Then the integration: `load_plugin_library` (the one place build and run load a library into TensorRT),
``deleaker-trt build --plugin`` building the tiny transformer with TensorRT-RTX and recording the library in the
manifest, and ``run --engines`` refusing a changed, missing or cannot-run library or another TensorRT release
before any work, while ONNX Runtime runs the same folder without the library.

Each TensorRT-RTX interaction runs in a child process (``trt_rtx_driver.py``): a crash fails one test with the
child's output. The library needs the kernel library's C ABI version 2 (the fast path of issue 11); before that
lands, the tests that build it skip.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import fields
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from deleaker.config import DeLeakerConfig
from deleaker.export import onnx_node
from deleaker.export.exporter import export_attention_onnx
from deleaker.plugins import kernels_build as kernel_build
from deleaker.plugins import kernels, trt_plugin_build as trt_build

HERE = Path(__file__).resolve().parent
ODD_CONFIG = DeLeakerConfig(
    std_mul_text=0.75,
    std_mul_image_image=1.5,
    k_strength=1.3,
    start_aggregating_from=3,
    stop_aggregating_at=40,
    start_intervention_from=5,
    stop_intervention_at=77,
    use_history=False,
    do_smoothing=True,
    do_image_image=False,
    do_image_text_strengthening=True,
    do_image_text_weakening=False,
)
PLACEMENT = dict(block_offset=3, num_blocks=4, grid=(8, 6))


# --- the build names what is missing --------------------------------------------------------------------------


def test_build_without_cmake_names_it_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(trt_build.PluginToolMissingError, match="cmake") as caught:
        trt_build.build_plugin(trt_build.PluginBuildConfig(out_dir=tmp_path / "out"))
    assert caught.value.missing and not (tmp_path / "out" / trt_build.LIBRARY_NAME).exists()


def _system_has_tensorrt_headers() -> bool:
    roots = ["/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/local/TensorRT/include",
             "/opt/tensorrt/include", "/usr/local/tensorrt/include", os.environ.get("TensorRT_ROOT", "") + "/include"]
    return any(Path(root, "NvInferRuntime.h").is_file() for root in roots)


def test_build_names_every_missing_header(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if _system_has_tensorrt_headers():
        pytest.skip("this machine has TensorRT headers")
    with pytest.raises(trt_build.PluginToolMissingError) as caught:
        trt_build.build_plugin(trt_build.PluginBuildConfig(out_dir=tmp_path, tensorrt_root=tmp_path))
    missing = "\n".join(caught.value.missing)
    # The root given is named (CMake's own line would point at $TensorRT_ROOT, or fall back to the system's headers).
    assert f"the TensorRT root {tmp_path} has no include/NvInferRuntime.h" in missing and "TensorRT_ROOT" not in missing
    assert not (tmp_path / trt_build.LIBRARY_NAME).exists()


def test_cuda_architectures_match_the_kernel_build():
    assert trt_build.cuda_architectures(("80", "90", "90a")) == "80-real;90-real;90a-real;90-virtual"
    flags = kernel_build.gencode_flags(kernel_build.ARCHS)
    cmake = trt_build.cuda_architectures(kernel_build.ARCHS).split(";")
    assert [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (c[:-5] for c in cmake[:-1])] == flags[:-1]
    assert flags[-1].endswith(f"code=compute_{cmake[-1][:-8]}")


def test_cli_plugin_reports_missing_pieces_and_exits_1(tmp_path):
    from click.testing import CliRunner

    from deleaker.runtime.cli import main

    result = CliRunner().invoke(main, ["plugin", "--out", str(tmp_path / "out")], env={"PATH": str(tmp_path)})
    assert result.exit_code == 1, result.output
    assert "error: cannot build the TensorRT plugin library; missing:" in result.output
    assert "cmake" in result.output and not (tmp_path / "out" / trt_build.LIBRARY_NAME).exists()


@pytest.mark.parametrize("root", ["no-such-root", "a-file"])
def test_cli_plugin_refuses_a_tensorrt_root_that_is_no_folder_with_exit_1(tmp_path, root):
    """A missing --tensorrt-root was click's usage error (exit 2, 'Usage: ...'); now it is named with the other
    missing pieces (here cmake: PATH is empty), one error and exit 1, as every bad path."""
    from click.testing import CliRunner

    from deleaker.runtime.cli import main

    (tmp_path / "a-file").write_text("")
    args = ["plugin", "--out", str(tmp_path / "out"), "--tensorrt-root", str(tmp_path / root)]
    result = CliRunner().invoke(main, args, env={"PATH": str(tmp_path / "empty-bin")})
    assert result.exit_code == 1, result.output
    state = "does not exist" if root == "no-such-root" else "is not a folder"
    assert result.output.startswith("error: cannot build the TensorRT plugin library; missing:")
    assert f"the TensorRT root {tmp_path / root} {state}" in result.output and "cmake" in result.output
    assert not (tmp_path / "out").exists()


def test_product_build_against_real_tensorrt_headers_where_present(tmp_path):
    """Where TensorRT's headers are installed ($TensorRT_ROOT or a system location) together with cuDNN's, cudnn-frontend's
    and NVRTC's, the product build compiles and TensorRT-RTX loads its creator (skipped on machines without them,
    such as CI)."""
    if kernels.ABI_VERSION < 2:
        pytest.skip("the plugin needs the kernel library's C ABI version 2 (issue 11's fast path), not merged yet")
    if not _system_has_tensorrt_headers():
        pytest.skip("no TensorRT headers on this machine (set TensorRT_ROOT)")
    try:
        library = trt_build.build_plugin(trt_build.PluginBuildConfig(out_dir=tmp_path / "out"))
    except trt_build.PluginToolMissingError as missing:
        pytest.skip(f"the product build needs what this machine lacks: {missing}")
    info = trt_build.library_build_info(library)
    assert "stand-in" not in info and "cuDNN SDPA" in info, info
    got, _ = run_rtx(library, "creator", {}, tmp_path)
    assert (got["name"], got["version"], got["namespace"]) == ("DeLeakerAttention", "1", "deleaker")


# --- the stand-in build ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stand_in_library() -> Path:
    """``deleaker-trt plugin --stand-in-headers``' library, built once into the kernel cache folder."""
    if kernels.ABI_VERSION < 2:
        pytest.skip("the plugin needs the kernel library's C ABI version 2 (issue 11's fast path), not merged yet")
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    try:
        kernel_build.find_nvcc()
    except kernel_build.NvccNotFoundError:
        missing.append("nvcc")
    if missing:
        pytest.skip(f"cannot build the plugin library here: no {', '.join(missing)}")
    out_dir = kernel_build.cache_root() / "trt_plugin_stand_in"
    return trt_build.build_plugin(trt_build.PluginBuildConfig(out_dir=out_dir, stand_in_headers=True))


def test_library_reports_how_it_was_built_and_exports_only_the_entry_points(stand_in_library):
    info = trt_build.library_build_info(stand_in_library)
    assert "tensorrt_headers stand-in" in info
    assert "attention none (built without cuDNN" in info or "attention cuDNN SDPA" in info, info
    assert f"kernel_abi {kernels.ABI_VERSION}" in info and "deleaker::DeLeakerAttention v1" in info
    library = ctypes.CDLL(str(stand_in_library))
    for symbol in ("getCreators", "setLoggerFinder", "deleaker_trt_plugin_build_info"):
        assert hasattr(library, symbol), symbol
    for symbol in ("deleaker_attention_launch", "deleaker_init", "deleaker_abi_version"):
        assert not hasattr(library, symbol), f"{symbol} must stay inside the library"


def _rtx_env(tmp_path: Path) -> dict:
    """TensorRT-RTX's ONNX parser opens ``libtensorrt_rtx.so`` by its unversioned name when it adds a plugin
    layer; the wheel ships only ``libtensorrt_rtx.so.1`` (an SDK install has both), so a link is put on the
    library path of the child."""
    trt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    libs = Path(trt_rtx.__file__).resolve().parent.parent / "tensorrt_rtx_libs"
    link_dir = tmp_path / "rtx-libs"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "libtensorrt_rtx.so"
    if not link.exists():
        link.symlink_to(libs / "libtensorrt_rtx.so.1")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(link_dir), env.get("LD_LIBRARY_PATH")]))
    return env


def run_rtx(library: Path, command: str, args: dict, tmp_path: Path) -> tuple[dict, list]:
    """``(result, log lines)`` of one driver command in a child process; fails with its output if it died."""
    child = subprocess.run(
        [sys.executable, str(HERE / "trt_rtx_driver.py"), str(library), command, json.dumps(args)],
        capture_output=True, text=True, timeout=300, env=_rtx_env(tmp_path),
    )
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    results = [line["result"] for line in lines if "result" in line]
    assert child.returncode == 0 and results, (
        f"TensorRT-RTX child failed (rc {child.returncode}):\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}"
    )
    return results[-1], [line["log"] for line in lines if "log" in line]


def test_tensorrt_rtx_registers_the_creator_with_the_node_fields(stand_in_library, tmp_path):
    got, log = run_rtx(stand_in_library, "creator", {}, tmp_path)
    assert (got["name"], got["version"], got["namespace"]) == ("DeLeakerAttention", "1", "deleaker")
    assert got["interface"] == ["PLUGIN CREATOR_V3ONE", 1, 0]
    attrs = onnx_node.node_attributes(block_offset=0, num_blocks=4, grid=(8, 8), config=DeLeakerConfig())
    # Exactly the node's attributes less the lookup ones, in the order the plugin serializes them: the block's
    # place and the grid, then DeLeakerConfig's fields in their order.
    names = [name for name, _ in got["fields"]]
    assert set(names) == set(attrs) - {"plugin_namespace", "plugin_version"}
    assert names == ["block_offset", "num_blocks", "grid_h", "grid_w"] + [f.name for f in fields(DeLeakerConfig)]
    for name, kind in got["fields"]:
        assert kind == ("FLOAT32" if name in onnx_node.FLOAT_ATTRIBUTES else "INT32"), name
    assert any("stand-in TensorRT headers" in text for _, text in log), log


def _node_fields(**overrides) -> dict:
    """The node's attributes as plugin fields, with ``overrides`` (a None override leaves that field out)."""
    attrs = onnx_node.node_attributes(config=ODD_CONFIG, **PLACEMENT)
    fields = {
        name: ["FLOAT32" if name in onnx_node.FLOAT_ATTRIBUTES else "INT32", value]
        for name, value in attrs.items()
        if name not in ("plugin_namespace", "plugin_version")
    }
    fields.update(overrides)
    return {name: field for name, field in fields.items() if field is not None}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"do_smoothing": ["INT32", 2]}, "do_smoothing is a flag and must be 0 or 1, got 2"),
        ({"block_offset": ["INT32", 4]}, "block_offset must be in [0, num_blocks=4), got 4"),
        ({"stop_intervention_at": ["INT32", 1]}, "stop_intervention_at (1) must be >= start_intervention_from (5)"),
        ({"grid_x": ["INT32", 6]}, "unknown ['grid_x']"),
        ({"grid_w": None}, "missing ['grid_w']"),
        ({"grid_h": ["FLOAT32", 7.5]}, "grid_h must be an integer"),
        ({"num_blocks": ["INT32", [4, 4]]}, "plugin field num_blocks must hold one value, got 2"),
        ({"plugin_namespace": ["CHAR", "other"]}, "plugin_namespace must be 'deleaker', got 'other'"),
        # The float knobs' ranges as DeLeakerConfig's, on the float32 the plugin stores: a FLOAT64 1e300 is finite
        # but would be inf, which the plugin could serialize and then not read back.
        ({"k_strength": ["FLOAT64", 1e300]}, "k_strength must be a finite number in (0, 10] (as float32), got inf"),
        ({"k_strength": ["FLOAT32", 0.0]}, "k_strength must be a finite number in (0, 10] (as float32), got 0"),
        ({"k_strength": ["FLOAT32", 10.5]}, "k_strength must be a finite number in (0, 10]"),
        ({"k_strength": ["FLOAT64", 1e-320]}, "k_strength must be a finite number in (0, 10] (as float32), got 0"),
        ({"std_mul_text": ["FLOAT32", -10.5]}, "std_mul_text must be a finite number in [-10, 10]"),
        ({"std_mul_image_image": ["FLOAT32", 1e30]}, "std_mul_image_image must be a finite number in [-10, 10]"),
        ({"num_blocks": ["INT64", 2**63 - 1]}, "num_blocks must be in [0, 2^31), got 9.22337204e+18"),
        ({"grid_h": ["INT64", 7]}, None),  # an INT64 field in range is read as any int
        ({"k_strength": ["FLOAT64", 10.0]}, None),  # the range's end is allowed
    ],
)
def test_creator_refuses_bad_fields_with_a_message(stand_in_library, tmp_path, fields, message):
    good, _ = run_rtx(stand_in_library, "create", {"fields": _node_fields()}, tmp_path)
    assert good == {"created": True}
    got, log = run_rtx(stand_in_library, "create", {"fields": _node_fields(**fields)}, tmp_path)
    if message is None:
        assert got == {"created": True}, log
        return
    assert got == {"created": False}
    assert any(message in text for severity, text in log if severity == "ERROR"), log


def test_creator_refuses_a_field_given_twice(stand_in_library, tmp_path):
    """Two values for one field: neither silently wins."""
    args = {"fields": _node_fields(), "extra": [["grid_h", "INT32", 99]]}
    got, log = run_rtx(stand_in_library, "create", args, tmp_path)
    assert got == {"created": False}
    assert any("plugin field grid_h is given twice" in text for severity, text in log if severity == "ERROR"), log


def read_plan_fields(plan: bytes, start: int = 0) -> dict:
    """The DeLeakerAttention fields serialized in a TensorRT-RTX plan (the first plugin layer's from ``start`` on),
    decoded from the plan's bytes: each field as TensorRT-RTX 1.7 writes it (observed, not documented): uint32 name
    length with its NUL, the name, uint32 PluginFieldType, uint32 length, the data. Only INT32 and FLOAT32 fields
    are read."""
    fields = {}
    for name in (n for n in onnx_node.INT_ATTRIBUTES + onnx_node.FLOAT_ATTRIBUTES):
        key = struct.pack("<I", len(name) + 1) + name.encode() + b"\0"
        at = plan.find(key, start)
        assert at >= 0, f"field {name} is not in the plan"
        kind, length = struct.unpack_from("<II", plan, at + len(key))
        assert length == 1, (name, length)
        data_at = at + len(key) + 8
        fields[name] = struct.unpack_from("<f" if kind == 1 else "<i", plan, data_at)[0]
    return fields


def read_every_plan_fields(plan: bytes) -> list[dict]:
    """`read_plan_fields` of every plugin layer of the plan (each layer's fields start with block_offset)."""
    key = struct.pack("<I", len("block_offset") + 1) + b"block_offset\0"
    starts, at = [], plan.find(key)
    while at >= 0:
        starts.append(at)
        at = plan.find(key, at + 1)
    return [read_plan_fields(plan, start) for start in starts]


def _expected_plan_fields() -> dict:
    attrs = onnx_node.node_attributes(config=ODD_CONFIG, **PLACEMENT)
    return {name: (np.float32(v).item() if name in onnx_node.FLOAT_ATTRIBUTES else v) for name, v in attrs.items()
            if name not in ("plugin_namespace", "plugin_version")}


def test_tensorrt_rtx_parses_the_exporters_node_and_builds_an_engine(stand_in_library, tmp_path):
    onnx_path = export_attention_onnx(
        tmp_path / "node.onnx", batch=2, heads=2, text_len=16, grid=PLACEMENT["grid"], head_dim=64, max_entities=4,
        dtype="float16", block_offset=PLACEMENT["block_offset"], num_blocks=PLACEMENT["num_blocks"],
        config=ODD_CONFIG,
    )
    engine = tmp_path / "node.plan"
    got, log = run_rtx(stand_in_library, "build", {"onnx": str(onnx_path), "engine": str(engine)}, tmp_path)
    assert got["parsed"], got["errors"]
    assert got["layers"] == ["PLUGIN_V3"]
    # getOutputDataTypes / getOutputShapes, called by TensorRT-RTX through our vtable: out as q, history as history.
    assert got["outputs"] == [["out", [2, 2, 64, 64], "HALF"], ["history_out", [2, 4, 48], "FLOAT"]]
    assert got["engine_bytes"], log
    assert read_plan_fields(engine.read_bytes()) == _expected_plan_fields()


def _dynamic_batch_onnx(path: Path, dtype: int) -> Path:
    t, (gh, gw), e, heads, head_dim = 16, PLACEMENT["grid"], 4, 2, 64
    n = t + gh * gw
    attrs = onnx_node.node_attributes(config=ODD_CONFIG, **PLACEMENT)
    node = helper.make_node(onnx_node.OP_TYPE, list(onnx_node.NODE_INPUTS), list(onnx_node.NODE_OUTPUTS),
                            domain=onnx_node.DOMAIN, **attrs)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "deleaker_dynamic_batch",
        [
            *(value(x, dtype, ["batch", heads, n, head_dim]) for x in ("q", "k", "v")),
            value("entity_mask", onnx.TensorProto.BOOL, [e, t]),
            value("history", onnx.TensorProto.FLOAT, ["batch", e, gh * gw]),
            value("step", onnx.TensorProto.INT64, []),
        ],
        [value("out", dtype, ["batch", heads, n, head_dim]), value("history_out", onnx.TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(onnx_node.DOMAIN, 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.mark.parametrize("dtype", [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16], ids=["bf16", "fp16"])
def test_tensorrt_rtx_builds_a_dynamic_batch_engine(stand_in_library, tmp_path, dtype):
    onnx_path = _dynamic_batch_onnx(tmp_path / "dynamic.onnx", dtype)
    engine = tmp_path / "dynamic.plan"
    args = {"onnx": str(onnx_path), "engine": str(engine), "batch": [1, 2, 4]}
    got, log = run_rtx(stand_in_library, "build", args, tmp_path)
    assert got["parsed"], got["errors"]
    type_name = "BF16" if dtype == onnx.TensorProto.BFLOAT16 else "HALF"
    assert got["outputs"][0] == ["out", [-1, 2, 64, 64], type_name]
    assert got["engine_bytes"], log
    assert read_plan_fields(engine.read_bytes()) == _expected_plan_fields()


def test_gpu_check_driver_runs_the_build_phase_and_reports_why_it_cannot_run(stand_in_library, tmp_path):
    """benchmarks/plugin_check.py's driver, built on its own, drives the library (a separate .so) as TensorRT
    would: the build phase works on the CPU, and onShapeChange of a library built without cuDNN says why it
    cannot run (the GPU check uses a build with cuDNN)."""
    import torch
    import trt_plugin_host

    driver = ctypes.CDLL(str(trt_plugin_host.build_gpu_driver(tmp_path, trt_plugin_host.cuda_include_dir())))
    plugin = ctypes.CDLL(str(stand_in_library))
    grid, t = PLACEMENT["grid"], 16
    q = torch.zeros(2, 2, t + grid[0] * grid[1], 64, dtype=torch.bfloat16)
    history = torch.zeros(2, 4, grid[0] * grid[1])
    inputs = [q, q, q, torch.zeros(4, t, dtype=torch.bool), history, torch.tensor(0)]
    outputs = [torch.empty_like(q), torch.empty_like(history)]
    attrs = onnx_node.node_attributes(config=ODD_CONFIG, **PLACEMENT)
    size = trt_plugin_host.drive(plugin, driver, attrs, inputs, outputs)
    assert size >= 16 << 20  # the fused attention's reserve is part of it
    if "attention none" in trt_build.library_build_info(stand_in_library):
        workspace = torch.empty(size, dtype=torch.uint8)
        with pytest.raises(trt_plugin_host.PluginDriveError, match="built without cuDNN"):
            trt_plugin_host.drive(plugin, driver, attrs, inputs, outputs, workspace.data_ptr(), size)




# --- loading the library into TensorRT-RTX's registry (deleaker.plugins.trt_library) ---------------------------

LOAD_SCRIPT = """
import json, sys
from pathlib import Path

import tensorrt_rtx as trt
from deleaker.plugins import trt_library as tl

builder = trt.Builder(trt.Logger(trt.Logger.ERROR))  # alive while libraries load: they get its logger
library, twin, other = (tl.inspect_plugin_library(Path(p)) for p in sys.argv[1:4])
foreign = Path(sys.argv[4])
result = {"before": tl._registered_plugin(trt, library.plugin)}


def attempt(what, lib):
    try:
        tl.load_plugin_library(trt, lib)
        result[what] = "loaded"
    except tl.PluginLibraryError as exc:
        result[what] = str(exc)


attempt("foreign", tl.PluginLibrary(foreign, tl.sha256_file(foreign), library.build_info))
attempt("library", library)
result["registered"] = tl._registered_plugin(trt, library.plugin)
result["mapped"] = [str(p) for p in tl.mapped_plugin_libraries()]
attempt("again", library)
attempt("twin", twin)
attempt("other", other)
# (rewriting the loaded file itself would change the code this process runs)
attempt("changed", tl.PluginLibrary(other.path, library.sha256, library.build_info))
print(json.dumps(result))
"""


def test_load_plugin_library_registers_once_and_refuses_another(stand_in_library, tmp_path):
    """`load_plugin_library`, the one place build and run load a library into TensorRT: TensorRT-RTX registers its
    creator; loading the same bytes again (that file or a copy) is a no-op; another library (one byte more), a
    shared library that is not a plugin library, and a file changed since it was checked are refused with a
    message."""
    import _ctypes

    paths = []
    for name, extra in (("library", b""), ("twin", b""), ("other", b"\0")):
        path = tmp_path / name / trt_build.LIBRARY_NAME
        path.parent.mkdir()
        path.write_bytes(stand_in_library.read_bytes() + extra)  # trailing bytes: the same loadable library
        paths.append(path)
    foreign = tmp_path / "foreign" / trt_build.LIBRARY_NAME
    foreign.parent.mkdir()
    foreign.write_bytes(Path(_ctypes.__file__).read_bytes())  # a real shared library, not a plugin library
    got = _load_child(LOAD_SCRIPT, [*paths, foreign], tmp_path)
    assert got["before"] is False
    assert got["foreign"].startswith(f"TensorRT could not load the plugin library {foreign}"), got["foreign"]
    assert got["library"] == "loaded" and got["registered"] is True
    assert str(paths[0]) in got["mapped"]
    assert got["again"] == got["twin"] == "loaded"  # the same bytes are loaded already
    assert "already holds another deleaker::DeLeakerAttention v1 plugin than" in got["other"], got["other"]
    assert got["changed"].endswith("changed since it was checked (sha256 differs); load it again")


def _load_child(script: str, args: list, tmp_path: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                           timeout=300, env=_rtx_env(tmp_path))
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0 and lines, f"rc {child.returncode}:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}"
    return json.loads(lines[-1])


# --- deleaker-trt build --plugin with TensorRT-RTX, and run --engines on what it built -------------------------

TINY_BUILD = ["build", "--model", "tiny", "--height", "64", "--width", "64", "--text-len", "16", "--max-entities", "4"]
RUN = ["run", "--prompt", "A cat and a cheetah", "--entities", "cat,cheetah", "--steps", "2", "--no-progress"]


def deleaker_trt(args: list, env: dict) -> subprocess.CompletedProcess:
    """``deleaker-trt ARGS`` in a child process: a crash in TensorRT-RTX fails one test, not pytest."""
    return subprocess.run([sys.executable, "-c", "from deleaker.runtime.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def rtx_engines(stand_in_library, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``deleaker-trt build --plugin`` of the tiny model, fp16, by TensorRT-RTX (CPU-only), in a child process."""
    from deleaker.plugins.trt_library import TensorRTUnavailableError, import_tensorrt

    try:
        if import_tensorrt().__name__ != "tensorrt_rtx":
            pytest.skip("TensorRT proper is installed: deleaker-trt build uses it, not TensorRT-RTX")
    except TensorRTUnavailableError:
        pytest.skip("tensorrt-rtx is not installed")
    out = tmp_path_factory.mktemp("rtx-engines")
    env = _rtx_env(tmp_path_factory.mktemp("rtx-env"))
    return out, deleaker_trt([*TINY_BUILD, "--precision", "fp16", "--plugin", stand_in_library, "--out", out], env)


def _copy_engines(rtx_engines, tmp_path: Path, *, without: tuple[str, ...] = ()) -> Path:
    out, build = rtx_engines
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    copy = Path(shutil.copytree(out, tmp_path / "engines", ignore=shutil.ignore_patterns(".build.lock", *without)))
    return copy


def test_build_loads_the_library_into_tensorrt_rtx_and_records_it(rtx_engines, stand_in_library):
    """TensorRT-RTX builds the tiny transformer (4 DeLeakerAttention nodes) with our library, loaded from the engine
    folder's copy; the manifest records the copy's hash, its build info and the TensorRT release; the plan holds
    each block's fields."""
    import tensorrt_rtx

    from deleaker.engines.manifest import EngineManifest, sha256_file
    from deleaker.plugins.trt_library import PluginLibrary

    out, build = rtx_engines
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # Loaded into TensorRT-RTX, which handed it its logger; TensorRT's log goes to stderr, stdout has the results.
    assert "TensorRT: libdeleaker_trt_plugin was built against the test stand-in TensorRT headers" in build.stderr
    engine = out / "transformer.64x64.fp16.plan"
    assert [line.split(":")[0] for line in build.stdout.splitlines()] == ["onnx", "engine", "timings"]
    assert f"engine: {engine}" in build.stdout
    library = out / trt_build.LIBRARY_NAME
    assert library.read_bytes() == stand_in_library.read_bytes()
    manifest = EngineManifest.read(engine)
    assert manifest.kind == "engine" and manifest.artifact_sha256 == sha256_file(engine)
    assert manifest.plugin == PluginLibrary(library, sha256_file(library),
                                            trt_build.library_build_info(stand_in_library)).record()
    assert manifest.plugin["library"] == trt_build.LIBRARY_NAME and manifest.plugin["tensorrt_headers"] == "stand-in"
    assert manifest.tensorrt_version == f"tensorrt_rtx=={tensorrt_rtx.__version__}"
    assert manifest.gpu_name is None and manifest.compute_capability is None  # portable: built without a GPU
    manifest.check_artifact(out)
    layers = sorted(read_every_plan_fields(engine.read_bytes()), key=lambda fields: fields["block_offset"])
    expected = [
        {name: (np.float32(v).item() if name in onnx_node.FLOAT_ATTRIBUTES else v) for name, v in attrs.items()
         if name not in ("plugin_namespace", "plugin_version")}
        for attrs in (onnx_node.node_attributes(block_offset=b, num_blocks=4, grid=(8, 8),
                                                config=DeLeakerConfig.for_model(4)) for b in range(4))
    ]
    assert layers == expected  # one plugin layer per block of the tiny model (2 double + 2 single), in the plan
    onnx_path = out / "transformer.64x64.fp16.onnx"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        ".build.lock", trt_build.LIBRARY_NAME, onnx_path.name, onnx_path.name + ".manifest.json", engine.name,
        engine.name + ".manifest.json",
    ])  # no staging file, no timing cache (TensorRT-RTX has none)


def test_a_bf16_engine_built_into_the_folder_shares_its_library(rtx_engines, stand_in_library, tmp_path):
    from deleaker.engines.manifest import EngineManifest

    engines = _copy_engines(rtx_engines, tmp_path)
    library = engines / trt_build.LIBRARY_NAME
    inode = library.stat().st_ino
    build = deleaker_trt([*TINY_BUILD, "--precision", "bf16", "--plugin", stand_in_library, "--out", engines],
                         _rtx_env(tmp_path))
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    fp16, bf16 = (EngineManifest.read(engines / f"transformer.64x64.{p}.plan") for p in ("fp16", "bf16"))
    assert bf16.io["dtype"] == "bfloat16" and bf16.plugin == fp16.plugin
    assert library.stat().st_ino == inode  # the same bytes: left as they were


def test_build_without_the_unversioned_tensorrt_rtx_library_says_how_to_link_it(rtx_engines, stand_in_library,
                                                                                tmp_path):
    """Without ``libtensorrt_rtx.so`` TensorRT-RTX's parser would abort the process on our first node: the build
    stops before parsing, with the fix, exit 1."""
    from deleaker.plugins import trt_library

    try:
        trt_library.check_plugin_layers_loadable(trt_library.import_tensorrt())
        pytest.skip("this environment already provides libtensorrt_rtx.so")
    except trt_library.PluginLibraryError:
        pass
    engines = _copy_engines(rtx_engines, tmp_path, without=("*.plan", "*.plan.manifest.json"))
    build = deleaker_trt([*TINY_BUILD, "--precision", "fp16", "--plugin", stand_in_library, "--out", engines],
                         dict(os.environ))
    assert build.returncode == 1, build.stdout[-3000:] + build.stderr[-3000:]
    assert "error: TensorRT-RTX's ONNX parser needs libtensorrt_rtx.so (unversioned)" in build.stderr
    assert "ln -s " in build.stderr and "Traceback" not in build.stderr
    assert "reusing" in build.stderr and not list(engines.glob("*.plan"))


def test_build_without_tensorrt_is_refused_before_any_work(rtx_engines, stand_in_library, tmp_path, monkeypatch):
    """No TensorRT package importable (both made unimportable in this process): refused before the model loads or
    the ONNX exports (minutes for FLUX.1-dev), saying what to install; the folder is left as it was."""
    from click.testing import CliRunner

    from deleaker.runtime.cli import main

    engines = _copy_engines(rtx_engines, tmp_path, without=("*.plan", "*.plan.manifest.json", trt_build.LIBRARY_NAME))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in engines.iterdir())
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    result = CliRunner().invoke(main, [*TINY_BUILD, "--precision", "fp16", "--plugin", str(stand_in_library),
                                       "--out", str(engines)])
    assert result.exit_code == 1, result.output
    assert "TensorRT's Python package is not importable" in result.output
    assert "loading model" not in result.output and "reusing" not in result.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in engines.iterdir()) == before


def _tamper_manifest(engines: Path, **changes) -> None:
    path = engines / "transformer.64x64.fp16.plan.manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("intact", "was built without cuDNN's attention (`deleaker-trt plugin --stand-in-headers`"),
        ("changed_library", "libdeleaker_trt_plugin.so is not the plugin library transformer.64x64.fp16.plan was "
                            "built with (its sha256 differs"),
        ("missing_library", "libdeleaker_trt_plugin.so (plugin library of the manifest) does not exist: put the "
                            "library transformer.64x64.fp16.plan was built with back"),
        ("other_release", "built with tensorrt_rtx==1.6.0.0, this machine has tensorrt_rtx=="),
        ("tensorrt_proper", "built with tensorrt==10.13.0.35, this machine has tensorrt_rtx=="),
    ],
)
def test_run_engines_refuses_a_library_or_tensorrt_mismatch_before_any_work(rtx_engines, tmp_path, setup, message):
    """``run --engines`` on what TensorRT-RTX built: the folder's library must be the one the engine was built with
    (hash), present, able to run, and the TensorRT here the release that built it; each is refused before any model
    is loaded, exit 1, no image. (The intact folder is refused too: its stand-in library cannot run.)"""
    from click.testing import CliRunner

    from deleaker.runtime.cli import main

    engines = _copy_engines(rtx_engines, tmp_path)
    library = engines / trt_build.LIBRARY_NAME
    if setup == "changed_library":
        library.write_bytes(library.read_bytes() + b"\0")
    elif setup == "missing_library":
        library.unlink()
    elif setup == "other_release":
        _tamper_manifest(engines, tensorrt_version="tensorrt_rtx==1.6.0.0")
    elif setup == "tensorrt_proper":
        _tamper_manifest(engines, tensorrt_version="tensorrt==10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3",
                         compute_capability=[9, 0])
    image = tmp_path / "x.png"
    result = CliRunner().invoke(main, [*RUN, "--engines", str(engines), "--out", str(image)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not image.exists()


def test_onnx_runtime_runs_the_folder_without_its_plugin_library(rtx_engines, tmp_path):
    """The folder's ONNX runs in ONNX Runtime (its portable form) with the plugin library gone: only engines need it."""
    from click.testing import CliRunner

    from deleaker.runtime.cli import main

    engines = _copy_engines(rtx_engines, tmp_path, without=(trt_build.LIBRARY_NAME,))
    image = tmp_path / "x.png"
    result = CliRunner().invoke(main, [*RUN, "--engines", str(engines), "--backend", "onnxruntime", "--height", "64",
                                       "--width", "64", "--out", str(image), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert image.is_file()
