"""Exporting the tiny FLUX with DeLeaker to ONNX: the contract, the graph, and ONNX Runtime == PyTorch over steps."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import deleaker.library  # noqa: F401  (torch.ops.deleaker.attention)
from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError, ShapeError
from deleaker.export.contract import BATCH_AXIS, FluxTransformerIO
from deleaker.export.exporter import (
    ExportError,
    check_onnx_model,
    export_transformer_onnx,
    read_export_metadata,
    sha256_file,
)
from deleaker.export.model_export import export_model_onnx, load_transformer
from deleaker.export.onnx_node import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, config_from_attributes
from deleaker.export.ort_reference import make_reference_session
from deleaker.export.ort_session import make_session, session_feeds
from deleaker.export.portable import make_portable, needs_portable
from deleaker.export.wrapper import make_wrapper
from deleaker.ops import entity_affinity, entity_image_masks, update_history

TEXT_LEN = 16
NUM_BLOCKS = 4  # the tiny model: 2 double + 2 single blocks
STEPS = 4
# Block steps t = 4 * step + offset: step 0 covers t = 0..3 (history from t = 1, intervention from t = 3), step 1
# is inside both windows, step 2 leaves them (intervention to t = 9, history to t < 10), step 3 is outside.
WINDOWS = dict(start_aggregating_from=1, stop_aggregating_at=10, start_intervention_from=3, stop_intervention_at=9)
# std_mul_text = -0.5 keeps masks large enough to survive the 3x3 opening on the tiny model's noisy 8x8 maps, so
# every edit (strengthening, weakening, image-image cuts) really happens; margins are asserted below.
CONFIG = DeLeakerConfig.for_model(NUM_BLOCKS, std_mul_text=-0.5, **WINDOWS)
OFF = dataclasses.replace(CONFIG, start_intervention_from=10**6, stop_intervention_at=10**6)
SEED = 10
ORT_RTOL = {"custom": 1e-5, "decomposed": 1e-4, "portable": 1e-4}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class AttentionCalls(TorchDispatchMode):
    """Records the arguments of every ``torch.ops.deleaker.attention`` call (observes; changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.deleaker.attention.default:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def transformer(tiny_components):
    return copy.deepcopy(tiny_components["transformer"])  # the wrapper installs processors: keep the shared one


@pytest.fixture(scope="module")
def io(transformer):
    return FluxTransformerIO.from_transformer(
        transformer, height=64, width=64, text_len=TEXT_LEN, max_entities=4, vae_scale_factor=4, batch=(1, 2, 2)
    )


@pytest.fixture(scope="module")
def entity_mask():
    mask = torch.zeros(4, TEXT_LEN, dtype=torch.int32)
    mask[0, 1] = mask[0, 2] = 1  # a two-token entity
    mask[1, 5] = 1  # rows 2 and 3 are absent entities
    return mask


@pytest.fixture(scope="module")
def torch_steps(transformer, io, entity_mask):
    """PyTorch over `STEPS` steps (fresh latents per step, history threaded), with DeLeaker on and off."""
    wrapper, wrapper_off = make_wrapper(transformer, io, CONFIG).eval(), make_wrapper(transformer, io, OFF).eval()
    inputs, outputs, outputs_off = [], [], []
    history = torch.zeros(io.spec("history").concrete(2))
    recorder = AttentionCalls()
    for step in range(STEPS):
        x = io.sample_inputs(2, seed=SEED + step, step=step, entity_mask=entity_mask)
        x["history"] = history
        with torch.no_grad(), recorder:
            noise, history = wrapper(*x.values())
        with torch.no_grad():
            outputs_off.append(wrapper_off(*x.values())[0])
        inputs.append(x)
        outputs.append((noise, history))
    return inputs, outputs, outputs_off, recorder.calls


@pytest.fixture(scope="module")
def exports(transformer, io, tmp_path_factory):
    """The custom-node export (weights forced to external data) and the decomposed export, made once."""
    out = tmp_path_factory.mktemp("onnx")
    return {
        "custom": export_transformer_onnx(transformer, io, out / "custom.onnx", config=CONFIG, external_data=True),
        "decomposed": export_transformer_onnx(transformer, io, out / "decomposed.onnx", config=CONFIG, decompose=True),
    }


# --- the contract ---------------------------------------------------------------------------------------------


def test_contract_names_dtypes_profiles(io):
    assert io.input_names == (
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
        "guidance", "entity_mask", "history", "step",
    )
    assert io.output_names == ("noise_pred", "history_out")
    assert io.grid == (8, 8) and io.image_tokens == 64
    assert io.spec("entity_mask").dtype == "int32" and io.spec("step").shape == ()
    assert io.spec("history").dtype == io.spec("history_out").dtype == "float32"
    assert io.profile("hidden_states") == ((1, 64, 16), (2, 64, 16), (2, 64, 16))
    assert io.profile("img_ids") == ((64, 3),) * 3
    assert io.dynamic_axes["history"] == {0: BATCH_AXIS} and "entity_mask" not in io.dynamic_axes
    assert FluxTransformerIO.from_dict(json.loads(json.dumps(io.to_dict()))) == io
    sample = io.sample_inputs(1, step=3)
    assert list(sample) == list(io.input_names)
    assert all(tuple(sample[s.name].shape) == s.concrete(1) and sample[s.name].dtype == s.torch_dtype for s in io.inputs)


def test_contract_of_flux1_dev_config():
    """FLUX.1-dev's transformer config.json at 1024x1024, T = 512: the sizes of the spec."""
    config = {
        "_class_name": "FluxTransformer2DModel", "in_channels": 64, "out_channels": None, "num_layers": 19,
        "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56], "patch_size": 1,
    }
    io = FluxTransformerIO.from_config(config, height=1024, width=1024, text_len=512, dtype=torch.bfloat16)
    assert io.num_blocks == 57 and io.grid == (64, 64) and io.dtype == "bfloat16"
    assert io.spec("hidden_states").shape == (BATCH_AXIS, 4096, 64)
    assert io.spec("noise_pred").shape == (BATCH_AXIS, 4096, 64)
    assert io.profile("encoder_hidden_states") == ((1, 512, 4096), (1, 512, 4096), (4, 512, 4096))
    assert io.profile("history")[2] == (4, 4, 4096)


def test_contract_without_guidance_and_bad_values(transformer):
    schnell = dict(transformer.config, guidance_embeds=False)
    io = FluxTransformerIO.from_config(schnell, height=64, width=48, text_len=8, vae_scale_factor=4)
    assert "guidance" not in io.input_names and io.grid == (8, 6)
    with pytest.raises(ShapeError, match="multiples of 2 \\* vae_scale_factor"):
        FluxTransformerIO.from_config(schnell, height=60, width=64, text_len=8, vae_scale_factor=4)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        FluxTransformerIO.from_config(schnell, height=64, width=64, text_len=8, vae_scale_factor=4, batch=(2, 1, 4))
    with pytest.raises(ConfigError, match="dtype"):
        FluxTransformerIO.from_config(schnell, height=64, width=64, text_len=8, vae_scale_factor=4, dtype="int8")
    with pytest.raises(ShapeError, match="batch must be an int in \\[1, 4\\]"):
        io.check_batch(5)


def test_load_transformer_tiny_and_bad_paths(tmp_path):
    transformer, vae_scale_factor = load_transformer("tiny", "bf16")
    assert next(transformer.parameters()).dtype == torch.bfloat16 and vae_scale_factor == 4
    with pytest.raises(ConfigError, match="local diffusers folder"):
        load_transformer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="precision"):
        load_transformer("tiny", "int8")


