"""FP8 (E4M3) post-training quantization of the transformer's linear layers: calibration, PyTorch fake quantization
and an ONNX graph pass that inserts Q/DQ nodes, as TensorRT's explicit quantization reads them.

Recipe (as NVIDIA's FLUX FP8 recipe): every ``nn.Linear`` of the transformer is quantized, per tensor, input and
weight, except the embedders (``x_embedder``, ``context_embedder``, ``time_text_embed``), the final norm
(``norm_out``) and the output projection (``proj_out``), which stay in the model's precision; attention itself
(the DeLeakerAttention node) is not quantized. Scales are ``amax / 448`` (448 = largest E4M3 value): activation
amax is the largest ``|input|`` seen over the calibration inputs, weight amax the largest ``|weight|``.

**[decision] Which ONNX MatMul/Gemm is which layer.** The dynamo exporter folds the weight transposes, so a MatMul's
weight initializer is an anonymous ``val_N``. The pass maps nodes to layers through the metadata the exporter
writes on each node (``pkg.torch.onnx.name_scopes``: the module path; ``pkg.torch.onnx.class_hierarchy``: the module
class), and then checks that the node's weight initializer holds exactly that layer's weight (transposed for MatMul):
a mismatch or a missing layer is an error, never a silent skip.

The graph keeps its float dtype; weights become FLOAT8E4M3FN initializers followed by ``DequantizeLinear``, and each
quantized activation passes through ``QuantizeLinear -> DequantizeLinear``. FP8 Q/DQ needs ONNX opset 19; the pass
raises the default-domain opset import from 18 to 19, which changes no operator the exporter emits (opset 19 only
adds types and attributes with backward-compatible defaults).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from deleaker.errors import ConfigError, DeLeakerError
# The recipe's constants are shared with the PyTorch FP8 path (E4M3's largest value, the modules kept in high
# precision); re-exported here, where the engine build and its tests read them.
from deleaker.fp8_linear import E4M3_MAX, HIGH_PRECISION_MODULES, in_high_precision_module  # noqa: F401

#: Default-domain opset the Q/DQ graph needs (FLOAT8E4M3FN QuantizeLinear/DequantizeLinear).
QDQ_OPSET = 19

_LINEAR_CLASS = "torch.nn.modules.linear.Linear"


class QuantizationError(DeLeakerError):
    """The graph or the calibration does not fit the FP8 recipe (missing layers, mismatched weights...)."""


@dataclass(frozen=True)
class LinearScales:
    """Per-tensor E4M3 scales of one linear layer: ``input_scale = input amax / 448``, same for the weight."""

    input_scale: float
    weight_scale: float


def is_high_precision(name: str) -> bool:
    """Whether the linear at module path ``name`` (relative to the transformer) stays unquantized."""
    return in_high_precision_module(name)


def quantizable_linears(transformer: nn.Module) -> Dict[str, nn.Linear]:
    """``{module path: layer}`` of the linears the recipe quantizes, in module order."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and not is_high_precision(name)
    }


def scale_of(amax: float) -> float:
    """``amax / 448``; an all-zero tensor gets the scale of amax 1 (any scale represents zeros exactly)."""
    return (amax if amax > 0 and math.isfinite(amax) else 1.0) / E4M3_MAX


def fake_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """E4M3 quantize-dequantize of ``x`` with a per-tensor ``scale`` (saturating, round to nearest even).

    Matches ONNX ``QuantizeLinear`` (saturate=1) then ``DequantizeLinear`` with a scale of ``x``'s dtype, as ONNX
    Runtime computes them: the scale rounded to ``x``'s dtype, the arithmetic in float32, the result in ``x``'s dtype.
    """
    s = torch.tensor(scale, dtype=x.dtype).float()
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def calibrate(
    transformer: nn.Module, run: Callable[[Dict[str, torch.Tensor]], Any], batches: Iterable[Dict[str, torch.Tensor]]
) -> Dict[str, LinearScales]:
    """Scales of every quantizable linear of ``transformer`` from ``run(batch)`` over ``batches``.

    ``run`` calls the model (e.g. the export wrapper) on one batch of contract inputs; forward pre-hooks on the
    linears record the largest ``|input|``. Raises `QuantizationError` if a linear never ran.
    """
    layers = quantizable_linears(transformer)
    amax = {name: 0.0 for name in layers}
    seen = set()

    def hook(name: str):
        def record(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))
            seen.add(name)

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - seen)
    if missing:
        raise QuantizationError(f"calibration never ran these linears: {missing}")
    return {
        name: LinearScales(scale_of(amax[name]), scale_of(float(layer.weight.detach().abs().max())))
        for name, layer in layers.items()
    }


