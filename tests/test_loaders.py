"""`deleaker.engines.loaders`: Polygraphy's loaders as the build uses them, on the TensorRT importable here
(TensorRT-RTX on a CPU-only machine: it parses and builds without a GPU). The loaders' engine and parse-error tests are in
tests/test_engines.py; these check the glue: which TensorRT Polygraphy drives, and where its log goes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from deleaker.engines import loaders

pytest.importorskip("polygraphy")


def _relu_onnx(path: Path, op_type: str = "Relu", domain: str = "") -> Path:
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["y"], domain=domain)],
        "relu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["batch", 4])],
        [numpy_helper.from_array(np.zeros(1, np.float16), "unused")],
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_loaders_print_nothing_on_stdout_and_leave_polygraphy_as_they_found_it(trt, tmp_path, capfd):
    """The CLI keeps stdout for its results: Polygraphy's log (it prints there) is routed away while a loader runs,
    a failure's messages end up in the `BuildError`, and Polygraphy's logger settings are restored afterwards."""
    from polygraphy.logger import G_LOGGER

    before = (G_LOGGER.use_python_logging_system, G_LOGGER.module_severity.get(), G_LOGGER.colors, G_LOGGER.letter)
    net = loaders.network_from_onnx(_relu_onnx(tmp_path / "relu.onnx"), trt)
    data = loaders.build_serialized_engine(net, {"x": ((1, 4), (2, 4), (3, 4))}, timing_cache=tmp_path / "t.cache")
    assert len(data) > 1000 and (tmp_path / "t.cache").is_file()
    with pytest.raises(loaders.BuildError, match=r"^TensorRT could not parse .*NoSuchOp") as failure:
        loaders.network_from_onnx(_relu_onnx(tmp_path / "bad.onnx", "NoSuchOp", "nowhere"), trt)
    assert "\n" not in str(failure.value)  # one line: the CLI's `error:` line
    after = (G_LOGGER.use_python_logging_system, G_LOGGER.module_severity.get(), G_LOGGER.colors, G_LOGGER.letter)
    assert after == before
    assert capfd.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "relu.onnx", "t.cache"]  # no t.cache.lock


CHILD = """
import sys
from polygraphy import config
config.USE_TENSORRT_RTX = {other_is_rtx}
import polygraphy.backend.trt  # Polygraphy now drives the other TensorRT in this process
from deleaker.engines import loaders
from deleaker.plugins.trt_library import import_tensorrt
try:
    loaders.polygraphy_backend(import_tensorrt())
except loaders.BuildError as err:
    print(err)
    sys.exit(3)
"""


def test_a_process_where_polygraphy_drives_the_other_tensorrt_is_refused(trt):
    other_is_rtx = trt.__name__ != "tensorrt_rtx"
    child = subprocess.run([sys.executable, "-c", CHILD.format(other_is_rtx=other_is_rtx)], capture_output=True,
                           text=True, timeout=300)
    other = "tensorrt_rtx" if other_is_rtx else "tensorrt"
    assert child.returncode == 3, child.stdout + child.stderr
    assert child.stdout.startswith(f"Polygraphy already drives {other} in this process, the build uses {trt.__name__}")