def test_export_rejects_a_contract_that_does_not_fit(transformer, io, tmp_path):
    fp16_io = dataclasses.replace(io, dtype="float16")
    with pytest.raises(ConfigError, match="transformer is float32 but the contract says float16"):
        export_transformer_onnx(transformer, fp16_io, tmp_path / "x.onnx", config=CONFIG)
    with pytest.raises(ShapeError, match="57 blocks per step but the transformer has 4"):
        export_transformer_onnx(transformer, dataclasses.replace(io, num_blocks=57), tmp_path / "x.onnx", config=CONFIG)
    with pytest.raises(TypeError, match="DeLeakerConfig"):
        export_transformer_onnx(transformer, io, tmp_path / "x.onnx", config={"k_strength": 2.0})
    assert list(tmp_path.iterdir()) == []


# --- the graphs -----------------------------------------------------------------------------------------------


def _value_info(value):
    t = value.type.tensor_type
    return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]


def test_custom_node_graph(exports, io):
    result = exports["custom"]
    check_onnx_model(result.onnx_path)  # full check + strict shape inference, with the node's schema
    assert result.data_path is not None and result.data_path.name == "custom.onnx.data"
    assert result.sha256 == sha256_file(result.onnx_path) and result.data_sha256 == sha256_file(result.data_path)
    assert sorted(p.name for p in result.onnx_path.parent.iterdir()) == ["custom.onnx", "custom.onnx.data", "decomposed.onnx"]

    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 18
    assert {o.domain: o.version for o in model.opset_import}[DOMAIN] == 1
    types = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}
    assert [i.name for i in model.graph.input] == list(io.input_names)
    assert [o.name for o in model.graph.output] == list(io.output_names)
    for value in list(model.graph.input) + list(model.graph.output):
        spec = io.spec(value.name)
        assert _value_info(value) == (types[spec.dtype], list(spec.shape)), value.name

    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == NUM_BLOCKS == result.num_deleaker_nodes
    assert not any(n.op_type == "Attention" for n in model.graph.node)
    producers = {out: n for n in model.graph.node for out in n.output}
    for offset, node in enumerate(nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == DOMAIN and len(node.input) == 6 and len(node.output) == 2
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == PLUGIN_VERSION.encode()
        decoded = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        assert config_from_attributes(decoded) == (offset, NUM_BLOCKS, (8, 8), CONFIG)
        # The history threads through the nodes in block order: graph input -> node 0 -> ... -> graph output.
        history_in = node.input[4]
        if offset == 0:
            assert history_in == "history"
        else:
            assert producers[history_in] is nodes[offset - 1] and history_in == nodes[offset - 1].output[1]
    assert nodes[-1].output[1] == "history_out"
    # No float64 anywhere (TensorRT has none): the rotary embedding is exported in float32.
    inferred = onnx.shape_inference.infer_shapes(model)
    double = onnx.TensorProto.DOUBLE
    assert not [v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == double]
    assert not [i.name for i in model.graph.initializer if i.data_type == double]
    assert read_export_metadata(result.onnx_path) == (io, CONFIG, False)


def test_decomposed_graph_is_standard_onnx(exports, io):
    result = exports["decomposed"]
    check_onnx_model(result.onnx_path)
    assert result.data_path is None and result.num_deleaker_nodes == 0
    model = onnx.load(str(result.onnx_path))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    op_types = {n.op_type for n in model.graph.node}
    assert {"MaxPool", "Where", "Softmax"} <= op_types and not op_types & {"Loop", "If", "Scan"}
    assert [i.name for i in model.graph.input] == list(io.input_names)
    assert read_export_metadata(result.onnx_path) == (io, CONFIG, True)


def polygraphy_cli(*args: str) -> subprocess.CompletedProcess:
    """``polygraphy ARGS``: the console script installed beside this Python (the one a user runs)."""
    pytest.importorskip("polygraphy")
    script = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    assert script, "polygraphy is importable but its console script is not installed"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=300)


