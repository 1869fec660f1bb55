"""One DeLeaker attention as ONNX (custom node and standard-op decomposition) in ONNX Runtime vs the reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper

from deleaker.config import DeLeakerConfig
from deleaker.export.exporter import export_attention_onnx
from deleaker.export.onnx_node import (
    DOMAIN,
    OP_TYPE,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    config_from_attributes,
    node_attributes,
)
from deleaker.export.ort_reference import make_reference_session
from deleaker.export.ort_session import make_session
from deleaker.ops import deleaker_attention_reference, entity_affinity, entity_image_masks, update_history
from test_op_reference import constant_region_inputs, uniform_attention_inputs

GRID = (8, 8)
NUM_BLOCKS = 4
BLOCK_OFFSET = 1
# t = step * 4 + 1 = 1, 5, 9, 13: before the windows, at their start, inside, at/after their end.
WINDOWS = dict(start_aggregating_from=5, stop_aggregating_at=13, start_intervention_from=5, stop_intervention_at=9)
STEPS = (0, 1, 2, 3)
ENTITY_TOKENS = ((1,), (3, 4))  # two entities; row 2 of the (3, T) mask is absent
TEXT_LEN = 6
HEADS, HEAD_DIM, BATCH = 2, 16, 2


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def structured_inputs(seed: int, dtype: torch.dtype = torch.float32):
    """q, k, v with clean entity regions (large mask margins), entity mask (3, T) and a non-negative history.

    Entity e's text tokens carry a key along basis direction u_e and the image queries of its region (a block of
    the grid, one per sample) carry u_e too, so the affinity maps are high there and low elsewhere.
    """
    gen = torch.Generator().manual_seed(seed)
    n_img = GRID[0] * GRID[1]
    q = 0.3 * torch.randn(BATCH, HEADS, TEXT_LEN + n_img, HEAD_DIM, generator=gen)
    k = 0.3 * torch.randn(BATCH, HEADS, TEXT_LEN + n_img, HEAD_DIM, generator=gen)
    v = torch.randn(BATCH, HEADS, TEXT_LEN + n_img, HEAD_DIM, generator=gen)
    regions = (
        ((slice(0, 4), slice(0, 4)), (slice(4, 8), slice(3, 8))),
        ((slice(1, 5), slice(2, 7)), (slice(5, 8), slice(0, 4))),
    )
    entity_mask = torch.zeros(3, TEXT_LEN, dtype=torch.bool)
    for e, tokens in enumerate(ENTITY_TOKENS):
        for t in tokens:
            entity_mask[e, t] = True
            k[:, :, t, e] += 4.0
        for b in range(BATCH):
            cells = torch.zeros(GRID, dtype=torch.bool)
            cells[regions[b][e]] = True
            rows = TEXT_LEN + cells.flatten().nonzero().flatten()
            q[b, :, rows, e] += 4.0
    history = torch.rand(BATCH, 3, n_img, generator=gen) * 0.1
    history[:, 2] = 0.0  # absent entity rows stay zero
    return q.to(dtype), k.to(dtype), v.to(dtype), entity_mask, history


def step_inputs(seed: int, dtype: torch.dtype = torch.float32):
    """Per step ``(q, k, v)`` (same entity regions, fresh noise, so the running mean moves), the mask and history."""
    per_step = [structured_inputs(seed + step, dtype) for step in STEPS]
    _, _, _, entity_mask, history = per_step[0]
    return [qkv[:3] for qkv in per_step], entity_mask, history


def plain_attention(q, k, v, entity_mask, grid=GRID) -> np.ndarray:
    """The output with DeLeaker off (intervention window never reached)."""
    off = DeLeakerConfig(start_intervention_from=10**6, stop_intervention_at=10**6)
    return deleaker_attention_reference(q, k, v, entity_mask, grid=grid, block_step=0, history=None, config=off)[0].numpy()


def reference_steps(qkvs, entity_mask, history, config):
    """The reference over `STEPS`, history threaded: list of (out, history_out, masks, source)."""
    results = []
    for step, (q, k, v) in zip(STEPS, qkvs):
        q, k, v = q.float(), k.float(), v.float()
        block_step = step * NUM_BLOCKS + BLOCK_OFFSET
        out, new_history = deleaker_attention_reference(
            q, k, v, entity_mask, grid=GRID, block_step=block_step, history=history, config=config
        )
        # The masks the reference used at this step (to prove the test exercises edits).
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)
        present = entity_mask.any(-1)
        affinity = entity_affinity(probs[:, :, TEXT_LEN:, :TEXT_LEN], entity_mask)
        _, source = update_history(history, affinity, present, block_step, config)
        masks = entity_image_masks(source, present, GRID, config)
        results.append((out, new_history, masks, source))
        history = new_history
    return results


def run_ort_steps(session, qkvs, entity_mask, history):
    results = []
    hist = history.numpy()
    for step, (q, k, v) in zip(STEPS, qkvs):
        feeds = {
            "q": q.numpy(),
            "k": k.numpy(),
            "v": v.numpy(),
            "entity_mask": entity_mask.numpy(),
            "history": hist,
            "step": np.array(step, dtype=np.int64),
        }
        out, hist = session.run(None, feeds)
        results.append((out, hist))
    return results


CONFIGS = {
    "all_on": DeLeakerConfig(**WINDOWS),
    "no_history_no_smoothing": DeLeakerConfig(**WINDOWS, use_history=False, do_smoothing=False, k_strength=1.5),
    "image_image_only": DeLeakerConfig(
        **WINDOWS, do_image_text_strengthening=False, do_image_text_weakening=False, std_mul_image_image=0.5
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decomposition_matches_reference_over_steps(tmp_path, name):
    config = CONFIGS[name]
    path = export_attention_onnx(
        tmp_path / "attention.onnx",
        batch=BATCH, heads=HEADS, text_len=TEXT_LEN, grid=GRID, head_dim=HEAD_DIM, max_entities=3,
        block_offset=BLOCK_OFFSET, num_blocks=NUM_BLOCKS, config=config, decompose=True,
    )
    model = onnx.load(str(path))
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node), "decomposition uses only standard ops"
    op_types = {node.op_type for node in model.graph.node}
    assert not op_types & {"Loop", "If", "Scan"}, "window logic must be branch-free"
    assert "Where" in op_types
    if config.do_smoothing:
        assert "MaxPool" in op_types

    qkvs, entity_mask, history = step_inputs(seed=3)
    reference = reference_steps(qkvs, entity_mask, history, config)
    got = run_ort_steps(make_session(path), qkvs, entity_mask, history)
    for step, ((ref_out, ref_hist, masks, source), (out, hist)) in enumerate(zip(reference, got)):
        assert rel_l2(out, ref_out.numpy()) < 1e-4, f"step {step}"
        np.testing.assert_allclose(hist, ref_hist.numpy(), rtol=1e-5, atol=1e-7, err_msg=f"step {step}")
        # Clean masks: every present entity has a mask, and no source value sits near its threshold.
        assert masks[:, :2].flatten(1).any(-1).all(), f"step {step}: an entity mask is empty"
        threshold = source.mean(-1, keepdim=True) + config.std_mul_text * source.std(-1, keepdim=True)
        assert (source[:, :2] - threshold[:, :2]).abs().min() > 1e-4
    # Inside the window the edits change the output; at t = 13 (outside) it is plain attention.
    plain = [plain_attention(*qkv, entity_mask) for qkv in qkvs]
    assert rel_l2(got[1][0], plain[1]) > 1e-3 and rel_l2(got[2][0], plain[2]) > 1e-3
    assert rel_l2(got[0][0], plain[0]) < 1e-5 and rel_l2(got[3][0], plain[3]) < 1e-5
    # History: unchanged before the window, replaced at its start, a running mean inside, frozen at its end.
    np.testing.assert_allclose(got[0][1], history.numpy(), rtol=0, atol=0)
    if config.use_history:
        assert not np.allclose(got[1][1], got[0][1]) and not np.allclose(got[2][1], got[1][1])
        np.testing.assert_array_equal(got[3][1], got[2][1])
    assert not got[2][1][:, 2].any(), "the absent entity's history row stays zero"


def test_decomposition_fp16_within_spec_tolerance(tmp_path):
    config = CONFIGS["all_on"]
    path = export_attention_onnx(
        tmp_path / "attention_fp16.onnx",
        batch=BATCH, heads=HEADS, text_len=TEXT_LEN, grid=GRID, head_dim=HEAD_DIM, max_entities=3, dtype="float16",
        block_offset=BLOCK_OFFSET, num_blocks=NUM_BLOCKS, config=config, decompose=True,
    )
    qkvs, entity_mask, history = step_inputs(seed=5, dtype=torch.float16)
    reference = reference_steps(qkvs, entity_mask, history, config)  # fp32 on the same fp16-rounded inputs
    got = run_ort_steps(make_session(path), qkvs, entity_mask, history)
    for step, ((ref_out, ref_hist, _, _), (out, hist)) in enumerate(zip(reference, got)):
        assert out.dtype == np.float16
        assert rel_l2(out, ref_out.numpy()) < 1e-2, f"step {step}"
        assert rel_l2(hist, ref_hist.numpy()) < 1e-4, f"step {step}"


def test_custom_node_runs_in_ort_with_reference(tmp_path):
    config = CONFIGS["all_on"]
    path = export_attention_onnx(
        tmp_path / "attention_node.onnx",
        batch=BATCH, heads=HEADS, text_len=TEXT_LEN, grid=GRID, head_dim=HEAD_DIM, max_entities=3,
        block_offset=BLOCK_OFFSET, num_blocks=NUM_BLOCKS, config=config, decompose=False,
    )
    model = onnx.load(str(path))
    (node,) = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert node.domain == DOMAIN and len(node.output) == 2
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == PLUGIN_VERSION.encode()
    decoded = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    assert config_from_attributes(decoded) == (BLOCK_OFFSET, NUM_BLOCKS, GRID, config)
    expected = node_attributes(block_offset=BLOCK_OFFSET, num_blocks=NUM_BLOCKS, grid=GRID, config=config)
    # Float attributes are stored as float32: numbers compare approximately, strings exactly (pytest >= 9.2's
    # approx refuses a mapping that holds strings).
    assert decoded.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert decoded[name] == pytest.approx(value, rel=1e-7), name
        else:
            assert decoded[name] == value, name

    qkvs, entity_mask, history = step_inputs(seed=3)
    reference = reference_steps(qkvs, entity_mask, history, config)
    got = run_ort_steps(make_reference_session(path), qkvs, entity_mask, history)
    for (ref_out, ref_hist, _, _), (out, hist) in zip(reference, got):
        assert rel_l2(out, ref_out.numpy()) < 1e-6
        np.testing.assert_allclose(hist, ref_hist.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("inputs", ["uniform_attention", "uniform_attention_split", "constant_image_image_region"])
def test_decomposition_cuts_nothing_where_statistics_are_constant(tmp_path, inputs):
    """Equal values have std 0 and nothing above their mean: no mask (zero queries) and no image-image cut (a
    region of one pbar value), with the multipliers where an ulp in the mean would flip that."""
    windows = dict(start_aggregating_from=0, start_intervention_from=0)
    if inputs == "uniform_attention":
        text_len, grid = 13, (8, 8)  # a plain float32 mean of the constant map is an ulp off it here
        q, k, v, entity_mask = uniform_attention_inputs(text_len, grid)
        config = DeLeakerConfig(**windows, std_mul_text=0.0)
    elif inputs == "uniform_attention_split":
        text_len, grid = 127, (1, 127)  # a MatMul gave these maps values an ulp apart
        q, k, v, entity_mask = uniform_attention_inputs(text_len, grid, split=True)
        config = DeLeakerConfig(**windows, std_mul_text=1.0, do_smoothing=False)
    else:
        text_len, grid = 4, (6, 6)
        q, k, v, entity_mask = constant_region_inputs()
        config = DeLeakerConfig(**windows, std_mul_image_image=-1.0)
    no_image_image = dataclasses.replace(config, do_image_image=False)
    expected, _ = deleaker_attention_reference(q, k, v, entity_mask, grid=grid, block_step=5, history=None,
                                               config=no_image_image)
    path = export_attention_onnx(
        tmp_path / "attention.onnx", batch=1, heads=q.shape[1], text_len=text_len, grid=grid, head_dim=q.shape[-1],
        max_entities=entity_mask.shape[0], block_offset=1, num_blocks=4, config=config, decompose=True,
    )
    history = np.zeros((1, entity_mask.shape[0], grid[0] * grid[1]), dtype=np.float32)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "entity_mask": entity_mask.numpy(),
             "history": history, "step": np.array(1, dtype=np.int64)}  # t = 1 * 4 + 1 = 5
    out, _ = make_session(path).run(None, feeds)
    assert rel_l2(out, expected.numpy()) < 1e-6
    if inputs.startswith("uniform_attention"):
        plain = plain_attention(q, k, v, entity_mask, grid)
        assert rel_l2(out, plain) < 1e-6


def _morphology_graph(ops: str) -> onnx.ModelProto:
    """A graph applying ``ops`` ('d' dilate, 'e' erode: MaxPool and -MaxPool(-x), pads 1) to a (1, 1, H, W) grid."""
    nodes, current = [], "x"
    for i, kind in enumerate(ops):
        pool = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        if kind == "d":
            nodes.append(helper.make_node("MaxPool", [current], [f"y{i}"], **pool))
        else:
            nodes += [
                helper.make_node("Neg", [current], [f"n{i}"]),
                helper.make_node("MaxPool", [f"n{i}"], [f"p{i}"], **pool),
                helper.make_node("Neg", [f"p{i}"], [f"y{i}"]),
            ]
        current = f"y{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "morphology",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5, 6])],
    )
    # IR 10, as torch.onnx writes: onnx's default (14 in onnx 1.23) is newer than ONNX Runtime 1.30 reads (13).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_maxpool_padding_acts_as_minus_infinity(tmp_path):
    """ONNX MaxPool ignores padded cells: an erosion of an all-ones grid keeps its border (zero padding would not),
    and opening + double closing equal the reference's ``max_pool2d`` morphology on random masks."""
    from deleaker.ops import smooth_masks

    erode = tmp_path / "erode.onnx"
    onnx.save(_morphology_graph("e"), str(erode))
    ones = np.ones((1, 1, 5, 6), dtype=np.float32)
    np.testing.assert_array_equal(make_session(erode).run(None, {"x": ones})[0], ones)
    dilate = tmp_path / "dilate.onnx"
    onnx.save(_morphology_graph("d"), str(dilate))
    minus = -ones
    np.testing.assert_array_equal(make_session(dilate).run(None, {"x": minus})[0], minus)

    smooth = tmp_path / "smooth.onnx"
    onnx.save(_morphology_graph("edddee"), str(smooth))  # opening, then closing with two iterations
    session = make_session(smooth)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        masks = torch.rand(1, 1, 30, generator=gen) > 0.45
        expected = smooth_masks(masks, (5, 6)).reshape(1, 1, 5, 6).numpy()
        got = session.run(None, {"x": masks.reshape(1, 1, 5, 6).float().numpy()})[0] > 0.5
        np.testing.assert_array_equal(got, expected)


