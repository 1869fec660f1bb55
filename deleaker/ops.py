"""DeLeaker attention, the functional op (``DELEAKER_SPEC.md``, "Per call", steps 1-7).

Everything is computed in float32 on the inputs' device, without host synchronisation: masks are cleaned with
max-pooling on the device and the history is the running mean of the entity affinities only,
``(B, E_max, gh * gw)`` floats, never an attention map. ``block_step`` may be a Python int (work outside the
intervention window is skipped) or a 0-d integer tensor (branch-free, for graphs and export).
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from .config import DeLeakerConfig
from .errors import ShapeError

Tensor = torch.Tensor
BlockStep = Union[int, Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: block_step is an int64 wherever it reaches a graph or the kernels.
_INT64_MAX = 2**63 - 1


def deleaker_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
) -> Tuple[Tensor, Tensor]:
    """DeLeaker attention in PyTorch, on any device: the op's default kernel and the reference that kernels are
    checked against. Arguments and results as `deleaker.deleaker_attention` (``deleaker.library``), which runs
    the kernel PyTorch's dispatcher picks for the device."""
    check_attention_inputs(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config)
    return _reference(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config)


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
) -> None:
    """Raise `ShapeError` (or TypeError for a wrong config type) naming what is wrong and what is allowed."""
    if not isinstance(config, DeLeakerConfig):
        raise TypeError(f"config must be a DeLeakerConfig, got {type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ShapeError(f"{name} must be (B, H, N, D), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ShapeError(f"{name} must be a float tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ShapeError(
            f"q, k and v must have the same shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ShapeError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, tokens, head_dim = q.shape
    if min(batch, heads, head_dim) < 1:
        raise ShapeError(f"q, k and v must have B, H and D >= 1, got shape (B, H, N, D) = {tuple(q.shape)}")
    if not isinstance(entity_mask, torch.Tensor) or entity_mask.dim() != 2:
        shape = tuple(entity_mask.shape) if isinstance(entity_mask, torch.Tensor) else type(entity_mask).__name__
        raise ShapeError(f"entity_mask must be an (E_max, T) bool tensor, got {shape}")
    if entity_mask.dtype != torch.bool:
        raise ShapeError(f"entity_mask must be bool (True marks an entity's text token), got {entity_mask.dtype}")
    if entity_mask.device != q.device:
        raise ShapeError(f"entity_mask must be on q's device {q.device}, got {entity_mask.device}")
    num_entities, text_len = entity_mask.shape
    if num_entities < 1:
        raise ShapeError("entity_mask must have at least one row (E_max >= 1)")
    if not 0 < text_len < tokens:
        raise ShapeError(f"entity_mask has T = {text_len} text tokens; T must be in [1, N) with N = {tokens}")
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ShapeError(f"grid must be a pair of positive ints (gh, gw), got {grid!r}")
    image_tokens = tokens - text_len
    if grid[0] * grid[1] != image_tokens:
        raise ShapeError(
            f"grid {tuple(grid)} has {grid[0] * grid[1]} cells but q has N - T = {tokens} - {text_len} = "
            f"{image_tokens} image tokens"
        )
    if isinstance(block_step, torch.Tensor):
        if block_step.numel() != 1 or block_step.dtype.is_floating_point or block_step.dtype == torch.bool:
            raise ShapeError(f"block_step must be an int or a one-element integer tensor, got {block_step!r}")
        # A tensor on the host is read here; on a GPU it is read by the kernels only (no synchronisation).
        if block_step.device.type == "cpu":
            value = block_step.reshape(()).item()  # a Python int: a uint64 beyond int64 is read as it is
            if not 0 <= value <= _INT64_MAX:
                raise ShapeError(f"block_step must be >= 0 and at most 2**63 - 1 (int64), got {value}")
    elif isinstance(block_step, bool) or not isinstance(block_step, int) or not 0 <= block_step <= _INT64_MAX:
        raise ShapeError(f"block_step must be an int >= 0 and at most 2**63 - 1 (int64), got {block_step!r:.40}")
    if history is not None:
        expected = (batch, num_entities, image_tokens)
        if not isinstance(history, torch.Tensor) or tuple(history.shape) != expected:
            shape = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
            raise ShapeError(f"history must be None or (B, E_max, gh * gw) = {expected}, got {shape}")
        if history.dtype != torch.float32:
            raise ShapeError(f"history must be float32, got {history.dtype}")
        if history.device != q.device:
            raise ShapeError(f"history must be on q's device {q.device}, got {history.device}")


# --- the steps of the spec, as small pure functions (also used by the ONNX reference node) -------------------


def entity_affinity(probs_image_text: Tensor, entity_mask: Tensor) -> Tensor:
    """Step 2: ``c[b, e, i] = mean_h mean_{t in T_e} p[b, h, T + i, t]``.

    Args: ``probs_image_text`` ``(B, H, Nimg, T)`` float32; ``entity_mask`` ``(E, T)`` bool.
    Returns ``(B, E, Nimg)``; rows of absent entities are zero.
    """
    weights = entity_mask.to(torch.float32)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1.0)
    probs = probs_image_text.mean(1)  # (B, Nimg, T)
    # A row-wise product and sum, not a matrix product: every image token's value is then computed the same way,
    # so equal rows (uniform attention) give exactly equal affinities, a constant map and no mask. A GEMM rounds
    # rows differently by where they fall in its tiles, and an ulp of spread is a "std" the threshold then passes.
    if weights.shape[0] == 0:
        return probs.new_zeros(probs.shape[0], 0, probs.shape[1])
    return torch.stack([(probs * row).sum(-1) for row in weights], dim=1)


def _select(condition, if_true: Tensor, if_false: Tensor) -> Tensor:
    """``torch.where`` for a tensor condition; a Python bool picks without touching the device."""
    if isinstance(condition, torch.Tensor):
        return torch.where(condition, if_true, if_false)
    return if_true if condition else if_false


def update_history(
    history: Tensor, affinity: Tensor, present: Tensor, block_step: BlockStep, config: DeLeakerConfig
) -> Tuple[Tensor, Tensor]:
    """Step 3: the running mean of affinities and the source map of the masks.

    Returns ``(new_history, source)``, both ``(B, E, Nimg)`` float32. Works for an int or a tensor ``block_step``.
    """
    if not config.use_history:
        return history.clone(), affinity
    start, stop = config.start_aggregating_from, config.stop_aggregating_at
    t = block_step.reshape(()) if isinstance(block_step, torch.Tensor) else block_step
    # m >= 0 wherever the running mean is selected (t > start); clamping keeps the unselected branch finite.
    m = (t - start).clamp(min=0).to(torch.float32) if isinstance(t, torch.Tensor) else max(t - start, 0)
    running = history * (m / (m + 1)) + affinity / (m + 1)
    new_history = _select(t == start, affinity, _select((t > start) & (t < stop), running, history))
    new_history = new_history * present[None, :, None].to(new_history.dtype)
    source = _select(t > start, new_history, affinity)
    return new_history, source


def _dilate(x: Tensor) -> Tensor:
    # max_pool2d pads with -inf: out-of-grid neighbours are ignored, as OpenCV's morphology border does.
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _erode(x: Tensor) -> Tensor:
    return -F.max_pool2d(-x, kernel_size=3, stride=1, padding=1)


def smooth_masks(masks: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Step 5 morphology on the ``(gh, gw)`` grid: 3x3 opening, then a 3x3 closing with two iterations.

    ``masks`` ``(B, E, gh * gw)`` bool -> same shape, bool.
    """
    batch, entities, _ = masks.shape
    x = masks.reshape(batch * entities, 1, grid[0], grid[1]).to(torch.float32)
    x = _dilate(_erode(x))  # opening
    x = _erode(_erode(_dilate(_dilate(x))))  # closing, iterations=2
    return x.reshape(batch, entities, -1) > 0.5


def _magnitude(x: Tensor, dims: Tuple[int, ...]) -> Tensor:
    """The largest ``|x|`` over ``dims`` (kept), 1 where it is 0: a divisor that leaves comparisons unchanged."""
    largest = x.abs().amax(dims, keepdim=True)
    return torch.where(largest > 0, largest, torch.ones_like(largest))


def entity_image_masks(source: Tensor, present: Tensor, grid: Tuple[int, int], config: DeLeakerConfig) -> Tensor:
    """Step 5: ``M_e[i] = src_e[i] > mean(src_e) + std_mul_text * std(src_e)`` (unbiased std), then smoothing.

    ``source`` ``(B, E, Nimg)`` float32, ``present`` ``(E,)`` bool -> ``(B, E, Nimg)`` bool.
    """
    # Statistics of the values relative to their largest: the same threshold in exact arithmetic, and exactly the
    # spec's answer for a constant map (std 0, nothing above the mean: no mask), which a plain float32 mean can
    # miss by an ulp (uniform attention, e.g. zero queries, gives such maps).
    shifted = source - source.amax(-1, keepdim=True)
    # ... and scaled to [-1, 0] (the rule is scale-invariant): maps of tiny affinities (about 1e-30 under sharp
    # attention) would otherwise have squares that underflow float32, a std of 0 and a mask at their maximum.
    shifted = shifted / _magnitude(shifted, (-1,))
    mean = shifted.mean(-1, keepdim=True)
    # Unbiased, written out: one image token gives 0 / 0 = NaN (no mask) without torch's degrees-of-freedom warning.
    std = (((shifted - mean) ** 2).sum(-1, keepdim=True) / (source.shape[-1] - 1)).sqrt()
    masks = (shifted > mean + config.std_mul_text * std) & present[None, :, None]
    if config.do_smoothing:
        masks = smooth_masks(masks, grid)
    return masks


def image_text_edits(masks: Tensor, entity_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Step 6, image-text part: which image-query/text-key logits are cut and which are strengthened.

    ``masks`` ``(B, E, Nimg)`` bool, ``entity_mask`` ``(E, T)`` bool -> ``(weaken, strengthen)``, both
    ``(B, Nimg, T)`` bool: ``weaken[b, i, t]`` iff ``i in M_e`` and ``t in T_f`` for some ``f != e``;
    ``strengthen[b, i, t]`` iff ``i in M_e`` and ``t in T_e`` for some ``e`` (applied once).
    """
    tokens = entity_mask.to(torch.float32)
    others = (tokens.sum(0, keepdim=True) - tokens) > 0  # t belongs to an entity other than e
    m = masks.to(torch.float32)
    weaken = torch.einsum("bei,et->bit", m, others.to(torch.float32)) > 0
    strengthen = torch.einsum("bei,et->bit", m, tokens) > 0
    return weaken, strengthen


def image_image_suppression(probs_image_image: Tensor, masks: Tensor, config: DeLeakerConfig) -> Tensor:
    """Step 6, image-image part: ``(B, Nimg, Nimg)`` bool, True where the logit is cut for every head.

    For each ordered pair ``(e, f)``, ``e != f``: over ``R = M_e x M_f``, cut ``pbar > mean_R + k * std_R``
    (unbiased std, ``pbar = mean_h p``, pre-intervention). A region of fewer than 2 cells has no std: no cut.
    ``probs_image_image`` is ``(B, H, Nimg, Nimg)`` float32.
    """
    pbar = probs_image_image.mean(1)
    cut = torch.zeros_like(pbar, dtype=torch.bool)
    m = masks.to(torch.float32)
    num_entities = masks.shape[1]
    for e in range(num_entities):
        for f in range(num_entities):
            if e == f:
                continue
            region = m[:, e, :, None] * m[:, f, None, :]
            count = region.sum((1, 2), keepdim=True)
            # Relative to the region's largest value (pbar >= 0), as the entity masks: a constant region cuts nothing.
            shifted = (pbar - (pbar * region).amax((1, 2), keepdim=True)) * region
            shifted = shifted / _magnitude(shifted, (1, 2))  # in [-1, 0]: tiny pbar's squares do not underflow
            mean = shifted.sum((1, 2), keepdim=True) / count.clamp(min=1.0)
            var = (((shifted - mean) * region) ** 2).sum((1, 2), keepdim=True) / (count - 1).clamp(min=1.0)
            threshold = mean + config.std_mul_image_image * var.sqrt()
            cut |= (region > 0) & (shifted > threshold) & (count >= 2)
    return cut


def as_int64_block_step(block_step: BlockStep) -> BlockStep:
    """A checked ``block_step`` (`check_attention_inputs`) as the op computes with it: an int stays an int, an
    integer tensor becomes a 0-d int64 tensor on its device. Compared or subtracted in its own width, an int8 or
    int16 step would meet the window knobs (up to 2**31 - 1) cast to that width, wrapped."""
    if isinstance(block_step, torch.Tensor):
        return block_step.reshape(()).to(torch.int64)
    return block_step


def _reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
) -> Tuple[Tensor, Tensor]:
    block_step = as_int64_block_step(block_step)
    batch, heads, tokens, head_dim = q.shape
    num_entities, text_len = entity_mask.shape
    qf, kf, vf = (x.to(torch.float32) for x in (q, k, v))

    # Step 1: pre-intervention logits and probabilities, fp32.
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    probs = torch.softmax(logits, dim=-1)

    # Steps 2-3: affinities of this block and the running mean.
    present = entity_mask.any(-1)
    affinity = entity_affinity(probs[:, :, text_len:, :text_len], entity_mask)
    if history is None:
        history = affinity.new_zeros(batch, num_entities, tokens - text_len)
    new_history, source = update_history(history, affinity, present, block_step, config)

    plain = torch.matmul(probs, vf)
    # Step 4: outside the window, plain attention. An int step skips the rest; a tensor step selects at the end.
    if not isinstance(block_step, torch.Tensor) and not config.intervenes_at(block_step):
        return plain.to(q.dtype), new_history

    # Step 5: entity image masks.
    masks = entity_image_masks(source, present, grid, config)

    # Step 6: edited logits of the image-query rows; text-query rows are never edited.
    image_logits = logits[:, :, text_len:, :].clone()
    image_text = image_logits[..., :text_len]
    weaken, strengthen = image_text_edits(masks, entity_mask)
    if config.do_image_text_strengthening:
        # A -inf logit stays -inf (alpha <= 0 would turn it into nan or +inf).
        scaled = strengthen[:, None] & (image_text != float("-inf"))
        image_text.copy_(torch.where(scaled, image_text * config.k_strength, image_text))
    if config.do_image_text_weakening:
        image_text.masked_fill_(weaken[:, None], float("-inf"))
    if config.do_image_image:
        cut = image_image_suppression(probs[:, :, text_len:, text_len:], masks, config)
        image_logits[..., text_len:].masked_fill_(cut[:, None], float("-inf"))

    # Step 7.
    edited_image_out = torch.matmul(torch.softmax(image_logits, dim=-1), vf)
    edited = torch.cat([plain[:, :, :text_len], edited_image_out], dim=2)
    if isinstance(block_step, torch.Tensor):
        t = block_step.reshape(())
        inside = (t >= config.start_intervention_from) & (t <= config.stop_intervention_at)
        edited = torch.where(inside, edited, plain)
    return edited.to(q.dtype), new_history