def test_polygraphy_inspect_and_run_read_our_exports(exports, io):
    """`polygraphy inspect model` reads the custom-node export (external weights) as exported: its inputs and outputs
    with the contract's dtypes, and one ``DeLeakerAttention`` node per block; `polygraphy run --onnxrt` runs the
    decomposed export (README's commands)."""
    custom = polygraphy_cli("inspect", "model", str(exports["custom"].onnx_path), "--show", "layers")
    assert custom.returncode == 0, custom.stdout[-3000:] + custom.stderr[-3000:]
    assert f"Other Opsets: {{'{DOMAIN}': 1}}" in custom.stdout
    for spec in io.inputs + io.outputs:
        assert f"{spec.name} [dtype={spec.dtype}, shape=" in custom.stdout, spec.name
    assert len(re.findall(rf"Node \d+\s+\|.*\[Op: {OP_TYPE}\]", custom.stdout)) == NUM_BLOCKS
    shapes = [f"{spec.name}:[{','.join(map(str, spec.concrete(io.batch_min)))}]" for spec in io.inputs if spec.dynamic_axes]
    run = polygraphy_cli("run", str(exports["decomposed"].onnx_path), "--onnxrt", "--input-shapes", *shapes)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"noise_pred [dtype=float32, shape=({io.batch_min}, " in run.stdout


# --- ONNX Runtime == PyTorch ----------------------------------------------------------------------------------


