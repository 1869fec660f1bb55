"""The TensorRT plugin: field codec, format truth table, shapes and kernel params (pure Python, always run), and
the adapter against TensorRT's real Python types (``tensorrt`` or ``tensorrt_rtx``; skipped when neither imports).

TensorRT cannot execute here (no GPU); nothing below claims an engine result. The parser test runs TensorRT's
real ONNX parser on a DeLeakerAttention node and checks the fields it hands to our creator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper

from deleaker.config import DeLeakerConfig
from deleaker.errors import ShapeError
from deleaker.export import onnx_node
from deleaker.plugins import trt_plugin as tp
from deleaker.plugins.trt_plugin import PluginFieldError, PluginFields, TensorDesc

ODD_CONFIG = DeLeakerConfig(
    std_mul_text=0.75,
    std_mul_image_image=1.5,
    k_strength=1.3,
    start_aggregating_from=3,
    stop_aggregating_at=40,
    start_intervention_from=5,
    stop_intervention_at=77,
    use_history=False,
    do_smoothing=True,
    do_image_image=False,
    do_image_text_strengthening=True,
    do_image_text_weakening=False,
)
FIELDS = PluginFields(block_offset=3, num_blocks=4, grid_h=8, grid_w=6, config=ODD_CONFIG)


def _descs(dtype="float16", b=2, h=3, t=16, gh=8, gw=6, d=16, e=4, mask="bool", step="int64"):
    n = t + gh * gw
    return [
        TensorDesc(dtype, (b, h, n, d)),
        TensorDesc(dtype, (b, h, n, d)),
        TensorDesc(dtype, (b, h, n, d)),
        TensorDesc(mask, (e, t)),
        TensorDesc("float32", (b, e, gh * gw)),
        TensorDesc(step, ()),
    ]


# --- field codec vs the exporter's node attributes ------------------------------------------------------------


def test_fields_are_exactly_the_exporters_node_attributes_with_matching_types():
    attrs = onnx_node.node_attributes(block_offset=3, num_blocks=4, grid=(8, 6), config=ODD_CONFIG)
    node = helper.make_node(onnx_node.OP_TYPE, ["q"], ["o"], domain=onnx_node.DOMAIN, **attrs)
    onnx_types = {a.name: onnx.AttributeProto.AttributeType.Name(a.type) for a in node.attribute}
    assert {s.name for s in tp.FIELD_SPECS} == set(onnx_types) - set(tp.LOOKUP_ATTRIBUTES)
    for spec in tp.FIELD_SPECS:
        assert spec.onnx_attribute_type == onnx_types[spec.name], spec.name
    assert onnx_types["plugin_namespace"] == onnx_types["plugin_version"] == "STRING"
    assert (attrs["plugin_namespace"], attrs["plugin_version"]) == (tp.PLUGIN_NAMESPACE, tp.PLUGIN_VERSION)
    assert (onnx_node.OP_TYPE, onnx_node.DOMAIN) == (tp.PLUGIN_NAME, tp.PLUGIN_NAMESPACE)
    # The node's attribute values decode to the block's fields (lookup attributes are checked, then dropped).
    assert tp.decode_fields(attrs) == FIELDS


def test_plugin_io_dtypes_are_the_exporters_node_dtypes():
    schema = onnx_node.deleaker_attention_schema()
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    by_input = {p.name: allowed[p.type_str] for p in schema.inputs}
    assert by_input["entity_mask"] == {f"tensor({tp.MASK_DTYPES[0]})"}
    assert by_input["step"] == {f"tensor({tp.STEP_DTYPES[0]})"}
    assert by_input["history"] == {"tensor(float)"}  # float32
    assert {"tensor(float16)", "tensor(bfloat16)"} <= by_input["q"]
    assert tuple(p.name for p in schema.inputs) == tp.INPUT_NAMES[:3] + tp.INPUT_NAMES[3:]
    assert tuple(p.name for p in schema.outputs) == tp.OUTPUT_NAMES


@pytest.mark.parametrize("config", [DeLeakerConfig(), ODD_CONFIG, DeLeakerConfig.for_model(4, k_strength=0.9)])
def test_encode_decode_round_trip(config):
    fields = PluginFields(block_offset=56, num_blocks=57, grid_h=64, grid_w=48, config=config)
    encoded = tp.encode_fields(fields)
    assert [name for name, _, _ in encoded] == [s.name for s in tp.FIELD_SPECS]
    for (_, array, kind), spec in zip(encoded, tp.FIELD_SPECS, strict=True):
        assert array.shape == (1,) and kind == spec.plugin_field_type
        assert array.dtype == (np.float32 if spec.kind == "float" else np.int32)
    decoded = tp.decode_fields([(name, array) for name, array, _ in encoded])
    # Floats pass through float32 and come back as the shortest decimal of that float32: exact for these knobs.
    assert decoded == fields
    assert decoded.config.use_history is config.use_history  # bools come back as bools


def test_decode_names_every_problem():
    good = {name: array for name, array, _ in tp.encode_fields(FIELDS)}
    with pytest.raises(PluginFieldError, match=r"missing \['grid_w'\], unknown \['grid_x'\]"):
        tp.decode_fields({**{k: v for k, v in good.items() if k != "grid_w"}, "grid_x": np.array([6])})
    with pytest.raises(PluginFieldError, match="do_smoothing is a flag and must be 0 or 1, got 2"):
        tp.decode_fields({**good, "do_smoothing": np.array([2], np.int32)})
    with pytest.raises(PluginFieldError, match="grid_h must be an integer"):
        tp.decode_fields({**good, "grid_h": np.array([7.5], np.float32)})
    with pytest.raises(PluginFieldError, match="must hold one value"):
        tp.decode_fields({**good, "num_blocks": np.array([4, 4], np.int32)})
    with pytest.raises(PluginFieldError, match="plugin_namespace must be 'deleaker'"):
        tp.decode_fields({**good, "plugin_namespace": "other"})
    with pytest.raises(PluginFieldError, match=r"block_offset must be in \[0, num_blocks=4\)"):
        tp.decode_fields({**good, "block_offset": np.array([4], np.int32)})
    with pytest.raises(PluginFieldError, match="stop_intervention_at"):
        tp.decode_fields({**good, "stop_intervention_at": np.array([1], np.int32)})


# --- formats, dtypes, shapes ------------------------------------------------------------------------------------

DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool", "int8")


def _expected_support(pos: int, dtype: str, q_dtype: str) -> bool:
    name = (tp.INPUT_NAMES + tp.OUTPUT_NAMES)[pos]
    return {
        "q": dtype in ("float16", "bfloat16"),
        "k": dtype == q_dtype,
        "v": dtype == q_dtype,
        "out": dtype == q_dtype,
        "entity_mask": dtype == "bool",
        "history": dtype == "float32",
        "history_out": dtype == "float32",
        "step": dtype == "int64",
    }[name]


@pytest.mark.parametrize("q_dtype", ["float16", "bfloat16"])
def test_supports_format_truth_table(q_dtype):
    for pos in range(8):
        for dtype in DTYPES:
            in_out = [TensorDesc(q_dtype)] + [TensorDesc(dtype)] * 7
            if pos == 0:
                in_out = [TensorDesc(dtype)] + in_out[1:]
            assert tp.supports_format(pos, in_out, 6) == _expected_support(pos, dtype, q_dtype), (pos, dtype)
        # Only the dense layout, and only the node's 6 inputs.
        ok = {0: q_dtype, 3: "bool", 4: "float32", 5: "int64", 7: "float32"}.get(pos, q_dtype)
        assert tp.supports_format(pos, [TensorDesc(q_dtype)] + [TensorDesc(ok)] * 7, 6)
        assert not tp.supports_format(
            pos, [TensorDesc(q_dtype, format="HWC8")] + [TensorDesc(ok, format="CHW32")] * 7, 6
        )
        assert not tp.supports_format(pos, [TensorDesc(q_dtype)] + [TensorDesc(ok)] * 7, 5)
    assert not tp.supports_format(0, [TensorDesc("float32")], 6)  # fp32 attention is the ORT path, not the plugin's


def test_output_dtypes_and_shapes():
    assert tp.output_dtypes(["bfloat16", "bfloat16", "bfloat16", "bool", "float32", "int64"]) == ["bfloat16", "float32"]
    with pytest.raises(ShapeError, match="q must be one of"):
        tp.output_dtypes(["float32"] * 6)
    # Dims may be symbolic (TensorRT's IDimensionExpr): outputs copy q's and history's dims untouched.
    b = object()
    shapes = [[b, 3, 64, 16], [b, 3, 64, 16], [b, 3, 64, 16], [4, 16], [b, 4, 48], []]
    out, history = tp.output_shapes(shapes)
    assert out == shapes[0] and history == shapes[4] and out[0] is b


def test_shape_checks():
    tp.check_io_shapes([d.shape for d in _descs()], FIELDS)
    tp.check_io_shapes([(-1, 3, 64, 16)] * 3 + [(4, 16), (-1, 4, 48), (1,)], FIELDS)  # dynamic batch is skipped
    with pytest.raises(ShapeError, match=r"q has tokens \(T=16 \+ grid 8x6\) 65, expected 64"):
        tp.check_io_shapes([(2, 3, 65, 16)] * 3 + [(4, 16), (2, 4, 48), ()], FIELDS)
    with pytest.raises(ShapeError, match=r"history has image tokens \(grid 8x6\) 49, expected 48"):
        tp.check_io_shapes([(2, 3, 64, 16)] * 3 + [(4, 16), (2, 4, 49), ()], FIELDS)
    with pytest.raises(ShapeError, match="v has head dim 8, expected 16"):
        tp.check_io_shapes([(2, 3, 64, 16)] * 2 + [(2, 3, 64, 8), (4, 16), (2, 4, 48), ()], FIELDS)
    with pytest.raises(ShapeError, match="step must be a scalar"):
        tp.check_io_shapes([(2, 3, 64, 16)] * 3 + [(4, 16), (2, 4, 48), (2,)], FIELDS)


def test_kernel_params_from_descs():
    params = tp.params_from_descs(_descs("bfloat16"), [11, 12, 13, 14, 15, 16], [21, 22], FIELDS)
    assert (params.q, params.k, params.v, params.entity_mask, params.history_in, params.step) == (
        11,
        12,
        13,
        14,
        15,
        16,
    )
    assert (params.out, params.history_out) == (21, 22)
    assert (params.batch, params.heads, params.tokens, params.text_tokens, params.head_dim) == (2, 3, 64, 16, 16)
    assert (params.q_batch_stride, params.k_head_stride, params.o_row_stride) == (3 * 64 * 16, 64 * 16, 16)
    assert (params.grid_h, params.grid_w, params.num_entities, params.dtype) == (8, 6, 4, 1)
    assert (params.block_offset, params.num_blocks, params.reserved) == (3, 4, 0)
    assert params.softmax_scale == pytest.approx(0.25)
    assert (params.use_history, params.do_image_image, params.do_smoothing) == (0, 0, 1)
    assert params.stop_intervention_at == 77 and params.k_strength == pytest.approx(1.3)
    with pytest.raises(ShapeError, match="at most 8 entity rows"):
        tp.params_from_descs(_descs(e=9), [0] * 6, [0] * 2, FIELDS)


# --- against TensorRT's real Python types -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt():
    try:
        return tp.import_tensorrt()
    except tp.TensorRTUnavailableError as err:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx imports ({type(err).__name__})")


def _dyn_desc(trt, dtype: str, dims, fmt=None):
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.type = tp.trt_dtype(trt, dtype)
    desc.desc.format = fmt or trt.TensorFormat.LINEAR
    desc.desc.dims = trt.Dims(dims)
    desc.min, desc.max = trt.Dims(dims), trt.Dims(dims)
    return desc


def test_trt_creator_fields_match_the_node_attributes(trt):
    creator = tp.register_plugin(trt)
    registry = trt.get_plugin_registry()
    assert registry.get_creator(tp.PLUGIN_NAME, tp.PLUGIN_VERSION, tp.PLUGIN_NAMESPACE) is not None
    assert tp.register_plugin(trt) is creator or registry.get_creator(tp.PLUGIN_NAME, "1", "deleaker") is not None
    names = [(f.name, f.type) for f in creator.field_names]
    attrs = onnx_node.node_attributes(block_offset=0, num_blocks=4, grid=(8, 8), config=DeLeakerConfig())
    onnx_float = set(onnx_node.FLOAT_ATTRIBUTES)
    assert [n for n, _ in names] == [s.name for s in tp.FIELD_SPECS]
    assert {n for n, _ in names} == set(attrs) - set(tp.LOOKUP_ATTRIBUTES)
    for name, kind in names:
        assert kind == (trt.PluginFieldType.FLOAT32 if name in onnx_float else trt.PluginFieldType.INT32), name
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("DeLeakerAttention", "deleaker", "1")


def test_trt_serialization_round_trip(trt):
    _, creator_cls = tp.plugin_classes(trt)
    creator = creator_cls()
    buffers: list = []
    plugin = creator.create_plugin(tp.PLUGIN_NAME, tp.field_collection(trt, FIELDS, buffers), trt.TensorRTPhase.BUILD)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version, plugin.num_outputs) == (
        "DeLeakerAttention",
        "deleaker",
        "1",
        2,
    )
    serialized = plugin.get_fields_to_serialize()
    assert all(isinstance(f, trt.PluginField) for f in serialized)
    import gc

    gc.collect()  # the fields must still read right after a collection (the plugin owns their buffers)
    restored = creator.create_plugin(tp.PLUGIN_NAME, serialized, trt.TensorRTPhase.RUNTIME)
    assert restored.fields == FIELDS
    clone = restored.clone()
    assert clone.fields == FIELDS and clone is not restored
    assert plugin.get_capability_interface(trt.PluginCapabilityType.RUNTIME) is plugin


def test_trt_formats_dtypes_and_configure(trt):
    _, creator_cls = tp.plugin_classes(trt)
    buffers: list = []
    plugin = creator_cls().create_plugin(
        tp.PLUGIN_NAME, tp.field_collection(trt, FIELDS, buffers), trt.TensorRTPhase.BUILD
    )
    for q_dtype in ("float16", "bfloat16"):
        descs = _descs(q_dtype)
        good = [_dyn_desc(trt, d.dtype, d.shape or (1,)) for d in descs]
        good += [_dyn_desc(trt, q_dtype, descs[0].shape), _dyn_desc(trt, "float32", descs[4].shape)]
        for pos in range(8):
            assert plugin.supports_format_combination(pos, good, 6), pos
            for wrong in ("float32", "int32", "int64", "bool", "float16", "bfloat16"):
                trial = list(good)
                trial[pos] = _dyn_desc(trt, wrong, (1,))
                expected = _expected_support(pos, wrong, q_dtype)
                assert plugin.supports_format_combination(pos, trial, 6) == expected, (q_dtype, pos, wrong)
        hwc8 = list(good)
        hwc8[0] = _dyn_desc(trt, q_dtype, descs[0].shape, trt.TensorFormat.HWC8)
        assert not plugin.supports_format_combination(0, hwc8, 6)
        types = plugin.get_output_data_types([tp.trt_dtype(trt, d.dtype) for d in descs])
        assert types == [tp.trt_dtype(trt, q_dtype), trt.DataType.FLOAT]
        plugin.configure_plugin(good[:6], good[6:])
    bad = [_dyn_desc(trt, d.dtype, d.shape or (1,)) for d in _descs(gh=7)]
    with pytest.raises(ShapeError, match="tokens"):
        plugin.configure_plugin(bad, [])


# TensorRT's ONNX parser, in a child process (test_engines.py runs it on the exported tiny model too): it creates our
# plugin from the node's attributes; we record what it handed over, then leave before TensorRT-RTX goes further (its
# Python API cannot host a Python plugin: the process aborts right after the creation).
PARSER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import onnx
    from deleaker.plugins import trt_plugin as tp

    trt = tp.import_tensorrt()
    _, creator_cls = tp.plugin_classes(trt)

    class Recording(creator_cls):
        def create_plugin(self, name, fc, phase):
            raw = {f.name: [str(f.type), f.data.tolist()] for f in fc}
            plugin = super().create_plugin(name, fc, phase)
            print(json.dumps({"name": name, "raw": raw, "decoded": plugin.fields.as_attributes()}), flush=True)
            os._exit(0)

    trt.get_plugin_registry().register_creator(Recording(), tp.PLUGIN_NAMESPACE)
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(onnx.load(sys.argv[1]).SerializeToString())
    print(json.dumps({"parsed": bool(ok), "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}))
    """
)


