"""FP8 (E4M3) Q/DQ: the fake quantization against ONNX Runtime's FLOAT8E4M3FN QuantizeLinear/DequantizeLinear, the
recipe's layer selection, and the Q/DQ graph pass on the tiny transformer run in ONNX Runtime against PyTorch
fake quantization (scales calibrated on prompts). Plus ``deleaker-trt build --precision fp8 --onnx-only``.

Tolerance: ONNX Runtime on the Q/DQ graph vs the PyTorch model under `fake_quantized`, both float32, relative L2
error of ``noise_pred`` below 1e-4, and below 2% of the error FP8 itself introduces (PyTorch fp8 vs fp32, which
must be above 1e-3 so that the comparison means something). Measured: about 2e-6 vs 5e-3.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from deleaker.config import DeLeakerConfig
from deleaker.engines import build as build_lib
from deleaker.engines import fp8
from deleaker.runtime.cli.build_command import build as build_command
from deleaker.engines.manifest import EngineManifest


#: What torch.onnx writes; onnx's own default (14 in onnx 1.23) is newer than ONNX Runtime 1.30 reads (13).
ONNX_IR_VERSION = 10


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ort_qdq(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear (FLOAT8E4M3FN, opset 19) in ONNX Runtime's CPU kernels."""
    elem = numpy_helper.from_array(x).data_type
    inits = [
        helper.make_tensor("s", elem, [], [scale]),
        helper.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [], [0]),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", elem, x.shape)],
        [helper.make_tensor_value_info("y", elem, x.shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=ONNX_IR_VERSION)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fake_quantize_matches_onnxruntime_e4m3(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4000) * 3, [1000.0, -1000.0, 1e-6, 0.0, 448 * 0.01]]).astype(dtype)
    scale = 0.01  # |x| / scale reaches 1e5: saturates at +-448
    ours = fp8.fake_quantize(torch.from_numpy(x), scale).numpy()
    theirs = _ort_qdq(x, scale)
    mismatched = np.flatnonzero(ours != theirs)
    assert len(mismatched) == 0, (x[mismatched], ours[mismatched], theirs[mismatched])
    assert ours[-5] == ours.max() == np.float32(448 * scale).astype(dtype)  # saturated, not inf/nan
    assert ours[-4] == -ours[-5] and ours[-2] == 0
    assert len(np.unique(ours)) <= 255  # at most the finite E4M3 values


def _fp8_linear_model(path, weight: np.ndarray, x_scale: float, w_scale: float) -> None:
    """y = DQ(Q(x)) @ DQ(w_fp8): the pattern `fp8.insert_fp8_qdq` writes before each quantized linear."""
    w_fp8 = fp8.fake_quantize(torch.from_numpy(weight), w_scale).div(w_scale).to(torch.float8_e4m3fn)
    stored = helper.make_tensor("w_fp8", onnx.TensorProto.FLOAT8E4M3FN, list(weight.shape),
                                w_fp8.view(torch.uint8).numpy().tobytes(), raw=True)
    inits = [
        stored,
        helper.make_tensor("xs", onnx.TensorProto.FLOAT, [], [x_scale]),
        helper.make_tensor("ws", onnx.TensorProto.FLOAT, [], [w_scale]),
        helper.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [], [0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_fp8", "ws"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fp8_linear", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, weight.shape[1]])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


