"""DeLeaker attention as a TensorRT ``IPluginV3`` (core, build and runtime capabilities) and its creator.

The plugin is registered as op type ``DeLeakerAttention``, version ``1``, namespace ``deleaker``: TensorRT's ONNX
parser finds it for the exporter's ``DeLeakerAttention`` node and hands the node's attributes (all but
``plugin_namespace`` / ``plugin_version``) to the creator as plugin fields.

Two layers, so that nearly everything is testable without TensorRT or a GPU:

- pure Python (always importable, no TensorRT): the field codec (`PluginFields`, `encode_fields`, `decode_fields`),
  the format truth table (`supports_format`), output dtypes/shapes (`output_dtypes`, `output_shapes`), the shape
  checks (`check_io_shapes`) and the kernel launch boundary (`_launch_from_descs`, which imports the CUDA host
  layer ``deleaker.plugins.kernels`` lazily);
- a thin TensorRT adapter (`plugin_classes(trt)`, `register_plugin`) that only converts TensorRT's types
  (``DataType``, ``PluginTensorDesc``, ``PluginField``, ``DimsExprs``) to and from the pure layer. It works with
  ``tensorrt`` and with ``tensorrt_rtx`` (same Python API), passed in as a module, never imported at import time.

Node / plugin I/O (positions as TensorRT numbers them: inputs, then outputs)::

    0 q            (B, H, N, D)     float16 | bfloat16   N = T + grid_h * grid_w, text tokens first
    1 k            (B, H, N, D)     same dtype as q
    2 v            (B, H, N, D)     same dtype as q
    3 entity_mask  (E_max, T)       bool (one byte per cell, the kernels' ABI)
    4 history      (B, E_max, Nimg) float32
    5 step         () or (1,)       int64 (denoising step; the kernels read it on the device)
    6 out          (B, H, N, D)     same dtype as q
    7 history_out  (B, E_max, Nimg) float32

The mask and step dtypes are the exporter's (`deleaker.export.contract.NODE_ENTITY_MASK_DTYPE`, `NODE_STEP_DTYPE`):
the graph's int32 inputs are cast to them before the node.

Not checkable here (no GPU, and TensorRT-RTX's Python API aborts on a Python plugin right after creating it):
``get_output_shapes`` with a real ``IExprBuilder``, ``enqueue`` called by TensorRT, and whether TensorRT's builder
accepts the plugin. ``on_shape_change`` and ``enqueue`` called directly with TensorRT's real descriptor types do
run, on the CPU emulation of the kernels (``tests/test_kernels_emulated.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError, DeLeakerError, ShapeError
from deleaker.export.contract import NODE_ENTITY_MASK_DTYPE, NODE_STEP_DTYPE

PLUGIN_NAME = "DeLeakerAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "deleaker"

INPUT_NAMES = ("q", "k", "v", "entity_mask", "history", "step")
OUTPUT_NAMES = ("out", "history_out")
NUM_INPUTS = len(INPUT_NAMES)
NUM_OUTPUTS = len(OUTPUT_NAMES)

#: dtypes of the attention tensors (q, k, v, out); all four share one.
ATTENTION_DTYPES = ("float16", "bfloat16")
#: dtype of the entity mask and of the step, as the exporter casts them before the node (one source of truth).
MASK_DTYPES = (NODE_ENTITY_MASK_DTYPE,)
STEP_DTYPES = (NODE_STEP_DTYPE,)
#: history in and out.
HISTORY_DTYPE = "float32"
#: The only memory layout the kernels read: dense row-major.
LINEAR = "LINEAR"

#: Node attributes TensorRT's parser consumes to find the plugin; they are not plugin fields.
LOOKUP_ATTRIBUTES = ("plugin_namespace", "plugin_version")

#: Fields of the plugin besides the 12 DeLeakerConfig knobs: the block's place in a step and the latent grid.
PLACEMENT_FIELDS = ("block_offset", "num_blocks", "grid_h", "grid_w")


class TensorRTUnavailableError(DeLeakerError, ImportError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported."""


