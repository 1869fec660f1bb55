"""The kernels' correctness checks, shared by the GPU tests and the CPU emulator's tests.

Each ``check_*`` takes ``run``, a callable with the signature of
`deleaker.plugins.torch_op.deleaker_attention_cuda_debug` that returns only once the kernels are done, and the
``device`` its tensors live on: ``tests/test_cuda_kernels.py`` runs them on a GPU (PyTorch's fused attention
gives o and the LSE), ``tests/test_kernels_emulated.py`` on the CPU emulation of the same CUDA source (plain
PyTorch math gives them).

The reference is the fast path's specification, `deleaker.decomposed.decomposed_intermediates`, compared step by
step: LSE, affinities, history, masks (equal except at near-ties of a threshold), the union, region thresholds,
cut bits, Z of every edited row, which rows fall back, and the output, whose error against the exact edited
attention (float64, on the kernels' own masks and cuts) must stay within 2x the decomposed op's own error. Inputs
are random but structured: each entity owns a blob of image tokens whose queries point at that entity's text
keys, so the masks, the image-text edits and the image-image cuts are all non-trivial.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from deleaker import DeLeakerConfig
from deleaker.decomposed import decomposed_intermediates, image_image_cuts, region_thresholds
from deleaker.ops import image_text_edits, smooth_masks
from test_op_reference import (
    constant_region_inputs,
    constant_region_masks,
    make_case,
    rect,
    uniform_attention_inputs,
)

Tensor = torch.Tensor
#: ``run(q, k, v, entity_mask, *, grid, block_step, history, config, fallback_threshold=0.5)`` ->
#: ``(out, new_history, debug views)``, finished when it returns.
KernelRun = Callable[..., Tuple[Tensor, Tensor, Dict[str, Tensor]]]

# Windows placed so that a few block steps cross every boundary.
CONFIG = DeLeakerConfig(
    start_aggregating_from=2, stop_aggregating_at=6, start_intervention_from=4, stop_intervention_at=8
)
INSIDE = 5  # a block step inside both windows
NEAR_TIE = 1e-4  # relative margin under which a threshold comparison counts as a tie

#: batch, heads, T, grid, head_dim, entities, E_max
Shape = Tuple[int, int, int, Tuple[int, int], int, int, int]


def shape_id(shape: Shape) -> str:
    return f"B{shape[0]}H{shape[1]}T{shape[2]}g{shape[3][0]}x{shape[3][1]}D{shape[4]}E{shape[5]}of{shape[6]}"


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


def mostly_cut_inputs(seed: int, dtype: torch.dtype, device: str, head_dim: int = 64, boost: float = 7.0,
                      value_scale: float = 1.0):
    """Two entities sharing one blob, the top 3 rows of an 8x8 grid (T = 8, H = 2): those rows are in both
    masks, so both entities' text tokens are cut there, and their queries put nearly all their mass on those
    tokens (their logits raised by ``boost``): Z far below 0.5, where the exact fallback must take over. The two
    masks also make an image-image region pair. ``value_scale`` multiplies v."""
    blob = rect(0, 3, 0, 8)
    case = make_case(seed, grid=(8, 8), entities=[(1,), (4,)], e_max=4, heads=2, dim=head_dim, text_len=8,
                     blobs=[[blob, blob]])
    rows = [8 + r * 8 + c for r, c in blob]
    q, k = case.q.clone(), case.k
    # Raise both entity logits of the blob's queries by the same 7 units: w in span(k_1, k_4), w.k_1 = w.k_4 = 1.
    keys = torch.stack([k[:, :, 1], k[:, :, 4]], dim=-2)  # (B, H, 2, D)
    w = (torch.linalg.pinv(keys) @ torch.ones(2, 1, dtype=keys.dtype)).transpose(-1, -2)  # (B, H, 1, D)
    q[:, :, rows] += boost * math.sqrt(q.shape[-1]) * w
    v = case.v * value_scale
    return tuple(x.to(dtype=dtype, device=device) for x in (q, case.k, v)), case.entity_mask.to(device)


def rel_l2(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ---- reference pieces on the kernels' own masks and cuts --------------------------------------------------------


def image_pbar(q: Tensor, k: Tensor, lse: Tensor, text_len: int) -> Tensor:
    """``(B, Nimg, Nimg)`` float32: head mean of the pre-intervention image-image probabilities."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = q[:, :, text_len:].float() @ k[:, :, text_len:].float().transpose(-1, -2) * scale
    return torch.exp(s - lse[:, :, text_len:, None]).mean(1)