def test_sessions_run_fp8_qdq_linears_as_written(tmp_path):
    """ONNX Runtime 1.30.0 fused DQ(fp8) -> MatMul into MatMulIntegerToFloat and refused the model; our sessions turn
    the QDQ fusions off, so the graph loads and computes the float fake quantization on any version."""
    from deleaker.export.ort_session import QDQ_FUSION_KEY, make_session

    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((16, 8)) * 0.2).astype(np.float32)
    x = (rng.standard_normal((5, 16)) * 2).astype(np.float32)
    x_scale, w_scale = float(np.abs(x).max() / 448), float(np.abs(weight).max() / 448)
    _fp8_linear_model(tmp_path / "fp8_linear.onnx", weight, x_scale, w_scale)
    want = (fp8.fake_quantize(torch.from_numpy(x), x_scale).double()
            @ fp8.fake_quantize(torch.from_numpy(weight), w_scale).double()).numpy()
    got = make_session(tmp_path / "fp8_linear.onnx").run(None, {"x": x})[0]
    assert _rel(got, want) < 1e-6
    assert _rel(got, x.astype(np.float64) @ weight) > 1e-4  # FP8 changed the result: the check has teeth
    # A caller's own setting of the key is kept, not overwritten (on a graph without FP8, which 1.30.0 would refuse).
    identity = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                                 [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                 [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    onnx.save_model(helper.make_model(identity, opset_imports=[helper.make_opsetid("", 19)],
                                      ir_version=ONNX_IR_VERSION), str(tmp_path / "identity.onnx"))
    options = ort.SessionOptions()
    options.add_session_config_entry(QDQ_FUSION_KEY, "0")
    session = make_session(tmp_path / "identity.onnx", session_options=options)
    assert options.get_session_config_entry(QDQ_FUSION_KEY) == "0"
    assert session.get_session_options().get_session_config_entry(QDQ_FUSION_KEY) == "0"


def test_recipe_keeps_embedders_norm_out_and_proj_out_in_high_precision(tiny_components):
    transformer = tiny_components["transformer"]
    chosen = fp8.quantizable_linears(transformer)
    all_linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = sorted(set(all_linears) - set(chosen))
    assert kept == sorted(
        n
        for n in all_linears
        if n.split(".")[0] in ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
    )
    assert "proj_out" in kept and "norm_out.linear" in kept and "x_embedder" in kept
    assert "single_transformer_blocks.0.proj_out" in chosen  # only the model's final proj_out is kept
    assert "transformer_blocks.1.attn.to_q" in chosen and "transformer_blocks.0.ff.net.2" in chosen
    assert len(chosen) == 40 and len(kept) == 10


@pytest.fixture(scope="module")
def qdq_float32(tmp_path_factory):
    """The tiny transformer (float32, own copy), its contract, config, calibrated scales, and both ONNX files."""
    from deleaker.export.contract import FluxTransformerIO
    from deleaker.tiny import build_tiny_flux_components

    components = build_tiny_flux_components(seed=0)
    transformer = components["transformer"].eval()
    io = FluxTransformerIO.from_transformer(
        transformer, height=64, width=64, text_len=16, max_entities=4, vae_scale_factor=4
    )
    config = DeLeakerConfig.for_model(io.num_blocks)
    batches = build_lib.calibration_batches(components, io, build_lib.DEFAULT_CALIBRATION_PROMPTS[:2], (1.0, 0.5))
    scales = build_lib.calibrate_fp8(transformer, io, config, batches)
    out = tmp_path_factory.mktemp("fp8")
    model = onnx.load(str(build_lib.export_onnx(transformer, io, config, out / "plain.onnx")))
    weights = {name: layer.weight for name, layer in fp8.quantizable_linears(transformer).items()}
    build_lib.save_onnx(fp8.insert_fp8_qdq(model, scales, weights), out / "qdq.onnx")
    test_batch = build_lib.calibration_batches(components, io, ["A cow and a horse in a farm"], (0.7,), seed=99)[0]
    test_batch["step"] = torch.tensor(1, dtype=torch.int32)  # inside the intervention window of the tiny model
    return transformer, io, config, scales, out, test_batch


def test_qdq_graph_structure(qdq_float32):
    transformer, io, config, scales, out, _ = qdq_float32
    model = onnx.load(str(out / "qdq.onnx"))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == fp8.QDQ_OPSET
    assert fp8.qdq_summary(model) == {"QuantizeLinear": 40, "DequantizeLinear": 80, "fp8_initializers": 40}
    producers = {o: n for n in model.graph.node for o in n.output}
    linear_nodes = fp8.linear_nodes(model)
    assert set(linear_nodes) == {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, node in linear_nodes.items():
        quantized = [
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input[:2]
        ]
        assert quantized == ([True, True] if name in scales else [False, False]), name
    for node in model.graph.node:  # attention stays unquantized
        if node.op_type == "DeLeakerAttention":
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    # Each weight is stored as E4M3 and dequantizes to exactly PyTorch's fake-quantized weight.
    inits = {i.name: i for i in model.graph.initializer}
    node = linear_nodes["transformer_blocks.0.attn.to_q"]
    dq = producers[node.input[1]]
    stored = np.frombuffer(inits[dq.input[0]].raw_data, dtype=np.uint8).reshape(tuple(inits[dq.input[0]].dims))
    weight_scale = float(numpy_helper.to_array(inits[dq.input[1]]))
    dequantized = torch.from_numpy(stored.copy()).view(torch.float8_e4m3fn).float() * weight_scale
    expected = fp8.fake_quantize(transformer.transformer_blocks[0].attn.to_q.weight.detach(), weight_scale).T
    assert torch.equal(dequantized, expected)
    assert weight_scale == pytest.approx(
        float(transformer.transformer_blocks[0].attn.to_q.weight.abs().max()) / 448, rel=1e-6
    )


def test_qdq_onnx_in_onnxruntime_matches_pytorch_fake_quantization(qdq_float32):
    from deleaker.export.ort_reference import make_reference_session
    from deleaker.export.ort_session import make_session, session_feeds
    from deleaker.export.portable import make_portable
    from deleaker.export.wrapper import make_wrapper

    transformer, io, config, scales, out, batch = qdq_float32
    feeds = session_feeds(io, batch)
    ort_qdq = make_reference_session(out / "qdq.onnx").run(None, feeds)
    ort_plain = make_reference_session(out / "plain.onnx").run(None, feeds)
    # The portable form (what `run --engines` loads in ONNX Runtime) keeps the Q/DQ pattern and agrees with it.
    ort_portable = make_session(make_portable(out / "qdq.onnx", out / "qdq_portable.onnx")).run(None, feeds)
    assert _rel(ort_portable[0], ort_qdq[0]) < 1e-5 and _rel(ort_portable[1], ort_qdq[1]) < 1e-5
    wrapper = make_wrapper(transformer, io, config).eval()
    with torch.no_grad():
        reference = [t.numpy() for t in wrapper(*batch.values())]
        with fp8.fake_quantized(transformer, scales):
            fake_quant = [t.numpy() for t in wrapper(*batch.values())]
        restored = [t.numpy() for t in wrapper(*batch.values())]
    fp8_effect = _rel(fake_quant[0], reference[0])
    ort_error = _rel(ort_qdq[0], fake_quant[0])
    assert fp8_effect > 1e-3, "the quantization must change the output, or the comparison proves nothing"
    assert ort_error < 1e-4 and ort_error < 0.02 * fp8_effect, (ort_error, fp8_effect)
    assert _rel(ort_qdq[1], fake_quant[1]) < 1e-4  # history_out
    assert _rel(ort_plain[0], reference[0]) < 1e-4  # the unquantized export agrees too
    assert np.array_equal(restored[0], reference[0])  # fake_quantized restores the weights


def test_cli_fp8_onnx_only_writes_a_qdq_onnx_with_its_scales(tmp_path, tiny_components):
    result = CliRunner().invoke(
        build_command,
        [
            "--model",
            "tiny",
            "--precision",
            "fp8",
            "--height",
            "64",
            "--width",
            "64",
            "--text-len",
            "16",
            "--out",
            str(tmp_path),
            "--onnx-only",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "calibrating FP8 scales on 4 prompts: done" in result.output
    path = tmp_path / "transformer.64x64.fp8.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert fp8.qdq_summary(model) == {"QuantizeLinear": 40, "DequantizeLinear": 80, "fp8_initializers": 40}
    # fp16 outside the quantized linears (strongly typed engine); the DeLeaker nodes see fp16 q/k/v.
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs["hidden_states"] == onnx.TensorProto.FLOAT16
    manifest = EngineManifest.read(path)
    assert manifest.precision == "fp8" and manifest.io["dtype"] == "float16"
    record = manifest.quantization
    assert record["format"] == "float8_e4m3fn" and record["calibration_batches"] == 12
    assert record["high_precision_modules"] == list(fp8.HIGH_PRECISION_MODULES)
    transformer = tiny_components["transformer"]
    assert set(record["scales"]) == set(fp8.quantizable_linears(transformer))
    for name, s in record["scales"].items():
        weight = transformer.get_submodule(name).weight
        assert s["weight_scale"] == pytest.approx(float(weight.abs().max()) / 448, rel=1e-6), name
        assert 0 < s["input_scale"] < 1e3


def test_tensorrt_parses_and_builds_the_qdq_pattern(tmp_path):
    """TensorRT(-RTX)'s parser and builder take the pass's output (E4M3 weight initializers + DequantizeLinear,
    Q/DQ on fp16 activations, opset 19) in a strongly typed network: a two-linear fp16 model, no plugin, CPU-only
    build with TensorRT-RTX here (nothing is executed, so this checks the graph form, not FP8 kernels)."""
    from deleaker.plugins import trt_library

    try:
        trt = trt_library.import_tensorrt()
    except trt_library.TensorRTUnavailableError as err:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx imports ({type(err).__name__})")

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.transformer(x)

    torch.manual_seed(0)
    model = Mlp().eval().half()
    weights = {"0": model.transformer[0].weight, "2": model.transformer[2].weight}
    scales = {name: fp8.LinearScales(0.01, float(w.detach().abs().max()) / 448) for name, w in weights.items()}
    x = torch.randn(2, 8, 32, dtype=torch.float16)
    program = torch.onnx.export(
        model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4)},),
    )  # fmt: skip
    path = tmp_path / "mlp_fp8.onnx"
    onnx.save(fp8.insert_fp8_qdq(program.model_proto, scales, weights), str(path))
    net = build_lib.network_from_onnx(path, trt)
    layers = [net.network.get_layer(i) for i in range(net.network.num_layers)]
    kinds = [layer.type for layer in layers]
    assert kinds.count(trt.LayerType.QUANTIZE) == 2 and kinds.count(trt.LayerType.DEQUANTIZE) == 4
    fp8_constants = [
        layer for layer in layers
        if layer.type == trt.LayerType.CONSTANT and layer.get_output_type(0) == trt.DataType.FP8
    ]  # fmt: skip
    assert len(fp8_constants) == 2  # the weights stay E4M3 in the network
    data = build_lib.build_serialized_engine(net, {"x": ((1, 8, 32), (2, 8, 32), (4, 8, 32))})
    assert len(data) > 1000