class PluginFieldError(ConfigError):
    """Plugin fields (ONNX node attributes) are missing, unknown or of the wrong kind."""


# ---------------------------------------------------------------------------------------------------------------
# Field codec (pure Python)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One plugin field: its name and kind. ``kind`` is "int", "float" or "bool" (ONNX INT, FLOAT, INT)."""

    name: str
    kind: str

    @property
    def onnx_attribute_type(self) -> str:
        """The ONNX ``AttributeProto`` type the exporter writes (bools are ints: ONNX has no bool attribute)."""
        return "FLOAT" if self.kind == "float" else "INT"

    @property
    def plugin_field_type(self) -> str:
        """The ``PluginFieldType`` member TensorRT's ONNX parser makes of that attribute (INT -> INT32)."""
        return "FLOAT32" if self.kind == "float" else "INT32"


def _config_kind(field: dataclasses.Field) -> str:
    kind = {"bool": "bool", "int": "int", "float": "float"}.get(str(field.type))
    if kind is None:  # pragma: no cover - DeLeakerConfig only has these three
        raise TypeError(f"unsupported DeLeakerConfig field type {field.type!r}")
    return kind


#: Every field, in the order the plugin serializes them.
FIELD_SPECS: Tuple[FieldSpec, ...] = tuple(FieldSpec(name, "int") for name in PLACEMENT_FIELDS) + tuple(
    FieldSpec(f.name, _config_kind(f)) for f in dataclasses.fields(DeLeakerConfig)
)
_SPECS_BY_NAME = {spec.name: spec for spec in FIELD_SPECS}


