"""A slow, obvious float64 DeLeaker attention, written from ``DELEAKER_SPEC.md`` alone (not from ``deleaker.ops``).

It is the second reading of the contract that the op is tested against: every step is spelled out with loops
or einsum in float64, the morphology walks explicit 3x3 neighbourhoods (out-of-grid neighbours are ignored),
and the intermediates (raw and smoothed masks, image-image cuts, distances to thresholds) are returned so tests
can compare each step and refuse cases that sit too close to a threshold.

Shapes: ``q, k, v`` ``(B, H, N, D)`` with ``N = T + gh * gw`` (text first); ``entity_mask`` ``(E_max, T)`` bool;
history ``(B, E_max, gh * gw)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from deleaker import DeLeakerConfig

Tensor = torch.Tensor
F64 = torch.float64


@dataclass
class SlowResult:
    """Everything one slow call computes. Tensors are float64 unless noted; masks are bool."""

    out: Tensor  # (B, H, N, D)
    history: Tensor  # (B, E_max, Nimg), the updated running mean a
    affinity: Tensor  # (B, E_max, Nimg), c of this block
    source: Tensor  # (B, E_max, Nimg), the map the masks are cut from
    raw_masks: Tensor  # (B, E_max, Nimg) bool, thresholded, before smoothing
    masks: Tensor  # (B, E_max, Nimg) bool, M_e as used (smoothed if do_smoothing)
    image_image_cut: Tensor  # (B, Nimg, Nimg) bool, all False unless the image-image rule ran
    weaken: Tensor  # (B, Nimg, T) bool, where the weakening rule applies (whether or not it is switched on)
    strengthen: Tensor  # (B, Nimg, T) bool, likewise for strengthening
    logits: Tensor  # (B, H, N, N), pre-intervention s
    edited_logits: Tensor  # (B, H, N, N), s' (equal to s outside the window)
    intervened: bool
    text_margin: float  # min relative |src_e[i] - threshold_e| over present entities (inf if none)
    image_margin: float  # min relative |pbar[i, j] - threshold_(e,f)| over thresholded regions (inf if none)


# --- step 1 -------------------------------------------------------------------------------------------------


def logits_and_probs(q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """``s = q k^T / sqrt(D)``, ``p = softmax_j(s)``, float64 in fp32's range. ``(B, H, N, D)`` -> ``(B, H, N, N)``."""
    q, k = q.to(F64), k.to(F64)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    # The spec's logits are fp32 quantities: a value beyond fp32's range is the infinity fp32 would give.
    s = torch.where(s.abs() > torch.finfo(torch.float32).max, s.sign() * math.inf, s)
    return s, softmax_rows(s)


def softmax_rows(s: Tensor) -> Tensor:
    """Softmax over the last axis, written out; -inf entries get exactly zero weight."""
    top = s.max(dim=-1, keepdim=True).values
    e = torch.exp(s - top)
    return e / e.sum(dim=-1, keepdim=True)


# --- step 2 -------------------------------------------------------------------------------------------------


def entity_affinity(p: Tensor, entity_mask: Tensor, text_len: int) -> Tensor:
    """``c[b, e, i] = mean_h mean_{t in T_e} p[b, h, T + i, t]``; zero rows for absent entities."""
    batch, heads, tokens, _ = p.shape
    image_tokens = tokens - text_len
    c = torch.zeros(batch, entity_mask.shape[0], image_tokens, dtype=F64)
    for b in range(batch):
        for e in range(entity_mask.shape[0]):
            token_ids = [t for t in range(text_len) if bool(entity_mask[e, t])]
            if not token_ids:
                continue
            for i in range(image_tokens):
                total = 0.0
                for h in range(heads):
                    for t in token_ids:
                        total += float(p[b, h, text_len + i, t])
                c[b, e, i] = total / (heads * len(token_ids))
    return c


# --- step 3 -------------------------------------------------------------------------------------------------


def update_history(
    history: Optional[Tensor], c: Tensor, present: List[bool], t: int, config: DeLeakerConfig
) -> Tuple[Tensor, Tensor]:
    """The running mean ``a`` and the source map. ``history`` None means zeros. Returns ``(a_new, src)``."""
    a = torch.zeros_like(c) if history is None else history.to(F64).clone()
    if not config.use_history:
        return a, c.clone()
    start, stop = config.start_aggregating_from, config.stop_aggregating_at
    new = a.clone()
    for e, is_present in enumerate(present):
        if not is_present:
            new[:, e] = 0.0  # absent entities' rows stay zero
            continue
        if t == start:
            new[:, e] = c[:, e]
        elif start < t < stop:
            m = t - start
            new[:, e] = a[:, e] * m / (m + 1) + c[:, e] / (m + 1)
        # otherwise unchanged
    src = new.clone() if t > start else c.clone()
    return new, src


# --- step 5 -------------------------------------------------------------------------------------------------


