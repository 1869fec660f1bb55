"""ONNX Runtime for exported DeLeaker graphs: sessions, their feeds, and the custom node's Python reference.

Graphs in standard ONNX (the decomposition, ``decompose=True`` at export, or the portable form of any exported
graph, `deleaker.export.portable`) run in a plain session (`make_session`): nothing runs in Python inside ONNX
Runtime. `make_session` refuses graphs with ``deleaker::DeLeakerAttention`` nodes.

The custom node itself runs only where asked for by name (`make_reference_session`, for tests and debugging): it
gets a Python implementation through onnxruntime-extensions (`register_reference_op`) that calls
``deleaker.deleaker_attention_reference`` (float32 ``q, k, v`` only: a Python op has fixed input types). An
exception that leaves a Python op makes onnxruntime-extensions terminate the process (SIGABRT), so the reference
never lets one leave: its node attributes are validated when the session is made, and an error inside the node
(or a signal) turns into NaN outputs plus the error, which the session's ``run`` raises once ONNX Runtime
returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import DeLeakerError, ShapeError
from deleaker.jsonio import loads_strict
from deleaker.ops import deleaker_attention_reference

from .contract import FluxTransformerIO
from .exporter import META_CONFIG, META_IO
from .onnx_node import DOMAIN, FLOAT_ATTRIBUTES, INT_ATTRIBUTES, OP_TYPE, STRING_ATTRIBUTES, config_from_attributes


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


def _session_options(given: Any) -> Any:
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

    path = _existing(onnx_path)
    if uses_custom_node(path):
        raise DeLeakerError(
            f"{path.name} has {DOMAIN}::{OP_TYPE} nodes, which ONNX Runtime has no kernel for; run its portable form "
            "(deleaker.export.portable.make_portable) or, for tests, make_reference_session"
        )
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=_session_options(session_options), providers=providers)


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

    path = _existing(onnx_path)
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
    options = _session_options(session_options)
    options.register_custom_ops_library(register_reference_op())
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return ReferenceSession(session)


def _existing(onnx_path: Union[str, Path]) -> Path:
    path = Path(onnx_path)
    if not path.is_file():
        raise DeLeakerError(f"no ONNX file at {path}")
    return path


def run_interruptible(session: Any, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list:
    """``session.run(output_names, feeds)`` that Ctrl-C (or SIGTERM) stops between two nodes, also in a long run.

    Python raises KeyboardInterrupt only in the main thread and only between bytecodes, never while ONNX Runtime
    computes; and an exception raised while ONNX Runtime still runs in another thread lets the process exit with it
    running, which aborts ("terminate called without an active exception"). So, from the main thread: the run goes
    to a worker thread; for exactly as long as that thread lives, SIGINT and SIGTERM only set a flag (their handlers
    are swapped for one that records the signal), and a recorded signal tells the run to stop
    (``RunOptions.terminate``). Once the worker is gone the handlers are restored and each recorded signal is
    handed to the handler it would have reached (KeyboardInterrupt for Ctrl-C). From any other thread (where no
    signal handler runs) this is ``session.run``.
    """
    if threading.current_thread() is not threading.main_thread():
        return session.run(list(output_names), dict(feeds))
    import signal

    import onnxruntime as ort

    options = ort.RunOptions()
    outcome: Dict[str, Any] = {}
    received: list[int] = []

    def work() -> None:
        try:
            outcome["outputs"] = session.run(list(output_names), dict(feeds), options)
        except BaseException as exc:  # noqa: BLE001  (handed to the waiting thread)
            outcome["error"] = exc

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        options.terminate = True  # ONNX Runtime stops before its next node

    previous: Dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, record)
        worker = threading.Thread(target=work, name="deleaker-ort-run", daemon=True)
        worker.start()
        # The handlers only record, so nothing interrupts this wait: it returns once the worker has left.
        worker.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(received):
        _deliver(signum, previous[signum])
    if "error" in outcome:
        raise outcome["error"]
    return outcome["outputs"]


def _deliver(signum: int, handler: Any) -> None:
    """What ``signum`` would have done under ``handler`` (the handler it found when the run started)."""
    import signal

    if callable(handler):
        handler(signum, None)  # Python's default SIGINT handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action: the process ends by this signal
    # SIG_IGN: ignored, as it would have been


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
