"""The ``DeLeakerAttention`` ONNX node: its schema, and the two translations of ``torch.ops.deleaker.attention``.

One joint attention of the transformer exports as either

- one custom node ``deleaker::DeLeakerAttention`` (domain `DOMAIN`, opset version `OPSET_VERSION`), the TensorRT
  plugin's node: inputs ``q, k, v (B, H, N, D)`` float16/bfloat16/float32, ``entity_mask (E_max, T)`` bool,
  ``history (B, E_max, Nimg)`` float32, ``step ()`` int64; outputs ``out`` (like ``q``) and ``history_out``
  (like ``history``); attributes `INT_ATTRIBUTES`, `FLOAT_ATTRIBUTES` and the strings ``plugin_namespace`` /
  ``plugin_version`` that TensorRT's ONNX parser uses to find the plugin (the op type is the plugin name).
  It is deliberately not called ``Attention``, which TensorRT 10.14+ imports natively; or
- its decomposition (``decompose=True``): the same computation from standard ONNX opset-18 operators only
  (for ONNX Runtime, or TensorRT without the plugin). Loops over entity pairs unroll (E_max is static); the
  window and history logic is branch-free (``Where`` on the step input); the morphology is ``MaxPool`` and
  ``-MaxPool(-x)``, whose padding is ignored (as -inf), like the reference's ``max_pool2d``.

Both are plain Python translation functions for ``torch.onnx.export(dynamo=True, custom_translation_table=...)``
(see `translation_table`): the exporter calls them with symbolic values while recording onnxscript calls.

Over 400 lines, one job: the node's schema and its two translations must change together (an attribute added to
the schema is read by both), so they stay in one module; the decomposition is most of it, one short function per
step of the specification.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import numpy as np
import onnx
import onnx.defs
import torch
from onnxscript import opset18 as op
from onnxscript import values as osv

from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError, ShapeError
from deleaker.library import config_from_knobs

from .node_names import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

#: Version of the ``deleaker`` opset the node belongs to.
OPSET_VERSION = 1
#: The standard ONNX opset of exported graphs.
ONNX_OPSET = 18

NODE_INPUTS = ("q", "k", "v", "entity_mask", "history", "step")
NODE_OUTPUTS = ("out", "history_out")

#: Integer attributes: the block's place, the grid, the window knobs and the switches (0/1).
INT_ATTRIBUTES = (
    "block_offset",
    "num_blocks",
    "grid_h",
    "grid_w",
    "start_aggregating_from",
    "stop_aggregating_at",
    "start_intervention_from",
    "stop_intervention_at",
    "use_history",
    "do_smoothing",
    "do_image_image",
    "do_image_text_strengthening",
    "do_image_text_weakening",
)
FLOAT_ATTRIBUTES = ("std_mul_text", "std_mul_image_image", "k_strength")
STRING_ATTRIBUTES = ("plugin_namespace", "plugin_version")

_BOOL_KNOBS = ("use_history", "do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening")
_INT64_MAX = 2**63 - 1


# --- schema ------------------------------------------------------------------------------------------------


@functools.cache
def deleaker_attention_schema() -> onnx.defs.OpSchema:
    """The ``OpSchema`` of ``deleaker::DeLeakerAttention`` (two outputs, typed inputs, all attributes)."""
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    types = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        "DeLeaker joint attention (DELEAKER_SPEC.md): attention with entity leakage mitigation, and the history.",
        inputs=[
            param("q", "T", "(B, H, N, D), text tokens first"),
            param("k", "T", "(B, H, N, D)"),
            param("v", "T", "(B, H, N, D)"),
            param("entity_mask", "M", "(E_max, T) entity text tokens"),
            param("history", "H", "(B, E_max, gh * gw) running mean of entity affinities"),
            param("step", "S", "() denoising step"),
        ],
        outputs=[param("out", "T", "(B, H, N, D)"), param("history_out", "H", "(B, E_max, gh * gw)")],
        type_constraints=[
            ("T", ["tensor(float16)", "tensor(bfloat16)", "tensor(float)"], "attention dtype"),
            ("M", ["tensor(bool)"], "entity mask"),
            ("H", ["tensor(float)"], "history, always float32"),
            ("S", ["tensor(int64)"], "step"),
        ],
        attributes=[attr(name, types.INT, "", required=True) for name in INT_ATTRIBUTES]
        + [attr(name, types.FLOAT, "", required=True) for name in FLOAT_ATTRIBUTES]
        + [attr(name, types.STRING, "", required=True) for name in STRING_ATTRIBUTES],
    )
    return schema


def register_onnx_schema() -> None:
    """Register the schema with ``onnx.defs`` once per process (so ``onnx.checker`` validates the node's attributes).

    Idempotent.
    """
    if not onnx.defs.has(OP_TYPE, DOMAIN):
        onnx.defs.register_schema(deleaker_attention_schema())


@functools.cache
def _custom_op() -> osv.Op:
    return osv.Op(osv.Opset(DOMAIN, OPSET_VERSION), OP_TYPE, deleaker_attention_schema())


# --- attributes <-> config -----------------------------------------------------------------------------------


def node_attributes(*, block_offset: int, num_blocks: int, grid: Tuple[int, int], config: DeLeakerConfig) -> Dict[str, Any]:
    """The node's attributes for one block (bools as 0/1 ints, as ONNX and TensorRT plugin fields want)."""
    attrs: Dict[str, Any] = {
        "block_offset": int(block_offset),
        "num_blocks": int(num_blocks),
        "grid_h": int(grid[0]),
        "grid_w": int(grid[1]),
    }
    for name in INT_ATTRIBUTES[4:]:
        attrs[name] = int(getattr(config, name))
    for name in FLOAT_ATTRIBUTES:
        attrs[name] = float(getattr(config, name))
    attrs["plugin_namespace"] = PLUGIN_NAMESPACE
    attrs["plugin_version"] = PLUGIN_VERSION
    return attrs


def config_from_attributes(attrs: Mapping[str, Any]) -> Tuple[int, int, Tuple[int, int], DeLeakerConfig]:
    """Inverse of `node_attributes`: ``(block_offset, num_blocks, (grid_h, grid_w), config)``.

    Raises `ShapeError` for missing attributes or a grid, block offset or block count out of range, and
    `ConfigError` for knobs that `DeLeakerConfig` refuses (NaN, infinite, negative windows, ...).
    """
    missing = [name for name in INT_ATTRIBUTES + FLOAT_ATTRIBUTES if name not in attrs]
    if missing:
        raise ShapeError(f"{OP_TYPE} node lacks attribute(s) {missing}")
    try:
        knobs: Dict[str, Any] = {name: int(attrs[name]) for name in INT_ATTRIBUTES[4:]}
        # ONNX stores float attributes as float32: take the shortest decimal that rounds to it (1.2f -> 1.2), so a
        # config survives the round trip through the node. NaN and inf stay NaN and inf (refused below).
        knobs.update({name: float(str(np.float32(attrs[name]))) for name in FLOAT_ATTRIBUTES})
        placement = {name: int(attrs[name]) for name in INT_ATTRIBUTES[:4]}
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{OP_TYPE} node has a non-numeric attribute: {exc}") from exc
    for name in _BOOL_KNOBS:
        if knobs[name] not in (0, 1):
            raise ConfigError(f"{OP_TYPE} attribute {name} must be 0 or 1, got {knobs[name]}")
        knobs[name] = bool(knobs[name])
    if placement["num_blocks"] < 1 or not 0 <= placement["block_offset"] < placement["num_blocks"]:
        raise ShapeError(
            f"{OP_TYPE} node has block_offset {placement['block_offset']} and num_blocks {placement['num_blocks']}; "
            "allowed: num_blocks >= 1 and 0 <= block_offset < num_blocks"
        )
    grid = (placement["grid_h"], placement["grid_w"])
    if min(grid) < 1:
        raise ShapeError(f"{OP_TYPE} node has grid {grid[0]}x{grid[1]}; both sides must be >= 1")
    return placement["block_offset"], placement["num_blocks"], grid, DeLeakerConfig(**knobs)


# --- translation 1: the custom node --------------------------------------------------------------------------


def custom_node_translation(
    q,
    k,
    v,
    entity_mask,
    history,
    step,
    block_offset: int,
    num_blocks: int,
    grid_h: int,
    grid_w: int,
    std_mul_text: float,
    std_mul_image_image: float,
    k_strength: float,
    start_aggregating_from: int,
    stop_aggregating_at: int,
    start_intervention_from: int,
    stop_intervention_at: int,
    use_history: bool,
    do_smoothing: bool,
    do_image_image: bool,
    do_image_text_strengthening: bool,
    do_image_text_weakening: bool,
):
    """``torch.ops.deleaker.attention`` -> one ``deleaker::DeLeakerAttention`` node (two outputs)."""
    config = config_from_knobs(
        std_mul_text, std_mul_image_image, k_strength, start_aggregating_from, stop_aggregating_at,
        start_intervention_from, stop_intervention_at, use_history, do_smoothing, do_image_image,
        do_image_text_strengthening, do_image_text_weakening,
    )
    attrs = node_attributes(block_offset=block_offset, num_blocks=num_blocks, grid=(grid_h, grid_w), config=config)
    out, history_out = _custom_op()(q, k, v, entity_mask, history, step, **attrs)
    return out, history_out


# --- translation 2: standard ONNX operators only ---------------------------------------------------------------


def _f(value: float):
    return op.Constant(value_float=float(value))


def _i(values: Sequence[int]):
    return op.Constant(value_ints=[int(x) for x in values])


def _static_dim(value, axis: int, what: str) -> int:
    shape = getattr(value, "shape", None)
    dim = None if shape is None else shape[axis]
    if not isinstance(dim, int):
        raise ShapeError(f"the DeLeaker decomposition needs a static {what}; the exporter gave shape {shape}")
    return dim


def _dilate(x):
    # ONNX MaxPool ignores padded cells (they act as -inf), as torch's max_pool2d: out-of-grid cells never win.
    # MaxPool's schema has an optional second output (indices); the exporter drops it when unused.
    pooled = op.MaxPool(x, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    return pooled[0] if isinstance(pooled, (tuple, list)) else pooled


def _erode(x):
    return op.Neg(_dilate(op.Neg(x)))


def _unit_scaled(x, axes: Sequence[int]):
    """``x / max |x|`` over ``axes`` (x where that is 0), as ``deleaker.ops``: squares of tiny values do not
    underflow float32 (the threshold rule is scale-invariant)."""
    largest = op.ReduceMax(op.Abs(x), _i(axes), keepdims=1)
    return op.Div(x, op.Where(op.Greater(largest, _f(0.0)), largest, _f(1.0)))


def decomposed_translation(
    q,
    k,
    v,
    entity_mask,
    history,
    step,
    block_offset: int,
    num_blocks: int,
    grid_h: int,
    grid_w: int,
    std_mul_text: float,
    std_mul_image_image: float,
    k_strength: float,
    start_aggregating_from: int,
    stop_aggregating_at: int,
    start_intervention_from: int,
    stop_intervention_at: int,
    use_history: bool,
    do_smoothing: bool,
    do_image_image: bool,
    do_image_text_strengthening: bool,
    do_image_text_weakening: bool,
):
    """``torch.ops.deleaker.attention`` -> standard ONNX opset-18 operators (the reference's branch-free path).

    Mirrors ``deleaker.ops._reference`` with a tensor ``block_step``; shapes as in the module docstring.
    """
    config = config_from_knobs(
        std_mul_text, std_mul_image_image, k_strength, start_aggregating_from, stop_aggregating_at,
        start_intervention_from, stop_intervention_at, use_history, do_smoothing, do_image_image,
        do_image_text_strengthening, do_image_text_weakening,
    )
    n_img = grid_h * grid_w
    num_entities = _static_dim(entity_mask, 0, "E_max (entity_mask rows)")
    head_dim = _static_dim(q, 3, "head dim")
    f32 = onnx.TensorProto.FLOAT
    end = [_INT64_MAX]

    # Text tokens are q[:, :, :-Nimg], image tokens q[:, :, -Nimg:]: T itself is never needed.
    def text_part(x, axis: int):
        return op.Slice(x, _i([0]), _i([-n_img]), _i([axis]))

    def image_part(x, axis: int):
        return op.Slice(x, _i([-n_img]), _i(end), _i([axis]))

    qf, kf, vf = (op.Cast(x, to=f32) for x in (q, k, v))

    # Step 1.
    logits = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), _f(1.0 / math.sqrt(head_dim)))
    probs = op.Softmax(logits, axis=-1)

    # Steps 2-3.
    tokens = op.Cast(entity_mask, to=f32)  # (E, T)
    present = op.Greater(op.ReduceSum(tokens, _i([1]), keepdims=0), _f(0.0))  # (E,)
    present_f = op.Unsqueeze(op.Cast(present, to=f32), _i([0, 2]))  # (1, E, 1)
    weights = op.Div(tokens, op.Max(op.ReduceSum(tokens, _i([1]), keepdims=1), _f(1.0)))
    probs_image_rows = image_part(probs, 2)  # (B, H, Nimg, N)
    image_text_probs = op.ReduceMean(text_part(probs_image_rows, 3), _i([1]), keepdims=0)  # (B, Nimg, T)
    # A row-wise product and sum, as deleaker.ops (not a MatMul, which rounds rows by their place in its tiles):
    # equal rows (uniform attention) give exactly equal affinities, hence no mask.
    affinity = op.ReduceSum(
        op.Mul(op.Unsqueeze(image_text_probs, _i([1])), op.Unsqueeze(weights, _i([0, 2]))), _i([3]), keepdims=0
    )  # (B, E, Nimg)

    t = op.Add(op.Mul(op.Reshape(op.Cast(step, to=onnx.TensorProto.INT64), op.Constant(value=onnx.helper.make_tensor("scalar_shape", onnx.TensorProto.INT64, [0], []))), op.Constant(value_int=num_blocks)),
               op.Constant(value_int=block_offset))
    if config.use_history:
        start = op.Constant(value_int=config.start_aggregating_from)
        stop = op.Constant(value_int=config.stop_aggregating_at)
        m = op.Cast(op.Sub(t, start), to=f32)
        m1 = op.Add(m, _f(1.0))
        running = op.Add(op.Mul(history, op.Div(m, m1)), op.Div(affinity, m1))
        aggregating = op.And(op.Greater(t, start), op.Less(t, stop))
        new_history = op.Where(op.Equal(t, start), affinity, op.Where(aggregating, running, history))
        new_history = op.Mul(new_history, present_f)
        source = op.Where(op.Greater(t, start), new_history, affinity)
    else:
        new_history = op.Identity(history)
        source = affinity

    plain = op.MatMul(probs, vf)  # (B, H, N, D)

    # Step 5: entity image masks, unbiased std, strict >.
    # Relative to each map's largest value, as deleaker.ops: a constant map gives no mask.
    shifted = _unit_scaled(op.Sub(source, op.ReduceMax(source, _i([-1]), keepdims=1)), [-1])
    mean = op.ReduceMean(shifted, _i([-1]), keepdims=1)
    centred = op.Sub(shifted, mean)
    std = op.Sqrt(op.Div(op.ReduceSum(op.Mul(centred, centred), _i([-1]), keepdims=1), _f(max(n_img - 1, 1))))
    masks = op.And(op.Greater(shifted, op.Add(mean, op.Mul(_f(config.std_mul_text), std))),
                   op.Cast(present_f, to=onnx.TensorProto.BOOL))
    masks_f = op.Cast(masks, to=f32)  # (B, E, Nimg)
    if config.do_smoothing:
        x = op.Reshape(masks_f, _i([-1, 1, grid_h, grid_w]))
        x = _dilate(_erode(x))  # opening
        x = _erode(_erode(_dilate(_dilate(x))))  # closing, two iterations
        masks_f = op.Cast(op.Greater(op.Reshape(x, op.Shape(source)), _f(0.5)), to=f32)

    # Step 6.
    image_logits = image_part(logits, 2)  # (B, H, Nimg, N)
    image_text = text_part(image_logits, 3)  # (B, H, Nimg, T)
    image_image = image_part(image_logits, 3)  # (B, H, Nimg, Nimg)
    masks_t = op.Transpose(masks_f, perm=[0, 2, 1])  # (B, Nimg, E)
    others = op.Cast(op.Greater(op.Sub(op.ReduceSum(tokens, _i([0]), keepdims=1), tokens), _f(0.0)), to=f32)
    neg_inf = _f(-math.inf)
    if config.do_image_text_strengthening:
        strengthen = op.Unsqueeze(op.Greater(op.MatMul(masks_t, tokens), _f(0.0)), _i([1]))
        image_text = op.Where(strengthen, op.Mul(image_text, _f(config.k_strength)), image_text)
    if config.do_image_text_weakening:
        weaken = op.Unsqueeze(op.Greater(op.MatMul(masks_t, others), _f(0.0)), _i([1]))
        image_text = op.Where(weaken, neg_inf, image_text)
    if config.do_image_image:
        pbar = op.ReduceMean(image_part(probs_image_rows, 3), _i([1]), keepdims=0)  # (B, Nimg, Nimg)
        cut = None
        for e in range(num_entities):
            rows = op.Unsqueeze(op.Gather(masks_f, op.Constant(value_int=e), axis=1), _i([2]))  # (B, Nimg, 1)
            for f in range(num_entities):
                if e == f:
                    continue
                cols = op.Unsqueeze(op.Gather(masks_f, op.Constant(value_int=f), axis=1), _i([1]))  # (B, 1, Nimg)
                region = op.Mul(rows, cols)
                count = op.ReduceSum(region, _i([1, 2]), keepdims=1)
                # Relative to the region's largest value (pbar >= 0), as deleaker.ops.
                largest = op.ReduceMax(op.Mul(pbar, region), _i([1, 2]), keepdims=1)
                shifted = _unit_scaled(op.Mul(op.Sub(pbar, largest), region), [1, 2])
                region_mean = op.Div(op.ReduceSum(shifted, _i([1, 2]), keepdims=1), op.Max(count, _f(1.0)))
                dev = op.Mul(op.Sub(shifted, region_mean), region)
                var = op.Div(op.ReduceSum(op.Mul(dev, dev), _i([1, 2]), keepdims=1),
                             op.Max(op.Sub(count, _f(1.0)), _f(1.0)))
                threshold = op.Add(region_mean, op.Mul(_f(config.std_mul_image_image), op.Sqrt(var)))
                pair_cut = op.And(
                    op.And(op.Greater(region, _f(0.0)), op.Greater(shifted, threshold)),
                    op.GreaterOrEqual(count, _f(2.0)),
                )
                cut = pair_cut if cut is None else op.Or(cut, pair_cut)
        if cut is not None:
            image_image = op.Where(op.Unsqueeze(cut, _i([1])), neg_inf, image_image)

    # Step 7, then the window (branch-free on the step input).
    edited_image_out = op.MatMul(op.Softmax(op.Concat(image_text, image_image, axis=3), axis=-1), vf)
    edited = op.Concat(text_part(plain, 2), edited_image_out, axis=2)
    inside = op.And(
        op.GreaterOrEqual(t, op.Constant(value_int=config.start_intervention_from)),
        op.LessOrEqual(t, op.Constant(value_int=config.stop_intervention_at)),
    )
    out = op.CastLike(op.Where(inside, edited, plain), q)
    return out, new_history


def translation_table(decompose: bool = False) -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: the custom node, or its decomposition."""
    import deleaker.library  # noqa: F401  (registers torch.ops.deleaker.attention)

    fn = decomposed_translation if decompose else custom_node_translation
    return {torch.ops.deleaker.attention.default: fn}
