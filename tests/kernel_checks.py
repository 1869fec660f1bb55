"""The kernels' correctness checks, shared by the GPU tests and the CPU emulator's tests.

Each ``check_*`` takes ``run``, a callable with the signature of
`deleaker.plugins.torch_op.deleaker_attention_cuda_debug` that returns only once the kernels are done, and the
``device`` its tensors live on: ``tests/test_cuda_kernels.py`` runs them on a GPU, ``tests/test_kernels_emulated.py``
on the CPU emulation of the same CUDA source.

Inputs are random but structured: each entity owns a blob of image tokens whose queries point at that entity's
text keys, so the masks, the image-text edits and the image-image cuts are all non-trivial. The kernels' masks
must equal the reference's except at near-ties; their output error against the fp32 reference must stay within
2x the error of the same reference computed in the input dtype (and under the spec's 1e-2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from deleaker import DeLeakerConfig, deleaker_attention_reference
from deleaker.ops import entity_affinity, image_image_suppression, image_text_edits, smooth_masks, update_history

Tensor = torch.Tensor
#: ``run(q, k, v, entity_mask, *, grid, block_step, history, config, out=None, new_history=None)`` ->
#: ``(out, new_history, debug views)``, finished when it returns.
KernelRun = Callable[..., Tuple[Tensor, Tensor, Dict[str, Tensor]]]

# Windows placed so that a few block steps cross every boundary.
CONFIG = DeLeakerConfig(
    start_aggregating_from=2, stop_aggregating_at=6, start_intervention_from=4, stop_intervention_at=8
)
INSIDE = 5  # a block step inside both windows
NEAR_TIE = 1e-4  # relative margin under which a threshold comparison counts as a tie


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


# ---- checks ------------------------------------------------------------------------------------------------

#: batch, heads, T, grid, head_dim, entities, E_max
Shape = Tuple[int, int, int, Tuple[int, int], int, int, int]


def shape_id(shape: Shape) -> str:
    return f"B{shape[0]}H{shape[1]}T{shape[2]}g{shape[3][0]}x{shape[3][1]}D{shape[4]}E{shape[5]}"


def check_inside_window(run: KernelRun, shape: Shape, dtype: torch.dtype, seed: int, device: str) -> None:
    """Every intermediate and the output against the reference, inside both windows."""
    batch, heads, text_len, grid, head_dim, entities, e_max = shape
    n_img = grid[0] * grid[1]
    (q, k, v), entity_mask = structured_inputs(
        batch, heads, text_len, grid, head_dim, entities, e_max, dtype, seed, device=device
    )
    out, history = poisoned_outputs(q, e_max, n_img)
    out, history, debug = run(
        q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=CONFIG, out=out, new_history=history
    )
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


def check_plain_outside_window(run: KernelRun, dtype: torch.dtype, head_dim: int, grid, device: str) -> None:
    """Before and after the intervention window the kernels are plain attention (against SDPA's error)."""
    (q, k, v), entity_mask = structured_inputs(2, 3, 77, grid, head_dim, 3, 4, dtype, seed=head_dim, device=device)
    out, history = poisoned_outputs(q, 4, grid[0] * grid[1])
    for block_step in (CONFIG.start_intervention_from - 1, CONFIG.stop_intervention_at + 1):
        out, history, _ = run(
            q, k, v, entity_mask, grid=grid, block_step=block_step, history=None, config=CONFIG,
            out=out.fill_(float("nan")), new_history=history,
        )
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa = F.scaled_dot_product_attention(q, k, v)
        err, err_sdpa = rel_l2(out, exact), rel_l2(sdpa, exact)
        assert not out.isnan().any()
        assert err <= 2 * err_sdpa + 1e-4 and err < 1e-2, (block_step, err, err_sdpa)


def check_switch_off(run: KernelRun, switch: str, device: str) -> None:
    """One knob switched off (paths the shape sweep never takes), inside both windows."""
    config = dataclasses.replace(CONFIG, **{switch: False})
    grid, e_max = (16, 16), 4
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, 64, 3, e_max, torch.float16, seed=300, device=device)
    out, history = poisoned_outputs(q, e_max, grid[0] * grid[1])
    out, history, debug = run(
        q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config, out=out, new_history=history
    )
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


def check_history_threaded(run: KernelRun, use_history: bool, device: str) -> None:
    """Block steps 0..10 cross both windows; the history is threaded through kernel and reference alike.
    Odd steps are Python ints (the host decides the launches), even ones tensors on ``device`` (read by the
    kernels)."""
    config = dataclasses.replace(CONFIG, use_history=use_history)
    grid, e_max = (16, 20), 4
    hist_kernel = hist_ref = None
    for t in range(11):
        (q, k, v), entity_mask = structured_inputs(
            2, 2, 77, grid, 64, 3, e_max, torch.bfloat16, seed=100 + t, device=device
        )
        block_step = t if t % 2 else torch.tensor(t, device=device)
        out, hist_kernel, _ = run(
            q, k, v, entity_mask, grid=grid, block_step=block_step, history=hist_kernel, config=config
        )
        ref_out, hist_ref = deleaker_attention_reference(
            q.float(), k.float(), v.float(), entity_mask, grid=grid, block_step=t, history=hist_ref, config=config
        )
        torch.testing.assert_close(hist_kernel, hist_ref, rtol=1e-4, atol=1e-7, msg=f"history at t={t}")
        assert rel_l2(out, ref_out) < 1e-2, t
        assert not hist_kernel[:, 3].any(), "the absent entity's history must stay zero"