def edited_logits(q, k, masks, cut, entity_mask, config) -> Tensor:
    """``(B, H, N, N)`` float64: the spec's edited logits for the given masks and image-image cuts."""
    text_len = entity_mask.shape[1]
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    image = s[:, :, text_len:]
    weaken, strengthen = image_text_edits(masks, entity_mask)
    if config.do_image_text_strengthening:
        text = image[..., :text_len]
        image[..., :text_len] = torch.where(strengthen[:, None], text * config.k_strength, text)
    if config.do_image_text_weakening:
        image[..., :text_len] = image[..., :text_len].masked_fill(weaken[:, None], -math.inf)
    if config.do_image_image:
        image[..., text_len:] = image[..., text_len:].masked_fill(cut[:, None], -math.inf)
    return s


def exact_edited_attention(q, k, v, masks, cut, entity_mask, config) -> Tuple[Tensor, Tensor]:
    """``softmax(s') v`` in float64 ``(B, H, N, D)``, and Z ``(B, H, Nimg)``: sum_j exp(s'_ij - l_i) with l the
    pre-intervention LSE (1 for rows no mask contains)."""
    text_len = entity_mask.shape[1]
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    s_edit = edited_logits(q, k, masks, cut, entity_mask, config)
    z = torch.exp(s_edit - torch.logsumexp(s, -1, keepdim=True)).sum(-1)[:, :, text_len:]
    return torch.softmax(s_edit, -1) @ v.double(), z


def threshold_near_ties(pbar: Tensor, masks: Tensor, thresholds: Tensor) -> Tensor:
    """``(B, Nimg, Nimg)`` bool: region cells whose pbar lies within NEAR_TIE (relative) of a pair threshold."""
    near = torch.zeros_like(pbar, dtype=torch.bool)
    for e in range(masks.shape[1]):
        for f in range(masks.shape[1]):
            thr = thresholds[:, e, f, None, None]
            region = masks[:, e, :, None] & masks[:, f, None, :]
            near |= region & ((pbar - thr).abs() <= NEAR_TIE * thr.abs())  # NaN thresholds: never near
    return near


def check_union(views: Dict[str, Tensor], n_img: int) -> Tensor:
    """U is the masks' union, listed first, grouped by entity bits (ascending within a group), then the rest."""
    masks = views["masks"]
    bits = (masks.long() << torch.arange(masks.shape[1], device=masks.device)[None, :, None]).sum(1)  # (B, Nimg)
    in_union = masks.any(1)
    for b in range(masks.shape[0]):
        count, order = int(views["union_count"][b]), views["union_index"][b].long()
        assert count == int(in_union[b].sum()), "|U| differs from the masks' union"
        assert torch.equal(order.sort().values, torch.arange(n_img, device=order.device)), "not a permutation"
        key = torch.where(in_union[b], bits[b], 1 << 16) * n_img + torch.arange(n_img, device=order.device)
        assert torch.equal(order, key.argsort()), "U is not grouped by entity bits, ascending within groups"
    return in_union


# ---- checks ------------------------------------------------------------------------------------------------


def check_matches_decomposed(
    run: KernelRun, shape: Shape, dtype: torch.dtype, seed: int, device: str, *, config: DeLeakerConfig = CONFIG,
    block_step=INSIDE, fallback_threshold: float = 0.5,
) -> Dict[str, Tensor]:
    """Every intermediate and the output against the decomposed op (the fast path's specification)."""
    batch, heads, text_len, grid, head_dim, entities, e_max = shape
    (q, k, v), entity_mask = structured_inputs(
        batch, heads, text_len, grid, head_dim, entities, e_max, dtype, seed, device=device
    )
    out, history, views = run(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=None, config=config,
        fallback_threshold=fallback_threshold,
    )
    ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=block_step, history=None,
                                   config=config, fallback_threshold=fallback_threshold)
    assert not out.isnan().any() and not history.isnan().any(), "an output element was not written"
    assert_statistics_match(views, history, ref)
    if not config.intervenes_at(int(block_step)):
        assert torch.equal(out, views["plain"]), "outside the intervention window out must stay o, bit for bit"
        return views
    assert_masks_match(views, ref, grid, config)
    assert_correction_matches(q, k, v, entity_mask, out, views, ref, config, fallback_threshold)
    return views