def test_trt_onnx_parser_hands_the_node_attributes_to_our_creator(trt, tmp_path):
    attrs = onnx_node.node_attributes(block_offset=3, num_blocks=4, grid=(8, 6), config=ODD_CONFIG)
    t, n, e = 16, 16 + 48, 4
    node = helper.make_node(tp.PLUGIN_NAME, list(tp.INPUT_NAMES), list(tp.OUTPUT_NAMES), domain="deleaker", **attrs)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "one_deleaker_node",
        [
            *(value(x, onnx.TensorProto.FLOAT16, ["batch", 3, n, 16]) for x in ("q", "k", "v")),
            value("entity_mask", onnx.TensorProto.BOOL, [e, t]),
            value("history", onnx.TensorProto.FLOAT, ["batch", e, 48]),
            value("step", onnx.TensorProto.INT64, []),
        ],
        [
            value("out", onnx.TensorProto.FLOAT16, ["batch", 3, n, 16]),
            value("history_out", onnx.TensorProto.FLOAT, None),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("deleaker", 1)])
    path = tmp_path / "node.onnx"
    onnx.save(model, str(path))
    run = subprocess.run([sys.executable, "-c", PARSER_SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, (
        f"the parser never created the plugin (rc {run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}"
    )
    got = json.loads(lines[0])
    assert got["name"] == "node_of_out"  # TensorRT names the plugin instance after the node
    # Exactly the non-lookup attributes, as INT32 / FLOAT32 one-element fields.
    assert set(got["raw"]) == {s.name for s in tp.FIELD_SPECS}
    for spec in tp.FIELD_SPECS:
        kind, data = got["raw"][spec.name]
        assert kind.endswith(spec.plugin_field_type) and len(data) == 1, (spec.name, kind, data)
    assert got["decoded"] == pytest.approx(FIELDS.as_attributes())
