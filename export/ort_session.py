"""ONNX Runtime sessions for exported DeLeaker graphs in standard ONNX, and the checks of what they take and give.

Graphs in standard ONNX (the decomposition, ``decompose=True`` at export, or the portable form of any exported
graph, `deleaker.export.portable`) run in a plain session (`make_session`): nothing runs in Python inside ONNX
Runtime. `make_session` refuses graphs with ``deleaker::DeLeakerAttention`` nodes (the node's Python reference,
for tests and debugging, is `deleaker.export.ort_reference`). `check_session_contract` checks a session against the
I/O contract; `session_feeds` turns tensors into its feeds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import DeLeakerError, ShapeError
from deleaker.jsonio import loads_strict

from .contract import FluxTransformerIO
from .exporter import META_CONFIG, META_IO
from .onnx_node import DOMAIN, OP_TYPE


def uses_custom_node(model: Union[str, Path, onnx.ModelProto]) -> bool:
    """True when the graph, a subgraph or a local function has ``deleaker`` domain nodes (reads only the graph,
    not external weights)."""
    from .portable import has_deleaker_nodes

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return has_deleaker_nodes(model)


#: ONNX Runtime's QDQ fusions turn DequantizeLinear -> MatMul into integer kernels. With the FP8 (E4M3) Q/DQ of an
#: FP8 engine's graph, ONNX Runtime 1.30.0 fuses them into MatMulIntegerToFloat, which takes no float8 input, and
#: refuses the model (1.32.0 does not). Our sessions run Q/DQ as written, the float fake quantization that
#: TensorRT's numbers are compared with, so the fusions are off unless the caller's options set this key.
QDQ_FUSION_KEY = "session.disable_quant_qdq"


def ort_session_options(given: Any) -> Any:
    """``given`` (or new ``SessionOptions``) with the QDQ fusions off, unless ``given`` sets them itself."""
    import onnxruntime as ort

    options = given if given is not None else ort.SessionOptions()
    try:
        options.get_session_config_entry(QDQ_FUSION_KEY)
    except RuntimeError:  # not set by the caller
        options.add_session_config_entry(QDQ_FUSION_KEY, "1")
    return options


def make_session(
    onnx_path: Union[str, Path],
    providers: Optional[Sequence[Any]] = None,
    *,
    session_options: Any = None,
):
    """An ``onnxruntime.InferenceSession`` on ``onnx_path`` (its external data next to it), standard ONNX only.

    ``providers`` defaults to ``["CPUExecutionProvider"]``; Q/DQ nodes run as written (`QDQ_FUSION_KEY`).
    Raises `DeLeakerError` if the file is missing or the graph has ``deleaker`` nodes (convert it with
    `deleaker.export.portable.make_portable`, or ask for the Python reference explicitly with
    `make_reference_session`).
    """
    import onnxruntime as ort

    path = existing_onnx(onnx_path)
    if uses_custom_node(path):
        raise DeLeakerError(
            f"{path.name} has {DOMAIN}::{OP_TYPE} nodes, which ONNX Runtime has no kernel for; run its portable form "
            "(deleaker.export.portable.make_portable) or, for tests, make_reference_session"
        )
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=ort_session_options(session_options), providers=providers)


def existing_onnx(onnx_path: Union[str, Path]) -> Path:
    """``onnx_path`` as a `Path`; `DeLeakerError` when no such file exists."""
    path = Path(onnx_path)
    if not path.is_file():
        raise DeLeakerError(f"no ONNX file at {path}")
    return path


_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
    "bool": "tensor(bool)",
}


def check_session_contract(
    session: Any, io: FluxTransformerIO, name: str, config: Optional[DeLeakerConfig] = None
) -> None:
    """Raise `ShapeError` unless the session's inputs and outputs are the contract's (names, order, element types,
    static sizes) and what the graph records (the exporter's metadata, when it has it) is ``io`` and, when given,
    ``config``. ``name`` names the graph in messages."""

    def dims_match(got: Sequence[Any], want: Sequence[Any]) -> bool:
        # A contract's batch axis (a name) takes any size; every other size must be the contract's.
        return len(got) == len(want) and all(isinstance(w, str) or g == w for g, w in zip(got, want))

    sides = (("inputs", session.get_inputs(), io.inputs), ("outputs", session.get_outputs(), io.outputs))
    for what, values, specs in sides:
        got = [(v.name, v.type, list(v.shape)) for v in values]
        want = [(s.name, _ORT_TYPES[s.dtype], list(s.shape)) for s in specs]
        if len(got) != len(want) or any(
            g[:2] != w[:2] or not dims_match(g[2], w[2]) for g, w in zip(got, want)
        ):
            raise ShapeError(f"{name} has {what} {got}; the contract wants {want}")
    check_recorded_contract(session.get_modelmeta().custom_metadata_map, io, name, config)


def check_recorded_contract(
    metadata: Mapping[str, str], io: FluxTransformerIO, name: str, config: Optional[DeLeakerConfig] = None
) -> None:
    """Raise `ShapeError` unless what a graph's metadata records (the exporter's, where present) is ``io`` and,
    when given, ``config``. Reads only the metadata: usable before a session or a conversion is made."""
    wanted = {META_IO: ("I/O contract", io.to_dict())}
    if config is not None:
        wanted[META_CONFIG] = ("DeLeaker config", dataclasses.asdict(config))
    for key, (what, value) in wanted.items():
        if key not in metadata:
            continue
        try:
            same = loads_strict(metadata[key]) == json.loads(json.dumps(value))
        except (ValueError, RecursionError):
            same = False
        if not same:
            raise ShapeError(f"{name} records another {what} than the one it is loaded for")


def session_feeds(io: FluxTransformerIO, inputs: Mapping[str, Union[torch.Tensor, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Numpy feeds for an ORT session from ``inputs`` keyed by contract name, cast to the contract's dtypes.

    Raises `ShapeError` on a missing/unknown name or a shape that the contract does not allow, and on an integer
    input (``step``, ``entity_mask``) whose values the cast would change: a float, a ``step`` given as a bool, a
    value outside int32 (an int64 step of 2**31 would wrap). Integer dtypes of any width are taken exactly.
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
        if np.issubdtype(spec.numpy_dtype, np.integer):
            _check_exact_integers(spec.name, array, spec.numpy_dtype)
        feeds[spec.name] = array.astype(spec.numpy_dtype, copy=False)
    return feeds


def _check_exact_integers(name: str, array: np.ndarray, dtype: np.dtype) -> None:
    """Raise `ShapeError` unless casting ``array`` to the integer ``dtype`` keeps every value."""
    if array.dtype == np.bool_:
        if name == "entity_mask":  # a 0/1 mask: bool is what it means
            return
        raise ShapeError(f"input {name} must be an integer, got a bool")
    if not np.issubdtype(array.dtype, np.integer):
        raise ShapeError(f"input {name} must be an integer ({np.dtype(dtype).name}), got {array.dtype}")
    info = np.iinfo(dtype)
    if array.size and (int(array.min()) < info.min or int(array.max()) > info.max):
        raise ShapeError(
            f"input {name} must fit {np.dtype(dtype).name} ([{info.min}, {info.max}]), got values in "
            f"[{int(array.min())}, {int(array.max())}]"
        )
