"""The CUDA kernels against the PyTorch reference (needs a CUDA device; skipped without one).

Inputs are random but structured: each entity owns a blob of image tokens whose queries point at that entity's
text keys, so the masks, the image-text edits and the image-image cuts are all non-trivial. The kernels' masks
must equal the reference's except at near-ties; their output error against the fp32 reference must stay within
2x the error of the same reference computed in the input dtype (and under the spec's 1e-2).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from deleaker import DeLeakerConfig, ShapeError, deleaker_attention_reference
from deleaker.ops import entity_affinity, image_image_suppression, image_text_edits, smooth_masks, update_history

pytestmark = pytest.mark.gpu

# Windows placed so that a few block steps cross every boundary.
CONFIG = DeLeakerConfig(
    start_aggregating_from=2, stop_aggregating_at=6, start_intervention_from=4, stop_intervention_at=8
)
INSIDE = 5  # a block step inside both windows
NEAR_TIE = 1e-4  # relative margin under which a threshold comparison counts as a tie


def skip_without_cuda() -> None:
    """Skip the calling test unless a CUDA device and the kernel library (built or buildable) are there."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from deleaker.plugins import build, kernels

    try:
        kernels.load_library()
    except build.NvccNotFoundError as exc:
        pytest.skip(f"the kernel library cannot be built here: {exc}")


@pytest.fixture(autouse=True)
def _cuda_and_exact_fp32():
    skip_without_cuda()
    # The fp32 reference must not silently run its matmuls in TF32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cuda_op():
    from deleaker.plugins import torch_op

    return torch_op


# ---- inputs ------------------------------------------------------------------------------------------------


def structured_inputs(batch, heads, text_len, grid, head_dim, entities, e_max, dtype, seed, device="cuda"):
    """q, k, v ``(B, H, T + gh * gw, D)`` in ``dtype`` and an ``(e_max, T)`` entity mask with ``entities`` rows."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    n_img = gh * gw
    tokens = text_len + n_img
    q = torch.randn(batch, heads, tokens, head_dim, generator=g) * 0.5
    k = torch.randn(batch, heads, tokens, head_dim, generator=g) * 0.5
    v = torch.randn(batch, heads, tokens, head_dim, generator=g)
    # One unit direction per entity and head; the amplitude gives logits about 3 above the noise.
    dirs = F.normalize(torch.randn(entities, heads, head_dim, generator=g), dim=-1)
    amp = (3.0 * math.sqrt(head_dim)) ** 0.5
    entity_mask = torch.zeros(e_max, text_len, dtype=torch.bool)
    positions = torch.randperm(text_len, generator=g)
    used = 0
    for e in range(entities):
        size = 1 + int(torch.randint(0, 3, (1,), generator=g))
        entity_mask[e, positions[used : used + size]] = True
        k[:, :, positions[used : used + size]] += amp * dirs[e][None, :, None, :]
        used += size
    ys = torch.arange(gh, dtype=torch.float32)[:, None].expand(gh, gw).reshape(-1)
    xs = torch.arange(gw, dtype=torch.float32)[None, :].expand(gh, gw).reshape(-1)
    radius = max(3.5, 0.25 * min(gh, gw) + 1.0)
    for b in range(batch):
        for e in range(entities):
            cy = 1.0 + float(torch.rand(1, generator=g)) * max(gh - 3, 0)  # not on the border
            cx = 1.0 + float(torch.rand(1, generator=g)) * max(gw - 3, 0)
            dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
            # A plateau (so that the core survives the 3x3 opening even on tiny grids), tapering to the edge.
            weight = (2.0 * (1.0 - dist / radius)).clamp(min=0.0, max=1.0)
            weight = weight * (0.9 + 0.2 * torch.rand(n_img, generator=g))
            q[b, :, text_len:] += amp * weight[None, :, None] * dirs[e][:, None, :]
            k[b, :, text_len:] += 0.5 * amp * weight[None, :, None] * dirs[e][:, None, :]
    return tuple(x.to(dtype=dtype, device=device) for x in (q, k, v)), entity_mask.to(device)


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ---- reference pieces (fp32, same formulas as deleaker.ops) -------------------------------------------------


def reference_steps(q, k, entity_mask, grid, block_step, history, config):
    """The reference's intermediates on upcast inputs: affinity, history, source, thresholds, raw masks, probs."""
    qf, kf = q.float(), k.float()
    text_len = entity_mask.shape[1]
    logits = qf @ kf.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    probs = torch.softmax(logits, dim=-1)
    present = entity_mask.any(-1)
    affinity = entity_affinity(probs[:, :, text_len:, :text_len], entity_mask)
    if history is None:
        history = affinity.new_zeros(affinity.shape)
    new_history, source = update_history(history, affinity, present, block_step, config)
    threshold = source.mean(-1, keepdim=True) + config.std_mul_text * source.std(-1, keepdim=True)
    raw = (source > threshold) & present[None, :, None]
    return {
        "probs": probs,
        "lse": torch.logsumexp(logits[:, :, text_len:], dim=-1),
        "affinity": affinity,
        "history": new_history,
        "source": source,
        "threshold": threshold,
        "raw_masks": raw,
    }