@dataclass(frozen=True)
class PluginFields:
    """What one DeLeakerAttention node carries: the block's place, the latent grid and the knobs."""

    block_offset: int
    num_blocks: int
    grid_h: int
    grid_w: int
    config: DeLeakerConfig

    def __post_init__(self) -> None:
        for name in PLACEMENT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PluginFieldError(f"plugin field {name} must be an int, got {value!r}")
        if self.num_blocks < 1:
            raise PluginFieldError(f"plugin field num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 <= self.block_offset < self.num_blocks:
            raise PluginFieldError(
                f"plugin field block_offset must be in [0, num_blocks={self.num_blocks}), got {self.block_offset}"
            )
        if self.grid_h < 1 or self.grid_w < 1:
            raise PluginFieldError(f"plugin fields grid_h, grid_w must be >= 1, got {self.grid_h}, {self.grid_w}")

    @property
    def num_image_tokens(self) -> int:
        return self.grid_h * self.grid_w

    def as_attributes(self) -> dict:
        """Every field by name, as plain Python values (the ONNX node's attributes, less the lookup ones)."""
        values = {name: getattr(self, name) for name in PLACEMENT_FIELDS}
        values.update(dataclasses.asdict(self.config))
        return values


def encode_fields(fields: PluginFields) -> list:
    """``[(name, value array, PluginFieldType name)]`` for every field, in `FIELD_SPECS` order.

    Ints and bools are 1-element int32 arrays, floats 1-element float32 arrays: exactly what TensorRT's ONNX
    parser produces from the node's INT / FLOAT attributes, so a plugin built from the parser and one
    deserialized from an engine decode the same way.
    """
    values = fields.as_attributes()
    encoded = []
    for spec in FIELD_SPECS:
        value = values[spec.name]
        if spec.kind == "float":
            array = np.array([value], dtype=np.float32)
        else:
            if not -(2**31) <= int(value) < 2**31:
                raise PluginFieldError(f"plugin field {spec.name}={value} does not fit an int32")
            array = np.array([int(value)], dtype=np.int32)
        encoded.append((spec.name, array, spec.plugin_field_type))
    return encoded


def _scalar(name: str, data: Any) -> Any:
    array = np.asarray(data).reshape(-1)
    if array.size != 1:
        raise PluginFieldError(f"plugin field {name} must hold one value, got {array.size}")
    return array[0].item()  # a plain Python number, so that messages read "2", not "np.int32(2)"


def _text(data: Any) -> str:
    if isinstance(data, str):
        return data
    raw = np.asarray(data).astype(np.uint8).tobytes() if not isinstance(data, (bytes, bytearray)) else bytes(data)
    return raw.split(b"\0", 1)[0].decode("utf-8")


def decode_fields(items: Iterable[Tuple[str, Any]] | Mapping[str, Any]) -> PluginFields:
    """`PluginFields` from ``(name, data)`` pairs (TensorRT's fields, `encode_fields`' output or ONNX attributes).

    ``data`` is a scalar or a 1-element array. Lookup attributes (``plugin_namespace``, ``plugin_version``) are
    checked if present and otherwise ignored. Raises `PluginFieldError` naming every missing or unknown field, a
    non-integral int, or a bool that is not 0/1.
    """
    pairs = list(items.items()) if isinstance(items, Mapping) else [tuple(item[:2]) for item in items]
    raw: dict = {}
    unknown = []
    for name, data in pairs:
        if name in LOOKUP_ATTRIBUTES:
            expected = PLUGIN_NAMESPACE if name == "plugin_namespace" else PLUGIN_VERSION
            if _text(data) != expected:
                raise PluginFieldError(f"{name} must be {expected!r}, got {_text(data)!r}")
            continue
        if name not in _SPECS_BY_NAME:
            unknown.append(name)
            continue
        raw[name] = _scalar(name, data)
    missing = [spec.name for spec in FIELD_SPECS if spec.name not in raw]
    if unknown or missing:
        raise PluginFieldError(
            f"{PLUGIN_NAME} fields: missing {missing}, unknown {sorted(unknown)}; "
            f"expected exactly {[spec.name for spec in FIELD_SPECS]}"
        )
    values = {}
    for spec in FIELD_SPECS:
        value = raw[spec.name]
        if spec.kind == "float":
            # Fields are float32: take the shortest decimal that names that float32 (1.3, not 1.2999999523), so a
            # knob survives encode -> decode unchanged whenever it is representable at float32's precision.
            values[spec.name] = float(str(np.float32(value)))
            continue
        as_float = float(value)
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise PluginFieldError(f"plugin field {spec.name} must be an integer, got {value!r}")
        if spec.kind == "bool":
            if int(as_float) not in (0, 1):
                raise PluginFieldError(f"plugin field {spec.name} is a flag and must be 0 or 1, got {value!r}")
            values[spec.name] = bool(int(as_float))
        else:
            values[spec.name] = int(as_float)
    placement = {name: values.pop(name) for name in PLACEMENT_FIELDS}
    try:
        config = DeLeakerConfig(**values)
    except ConfigError as err:
        raise PluginFieldError(f"{PLUGIN_NAME} fields: {err}") from err
    return PluginFields(config=config, **placement)


# ---------------------------------------------------------------------------------------------------------------
# Formats, dtypes, shapes (pure Python)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorDesc:
    """A tensor as the plugin sees it: dtype name ("float16", "int32", ...), format name and dims (-1: dynamic)."""

    dtype: str
    shape: Tuple[int, ...] = ()
    format: str = LINEAR


def supports_format(pos: int, in_out: Sequence[TensorDesc], num_inputs: int = NUM_INPUTS) -> bool:
    """TensorRT's ``supports_format_combination``: may tensor ``pos`` have ``in_out[pos]``'s dtype and format?

    Only ``in_out[:pos + 1]`` is meaningful (TensorRT asks position by position); later positions are compared with
    ``in_out[0]`` (q), whose dtype every attention tensor shares.
    """
    if num_inputs != NUM_INPUTS or not 0 <= pos < NUM_INPUTS + NUM_OUTPUTS or pos >= len(in_out):
        return False
    desc = in_out[pos]
    if desc.format != LINEAR:
        return False
    name = (INPUT_NAMES + OUTPUT_NAMES)[pos]
    if name == "q":
        return desc.dtype in ATTENTION_DTYPES
    if name in ("k", "v", "out"):
        return desc.dtype == in_out[0].dtype and desc.dtype in ATTENTION_DTYPES
    if name == "entity_mask":
        return desc.dtype in MASK_DTYPES
    if name == "step":
        return desc.dtype in STEP_DTYPES
    return desc.dtype == HISTORY_DTYPE  # history, history_out


def output_dtypes(input_dtypes: Sequence[str]) -> list:
    """``[out dtype, history_out dtype]``: out has q's dtype, the history stays float32."""
    if len(input_dtypes) != NUM_INPUTS:
        raise ShapeError(f"{PLUGIN_NAME} takes {NUM_INPUTS} inputs {INPUT_NAMES}, got {len(input_dtypes)}")
    if input_dtypes[0] not in ATTENTION_DTYPES:
        raise ShapeError(f"{PLUGIN_NAME}: q must be one of {ATTENTION_DTYPES}, got {input_dtypes[0]}")
    return [input_dtypes[0], HISTORY_DTYPE]


def output_shapes(input_shapes: Sequence[Sequence[Any]]) -> list:
    """``[out shape, history_out shape]``: out is shaped as q, history_out as history (dims may be symbolic)."""
    if len(input_shapes) != NUM_INPUTS:
        raise ShapeError(f"{PLUGIN_NAME} takes {NUM_INPUTS} inputs {INPUT_NAMES}, got {len(input_shapes)}")
    return [list(input_shapes[0]), list(input_shapes[4])]


def check_io_shapes(shapes: Sequence[Sequence[int]], fields: PluginFields) -> None:
    """Check the 6 input shapes against each other and the fields; -1 (dynamic) dims are skipped.

    Raises `ShapeError` naming the tensor and the expected shape.
    """
    if len(shapes) < NUM_INPUTS:
        raise ShapeError(f"{PLUGIN_NAME} takes {NUM_INPUTS} inputs {INPUT_NAMES}, got {len(shapes)}")
    q, k, v, mask, history, step = (tuple(int(d) for d in s) for s in shapes[:NUM_INPUTS])
    for name, shape in (("q", q), ("k", k), ("v", v)):
        if len(shape) != 4:
            raise ShapeError(f"{PLUGIN_NAME}: {name} must be (B, H, N, D), got {shape}")
    if len(mask) != 2:
        raise ShapeError(f"{PLUGIN_NAME}: entity_mask must be (E_max, T), got {mask}")
    if len(history) != 3:
        raise ShapeError(f"{PLUGIN_NAME}: history must be (B, E_max, Nimg), got {history}")
    if len(step) > 1 or (len(step) == 1 and step[0] not in (1, -1)):
        raise ShapeError(f"{PLUGIN_NAME}: step must be a scalar or (1,), got {step}")

    def same(name: str, got: int, expected: int, what: str) -> None:
        if got >= 0 and expected >= 0 and got != expected:
            raise ShapeError(f"{PLUGIN_NAME}: {name} has {what} {got}, expected {expected}")

    for name, shape in (("k", k), ("v", v)):
        for axis, what in enumerate(("batch", "heads", "tokens", "head dim")):
            same(name, shape[axis], q[axis], what)
    e_max, text_len = mask
    nimg = fields.num_image_tokens
    if text_len >= 0:
        same("q", q[2], text_len + nimg, f"tokens (T={text_len} + grid {fields.grid_h}x{fields.grid_w})")
    same("history", history[0], q[0], "batch")
    same("history", history[1], e_max, "entities")
    same("history", history[2], nimg, f"image tokens (grid {fields.grid_h}x{fields.grid_w})")


# ---------------------------------------------------------------------------------------------------------------
# Kernel boundary (lazy CUDA host layer)
# ---------------------------------------------------------------------------------------------------------------


def _kernels() -> ModuleType:
    """The CUDA host layer (ctypes); imported on first use. Its library is compiled/loaded only for sizes/launches."""
    return importlib.import_module("deleaker.plugins.kernels")


_KERNEL_DTYPES = {"float16": 0, "bfloat16": 1}  # DELEAKER_DTYPE_* of csrc/deleaker_params.h


def params_from_descs(
    input_descs: Sequence[TensorDesc], inputs: Sequence[int], outputs: Sequence[int], fields: PluginFields
) -> Any:
    """The kernels' ``DeLeakerParams`` for dense (LINEAR) tensors at the given device addresses.

    ``inputs`` / ``outputs`` are device addresses in `INPUT_NAMES` / `OUTPUT_NAMES` order (0 for a size-only
    query). The step stays on the device: the kernels compute ``t = (*step) * num_blocks + block_offset`` there,
    so the engine (and a CUDA graph of it) needs no host synchronisation per call.
    """
    kernels = _kernels()
    check_io_shapes([d.shape for d in input_descs], fields)
    batch, heads, tokens, head_dim = (int(x) for x in input_descs[0].shape)
    num_entities, text_tokens = (int(x) for x in input_descs[3].shape)
    if num_entities > kernels.MAX_ENTITIES:
        raise ShapeError(
            f"{PLUGIN_NAME}: the kernels take at most {kernels.MAX_ENTITIES} entity rows, got {num_entities}"
        )
    dtype = input_descs[0].dtype
    if dtype not in _KERNEL_DTYPES:
        raise ShapeError(f"{PLUGIN_NAME}: q must be one of {ATTENTION_DTYPES}, got {dtype}")
    # LINEAR (B, H, N, D): strides in elements.
    strides = {"batch_stride": heads * tokens * head_dim, "head_stride": tokens * head_dim, "row_stride": head_dim}
    config = fields.config
    return kernels.DeLeakerParams(
        q=inputs[0] or None,
        k=inputs[1] or None,
        v=inputs[2] or None,
        out=outputs[0] or None,
        entity_mask=inputs[3] or None,
        history_in=inputs[4] or None,
        history_out=outputs[1] or None,
        step=inputs[5] or None,
        **{f"{t}_{name}": value for t in ("q", "k", "v", "o") for name, value in strides.items()},
        batch=batch,
        heads=heads,
        tokens=tokens,
        text_tokens=text_tokens,
        head_dim=head_dim,
        grid_h=fields.grid_h,
        grid_w=fields.grid_w,
        num_entities=num_entities,
        dtype=_KERNEL_DTYPES[dtype],
        block_offset=fields.block_offset,
        num_blocks=fields.num_blocks,
        softmax_scale=1.0 / math.sqrt(head_dim),
        **kernels.config_fields(config),
        reserved=0,
    )


def workspace_size(input_descs: Sequence[TensorDesc], fields: PluginFields, library: Any = None) -> int:
    """Bytes of device workspace for the shapes in ``input_descs`` (the kernel library's own arithmetic)."""
    params = params_from_descs(input_descs, [0] * NUM_INPUTS, [0] * NUM_OUTPUTS, fields)
    return int((library or _kernels().load_library()).workspace_bytes(params))


def _launch_from_descs(
    input_descs: Sequence[TensorDesc],
    output_descs: Sequence[TensorDesc],
    inputs: Sequence[int],
    outputs: Sequence[int],
    workspace: int,
    stream: int,
    fields: PluginFields,
    workspace_bytes: Optional[int] = None,
    library: Any = None,
) -> None:
    """Run one DeLeaker attention call on device pointers: the only place the plugin reaches the kernels.

    ``workspace`` is a device address of at least `workspace_size` bytes; ``stream`` a ``cudaStream_t`` as an int;
    ``library`` a `deleaker.plugins.kernels.KernelLibrary` (None: the default build).
    """
    params = params_from_descs(input_descs, inputs, outputs, fields)
    library = library or _kernels().load_library()
    size = int(library.workspace_bytes(params)) if workspace_bytes is None else workspace_bytes
    library.launch(params, workspace, size, stream)


# ---------------------------------------------------------------------------------------------------------------
# TensorRT adapter
# ---------------------------------------------------------------------------------------------------------------


def import_tensorrt() -> ModuleType:
    """``tensorrt`` if importable, else ``tensorrt_rtx`` (same Python API); raises `TensorRTUnavailableError`."""
    errors = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = importlib.import_module(name)
        except Exception as err:  # the PyPI ``tensorrt`` stub raises at import time, not only ImportError
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if hasattr(module, "Builder"):
            return module
        errors.append(f"{name}: imported but has no Builder (an unbuilt stub package?)")
    raise TensorRTUnavailableError(
        "TensorRT's Python package is not importable (" + "; ".join(errors) + "). Install TensorRT >= 10.8 for your "
        "CUDA version (`pip install tensorrt-cu12` from NVIDIA's index, or the wheel of a TensorRT tarball)."
    )


def import_plugin_capable_tensorrt() -> ModuleType:
    """`import_tensorrt`, refusing TensorRT-RTX: its Python API cannot host the DeLeaker plugin (a Python
    IPluginV3), so it can neither build nor run our networks. Raises `TensorRTUnavailableError`."""
    trt = import_tensorrt()
    if trt.__name__ == "tensorrt_rtx":
        raise TensorRTUnavailableError(
            "only TensorRT-RTX is installed; its Python API cannot host the DeLeaker plugin (a Python IPluginV3), "
            "so it cannot build or run these networks. Install TensorRT >= 10.8 (`pip install tensorrt-cu12`)."
        )
    return trt


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}