def test_decomposition_thresholds_tiny_maps_as_any_scaled_copy(tmp_path):
    """The mask rule is scale-invariant: a history of tiny values (about 1e-30, as sharp attention gives) masks as
    the same history scaled to 1 does, as in the reference op. Their float32 squares used to underflow: std 0,
    and a mask at the maximum of each map only."""
    config = DeLeakerConfig(start_aggregating_from=0, stop_aggregating_at=2, start_intervention_from=0,
                            stop_intervention_at=100, do_smoothing=False)
    q, k, v, entity_mask, _ = structured_inputs(seed=7)
    history = torch.rand(BATCH, 3, GRID[0] * GRID[1], generator=torch.Generator().manual_seed(7))
    history[:, 2] = 0.0
    path = export_attention_onnx(
        tmp_path / "attention.onnx", batch=BATCH, heads=HEADS, text_len=TEXT_LEN, grid=GRID, head_dim=HEAD_DIM,
        max_entities=3, block_offset=1, num_blocks=4, config=config, decompose=True,
    )
    session = make_session(path)
    outs = []
    for scale in (1.0, 1e-30):
        hist = history * scale  # t = 5 > stop_aggregating_at: the source map is the history as given
        feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "entity_mask": entity_mask.numpy(),
                 "history": hist.numpy(), "step": np.array(1, dtype=np.int64)}
        out, _ = session.run(None, feeds)
        expected, _ = deleaker_attention_reference(q, k, v, entity_mask, grid=GRID, block_step=5, history=hist,
                                                   config=config)
        assert rel_l2(out, expected.numpy()) < 1e-5, scale
        outs.append(out)
    assert rel_l2(outs[1], outs[0]) < 1e-6
    assert rel_l2(outs[0], plain_attention(q, k, v, entity_mask)) > 1e-3, "the masks must edit the attention"
