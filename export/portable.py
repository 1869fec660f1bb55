"""The portable form of an exported DeLeaker graph: float32 throughout, standard ONNX operators only.

What `deleaker-trt build` writes is for TensorRT: fp16/bf16 (fp8 Q/DQ) graphs whose ``DeLeakerAttention`` nodes
TensorRT's plugin runs. ONNX Runtime has no native kernel for that node (only a Python one, which takes float32
and takes the whole process down on any exception raised inside it) and its CPU provider lacks many fp16/bf16
kernels. `make_portable` turns such a graph into one ONNX Runtime runs anywhere:

1. every float16/bfloat16 tensor (weights, constants), ``Cast`` target and declared type becomes float32. Widening
   is exact, so the result computes in float32 with the artifact's own (rounded) weights;
2. every ``DeLeakerAttention`` node becomes its standard-ONNX decomposition, the same translation the exporter
   uses (``decompose=True``, `deleaker.export.onnx_node.decomposed_translation`). The decomposition is traced once
   per group of nodes with equal knobs, grid and shapes, at block 0 of a 1-block model and with a dynamic batch,
   then spliced in place of each node with the node's step input mapped to its block step
   (``step * num_blocks + block_offset``): the same computation for every block, one trace for all of them.

The node attributes are validated first (`config_from_attributes`: NaN, knobs outside `DeLeakerConfig`'s ranges,
a grid that does not match the node's token count are refused with a typed error); nothing runs in Python inside
ONNX Runtime afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deleaker.config import DeLeakerConfig
from deleaker.errors import ShapeError
from deleaker.jsonio import loads_strict
from deleaker.staging import make_staging_dir, publish_staged

from .contract import FluxTransformerIO
from .exporter import EXTERNAL_DATA_THRESHOLD, META_DECOMPOSED, META_IO, ExportError, export_attention_onnx
from .onnx_node import DOMAIN, NODE_INPUTS, NODE_OUTPUTS, OP_TYPE, config_from_attributes, register_onnx_schema

_NARROW_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
#: Attributes that hold an element type (``Cast.to``, ``EyeLike.dtype``, the random generators' ``dtype``).
_TYPE_ATTRIBUTES = ("to", "dtype")


def all_nodes(model: onnx.ModelProto) -> Iterable[onnx.NodeProto]:
    """Every node of ``model``: its graph, the subgraphs of If/Loop/Scan nodes, and its local functions."""
    for graph in _graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def has_deleaker_nodes(model: onnx.ModelProto) -> bool:
    """True when the graph, a subgraph or a local function has ``deleaker`` domain nodes."""
    return any(node.domain == DOMAIN for node in all_nodes(model))


def needs_portable(model: onnx.ModelProto) -> bool:
    """True when ONNX Runtime on the CPU cannot run ``model`` as it is: it has ``deleaker`` nodes or float16 /
    bfloat16 inputs or weights (reads the graph only; ``model`` may be loaded without external data)."""
    graph = model.graph
    if has_deleaker_nodes(model):
        return True
    declared = [v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)]
    return any(t in _NARROW_FLOATS for t in declared + [init.data_type for init in graph.initializer])


def make_portable(src: str | Path, dst: str | Path, *, work_dir: Optional[str | Path] = None) -> Path:
    """Write the portable form of the ONNX file ``src`` (its external data beside it) to ``dst``.

    Weights go to ``<dst>.data`` beside ``dst`` when they are larger than the protobuf limit allows. ``dst`` is
    written in place: callers that need atomicity write into a staging folder (the runtime's cache does).
    ``work_dir`` holds the traced decompositions (default: a temporary folder). Raises `ConfigError` /
    `ShapeError` for node attributes or shapes the decomposition cannot take, `ExportError` for anything else
    that cannot be converted.
    """
    src, dst = Path(src), Path(dst)
    register_onnx_schema()
    model = onnx.load(str(src))
    for graph in _graphs(model):
        _widen_graph(graph)
    for function in model.functions:
        _widen_nodes(function.node)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        _replace_custom_nodes(model, Path(tmp))
    _mark_metadata(model)
    large = sum(init.ByteSize() for init in model.graph.initializer) >= EXTERNAL_DATA_THRESHOLD
    staging = make_staging_dir(dst)  # written and checked there, then moved into place: no half-written dst
    try:
        staged = staging / dst.name
        onnx.save_model(model, str(staged), save_as_external_data=large, location=dst.name + ".data")
        try:
            onnx.checker.check_model(str(staged))  # by path: works above the protobuf limit too
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the portable form of {src.name} fails the ONNX checks: {exc}") from exc
        publish_staged(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def external_data_locations(model: onnx.ModelProto) -> set[str]:
    """The ``location`` of every tensor of ``model`` (any graph, initializers and attributes) stored outside it."""
    locations = set()
    for graph in _graphs(model):
        tensors = list(graph.initializer) + [
            t
            for node in graph.node
            for attr in node.attribute
            for t in ([attr.t] if attr.type == onnx.AttributeProto.TENSOR else list(attr.tensors))
        ]
        for tensor in tensors:
            if tensor.data_location == TensorProto.EXTERNAL:
                locations.add({entry.key: entry.value for entry in tensor.external_data}.get("location", ""))
    return locations


# --- 1. float32 throughout ------------------------------------------------------------------------------------


def _graphs(model: onnx.ModelProto) -> Iterable[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies), depth first."""
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _widen_tensor(tensor: TensorProto) -> None:
    if tensor.data_type in _NARROW_FLOATS:
        wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
        tensor.CopyFrom(wide)


def _widen_type(type_proto: onnx.TypeProto) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" and type_proto.tensor_type.elem_type in _NARROW_FLOATS:
        type_proto.tensor_type.elem_type = TensorProto.FLOAT
    elif kind == "sequence_type":
        _widen_type(type_proto.sequence_type.elem_type)
    elif kind == "optional_type":
        _widen_type(type_proto.optional_type.elem_type)


def _widen_nodes(nodes: Iterable[onnx.NodeProto]) -> None:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                for tensor in attr.tensors:
                    _widen_tensor(tensor)
            elif attr.type == onnx.AttributeProto.INT and attr.name in _TYPE_ATTRIBUTES and attr.i in _NARROW_FLOATS:
                attr.i = TensorProto.FLOAT


def _widen_graph(graph: onnx.GraphProto) -> None:
    if any(t.values.data_type in _NARROW_FLOATS for t in graph.sparse_initializer):
        raise ExportError("sparse float16/bfloat16 initializers are not supported by the portable conversion")
    for tensor in graph.initializer:
        _widen_tensor(tensor)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        _widen_type(value.type)
    _widen_nodes(graph.node)


# --- 2. the decomposition in place of each custom node ---------------------------------------------------------


@dataclass(frozen=True)
class _NodeShape:
    """What a traced decomposition is specialised to, besides the knobs and the grid."""

    heads: int
    head_dim: int
    text_len: int
    max_entities: int


def _static_shapes(model: onnx.ModelProto) -> Dict[str, Tuple[Any, ...]]:
    """Value name -> shape (ints, or dim_param strings) of every value whose shape the graph declares (the
    exporter declares them all; graphs from elsewhere get ONNX shape inference when they fit in memory)."""
    declared = model.graph
    if not model.graph.value_info and model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        try:
            declared = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # noqa: BLE001  (inference is a fallback; missing shapes are refused below by name)
            pass
    shapes: Dict[str, Tuple[Any, ...]] = {}
    for value in list(declared.input) + list(declared.value_info) + list(declared.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _node_shape(node: onnx.NodeProto, shapes: Dict[str, Tuple[Any, ...]], grid: Tuple[int, int]) -> _NodeShape:
    q_shape = shapes.get(node.input[0])
    mask_shape = shapes.get(node.input[3])
    history_shape = shapes.get(node.input[4])
    where = f"{OP_TYPE} node {node.name or node.output[0]}"
    if q_shape is None or mask_shape is None or len(q_shape) != 4 or len(mask_shape) != 2:
        raise ShapeError(f"{where}: the graph does not declare the shapes of q (B, H, N, D) and entity_mask (E, T)")
    _, heads, tokens, head_dim = q_shape
    max_entities, text_len = mask_shape
    if not all(isinstance(d, int) and d > 0 for d in (heads, tokens, head_dim, max_entities, text_len)):
        raise ShapeError(f"{where}: q {q_shape} and entity_mask {mask_shape} must have static sizes")
    n_img = grid[0] * grid[1]
    if tokens != text_len + n_img:
        raise ShapeError(
            f"{where}: its grid {grid[0]}x{grid[1]} ({n_img} image tokens) plus T = {text_len} does not match the "
            f"{tokens} tokens of q"
        )
    if history_shape is not None and len(history_shape) == 3 and tuple(history_shape[1:]) != (max_entities, n_img):
        raise ShapeError(f"{where}: history {history_shape} does not match (B, {max_entities}, {n_img})")
    return _NodeShape(heads, head_dim, text_len, max_entities)


def _trace_decomposition(
    config: DeLeakerConfig, grid: Tuple[int, int], shape: _NodeShape, work_dir: Path, index: int
) -> onnx.GraphProto:
    path = export_attention_onnx(
        work_dir / f"decomposition_{index}.onnx",
        batch=2,
        heads=shape.heads,
        text_len=shape.text_len,
        grid=grid,
        head_dim=shape.head_dim,
        max_entities=shape.max_entities,
        dtype="float32",
        block_offset=0,
        num_blocks=1,
        config=config,
        decompose=True,
        dynamic_batch=True,
    )
    graph = onnx.load(str(path)).graph
    if [i.name for i in graph.input] != list(NODE_INPUTS) or [o.name for o in graph.output] != list(NODE_OUTPUTS):
        names = [i.name for i in graph.input]
        raise ExportError(f"the traced decomposition has inputs {names}, expected {NODE_INPUTS}")
    return graph


@dataclass(frozen=True)
class _CustomNode:
    """A ``DeLeakerAttention`` node (at ``position`` in the graph) with its attributes decoded and checked."""

    position: int
    node: onnx.NodeProto
    block_offset: int
    num_blocks: int
    grid: Tuple[int, int]
    config: DeLeakerConfig
    shape: _NodeShape


def check_custom_nodes(model: onnx.ModelProto) -> List[_CustomNode]:
    """Decode and check every ``deleaker`` node of ``model`` (graph only; weights not needed).

    Raises `ExportError` for an op type other than ``DeLeakerAttention``, `ConfigError` / `ShapeError` for
    attributes the node cannot take (missing, NaN, knobs outside the config's ranges, a block offset outside
    the block count) and for a grid or history that does not match the node's input shapes.
    """
    graph = model.graph
    custom = [(position, node) for position, node in enumerate(graph.node) if node.domain == DOMAIN]
    if sum(node.domain == DOMAIN for node in all_nodes(model)) != len(custom):
        raise ExportError(
            f"the graph has {DOMAIN} nodes inside subgraphs or functions; the exporter puts them in the main graph only"
        )
    unknown = sorted({node.op_type for _, node in custom if node.op_type != OP_TYPE})
    if unknown:
        raise ExportError(f"the graph has {DOMAIN} nodes {unknown}; only {OP_TYPE} is known")
    if not custom:
        return []
    shapes = _static_shapes(model)
    checked = []
    for position, node in custom:
        if len(node.input) != len(NODE_INPUTS) or len(node.output) != len(NODE_OUTPUTS):
            raise ShapeError(f"{OP_TYPE} node {node.name} must have inputs {NODE_INPUTS} and outputs {NODE_OUTPUTS}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        block_offset, num_blocks, grid, config = config_from_attributes(attrs)
        shape = _node_shape(node, shapes, grid)
        checked.append(_CustomNode(position, node, block_offset, num_blocks, grid, config, shape))
    return checked


def _replace_custom_nodes(model: onnx.ModelProto, work_dir: Path) -> None:
    graph = model.graph
    checked = {c.position: c for c in check_custom_nodes(model)}
    if not checked:
        return
    traced: Dict[Tuple[Any, ...], str] = {}
    subgraphs: Dict[str, onnx.GraphProto] = {}
    new_nodes: List[onnx.NodeProto] = []
    new_inits: List[TensorProto] = []
    for position, node in enumerate(graph.node):
        custom = checked.get(position)
        if custom is None:
            new_nodes.append(node)
            continue
        key = (custom.config, custom.grid, custom.shape)
        if key not in traced:
            group = f"deleaker_decomposition_{len(traced)}/"
            sub = _trace_decomposition(custom.config, custom.grid, custom.shape, work_dir, len(traced))
            for init in sub.initializer:  # shared by every node of the group
                shared = TensorProto()
                shared.CopyFrom(init)
                shared.name = group + init.name
                new_inits.append(shared)
            traced[key], subgraphs[group] = group, sub
        group = traced[key]
        prefix = f"deleaker_node_{position}/"
        new_nodes.extend(
            _splice(subgraphs[group], group, prefix, node, custom.block_offset, custom.num_blocks, new_inits)
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    kept = [opset for opset in model.opset_import if opset.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _splice(
    sub: onnx.GraphProto,
    group: str,
    prefix: str,
    node: onnx.NodeProto,
    block_offset: int,
    num_blocks: int,
    new_inits: List[TensorProto],
) -> List[onnx.NodeProto]:
    """The nodes that compute ``node`` with the traced decomposition ``sub`` (block 0 of a 1-block model)."""
    block_step = prefix + "block_step"
    new_inits.append(numpy_helper.from_array(np.array(num_blocks, dtype=np.int64), prefix + "num_blocks"))
    new_inits.append(numpy_helper.from_array(np.array(block_offset, dtype=np.int64), prefix + "block_offset"))
    step_times_blocks = prefix + "step_times_blocks"
    nodes = [
        helper.make_node("Mul", [node.input[5], prefix + "num_blocks"], [step_times_blocks], name=prefix + "mul"),
        helper.make_node("Add", [step_times_blocks, prefix + "block_offset"], [block_step], name=prefix + "add"),
    ]
    names = dict(zip(NODE_INPUTS, list(node.input[:5]) + [block_step]))
    names.update(zip(NODE_OUTPUTS, node.output))
    names.update({init.name: group + init.name for init in sub.initializer})
    for inner in sub.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        for i, name in enumerate(copy.input):
            if name:
                copy.input[i] = names.get(name, prefix + name)
        for i, name in enumerate(copy.output):
            if name:
                copy.output[i] = names.get(name, prefix + name)
        copy.name = prefix + (inner.name or inner.op_type)
        nodes.append(copy)
    return nodes


def _mark_metadata(model: onnx.ModelProto) -> None:
    """The exporter's metadata, updated: the contract is now float32 and the nodes are decomposed."""
    props = {p.key: p for p in model.metadata_props}
    if META_IO in props:
        io = FluxTransformerIO.from_dict(loads_strict(props[META_IO].value))
        props[META_IO].value = json.dumps(dataclasses.replace(io, dtype="float32").to_dict(), sort_keys=True)
    if META_DECOMPOSED in props:
        props[META_DECOMPOSED].value = "1"
    else:
        model.metadata_props.append(onnx.StringStringEntryProto(key=META_DECOMPOSED, value="1"))
