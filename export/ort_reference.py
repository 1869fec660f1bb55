"""The ``deleaker::DeLeakerAttention`` node's Python reference in ONNX Runtime, for tests and debugging.

The custom node runs only where asked for by name (`make_reference_session`): it gets a Python implementation
through onnxruntime-extensions (`register_reference_op`) that calls ``deleaker.deleaker_attention_reference``
(float32 ``q, k, v`` only: a Python op has fixed input types). An exception that leaves a Python op makes
onnxruntime-extensions terminate the process (SIGABRT), so the reference never lets one leave: its node attributes
are validated when the session is made, and an error inside the node (or a signal) turns into NaN outputs plus the
error, which the session's ``run`` raises once ONNX Runtime returns.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import onnx
import torch

from deleaker.errors import DeLeakerError, ShapeError
from deleaker.ops import deleaker_attention_reference

from .onnx_node import DOMAIN, FLOAT_ATTRIBUTES, INT_ATTRIBUTES, OP_TYPE, STRING_ATTRIBUTES, config_from_attributes
from .ort_session import existing_onnx, ort_session_options


class _NodeErrors(threading.local):
    """The error the reference node caught in this thread, for the session's ``run`` to raise.

    The node is a process-wide callback of onnxruntime-extensions and cannot raise, so this per-thread slot is
    the only way out for its errors; ONNX Runtime calls a CPU node on the thread that called ``run``.
    """

    error: Optional[BaseException] = None


_NODE_ERRORS = _NodeErrors()


def reference_node(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    entity_mask: np.ndarray,
    history: np.ndarray,
    step: np.ndarray,
    **attrs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The node's computation on numpy arrays: ``(out (B, H, N, D), history_out (B, E_max, Nimg) float32)``.

    ``attrs`` are the node's attributes (`deleaker.export.onnx_node.node_attributes`).
    """
    block_offset, num_blocks, grid, config = config_from_attributes(attrs)
    block_step = int(np.asarray(step).reshape(())) * num_blocks + block_offset
    out, history_out = deleaker_attention_reference(
        torch.from_numpy(np.ascontiguousarray(q)),
        torch.from_numpy(np.ascontiguousarray(k)),
        torch.from_numpy(np.ascontiguousarray(v)),
        torch.from_numpy(np.asarray(entity_mask)).to(torch.bool),
        grid=grid,
        block_step=block_step,
        history=torch.from_numpy(np.ascontiguousarray(history, dtype=np.float32)),
        config=config,
    )
    return out.numpy(), history_out.numpy()


def _guarded_reference_node(q, k, v, entity_mask, history, step, **attrs):
    """`reference_node`, but nothing leaves it: an exception (or a KeyboardInterrupt) is kept for
    `ReferenceSession.run` and the outputs are NaN, so onnxruntime-extensions never aborts the process."""
    try:
        return reference_node(q, k, v, entity_mask, history, step, **attrs)
    except BaseException as exc:  # noqa: BLE001  (an exception escaping into C++ terminates the process)
        if _NODE_ERRORS.error is None:
            _NODE_ERRORS.error = exc
        return np.full(np.shape(q), np.nan, np.float32), np.full(np.shape(history), np.nan, np.float32)


@functools.cache
def register_reference_op() -> str:
    """Give ``deleaker::DeLeakerAttention`` its Python implementation in onnxruntime-extensions (float32 q/k/v).

    Once per process (cached; later calls do nothing). Returns the extensions library path that a session must
    register (``SessionOptions.register_custom_ops_library``).
    """
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as exc:  # an optional dependency: say what to install
        raise DeLeakerError(
            "running the DeLeakerAttention node in ONNX Runtime needs onnxruntime-extensions "
            "(pip install 'deleaker-trt[onnx]'), or export with decompose=True"
        ) from exc

    attrs: Dict[str, int] = {name: PyCustomOpDef.dt_int64 for name in INT_ATTRIBUTES}
    attrs.update({name: PyCustomOpDef.dt_float for name in FLOAT_ATTRIBUTES})
    attrs.update({name: PyCustomOpDef.dt_string for name in STRING_ATTRIBUTES})
    onnx_op(
        op_type=f"{DOMAIN}::{OP_TYPE}",
        inputs=[
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_bool,
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_int64,
        ],
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
        attrs=attrs,
    )(_guarded_reference_node)
    return get_library_path()


class ReferenceSession:
    """An ONNX Runtime session whose ``DeLeakerAttention`` nodes run the Python reference (float32 graphs).

    ``run`` raises what the node raised (after ONNX Runtime returns; the node's outputs were NaN meanwhile).
    Every other attribute is the ``InferenceSession``'s.
    """

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, output_names: Any, feeds: Mapping[str, Any], run_options: Any = None) -> list:
        _NODE_ERRORS.error = None
        try:
            outputs = self._session.run(output_names, feeds, run_options)
        finally:
            error, _NODE_ERRORS.error = _NODE_ERRORS.error, None
        if isinstance(error, (KeyboardInterrupt, SystemExit, DeLeakerError)):
            raise error
        if error is not None:
            raise DeLeakerError(f"the {OP_TYPE} reference node failed: {type(error).__name__}: {error}") from error
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def make_reference_session(onnx_path: Union[str, Path], *, session_options: Any = None) -> ReferenceSession:
    """A CPU session on ``onnx_path`` in which ``deleaker::DeLeakerAttention`` runs the Python reference.

    Every custom node's attributes are checked first (`config_from_attributes`: missing, NaN, out-of-range
    values, a grid that does not match the node's tokens, q, k, v other than float32 raise `ConfigError` /
    `ShapeError` here, not inside ONNX Runtime). Errors inside the node come out of ``run`` (see `ReferenceSession`).
    """
    import onnxruntime as ort

    from .portable import check_custom_nodes

    path = existing_onnx(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    check_custom_nodes(model)
    # The Python op takes float32 q, k, v only; ONNX Runtime would refuse other types with its own InvalidGraph.
    declared = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.value_info)}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            narrow = {declared.get(name) for name in node.input[:3]} - {None, onnx.TensorProto.FLOAT}
            if narrow:
                names = sorted(onnx.TensorProto.DataType.Name(t).lower() for t in narrow)
                raise ShapeError(
                    f"{path.name}: {OP_TYPE} node {node.name} takes {', '.join(names)} q, k, v; the Python reference "
                    "takes float32 only: run the graph's portable form (deleaker.export.portable.make_portable)"
                )
    options = ort_session_options(session_options)
    options.register_custom_ops_library(register_reference_op())
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return ReferenceSession(session)
