"""`deleaker.export.ort_reference`: the custom node's Python reference refuses bad attributes and narrow floats
before ONNX Runtime runs, and an error inside the node is raised, never an abort."""

from __future__ import annotations


import pytest

from deleaker.errors import ConfigError, ShapeError
from deleaker.export.exporter import export_attention_onnx
from deleaker.export.ort_reference import make_reference_session
from deleaker.export.portable import make_portable

from hostile_use import CONFIG, assert_no_abort, node_graph, python_child


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"k_strength": float("nan")}, ConfigError, "k_strength must be a finite number"),
        ({"std_mul_text": float("inf")}, ConfigError, "std_mul_text must be a finite number"),
        ({"grid_h": 5}, ShapeError, r"grid 5x4 \(20 image tokens\) plus T = 8 does not match the 24 tokens"),
        ({"block_offset": 3, "num_blocks": 2}, ShapeError, "0 <= block_offset < num_blocks"),
        ({"use_history": 7}, ConfigError, "use_history must be 0 or 1"),
    ],
)
def test_bad_node_attributes_are_refused_before_onnx_runtime_runs(tmp_path, changes, error, message):
    path = node_graph(tmp_path, **changes)
    with pytest.raises(error, match=message):
        make_reference_session(path)
    with pytest.raises(error, match=message):
        make_portable(path, tmp_path / "portable.onnx")


_NODE_ERROR_INSIDE = r"""
import sys, numpy as np, onnxruntime as ort
from deleaker.errors import DeLeakerError
from deleaker.export.ort_reference import ReferenceSession, register_reference_op
options = ort.SessionOptions()
options.register_custom_ops_library(register_reference_op())
# Made by hand, without make_reference_session's checks: the bad attribute reaches the Python node.
session = ReferenceSession(ort.InferenceSession(sys.argv[1], sess_options=options, providers=["CPUExecutionProvider"]))
shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in session.get_inputs()}
feeds = {name: np.ones(shape, dtype=np.float32) for name, shape in shapes.items()}
feeds["entity_mask"] = np.ones(feeds["entity_mask"].shape, dtype=bool)
feeds["step"] = np.array(0, dtype=np.int64)
try:
    session.run(None, feeds)
except DeLeakerError as exc:
    print("RAISED", type(exc).__name__, exc, flush=True)
"""


def test_an_error_inside_the_python_node_is_raised_not_aborted(tmp_path):
    path = node_graph(tmp_path, k_strength=float("nan"))
    proc = python_child(_NODE_ERROR_INSIDE, path)
    assert_no_abort(proc, proc.stderr)
    assert proc.returncode == 0 and "RAISED ConfigError" in proc.stdout and "k_strength" in proc.stdout, proc.stderr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_python_reference_node_refuses_narrow_floats_with_a_typed_error(tmp_path, dtype):
    """The reference node takes float32 q, k, v; an fp16/bf16 node graph (what `build` writes) used to raise
    ONNX Runtime's own InvalidGraph from make_reference_session."""
    path = export_attention_onnx(
        tmp_path / "node.onnx", batch=1, heads=2, text_len=8, grid=(4, 4), head_dim=16, max_entities=3, config=CONFIG,
        dtype=dtype,
    )
    with pytest.raises(ShapeError, match=f"takes {dtype} q, k, v; the Python reference takes float32 only"):
        make_reference_session(path)
