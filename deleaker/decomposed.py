"""DeLeaker attention as the fast path computes it: one plain attention with statistics, then a correction.

The specification of the fast path (``FAST_PATH.md``, steps 1-6), in plain PyTorch on any device, with the fast
path's numerics, so that every kernel has intermediates to be compared with, step by step:

1. plain attention ``o = softmax(s) v`` of every row and the row log-sum-exp ``l`` of ``s = q k^T / sqrt(D)``,
   as a fused attention returns them: ``o`` rounded to the input dtype, ``l`` float32;
2. affinities from ``l`` and the text columns only: ``c_e[i] = mean_h mean_{t in T_e} exp(s[h, T+i, t] - l)``;
3. history and entity masks (the reference's own step functions, `deleaker.ops`);
4. region statistics: ``pbar = mean_h exp(s - l)`` over each region ``M_e x M_f``, its threshold, the cuts;
5. the correction of every edited row, in float32: with ``C_i`` the cut keys, ``S_i`` the strengthened ones
   (cutting wins) and ``p_a = exp(a s - l)``::

       Z_i  = 1 - sum_{C_i} p + sum_{S_i} (p_a - p)
       o'_i = (o_i - sum_{C_i} p v + sum_{S_i} (p_a - p) v) / Z_i

   which is ``softmax(s') v`` for the edited logits ``s'`` of the spec, by expanding the normaliser;
6. the exact fallback: ``o`` carries the input dtype's rounding, which the correction multiplies by ``1 / Z_i``,
   so rows with ``Z_i < fallback_threshold`` (or a non-finite ``Z_i`` or correction) are recomputed in full with
   the edited attention, restricted to those rows.

Rows that no mask contains are ``o`` itself; text-query rows are never edited. This module materialises what is
convenient for a specification (the image-image probabilities, the dense cut matrix); the kernels never do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Tuple

import torch

from .config import DeLeakerConfig
from .errors import ShapeError
from .ops import (
    BlockStep,
    as_int64_block_step,
    check_attention_inputs,
    entity_affinity,
    entity_image_masks,
    image_text_edits,
    smooth_masks,
    update_history,
)

Tensor = torch.Tensor

#: Rows whose normaliser ``Z`` falls below this are recomputed exactly: at most 2x the plain output's rounding.
DEFAULT_FALLBACK_THRESHOLD = 0.5


@dataclass(frozen=True)
class DecomposedIntermediates:
    """Every intermediate of one decomposed call (``Nimg = gh * gw``; ``E = E_max``).

    Outside the intervention window (an int ``block_step``) the masks are all False, ``thresholds`` NaN, ``cut``
    all False, ``z`` one and ``fallback`` all False: nothing past step 3 runs. A tensor ``block_step`` computes
    every step and selects the plain output at the end, as `deleaker.deleaker_attention` does.
    """

    plain: Tensor  # (B, H, N, D), input dtype: the plain attention output o
    lse: Tensor  # (B, H, N) float32: natural-log row log-sum-exp of s
    affinity: Tensor  # (B, E, Nimg) float32: c_e of this block
    source: Tensor  # (B, E, Nimg) float32: the map the masks are thresholded from
    raw_masks: Tensor  # (B, E, Nimg) bool: thresholded, before the morphology
    masks: Tensor  # (B, E, Nimg) bool: M_e as used
    thresholds: Tensor  # (B, E, E) float32: threshold of region M_e x M_f; NaN where the pair cuts nothing
    cut: Tensor  # (B, Nimg, Nimg) bool: image-image logits cut (all heads)
    z: Tensor  # (B, H, Nimg) float32: normaliser of each image row (1 where the row is not edited)
    fallback: Tensor  # (B, H, Nimg) bool: rows recomputed by the exact edited attention
    out: Tensor  # (B, H, N, D), input dtype
    history: Tensor  # (B, E, Nimg) float32: the updated history

    @property
    def fallback_count(self) -> int:
        return int(self.fallback.sum())


def check_fallback_threshold(value: float) -> None:
    """Raises `ShapeError` unless ``value`` is a number in (0, 1] (the fast path's fallback threshold)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ShapeError(f"fallback_threshold must be a number in (0, 1], got {value!r}")


def deleaker_attention_decomposed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
) -> Tuple[Tensor, Tensor]:
    """`deleaker.deleaker_attention` (same arguments, same results within the spec's tolerances), computed as the
    fast path does: plain attention with statistics, then a sparse correction and an exact fallback.

    Args:
        q, k, v: ``(B, H, N, D)``, the ``T`` text tokens first, then ``gh * gw`` image tokens row-major.
        entity_mask: ``(E_max, T)`` bool.
        grid: ``(gh, gw)``.
        block_step: int, or a one-element integer tensor.
        history: ``None`` (zeros) or ``(B, E_max, gh * gw)`` float32.
        config: the knobs, used as given.
        fallback_threshold: rows whose normaliser ``Z`` is below it are recomputed exactly (0 < it <= 1). The
            corrected rows' error grows like ``1 / Z``: the default 0.5 keeps it within 2x the plain output's
            rounding, while a threshold near 0 lets rows with ``Z`` near 0 keep a correction that cancelled
            catastrophically (errors of order 1 in bf16 were seen at 1e-6).

    Returns:
        ``out`` like ``q`` and the updated history ``(B, E_max, gh * gw)`` float32.
    """
    result = decomposed_intermediates(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config,
        fallback_threshold=fallback_threshold,
    )
    return result.out, result.history