def assert_statistics_match(views, history, ref) -> None:
    """LSE and plain output of the fused attention, affinities, history, source map."""
    torch.testing.assert_close(views["lse"], ref.lse, rtol=1e-5, atol=2e-4)
    assert rel_l2(views["plain"], ref.plain) < 5e-3, "the fused attention's output differs from plain math"
    torch.testing.assert_close(views["affinity"], ref.affinity, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(history, ref.history, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(views["source"], ref.source, rtol=1e-4, atol=1e-7)


def assert_masks_match(views, ref, grid, config) -> None:
    """Masks equal to the reference's except at near-ties of the threshold; the morphology is exact."""
    source = ref.source
    threshold = source.mean(-1, keepdim=True) + config.std_mul_text * source.std(-1, keepdim=True)
    near = (source - threshold).abs() <= NEAR_TIE * source.std(-1, keepdim=True).clamp(min=1e-30)
    raw_diff = views["raw_masks"] != ref.raw_masks
    assert not (raw_diff & ~near).any(), f"{int((raw_diff & ~near).sum())} mask tokens differ away from a tie"
    smoothed = smooth_masks(views["raw_masks"], grid) if config.do_smoothing else views["raw_masks"]
    assert torch.equal(views["masks"], smoothed)
    assert views["masks"].any(), "structured inputs should give non-empty masks"
    check_union(views, grid[0] * grid[1])


def assert_correction_matches(q, k, v, entity_mask, out, views, ref, config, fallback_threshold) -> None:
    """Thresholds, cuts, Z, the fallback rows and the output, on the kernels' own masks."""
    masks, text_len = views["masks"], entity_mask.shape[1]
    pbar = image_pbar(q, k, views["lse"], text_len)
    if config.do_image_image:
        torch.testing.assert_close(views["thresholds"], region_thresholds(pbar, masks, config), rtol=1e-4,
                                   atol=1e-9, equal_nan=True)
        expected_cut = image_image_cuts(pbar, masks, views["thresholds"])
        ties = threshold_near_ties(pbar, masks, views["thresholds"])
        if (masks.sum(-1) > 0).sum(-1).max() >= 2:
            assert expected_cut.any(), "two non-empty masks should cut some image-image logits"
    else:
        assert views["thresholds"].isnan().all()
        expected_cut = ties = torch.zeros_like(pbar, dtype=torch.bool)
    # The cut bits themselves, where the union fits one band (else they are checked through Z and the output).
    cut = views.get("cut", expected_cut)
    if "cut" in views:
        cut_diff = (cut != expected_cut) & ~ties
        assert not cut_diff.any(), f"{int(cut_diff.sum())} image-image cuts differ away from a tie"
    exact, z_exact = exact_edited_attention(q, k, v, masks, cut, entity_mask, config)
    far = ~ties.any(-1)[:, None, :].expand_as(z_exact)  # rows with a cell near a tie may differ in Z
    torch.testing.assert_close(views["z"].double()[far], z_exact[far], rtol=1e-4, atol=1e-5)
    in_union = masks.any(1)  # (B, Nimg)
    z = views["z"]
    assert torch.equal(views["fallback"], in_union[:, None] & ~(torch.isfinite(z) & (z >= fallback_threshold)))
    assert int(views["fallback_count"]) == int(views["fallback"].sum())
    # Text rows and rows no mask contains are o itself, bit for bit.
    plain = views["plain"]
    assert torch.equal(out[:, :, :text_len], plain[:, :, :text_len])
    image_rows = (out[:, :, text_len:].permute(0, 2, 1, 3), plain[:, :, text_len:].permute(0, 2, 1, 3))
    assert torch.equal(image_rows[0][~in_union], image_rows[1][~in_union])
    # Output: within 2x the decomposed op's own error (when its masks and cuts are the kernels').
    err = rel_l2(out, exact)
    assert err < 1e-2, err
    if torch.equal(masks, ref.masks) and torch.equal(cut, ref.cut):
        err_ref = rel_l2(ref.out, exact)
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)


def check_plain_outside_window(run: KernelRun, dtype: torch.dtype, head_dim: int, grid, device: str) -> None:
    """Before and after the intervention window the output is the fused attention's, untouched (against the same
    fp32 attention as SDPA's error), and the history is the decomposed op's."""
    (q, k, v), entity_mask = structured_inputs(2, 3, 77, grid, head_dim, 3, 4, dtype, seed=head_dim, device=device)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err_sdpa = rel_l2(F.scaled_dot_product_attention(q, k, v), exact)
    for block_step in (CONFIG.start_intervention_from - 1, CONFIG.stop_intervention_at + 1):
        out, history, views = run(q, k, v, entity_mask, grid=grid, block_step=block_step, history=None,
                                  config=CONFIG)
        ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=block_step, history=None,
                                       config=CONFIG)
        assert torch.equal(out, views["plain"]), block_step
        torch.testing.assert_close(history, ref.history, rtol=1e-4, atol=1e-7)
        err = rel_l2(out, exact)
        assert err <= 2 * err_sdpa + 1e-4 and err < 1e-2, (block_step, err, err_sdpa)