def dtype_name(trt_dtype: Any) -> str:
    """Our dtype name for a ``trt.DataType`` (FLOAT -> "float32", HALF -> "float16", ...)."""
    name = trt_dtype.name
    return _DTYPE_NAMES.get(name, name.lower())


def trt_dtype(trt: ModuleType, name: str) -> Any:
    """The ``trt.DataType`` of our dtype name."""
    for trt_name, ours in _DTYPE_NAMES.items():
        if ours == name:
            return getattr(trt.DataType, trt_name)
    return getattr(trt.DataType, name.upper())


def tensor_desc(trt_desc: Any) -> TensorDesc:
    """A `TensorDesc` of a ``trt.PluginTensorDesc`` (or of a ``DynamicPluginTensorDesc``: its ``max`` dims)."""
    if hasattr(trt_desc, "desc"):
        inner = trt_desc.desc
        return TensorDesc(dtype_name(inner.type), tuple(int(d) for d in trt_desc.max), inner.format.name)
    return TensorDesc(dtype_name(trt_desc.type), tuple(int(d) for d in trt_desc.dims), trt_desc.format.name)


def field_collection(trt: ModuleType, fields: PluginFields, buffers: list) -> Any:
    """A ``trt.PluginFieldCollection`` of `encode_fields` (what the plugin serializes).

    ``trt.PluginField`` points into its numpy array without owning it: the arrays are appended to ``buffers``,
    which the caller must keep alive as long as the collection (TensorRT reads them after the call returns).
    """
    encoded = encode_fields(fields)
    buffers.extend(array for _, array, _ in encoded)
    return trt.PluginFieldCollection(
        [trt.PluginField(name, array, getattr(trt.PluginFieldType, kind)) for name, array, kind in encoded]
    )