def unbiased_mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and unbiased standard deviation (n - 1 in the denominator); std is nan for fewer than 2 values.

    The mean is taken relative to the first value, so equal values give exactly that value and std 0 (nothing is
    strictly above a constant set's threshold); a plain float64 sum of n equal values can round away from n x.
    """
    n = len(values)
    mean = values[0] + math.fsum(x - values[0] for x in values) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((x - mean) ** 2 for x in values) / (n - 1)
    return mean, math.sqrt(var)


def relative_gap(x: float, threshold: float) -> float:
    """``|x - threshold|`` relative to the threshold's size: how far a decision is from flipping."""
    return abs(x - threshold) / max(abs(threshold), 1e-30)


def threshold_masks(src: Tensor, present: List[bool], std_mul: float) -> Tuple[Tensor, float]:
    """``M_e[i] = src_e[i] > mean + std_mul * std`` (strict, unbiased) per sample and present entity.

    Returns the raw masks ``(B, E_max, Nimg)`` bool and the smallest relative distance of a value to its threshold.
    """
    batch, entities, image_tokens = src.shape
    masks = torch.zeros(batch, entities, image_tokens, dtype=torch.bool)
    margin = math.inf
    for b in range(batch):
        for e in range(entities):
            if not present[e]:
                continue
            values = [float(x) for x in src[b, e]]
            mean, std = unbiased_mean_std(values)
            threshold = mean + std_mul * std
            for i, x in enumerate(values):
                masks[b, e, i] = x > threshold
                margin = min(margin, relative_gap(x, threshold))
    return masks, margin


def _neighbours(r: int, c: int, gh: int, gw: int) -> List[Tuple[int, int]]:
    """The in-grid cells of the 3x3 neighbourhood of ``(r, c)``, itself included."""
    return [
        (rr, cc)
        for rr in (r - 1, r, r + 1)
        for cc in (c - 1, c, c + 1)
        if 0 <= rr < gh and 0 <= cc < gw
    ]


def erode(grid_mask: List[List[bool]]) -> List[List[bool]]:
    """3x3 erosion: a cell stays set only if every in-grid neighbour is set."""
    gh, gw = len(grid_mask), len(grid_mask[0])
    return [[all(grid_mask[rr][cc] for rr, cc in _neighbours(r, c, gh, gw)) for c in range(gw)] for r in range(gh)]


def dilate(grid_mask: List[List[bool]]) -> List[List[bool]]:
    """3x3 dilation: a cell is set if any in-grid neighbour is set."""
    gh, gw = len(grid_mask), len(grid_mask[0])
    return [[any(grid_mask[rr][cc] for rr, cc in _neighbours(r, c, gh, gw)) for c in range(gw)] for r in range(gh)]


def smooth_one(mask: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Opening (erode, dilate) then closing with two iterations (dilate, dilate, erode, erode). ``(Nimg,)`` bool."""
    gh, gw = grid
    m = [[bool(mask[r * gw + c]) for c in range(gw)] for r in range(gh)]
    m = dilate(erode(m))
    m = erode(erode(dilate(dilate(m))))
    return torch.tensor([m[r][c] for r in range(gh) for c in range(gw)], dtype=torch.bool)


def smooth_masks(masks: Tensor, grid: Tuple[int, int]) -> Tensor:
    """`smooth_one` over every ``(b, e)`` of a ``(B, E, Nimg)`` bool tensor."""
    out = torch.zeros_like(masks)
    for b in range(masks.shape[0]):
        for e in range(masks.shape[1]):
            out[b, e] = smooth_one(masks[b, e], grid)
    return out


# --- step 6 -------------------------------------------------------------------------------------------------


def image_image_cut(p: Tensor, masks: Tensor, text_len: int, std_mul: float) -> Tuple[Tensor, float]:
    """Image-image suppression from the pre-intervention ``p``: ``(B, Nimg, Nimg)`` bool and the smallest margin.

    For each ordered pair ``(e, f)``, ``e != f``, both masks non-empty: over ``R = M_e x M_f``, cut where
    ``pbar > mean_R + std_mul * std_R`` (unbiased; a one-cell region has no std and cuts nothing).
    """
    batch, _, tokens, _ = p.shape
    image_tokens = tokens - text_len
    pbar = p[:, :, text_len:, text_len:].mean(dim=1)  # mean over heads
    cut = torch.zeros(batch, image_tokens, image_tokens, dtype=torch.bool)
    margin = math.inf
    entities = masks.shape[1]
    for b in range(batch):
        for e in range(entities):
            for f in range(entities):
                rows = [i for i in range(image_tokens) if bool(masks[b, e, i])]
                cols = [j for j in range(image_tokens) if bool(masks[b, f, j])]
                if e == f or not rows or not cols:
                    continue
                region = [(i, j) for i in rows for j in cols]
                values = [float(pbar[b, i, j]) for i, j in region]
                mean, std = unbiased_mean_std(values)
                if math.isnan(std):
                    continue  # x > nan is false: nothing is cut
                threshold = mean + std_mul * std
                for (i, j), x in zip(region, values):
                    if x > threshold:
                        cut[b, i, j] = True
                    margin = min(margin, relative_gap(x, threshold))
    return cut, margin


def image_text_rules(masks: Tensor, entity_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``(weaken, strengthen)``, both ``(B, Nimg, T)`` bool.

    weaken: ``i in M_e`` and ``t in T_f`` for some ``f != e``; strengthen: ``i in M_e`` and ``t in T_e``.
    """
    batch, entities, image_tokens = masks.shape
    text_len = entity_mask.shape[1]
    weaken = torch.zeros(batch, image_tokens, text_len, dtype=torch.bool)
    strengthen = torch.zeros(batch, image_tokens, text_len, dtype=torch.bool)
    for b in range(batch):
        for e in range(entities):
            for i in range(image_tokens):
                if not bool(masks[b, e, i]):
                    continue
                for t in range(text_len):
                    if bool(entity_mask[e, t]):
                        strengthen[b, i, t] = True
                    for f in range(entities):
                        if f != e and bool(entity_mask[f, t]):
                            weaken[b, i, t] = True
    return weaken, strengthen


# --- the whole call -----------------------------------------------------------------------------------------


def slow_deleaker_attention_detailed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    grid: Tuple[int, int],
    block_step: int,
    history: Optional[Tensor],
    config: DeLeakerConfig,
) -> SlowResult:
    """One DeLeaker attention call, float64, with all intermediates (see `SlowResult`)."""
    t = int(block_step)
    batch, heads, tokens, _ = q.shape
    text_len = entity_mask.shape[1]
    image_tokens = tokens - text_len
    assert grid[0] * grid[1] == image_tokens
    present = [bool(entity_mask[e].any()) for e in range(entity_mask.shape[0])]

    s, p = logits_and_probs(q, k)
    c = entity_affinity(p, entity_mask, text_len)
    new_history, src = update_history(history, c, present, t, config)

    entities = entity_mask.shape[0]
    empty_masks = torch.zeros(batch, entities, image_tokens, dtype=torch.bool)
    no_cut = torch.zeros(batch, image_tokens, image_tokens, dtype=torch.bool)
    no_text = torch.zeros(batch, image_tokens, text_len, dtype=torch.bool)
    vv = v.to(F64)
    if not config.start_intervention_from <= t <= config.stop_intervention_at:
        out = torch.einsum("bhij,bhjd->bhid", p, vv)
        return SlowResult(
            out, new_history, c, src, empty_masks, empty_masks, no_cut, no_text, no_text, s, s.clone(), False,
            math.inf, math.inf,
        )

    raw, text_margin = threshold_masks(src, present, config.std_mul_text)
    masks = smooth_masks(raw, grid) if config.do_smoothing else raw.clone()

    weaken, strengthen = image_text_rules(masks, entity_mask)
    cut, image_margin = (
        image_image_cut(p, masks, text_len, config.std_mul_image_image) if config.do_image_image else (no_cut, math.inf)
    )

    edited = s.clone()
    for b in range(batch):
        for i in range(image_tokens):
            row = text_len + i  # only image-query rows are edited
            for t_key in range(text_len):
                if config.do_image_text_weakening and bool(weaken[b, i, t_key]):
                    edited[b, :, row, t_key] = -math.inf
                elif config.do_image_text_strengthening and bool(strengthen[b, i, t_key]):
                    old = edited[b, :, row, t_key]
                    # alpha * s, once; a logit that is already -inf stays -inf whatever the sign of alpha.
                    edited[b, :, row, t_key] = torch.where(old == -math.inf, old, config.k_strength * old)
            for j in range(image_tokens):
                if bool(cut[b, i, j]):
                    edited[b, :, row, text_len + j] = -math.inf
    out = torch.einsum("bhij,bhjd->bhid", softmax_rows(edited), vv)
    return SlowResult(
        out, new_history, c, src, raw, masks, cut, weaken, strengthen, s, edited, True, text_margin, image_margin,
    )


def slow_deleaker_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    grid: Tuple[int, int],
    block_step: int,
    history: Optional[Tensor],
    config: DeLeakerConfig,
) -> Tuple[Tensor, Tensor]:
    """``(out, history)`` in float64: ``out`` ``(B, H, N, D)``, history ``(B, E_max, gh * gw)``."""
    r = slow_deleaker_attention_detailed(q, k, v, entity_mask, grid, block_step, history, config)
    return r.out, r.history


def plain_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(D)) v`` in float64, ``(B, H, N, D)``."""
    _, p = logits_and_probs(q, k)
    return torch.einsum("bhij,bhjd->bhid", p, v.to(F64))