def check_switch_off(run: KernelRun, switch: str, device: str) -> None:
    """One knob switched off (paths the shape sweep never takes), inside both windows."""
    config = dataclasses.replace(CONFIG, **{switch: False})
    check_matches_decomposed(run, (1, 2, 77, (16, 16), 64, 3, 4), torch.float16, 300, device, config=config)


def check_history_threaded(run: KernelRun, use_history: bool, device: str) -> None:
    """Block steps 0..10 cross both windows; the history is threaded through kernel and reference alike.
    Odd steps are Python ints (the host decides the launches), even ones tensors on ``device`` (read by the
    kernels)."""
    config = dataclasses.replace(CONFIG, use_history=use_history)
    grid, e_max = (12, 13), 4
    hist_kernel = hist_ref = None
    for t in range(11):
        (q, k, v), entity_mask = structured_inputs(
            2, 2, 77, grid, 64, 3, e_max, torch.bfloat16, seed=100 + t, device=device
        )
        block_step = t if t % 2 else torch.tensor(t, device=device)
        out, hist_kernel, _ = run(
            q, k, v, entity_mask, grid=grid, block_step=block_step, history=hist_kernel, config=config
        )
        ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=t, history=hist_ref,
                                       config=config)
        hist_ref = ref.history
        torch.testing.assert_close(hist_kernel, hist_ref, rtol=1e-4, atol=1e-7, msg=f"history at t={t}")
        assert rel_l2(out, ref.out) < 1e-2, t
        assert not hist_kernel[:, 3].any(), "the absent entity's history must stay zero"


def check_fallback(run: KernelRun, dtype: torch.dtype, device: str) -> None:
    """Rows whose mass is almost all cut (Z far below 0.5) are recomputed exactly: they are listed, counted, and
    the output stays within 2x the decomposed op's error; without the fallback it is several times worse."""
    config = dataclasses.replace(CONFIG, do_image_image=False)
    (q, k, v), entity_mask = mostly_cut_inputs(3, dtype, device)
    grid = (8, 8)
    out, _, views = run(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config)
    ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config)
    assert torch.equal(views["masks"], ref.masks)
    exact, z_exact = exact_edited_attention(q, k, v, views["masks"], views["cut"], entity_mask, config)
    assert float(z_exact.min()) < 0.05, "the case must have rows with Z near 0.02"
    assert torch.equal(views["fallback"], ref.fallback) and views["fallback"].any()
    assert int(views["fallback_count"]) == ref.fallback_count
    err, err_ref = rel_l2(out, exact), rel_l2(ref.out, exact)
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)
    unguarded, _, views_unguarded = run(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None,
                                        config=config, fallback_threshold=1e-9)
    assert not views_unguarded["fallback"].any()
    assert rel_l2(unguarded, exact) > 3 * err, "the fallback should matter here"