def test_pytorch_run_exercises_deleaker(torch_steps, entity_mask):
    """The steps the ORT tests compare really edit attention: clean masks, outputs unlike DeLeaker off."""
    _, outputs, outputs_off, calls = torch_steps
    assert len(calls) == STEPS * NUM_BLOCKS
    for args in calls:
        q, k, _, mask, history, step, offset, num_blocks = args[:8]
        t = int(step) * num_blocks + offset
        if not CONFIG.intervenes_at(t):
            continue
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        present = mask.any(-1)
        affinity = entity_affinity(probs[:, :, TEXT_LEN:, :TEXT_LEN], mask)
        _, source = update_history(history, affinity, present, t, CONFIG)
        masks = entity_image_masks(source, present, (8, 8), CONFIG)
        assert masks[:, :2].flatten(1).any(-1).all(), f"t = {t}: an entity mask is empty"
        assert not masks[:, 2:].any()
        # No near-ties: every cell is clearly above or below its threshold (ORT's rounding cannot flip a mask).
        src = source[:, :2]
        threshold = src.mean(-1, keepdim=True) + CONFIG.std_mul_text * src.std(-1, keepdim=True)
        assert float(((src - threshold).abs() / src.std(-1, keepdim=True)).min()) > 5e-5, f"t = {t}"
    for step in range(3):  # every step with an intervening block
        assert rel_l2(outputs[step][0], outputs_off[step]) > 1e-3
    assert rel_l2(outputs[3][0], outputs_off[3]) == 0.0
    histories = [h for _, h in outputs]
    assert not torch.equal(histories[0], histories[1]) and not torch.equal(histories[1], histories[2])
    assert torch.equal(histories[2], histories[3])  # aggregation stopped at t = 10
    assert not histories[3][:, 2:].any()  # absent entities keep zero rows


@pytest.fixture(scope="module")
def portable_of_custom(exports):
    """The custom-node export in its portable form (every DeLeakerAttention node replaced by the decomposition)."""
    path = exports["custom"].onnx_path.parent / "portable.onnx"
    make_portable(exports["custom"].onnx_path, path)
    assert needs_portable(onnx.load(str(exports["custom"].onnx_path), load_external_data=False))
    assert not needs_portable(onnx.load(str(path)))
    return path


@pytest.mark.parametrize("kind", ["custom", "decomposed", "portable"])
def test_onnxruntime_matches_pytorch_over_steps(exports, io, torch_steps, kind, portable_of_custom):
    inputs, outputs, outputs_off, _ = torch_steps
    if kind == "custom":  # the Python reference node, asked for by name
        session = make_reference_session(exports[kind].onnx_path)
    else:
        session = make_session(portable_of_custom if kind == "portable" else exports[kind].onnx_path)
    history = np.zeros(io.spec("history").concrete(2), dtype=np.float32)
    for step, (x, (noise_ref, history_ref)) in enumerate(zip(inputs, outputs)):
        noise, history = session.run(None, session_feeds(io, {**x, "history": history}))
        assert rel_l2(noise, noise_ref) < ORT_RTOL[kind], f"{kind} step {step}"
        assert rel_l2(history, history_ref) < ORT_RTOL[kind], f"{kind} step {step}"
        if step < 3:  # the match is not the trivial one: DeLeaker changed these outputs
            assert rel_l2(noise, outputs_off[step]) > 10 * ORT_RTOL[kind]
    # The batch axis is dynamic: one sample of the batch gives that sample's result.
    x = {name: (v[:1] if io.spec(name).dynamic_axes else v) for name, v in inputs[1].items()}
    x["history"] = torch.from_numpy(np.ascontiguousarray(outputs[0][1][:1].numpy()))
    noise, history = session.run(None, session_feeds(io, x))
    assert noise.shape[0] == 1 and rel_l2(noise, outputs[1][0][:1]) < ORT_RTOL[kind]
    assert rel_l2(history, outputs[1][1][:1]) < ORT_RTOL[kind]


def test_export_model_onnx_from_a_diffusers_folder_in_fp16(tmp_path):
    """``build --onnx-only``'s function on a saved diffusers folder, in fp16: custom nodes in fp16, the VAE's
    scale factor read from the folder, the contract in the metadata."""
    from deleaker.tiny import save_tiny_flux

    model_dir = save_tiny_flux(tmp_path / "model")
    out_dir = tmp_path / "onnx"
    result = export_model_onnx(
        model_dir, height=64, width=64, text_len=8, max_entities=2, precision="fp16", out_dir=out_dir
    )
    assert result.onnx_path.name == "transformer_64x64_t8_e2_float16.onnx"
    assert [p.name for p in out_dir.iterdir()] == [result.onnx_path.name]
    io, config, decomposed = read_export_metadata(result.onnx_path)
    assert io.dtype == "float16" and io.text_len == 8 and io.max_entities == 2 and not decomposed
    assert io.vae_scale_factor == 4 and io.grid == (8, 8)
    assert config == DeLeakerConfig.for_model(NUM_BLOCKS)
    model = onnx.load(str(result.onnx_path))
    assert _value_info(model.graph.input[0])[0] == onnx.TensorProto.FLOAT16
    assert _value_info(model.graph.output[0])[0] == onnx.TensorProto.FLOAT16
    assert _value_info(model.graph.output[1])[0] == onnx.TensorProto.FLOAT
    values = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == NUM_BLOCKS
    assert all(_value_info(values[n.input[0]])[0] == onnx.TensorProto.FLOAT16 for n in nodes if n.input[0] in values)