def fields_from_collection(collection: Iterable[Any]) -> PluginFields:
    """`PluginFields` of a ``trt.PluginFieldCollection`` (from the ONNX parser or a deserialized engine)."""
    return decode_fields([(f.name, f.data) for f in collection])


@functools.cache
def plugin_classes(trt: ModuleType) -> Tuple[type, type]:
    """``(DeLeakerAttentionPlugin, DeLeakerAttentionCreator)`` built on the given TensorRT module's base classes.

    Defined per module so that this file imports without TensorRT and works with ``tensorrt`` or ``tensorrt_rtx``.
    Every method converts TensorRT's types and calls the pure functions above.
    """

    class DeLeakerAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, fields: PluginFields) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = NUM_OUTPUTS
            self.fields = fields
            self._workspace_bytes: Optional[int] = None
            # The kernel library it launches: None is the default build; the tests set the CPU emulation's.
            self.kernel_library: Any = None

        # --- core ---
        def get_capability_interface(self, capability_type: Any) -> Any:
            return self

        def clone(self) -> "DeLeakerAttentionPlugin":
            twin = DeLeakerAttentionPlugin(self.fields)
            twin._workspace_bytes = self._workspace_bytes
            twin.kernel_library = self.kernel_library
            return twin

        # --- build ---
        def get_output_data_types(self, input_types: Sequence[Any]) -> list:
            names = output_dtypes([dtype_name(t) for t in input_types])
            return [trt_dtype(trt, n) for n in names]

        def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any], expr_builder: Any) -> list:
            # out is shaped as q and history_out as history: copies of the input expressions, no arithmetic.
            exprs = [[dims[i] for i in range(len(dims))] for dims in inputs]
            return [trt.DimsExprs(shape) for shape in output_shapes(exprs)]

        def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
            descs = [tensor_desc(d) for d in in_out[: pos + 1]]
            return supports_format(pos, descs, num_inputs)

        def configure_plugin(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            check_io_shapes([tensor_desc(d).shape for d in inputs], self.fields)

        def get_workspace_size(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
            return workspace_size([tensor_desc(d) for d in inputs], self.fields, self.kernel_library)

        def get_valid_tactics(self) -> list:
            return []

        # --- runtime ---
        def on_shape_change(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
            descs = [tensor_desc(d) for d in inputs]
            check_io_shapes([d.shape for d in descs], self.fields)
            self._workspace_bytes = workspace_size(descs, self.fields, self.kernel_library)

        def set_tactic(self, tactic: int) -> None:
            pass

        def attach_to_context(self, context: Any) -> "DeLeakerAttentionPlugin":
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            self._field_buffers: list = []  # owns the arrays the returned fields point into
            return field_collection(trt, self.fields, self._field_buffers)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            _launch_from_descs(
                [tensor_desc(d) for d in input_desc],
                [tensor_desc(d) for d in output_desc],
                [int(p) for p in inputs],
                [int(p) for p in outputs],
                int(workspace),
                int(stream),
                self.fields,
                self._workspace_bytes,
                self.kernel_library,
            )

    class DeLeakerAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            # Empty arrays: the fields only declare names and types. Kept on self (PluginField does not own them).
            self._field_buffers = [
                np.array([], dtype=np.float32 if spec.kind == "float" else np.int32) for spec in FIELD_SPECS
            ]
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField(spec.name, buffer, getattr(trt.PluginFieldType, spec.plugin_field_type))
                    for spec, buffer in zip(FIELD_SPECS, self._field_buffers, strict=True)
                ]
            )

        def create_plugin(self, name: str, field_collection: Any, phase: Any) -> DeLeakerAttentionPlugin:
            return DeLeakerAttentionPlugin(fields_from_collection(field_collection))

    return DeLeakerAttentionPlugin, DeLeakerAttentionCreator


def register_plugin(trt: Optional[ModuleType] = None) -> Any:
    """Register the creator in TensorRT's global plugin registry (idempotent); returns the registered creator.

    ``trt`` defaults to `import_tensorrt`. TensorRT's registry is process-global by design; registering twice is a
    no-op here.
    """
    trt = trt or import_tensorrt()
    registry = trt.get_plugin_registry()
    existing = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if existing is not None:
        return existing
    _, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise DeLeakerError(f"TensorRT refused to register plugin {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION}")
    # TensorRT keeps a raw pointer to the Python creator: it must outlive the registration.
    _KEEP_ALIVE.append(creator)
    return creator


# Python creators registered with TensorRT (the registry does not own them). Append-only, never read.
_KEEP_ALIVE: list = []