def check_constant_statistics(run: KernelRun, dtype: torch.dtype, head_dim: int, device: str) -> None:
    """Equal values have std 0 and nothing above their mean: zero queries (constant entity maps) give no mask and
    the plain output; a region of one pbar value is no cut even at std_mul_image_image = -1, where a rounding
    residue in the one-pass variance would cut all of it. Both as the decomposed op. (Exact on the emulator,
    whose LSE of equal rows is equal; a GPU's fused attention need not promise that.)"""
    windows = dict(start_aggregating_from=0, start_intervention_from=0)
    # Also multi-token entities (every text token in one of two), whose maps a matrix product once made unequal.
    for text_len, grid, split in ((13, (8, 8), False), (65, (1, 127), True)):
        inputs = uniform_attention_inputs(text_len, grid, head_dim, dtype=dtype, split=split)
        q, k, v, entity_mask = (x.to(device) for x in inputs)
        config = DeLeakerConfig(**windows, std_mul_text=0.0, do_smoothing=not split)
        out, _, views = run(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config)
        assert not views["masks"].any() and int(views["union_count"].sum()) == 0
        assert torch.equal(out, views["plain"])
        ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None,
                                       config=config)
        assert not ref.masks.any()

    q, k, v, entity_mask = (x.to(device) for x in constant_region_inputs(head_dim, dtype=dtype))
    config = DeLeakerConfig(**windows, std_mul_image_image=-1.0)
    out, _, views = run(q, k, v, entity_mask, grid=(6, 6), block_step=INSIDE, history=None, config=config)
    ref = decomposed_intermediates(q, k, v, entity_mask, grid=(6, 6), block_step=INSIDE, history=None,
                                   config=config)
    masks = constant_region_masks().to(device)
    assert torch.equal(views["masks"], masks) and torch.equal(ref.masks, masks)
    assert not views["cut"].any() and not ref.cut.any()
    assert torch.isfinite(views["thresholds"][0, :2, :2]).sum() == 2, "both ordered pairs are region pairs"
    assert rel_l2(out, ref.out) < 1e-2


def check_overflowing_corrections_fall_back(run: KernelRun, head_dim: int, device: str) -> None:
    """k_strength 10 (the largest allowed) on logits about twice the structured ones: p_a = exp(a s - l) of the
    strengthened tokens overflows float32 in some rows, whose corrections are then not finite. Those rows take the
    exact fallback (one lane of a row's pair seeing it must not keep the other from its shuffle: the kernel used
    to skip the shuffle there, undefined on a GPU, a deadlock on the emulator), and the output stays finite and
    within 2x the decomposed op's error."""
    config = dataclasses.replace(CONFIG, k_strength=10.0)
    grid = (12, 11)
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, head_dim, 2, 4, torch.float16, 3, device=device)
    q, k = q * 2, k * 2
    out, _, views = run(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config)
    ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config)
    assert torch.isfinite(out).all()
    assert int(views["fallback_count"]) > 0 and (~torch.isfinite(views["z"][views["fallback"]])).any(), \
        "the case must have rows whose correction is not finite"
    exact, _ = exact_edited_attention(q, k, v, views["masks"], views["cut"], entity_mask, config)
    err, err_ref = rel_l2(out, exact), rel_l2(ref.out, exact)
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


def check_corrections_beyond_fp16_fall_back(run: KernelRun, device: str) -> None:
    """Under a fallback threshold far below 0.5 a correction with Z near 2e-5 stands, and its rounding error,
    amplified 1 / Z, takes values of |v| ~ 5000 beyond fp16's range: finite in float32, inf once written. Such rows
    take the exact fallback (they used to be written as inf, by the decomposed op too), so the output is finite."""
    config = dataclasses.replace(CONFIG, do_image_image=False)
    (q, k, v), entity_mask = mostly_cut_inputs(3, torch.float16, device, boost=14.0, value_scale=5000.0)
    grid = (8, 8)
    out, _, views = run(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config,
                        fallback_threshold=1e-9)
    ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=config,
                                   fallback_threshold=1e-9)
    exact, _ = exact_edited_attention(q, k, v, views["masks"], views["cut"], entity_mask, config)
    assert torch.isfinite(exact).all() and float(exact.abs().max()) < 65504
    assert torch.isfinite(out).all() and torch.isfinite(ref.out).all()
    assert int(views["fallback_count"]) > 0 and ref.fallback_count > 0  # which rows overflow depends on rounding
    err, err_ref = rel_l2(out, exact), rel_l2(ref.out, exact)
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)