def _schnell_like_transformer():
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ).eval()


def test_schnell_like_model_static_batch(tmp_path, entity_mask):
    """A model without guidance embeddings (FLUX.1-schnell's layout) and a static batch of 1 export and run."""
    transformer = _schnell_like_transformer()
    io = FluxTransformerIO.from_transformer(
        transformer, height=64, width=64, text_len=TEXT_LEN, max_entities=4, vae_scale_factor=4, batch=(1, 1, 1)
    )
    config = DeLeakerConfig.for_model(2, start_aggregating_from=0, start_intervention_from=0, std_mul_text=-0.5)
    result = export_transformer_onnx(transformer, io, tmp_path / "schnell.onnx", config=config)
    model = onnx.load(str(result.onnx_path))
    assert "guidance" not in [i.name for i in model.graph.input]
    assert _value_info(model.graph.input[0])[1] == [1, 64, 16]  # static batch

    x = io.sample_inputs(1, seed=3, step=1, entity_mask=entity_mask)
    x["history"] = torch.rand(1, 4, 64)
    with torch.no_grad():
        noise_ref, history_ref = make_wrapper(transformer, io, config)(*x.values())
    noise, history = make_reference_session(result.onnx_path).run(None, session_feeds(io, x))
    assert rel_l2(noise, noise_ref) < 1e-5 and rel_l2(history, history_ref) < 1e-5
    portable = make_portable(result.onnx_path, tmp_path / "schnell_portable.onnx")  # decomposition in a static batch
    noise, history = make_session(portable).run(None, session_feeds(io, x))
    assert rel_l2(noise, noise_ref) < 1e-4 and rel_l2(history, history_ref) < 1e-4


def test_failed_export_leaves_no_partial_file(tmp_path):
    """The last rename fails (the destination is a folder): no data file, no staging folder is left behind."""
    transformer = _schnell_like_transformer()
    io = FluxTransformerIO.from_transformer(transformer, height=32, width=32, text_len=8, vae_scale_factor=4)
    blocker = tmp_path / "model.onnx"
    blocker.mkdir()
    (blocker / "keep").write_text("not ours")
    with pytest.raises(ExportError, match="cannot move the exported model into place"):
        export_transformer_onnx(
            transformer, io, blocker, config=DeLeakerConfig.for_model(2), external_data=True, check=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert [p.name for p in blocker.iterdir()] == ["keep"]


@pytest.mark.parametrize("text", ["{", "1" + "0" * 5000, "[1]", "[" * 100_000 + "]" * 100_000],
                         ids=["truncated", "int-of-5000-digits", "not-an-object", "nested-too-deeply"])
def test_unreadable_vae_config_is_a_config_error(tmp_path, text):
    from deleaker.export import model_export

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="VAE config"):
        model_export._vae_scale_factor(tmp_path)


def test_the_wrapper_places_processors_that_diffusers_rebuilt_without_arguments(tiny_components):
    """``unload_ip_adapter`` leaves ``DeLeakerFluxAttnProcessor()`` (no block offset) on blocks: the export wrapper
    gives each its place in execution order, as the pipeline does, instead of failing in the first attention."""
    from deleaker.processor import DeLeakerFluxAttnProcessor

    transformer = copy.deepcopy(tiny_components["transformer"])
    transformer.set_attn_processor(DeLeakerFluxAttnProcessor())  # one shared, unplaced processor on every block
    io = FluxTransformerIO.from_transformer(
        transformer, height=64, width=64, text_len=TEXT_LEN, max_entities=4, vae_scale_factor=4, batch=(1, 1, 1)
    )
    make_wrapper(transformer, io, CONFIG)
    processors = list(transformer.attn_processors.values())
    assert [p.block_offset for p in processors] == list(range(NUM_BLOCKS))
    assert {p.num_blocks for p in processors} == {NUM_BLOCKS}