def pair_near_ties(pbar, masks, config):
    """``(B, Nimg, Nimg)`` bool: cells whose pbar lies within NEAR_TIE (relative) of a threshold of their pairs."""
    near = torch.zeros_like(pbar, dtype=torch.bool)
    m = masks.float()
    for e in range(masks.shape[1]):
        for f in range(masks.shape[1]):
            if e == f:
                continue
            region = m[:, e, :, None] * m[:, f, None, :]
            count = region.sum((1, 2), keepdim=True)
            mean = (pbar * region).sum((1, 2), keepdim=True) / count.clamp(min=1.0)
            var = (((pbar - mean) * region) ** 2).sum((1, 2), keepdim=True) / (count - 1).clamp(min=1.0)
            thr = mean + config.std_mul_image_image * var.sqrt()
            near |= (region > 0) & ((pbar - thr).abs() <= NEAR_TIE * thr.abs())
    return near


def edited_attention(q, k, v, masks, cut, entity_mask, config, *, upcast):
    """Steps 6-7 given the masks and the cut: fp32 (``upcast``) or the input dtype's arithmetic."""
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    text_len = entity_mask.shape[1]
    scores = ((q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)).float()
    image = scores[:, :, text_len:]
    weaken, strengthen = image_text_edits(masks, entity_mask)
    if config.do_image_text_strengthening:
        text = image[..., :text_len]
        image[..., :text_len] = torch.where(strengthen[:, None], text * config.k_strength, text)
    if config.do_image_text_weakening:
        image[..., :text_len] = image[..., :text_len].masked_fill(weaken[:, None], float("-inf"))
    if config.do_image_image:
        image[..., text_len:] = image[..., text_len:].masked_fill(cut[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v


def poisoned_outputs(q, e_max, n_img):
    out = torch.full_like(q, float("nan"))
    history = torch.full((q.shape[0], e_max, n_img), float("nan"), device=q.device)
    return out, history


# ---- tests -------------------------------------------------------------------------------------------------

SHAPES = [
    # batch, heads, T, grid, head_dim, entities, E_max
    (1, 2, 77, (7, 9), 64, 2, 4),
    (2, 3, 77, (33, 33), 128, 3, 4),
    (1, 2, 256, (16, 16), 128, 4, 4),
    (2, 2, 512, (20, 24), 64, 4, 8),
    (1, 4, 256, (32, 32), 128, 2, 4),
    (1, 2, 77, (33, 33), 64, 5, 8),
]


SHAPE_IDS = [f"B{s[0]}H{s[1]}T{s[2]}g{s[3][0]}x{s[3][1]}D{s[4]}E{s[5]}" for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference_inside_window(shape, dtype):
    batch, heads, text_len, grid, head_dim, entities, e_max = shape
    n_img = grid[0] * grid[1]
    seed = 10 * SHAPES.index(shape) + (dtype == torch.bfloat16)
    (q, k, v), entity_mask = structured_inputs(batch, heads, text_len, grid, head_dim, entities, e_max, dtype, seed)
    out, history = poisoned_outputs(q, e_max, n_img)
    out, history, debug = _cuda_op().deleaker_attention_cuda_debug(
        q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=CONFIG, out=out, new_history=history
    )
    torch.cuda.synchronize()
    assert not out.isnan().any() and not history.isnan().any(), "an output element was not written"

    ref = reference_steps(q, k, entity_mask, grid, INSIDE, None, CONFIG)
    torch.testing.assert_close(debug["lse"], ref["lse"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(debug["affinity"], ref["affinity"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(history, ref["history"], rtol=1e-4, atol=1e-7)

    # Masks: equal to the reference except at near-ties of the threshold; the morphology is exact.
    spread = ref["source"].std(-1, keepdim=True).clamp(min=1e-30)
    near = (ref["source"] - ref["threshold"]).abs() <= NEAR_TIE * spread
    raw_diff = debug["raw_masks"] != ref["raw_masks"]
    assert not (raw_diff & ~near).any(), f"{int((raw_diff & ~near).sum())} mask tokens differ away from a tie"
    assert torch.equal(debug["masks"], smooth_masks(debug["raw_masks"], grid))
    ref_masks = smooth_masks(ref["raw_masks"], grid)
    masks_equal = torch.equal(debug["masks"], ref_masks)
    assert masks_equal or raw_diff.any()
    assert debug["masks"].any(), "structured inputs should give non-empty masks"
    assert int(debug["union_count"].sum()) == int(debug["masks"].any(1).sum())

    # The cut, against the reference's cut for the kernel's own masks, except at near-ties.
    pbar = ref["probs"][:, :, text_len:, text_len:].mean(1)
    ref_cut = image_image_suppression(ref["probs"][:, :, text_len:, text_len:], debug["masks"], CONFIG)
    cut_diff = (debug["cut"] != ref_cut) & ~pair_near_ties(pbar, debug["masks"], CONFIG)
    assert not cut_diff.any(), f"{int(cut_diff.sum())} image-image cuts differ away from a tie"
    if (debug["masks"].sum(-1) > 0).sum(-1).max() >= 2:
        assert debug["cut"].any(), "two non-empty masks should cut some image-image logits"

    # Output: within 2x the error of the same computation in the input dtype.
    exact = edited_attention(q, k, v, debug["masks"], debug["cut"], entity_mask, CONFIG, upcast=True)
    lowp = edited_attention(q, k, v, debug["masks"], debug["cut"], entity_mask, CONFIG, upcast=False)
    err, err_lowp = rel_l2(out, exact), rel_l2(lowp, exact)
    assert err <= 2 * err_lowp + 1e-6 and err < 1e-2, (err, err_lowp)
    if masks_equal:
        ref_out, _ = deleaker_attention_reference(
            q.float(), k.float(), v.float(), entity_mask, grid=grid, block_step=INSIDE, history=None, config=CONFIG
        )
        err = rel_l2(out, ref_out)
        assert err <= 2 * err_lowp + 1e-6 and err < 1e-2, (err, err_lowp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_plain_attention_outside_window_equals_sdpa(dtype, head_dim):
    (q, k, v), entity_mask = structured_inputs(2, 3, 77, (33, 33), head_dim, 3, 4, dtype, seed=head_dim)
    out, history = poisoned_outputs(q, 4, 33 * 33)
    for block_step in (CONFIG.start_intervention_from - 1, CONFIG.stop_intervention_at + 1):
        out, history = _cuda_op().deleaker_attention_cuda(
            q, k, v, entity_mask, grid=(33, 33), block_step=block_step, history=None, config=CONFIG,
            out=out.fill_(float("nan")), new_history=history,
        )
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa = F.scaled_dot_product_attention(q, k, v)
        err, err_sdpa = rel_l2(out, exact), rel_l2(sdpa, exact)
        assert not out.isnan().any()
        assert err <= 2 * err_sdpa + 1e-4 and err < 1e-2, (block_step, err, err_sdpa)


@pytest.mark.parametrize(
    "switch",
    ["do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening", "use_history"],
)
def test_each_switch_off_matches_reference(switch):
    """Each knob switched off (paths the shape sweep never takes), inside both windows."""
    config = dataclasses.replace(CONFIG, **{switch: False})
    grid, e_max = (16, 16), 4
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, 64, 3, e_max, torch.float16, seed=300)
    out, history = poisoned_outputs(q, e_max, grid[0] * grid[1])
    out, history, debug = _cuda_op().deleaker_attention_cuda_debug(
        q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config, out=out, new_history=history
    )
    torch.cuda.synchronize()
    assert not out.isnan().any() and not history.isnan().any(), "an output element was not written"
    ref = reference_steps(q, k, entity_mask, grid, INSIDE, None, config)
    torch.testing.assert_close(history, ref["history"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(debug["source"], ref["source"], rtol=1e-4, atol=1e-7)
    if config.do_smoothing:
        assert torch.equal(debug["masks"], smooth_masks(debug["raw_masks"], grid))
    else:
        assert torch.equal(debug["masks"], debug["raw_masks"])
    assert debug["masks"].any()
    if not config.do_image_image:
        assert not debug["cut"].any()
    exact = edited_attention(q, k, v, debug["masks"], debug["cut"], entity_mask, config, upcast=True)
    lowp = edited_attention(q, k, v, debug["masks"], debug["cut"], entity_mask, config, upcast=False)
    err, err_lowp = rel_l2(out, exact), rel_l2(lowp, exact)
    assert err <= 2 * err_lowp + 1e-6 and err < 1e-2, (switch, err, err_lowp)


@pytest.mark.parametrize("use_history", [True, False])
def test_history_threaded_over_block_steps(use_history):
    """Block steps 0..10 cross both windows; the history is threaded through kernel and reference alike."""
    config = DeLeakerConfig(
        start_aggregating_from=2, stop_aggregating_at=6, start_intervention_from=4, stop_intervention_at=8,
        use_history=use_history,
    )
    grid, e_max = (16, 20), 4
    hist_kernel = hist_ref = None
    for t in range(11):
        (q, k, v), entity_mask = structured_inputs(2, 2, 77, grid, 64, 3, e_max, torch.bfloat16, seed=100 + t)
        # Alternate a Python int and a device tensor step (the latter read by the kernels).
        block_step = t if t % 2 else torch.tensor(t, device="cuda")
        out, hist_kernel = _cuda_op().deleaker_attention_cuda(
            q, k, v, entity_mask, grid=grid, block_step=block_step, history=hist_kernel, config=config
        )
        ref_out, hist_ref = deleaker_attention_reference(
            q.float(), k.float(), v.float(), entity_mask, grid=grid, block_step=t, history=hist_ref, config=config
        )
        torch.testing.assert_close(hist_kernel, hist_ref, rtol=1e-4, atol=1e-7, msg=f"history at t={t}")
        assert rel_l2(out, ref_out) < 1e-2, t
        assert not hist_kernel[:, 3].any(), "the absent entity's history must stay zero"


def test_cuda_graph_capture_and_device_step():
    """A captured call replays with new inputs and a new device step, inside and outside the window."""
    grid = (16, 16)
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, 128, 2, 4, torch.float16, seed=7)
    step = torch.tensor(0, device="cuda", dtype=torch.int64)
    history = torch.zeros(1, 4, 256, device="cuda")
    op = _cuda_op().deleaker_attention_cuda

    def call():
        return op(q, k, v, entity_mask, grid=grid, block_step=step, history=history, config=CONFIG)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up: library load, kernel attributes
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_history = call()

    for t, seed in ((INSIDE, 8), (0, 9), (INSIDE, 10)):
        (q2, k2, v2), _ = structured_inputs(1, 2, 77, grid, 128, 2, 4, torch.float16, seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        step.fill_(t)
        history.uniform_(0.0, 1e-3)
        graph.replay()
        eager_out, eager_history = call()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager_out, rtol=0, atol=0)
        torch.testing.assert_close(static_history, eager_history, rtol=0, atol=0)
        ref_out, _ = deleaker_attention_reference(
            q.float(), k.float(), v.float(), entity_mask, grid=grid, block_step=t, history=history, config=CONFIG
        )
        assert rel_l2(static_out, ref_out) < 1e-2, t


def test_bad_inputs_raise_typed_errors():
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, (7, 9), 64, 2, 4, torch.float16, seed=1)
    op = _cuda_op()
    assert op.is_available() and op.supports(q, entity_mask)
    assert not op.supports(q.float(), entity_mask) and not op.supports(q[..., :32].contiguous(), entity_mask)
    assert not op.supports(q, torch.zeros(op.kernels.MAX_ENTITIES + 1, 77, dtype=torch.bool, device="cuda"))
    with pytest.raises(ShapeError, match="float16/bfloat16"):
        op.deleaker_attention_cuda(
            q.float(), k.float(), v.float(), entity_mask, grid=(7, 9), block_step=0, history=None, config=CONFIG
        )
    many = torch.zeros(9, 77, dtype=torch.bool, device="cuda")
    many[0, 0] = many[1, 1] = True
    with pytest.raises(ShapeError, match="at most 8"):
        op.deleaker_attention_cuda(q, k, v, many, grid=(7, 9), block_step=0, history=None, config=CONFIG)
    with pytest.raises(ShapeError, match="grid"):
        op.deleaker_attention_cuda(q, k, v, entity_mask, grid=(9, 9), block_step=0, history=None, config=CONFIG)
