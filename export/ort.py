"""ONNX Runtime for exported DeLeaker graphs: the reference implementation of the custom node, and sessions.

A graph with ``deleaker::DeLeakerAttention`` nodes runs in ONNX Runtime through onnxruntime-extensions: the node
gets a Python implementation (`register_reference_op`) that calls ``deleaker.deleaker_attention_reference``, so
it matches PyTorch exactly up to float rounding. That implementation takes float32 ``q, k, v`` only (a Python op
has fixed input types); fp16/bf16 graphs run in ORT through the decomposition (``decompose=True`` at export).
A decomposed graph needs nothing beyond ONNX Runtime.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch

from deleaker.errors import DeLeakerError, ShapeError
from deleaker.ops import deleaker_attention_reference

from .contract import FluxTransformerIO
from .onnx_node import DOMAIN, FLOAT_ATTRIBUTES, INT_ATTRIBUTES, OP_TYPE, STRING_ATTRIBUTES, config_from_attributes


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
    )(reference_node)
    return get_library_path()


def uses_custom_node(model: Union[str, Path, onnx.ModelProto]) -> bool:
    """True when the graph has ``deleaker`` domain nodes (reads only the graph, not external weights)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(node.domain == DOMAIN for node in model.graph.node)


def make_session(
    onnx_path: Union[str, Path],
    providers: Optional[Sequence[Any]] = None,
    *,
    session_options: Any = None,
):
    """An ``onnxruntime.InferenceSession`` on ``onnx_path`` (its external data next to it).

    When the graph has the custom node, the Python reference is registered (`register_reference_op`) and the
    extensions library is added to the session options. ``providers`` defaults to ``["CPUExecutionProvider"]``
    (the Python node runs on the CPU whatever the providers). Raises `DeLeakerError` if the file is missing.
    """
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise DeLeakerError(f"no ONNX file at {path}")
    options = session_options if session_options is not None else ort.SessionOptions()
    if uses_custom_node(path):
        options.register_custom_ops_library(register_reference_op())
    return ort.InferenceSession(
        str(path), sess_options=options, providers=list(providers) if providers else ["CPUExecutionProvider"]
    )


def session_feeds(io: FluxTransformerIO, inputs: Mapping[str, Union[torch.Tensor, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Numpy feeds for an ORT session from ``inputs`` keyed by contract name, cast to the contract's dtypes.

    Raises `ShapeError` on a missing/unknown name or a shape that the contract does not allow.
    """
    names = set(io.input_names)
    unknown = sorted(set(inputs) - names)
    missing = [name for name in io.input_names if name not in inputs]
    if unknown or missing:
        raise ShapeError(f"inputs must be exactly {io.input_names}; missing {missing}, unknown {unknown}")
    feeds: Dict[str, np.ndarray] = {}
    batch = None
    for spec in io.inputs:
        value = inputs[spec.name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if spec.dynamic_axes:
            batch = array.shape[0] if batch is None else batch
        expected = spec.concrete(batch if batch is not None else io.batch_opt)
        if tuple(array.shape) != expected:
            raise ShapeError(f"input {spec.name} must have shape {expected} (contract {spec.shape}), got {array.shape}")
        feeds[spec.name] = array.astype(spec.numpy_dtype, copy=False)
    return feeds