def decomposed_intermediates(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
) -> DecomposedIntermediates:
    """`deleaker_attention_decomposed` with every intermediate (see `DecomposedIntermediates`)."""
    check_attention_inputs(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config)
    check_fallback_threshold(fallback_threshold)
    block_step = as_int64_block_step(block_step)
    batch, heads, tokens, head_dim = q.shape
    num_entities, text_len = entity_mask.shape
    n_img = tokens - text_len
    scale = 1.0 / math.sqrt(head_dim)
    qf, kf, vf = (x.to(torch.float32) for x in (q, k, v))

    # Step 1: what a fused attention returns.
    plain, lse = plain_attention_with_lse(q, k, v, scale)

    # Step 2: affinities from the LSE and the text columns only.
    q_img = qf[:, :, text_len:]
    lse_img = lse[:, :, text_len:, None]
    s_text = torch.matmul(q_img, kf[:, :, :text_len].transpose(-1, -2)) * scale  # (B, H, Nimg, T)
    p_text = torch.exp(s_text - lse_img)
    present = entity_mask.any(-1)
    affinity = entity_affinity(p_text, entity_mask)

    # Step 3: history and the source of the masks.
    if history is None:
        history = affinity.new_zeros(batch, num_entities, n_img)
    new_history, source = update_history(history, affinity, present, block_step, config)

    no_masks = torch.zeros(batch, num_entities, n_img, dtype=torch.bool, device=q.device)
    if not isinstance(block_step, torch.Tensor) and not config.intervenes_at(block_step):
        return DecomposedIntermediates(
            plain=plain, lse=lse, affinity=affinity, source=source, raw_masks=no_masks, masks=no_masks,
            thresholds=torch.full((batch, num_entities, num_entities), math.nan, device=q.device),
            cut=torch.zeros(batch, n_img, n_img, dtype=torch.bool, device=q.device),
            z=torch.ones(batch, heads, n_img, device=q.device),
            fallback=torch.zeros(batch, heads, n_img, dtype=torch.bool, device=q.device),
            out=plain, history=new_history,
        )

    # Masks (spec step 5).
    raw_masks = entity_image_masks(source, present, grid, _without_smoothing(config))
    masks = smooth_masks(raw_masks, grid) if config.do_smoothing else raw_masks

    # Step 4: region statistics and the cuts, from the pre-intervention probabilities.
    s_image = torch.matmul(q_img, kf[:, :, text_len:].transpose(-1, -2)) * scale  # (B, H, Nimg, Nimg)
    p_image = torch.exp(s_image - lse_img)
    pbar = p_image.mean(1)
    thresholds = region_thresholds(pbar, masks, config)
    if config.do_image_image:
        cut = image_image_cuts(pbar, masks, thresholds)
    else:
        cut = torch.zeros(batch, n_img, n_img, dtype=torch.bool, device=q.device)

    # Step 5: the correction, float32.
    weaken, strengthen = image_text_edits(masks, entity_mask)
    cut_text = weaken if config.do_image_text_weakening else torch.zeros_like(weaken)
    strengthened = strengthen & ~cut_text if config.do_image_text_strengthening else torch.zeros_like(strengthen)
    p_strong = torch.exp(config.k_strength * s_text - lse_img)
    zero = torch.zeros((), device=q.device)
    # Selected, not multiplied by 0/1 masks: p_strong may overflow to inf where it is not used.
    text_weights = torch.where(strengthened[:, None], p_strong - p_text, zero) - torch.where(
        cut_text[:, None], p_text, zero
    )  # (B, H, Nimg, T)
    image_weights = -torch.where(cut[:, None], p_image, zero)  # (B, H, Nimg, Nimg)
    z = 1.0 + text_weights.sum(-1) + image_weights.sum(-1)  # (B, H, Nimg)
    correction = torch.matmul(text_weights, vf[:, :, :text_len]) + torch.matmul(image_weights, vf[:, :, text_len:])
    edited_rows = masks.any(1)[:, None, :].expand(batch, heads, n_img)  # (B, H, Nimg)
    z = torch.where(edited_rows, z, torch.ones_like(z))
    corrected = (plain[:, :, text_len:].to(torch.float32) + correction) / z[..., None]

    # Step 6: the exact fallback for rows with a small or non-finite normaliser.
    # Finite in the output dtype: a corrected value beyond fp16's range would be written as inf.
    finite = torch.isfinite(z) & torch.isfinite(corrected.to(q.dtype)).all(-1)
    fallback = edited_rows & ~((z >= fallback_threshold) & finite)
    if bool(fallback.any()):
        exact = edited_attention_rows(
            s_text, s_image, vf, cut_text, strengthened, cut, config.k_strength, fallback, text_len
        )
        corrected = torch.where(fallback[..., None], exact, corrected)
    image_out = torch.where(edited_rows[..., None], corrected.to(q.dtype), plain[:, :, text_len:])
    out = torch.cat([plain[:, :, :text_len], image_out], dim=2)

    if isinstance(block_step, torch.Tensor):
        t = block_step.reshape(())
        inside = (t >= config.start_intervention_from) & (t <= config.stop_intervention_at)
        out = torch.where(inside, out, plain)
        masks, raw_masks = masks & inside, raw_masks & inside
        cut = cut & inside
        z = torch.where(inside, z, torch.ones_like(z))
        fallback = fallback & inside
    return DecomposedIntermediates(
        plain=plain, lse=lse, affinity=affinity, source=source, raw_masks=raw_masks, masks=masks,
        thresholds=thresholds, cut=cut, z=z, fallback=fallback, out=out, history=new_history,
    )