@contextlib.contextmanager
def fake_quantized(transformer: nn.Module, scales: Mapping[str, LinearScales]) -> Iterator[None]:
    """Within the block, every linear in ``scales`` runs on fake-quantized input and weight (PyTorch reference).

    The weights are restored on exit.
    """
    layers = quantizable_linears(transformer)
    unknown = sorted(set(scales) - set(layers))
    if unknown:
        raise QuantizationError(f"scales given for layers that are not quantizable linears: {unknown}")
    saved = {}
    handles = []
    try:
        for name, s in scales.items():
            layer = layers[name]
            saved[name] = layer.weight.data
            layer.weight.data = fake_quantize(layer.weight.data, s.weight_scale)
            handles.append(
                layer.register_forward_pre_hook(
                    lambda module, args, s=s: (fake_quantize(args[0], s.input_scale),) + tuple(args[1:])
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, weight in saved.items():
            layers[name].weight.data = weight


# ---------------------------------------------------------------------------------------------------------------
# ONNX pass
# ---------------------------------------------------------------------------------------------------------------


def _metadata(node: onnx.NodeProto) -> Dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _linear_path(node: onnx.NodeProto) -> str | None:
    """The module path of the ``nn.Linear`` a MatMul/Gemm node was exported from, from the exporter's metadata."""
    meta = _metadata(node)
    scopes, classes = meta.get("pkg.torch.onnx.name_scopes"), meta.get("pkg.torch.onnx.class_hierarchy")
    if not scopes or not classes:
        return None
    scopes_list, classes_list = _parse_list(scopes), _parse_list(classes)
    if len(classes_list) < 2 or classes_list[-2] != _LINEAR_CLASS or len(scopes_list) < 2:
        return None
    return scopes_list[-2]


def _parse_list(text: str) -> List[str]:
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def linear_nodes(model: onnx.ModelProto, module_prefix: str = "transformer.") -> Dict[str, onnx.NodeProto]:
    """``{linear path relative to the transformer: MatMul/Gemm node}`` from the exporter's node metadata.

    ``module_prefix`` is the transformer's attribute path in the exported module (the export wrapper holds it as
    ``transformer``).
    """
    found: Dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        path = _linear_path(node)
        if path is None or not path.startswith(module_prefix):
            continue
        name = path[len(module_prefix) :]
        if name in found:
            raise QuantizationError(f"two MatMul/Gemm nodes come from linear {name!r}: {found[name].name}, {node.name}")
        found[name] = node
    return found


def _new_name(taken: set, base: str) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def insert_fp8_qdq(
    model: onnx.ModelProto,
    scales: Mapping[str, LinearScales],
    weights: Mapping[str, torch.Tensor],
    *,
    module_prefix: str = "transformer.",
) -> onnx.ModelProto:
    """A copy of ``model`` with E4M3 Q/DQ on the input and weight of every linear in ``scales``.

    Args:
        model: the exported transformer (any float dtype; the Q/DQ scales take the dtype of the tensor quantized).
        scales: `calibrate`'s output, keyed by module path relative to the transformer.
        weights: ``{module path: weight (out, in)}`` of the same layers, used to check each node's initializer
            (``transformer.get_submodule(name).weight`` in the export dtype).
    Raises:
        QuantizationError: a layer in ``scales`` has no node, or its node's weight is not the layer's weight.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nodes = linear_nodes(model, module_prefix)
    missing = sorted(set(scales) - set(nodes))
    if missing:
        raise QuantizationError(
            f"no MatMul/Gemm node carries the metadata of linear(s) {missing}; "
            "export with torch.onnx.export(dynamo=True)"
        )
    inits = {init.name: init for init in graph.initializer}
    consumers: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | set(inits)
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output} | {n.name for n in graph.node}

    new_inits: List[onnx.TensorProto] = []
    inserted: Dict[int, List[onnx.NodeProto]] = {}  # id(node) -> Q/DQ nodes to place right before it
    for name, s in scales.items():
        node = nodes[name]
        weight_name = node.input[1]
        init = inits.get(weight_name)
        if init is None:
            raise QuantizationError(
                f"linear {name!r}: weight input {weight_name!r} of {node.name} is not an initializer"
            )
        stored = numpy_helper.to_array(init)
        expected = weights[name].detach().float().numpy()
        # MatMul holds W.T (the exporter folds the transpose); Gemm holds W when transB=1.
        transposed = node.op_type == "MatMul" or not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if transposed:
            expected = expected.T
        if stored.shape != expected.shape or not np.allclose(stored.astype(np.float32), expected, rtol=0, atol=1e-6):
            raise QuantizationError(f"linear {name!r}: initializer {weight_name!r} of {node.name} is not its weight")
        if consumers.get(weight_name, 0) != 1:
            raise QuantizationError(f"linear {name!r}: weight {weight_name!r} is shared by several nodes")
        float_type = init.data_type

        def scale_init(value: float, base: str, float_type: int = float_type) -> str:
            tensor = helper.make_tensor(_new_name(taken, base), float_type, [], [value])
            new_inits.append(tensor)
            return tensor.name

        zero = helper.make_tensor(_new_name(taken, f"{name}.fp8_zero"), onnx.TensorProto.FLOAT8E4M3FN, [], [0])
        new_inits.append(zero)

        # Weight: stored as E4M3 (quantized exactly as `fake_quantize` does), dequantized in the graph.
        w_scale = scale_init(s.weight_scale, f"{name}.weight_scale")
        weight = weights[name].detach()
        weight = weight.t() if transposed else weight
        w_s = torch.tensor(s.weight_scale, dtype=weight.dtype).float()  # as `fake_quantize`
        q8 = (weight.float() / w_s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
        w_q = helper.make_tensor(
            _new_name(taken, f"{name}.weight_fp8"),
            onnx.TensorProto.FLOAT8E4M3FN,
            list(stored.shape),
            q8.view(torch.uint8).numpy().tobytes(),
            raw=True,
        )
        new_inits.append(w_q)
        w_dq = _new_name(taken, f"{name}.weight_dq")
        nodes_before = [
            helper.make_node(
                "DequantizeLinear", [w_q.name, w_scale, zero.name], [w_dq], name=_new_name(taken, f"{name}/weight_dq")
            )
        ]
        graph.initializer.remove(init)
        node.input[1] = w_dq

        # Activation: Q -> DQ in front of the node.
        x_scale = scale_init(s.input_scale, f"{name}.input_scale")
        x_q, x_dq = _new_name(taken, f"{name}.input_fp8"), _new_name(taken, f"{name}.input_dq")
        nodes_before += [
            helper.make_node(
                "QuantizeLinear", [node.input[0], x_scale, zero.name], [x_q], name=_new_name(taken, f"{name}/input_q")
            ),
            helper.make_node(
                "DequantizeLinear", [x_q, x_scale, zero.name], [x_dq], name=_new_name(taken, f"{name}/input_dq")
            ),
        ]
        node.input[0] = x_dq
        inserted[id(node)] = nodes_before

    ordered = []
    for node in graph.node:
        ordered.extend(inserted.get(id(node), []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QDQ_OPSET:
            opset.version = QDQ_OPSET
    return model


def qdq_summary(model: onnx.ModelProto) -> Dict[str, int]:
    """Counts of QuantizeLinear / DequantizeLinear nodes and FP8 initializers (for manifests and tests)."""
    ops = [n.op_type for n in model.graph.node]
    return {
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
        "fp8_initializers": sum(
            i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) > 0 for i in model.graph.initializer
        ),
    }


def check_fp8_capable(compute_capability: Sequence[int] | None) -> None:
    """Raise `ConfigError` unless the GPU runs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, later)."""
    if compute_capability is None:
        raise ConfigError("FP8 engines need a CUDA GPU with compute capability >= 8.9; no CUDA GPU is visible")
    if tuple(compute_capability) < (8, 9):
        raise ConfigError(
            f"FP8 engines need compute capability >= 8.9 (Ada, Hopper or later); this GPU is "
            f"{'.'.join(map(str, compute_capability))}: build fp16 or bf16 instead"
        )