# --- the steps, as small pure functions ----------------------------------------------------------------------


def plain_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Step 1: ``o = softmax(s) v`` rounded to the input dtype, and ``l = logsumexp(s)`` float32 (natural log),
    with ``s = scale * q k^T`` accumulated in float32. ``(B, H, N, D)`` -> ``(B, H, N, D)``, ``(B, H, N)``."""
    qf, kf, vf = (x.to(torch.float32) for x in (q, k, v))
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    plain = torch.matmul(torch.exp(s - lse[..., None]), vf)
    return plain.to(q.dtype), lse


def region_thresholds(pbar: Tensor, masks: Tensor, config: DeLeakerConfig) -> Tensor:
    """Step 4: ``thr[b, e, f] = mean_R(pbar) + std_mul_image_image * std_R(pbar)`` over ``R = M_e x M_f``.

    ``pbar`` ``(B, Nimg, Nimg)`` float32 (head mean of the pre-intervention probabilities), ``masks`` ``(B, E,
    Nimg)`` bool -> ``(B, E, E)`` float32. NaN where the pair cuts nothing: ``e == f``, or a region of fewer than
    2 cells (no unbiased std). Sums in float64, as the kernels' pair statistics, and as there the variance of a
    region whose least and largest values are equal is exactly 0 (a constant region cuts nothing), which the
    one-pass sums alone may miss by a rounding residue.
    """
    m = masks.to(torch.float64)
    p = pbar.to(torch.float64)
    count = torch.einsum("bei,bfj->bef", m, m)
    total = torch.einsum("bei,bij,bfj->bef", m, p, m)
    mean = total / count.clamp(min=1.0)
    # Centred second moment, per pair: sum over R of (pbar - mean)^2.
    squares = torch.einsum("bei,bij,bfj->bef", m, p * p, m)
    var = (squares - count * mean * mean).clamp(min=0.0) / (count - 1.0).clamp(min=1.0)
    var = torch.where(_constant_regions(pbar, masks), torch.zeros_like(var), var)
    threshold = (mean + config.std_mul_image_image * var.sqrt()).to(torch.float32)
    eye = torch.eye(masks.shape[1], dtype=torch.bool, device=masks.device)
    return torch.where((count >= 2) & ~eye, threshold, torch.full_like(threshold, math.nan))


def _constant_regions(pbar: Tensor, masks: Tensor) -> Tensor:
    """``(B, E, E)`` bool: whether every value of ``pbar`` over ``M_e x M_f`` is the same (False for empty regions)."""
    batch, num_entities = masks.shape[:2]
    constant = torch.zeros(batch, num_entities, num_entities, dtype=torch.bool, device=masks.device)
    for e in range(num_entities):
        for f in range(num_entities):
            region = masks[:, e, :, None] & masks[:, f, None, :]
            largest = torch.where(region, pbar, -math.inf).amax((1, 2))
            least = torch.where(region, pbar, math.inf).amin((1, 2))
            constant[:, e, f] = region.any((1, 2)) & (largest == least)
    return constant


def image_image_cuts(pbar: Tensor, masks: Tensor, thresholds: Tensor) -> Tensor:
    """Step 4: ``cut[b, i, j]`` iff ``pbar[b, i, j] > thresholds[b, e, f]`` for a pair with ``i in M_e``,
    ``j in M_f`` (NaN thresholds cut nothing). -> ``(B, Nimg, Nimg)`` bool."""
    cut = torch.zeros_like(pbar, dtype=torch.bool)
    num_entities = masks.shape[1]
    for e in range(num_entities):
        for f in range(num_entities):
            thr = thresholds[:, e, f, None, None]
            region = masks[:, e, :, None] & masks[:, f, None, :]
            cut |= region & (pbar > thr)  # a NaN threshold compares False
    return cut


def edited_attention_rows(
    s_text: Tensor,
    s_image: Tensor,
    v: Tensor,
    cut_text: Tensor,
    strengthened: Tensor,
    cut_image: Tensor,
    k_strength: float,
    rows: Tensor,
    text_len: int,
) -> Tensor:
    """Step 6: ``softmax(s') v`` of the image rows selected by ``rows`` (zeros elsewhere), float32.

    ``s_text`` ``(B, H, Nimg, T)`` and ``s_image`` ``(B, H, Nimg, Nimg)`` are the pre-intervention logits of the
    image rows; ``cut_text``, ``strengthened`` ``(B, Nimg, T)`` and ``cut_image`` ``(B, Nimg, Nimg)`` bool say which
    logits the spec edits; ``v`` ``(B, H, N, D)`` float32; ``rows`` ``(B, H, Nimg)`` bool.
    """
    batch, heads, n_img, _ = s_text.shape
    out = torch.zeros(batch, heads, n_img, v.shape[-1], dtype=torch.float32, device=v.device)
    for b, h in rows.any(-1).nonzero().tolist():
        index = rows[b, h].nonzero().squeeze(-1)
        text = s_text[b, h, index]
        text = torch.where(strengthened[b, index], text * k_strength, text)
        text = text.masked_fill(cut_text[b, index], -math.inf)
        image = s_image[b, h, index].masked_fill(cut_image[b, index], -math.inf)
        probs = torch.softmax(torch.cat([text, image], dim=-1), dim=-1)
        out[b, h, index] = probs @ v[b, h]
    return out


def _without_smoothing(config: DeLeakerConfig) -> DeLeakerConfig:
    return dataclasses.replace(config, do_smoothing=False)
