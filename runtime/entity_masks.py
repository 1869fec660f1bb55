"""The entity masks DeLeaker used in a generation, recovered from the history the denoising loop threads (their
overlay on the image is `deleaker.runtime.images.mask_overlay`).

The transformer does not return its masks; it returns the history (the running mean of affinities) after every
step. The masks of a block are a pure function of that history (`deleaker.ops.entity_image_masks`), so the runtime
keeps the history of the step holding the last block that intervened and recomputes that block's masks from it.
That is exact only where nothing changed the history between that block and the end of its step, and where the
block's masks came from the history at all (see `mask_step`); elsewhere there are no masks to report (None), never
approximate ones.
"""

from __future__ import annotations

from typing import Optional

import torch

from deleaker.config import DeLeakerConfig
from deleaker.ops import entity_image_masks


def mask_step(config: DeLeakerConfig, num_blocks: int, steps: int) -> Optional[int]:
    """The denoising step whose returned history gives the masks of the last block that intervened, or None.

    Block steps are ``t = step * num_blocks + block``. The last intervening block is ``t* = min(last block,
    stop_intervention_at)``; there is none before ``start_intervention_from``. Its masks come from the history
    after ``t*`` when the history is used and ``t* >= start_aggregating_from`` (before that they come from the
    block's own affinities, which nothing returns). The loop sees the history only at the end of each step, which
    equals the history after ``t*`` when no block after ``t*`` in that step aggregates (aggregating blocks are
    ``start_aggregating_from <= t < stop_aggregating_at``).
    """
    last = steps * num_blocks - 1
    t_star = min(last, config.stop_intervention_at)
    if t_star < config.start_intervention_from or not config.use_history:
        return None
    if t_star < config.start_aggregating_from:
        return None
    step = t_star // num_blocks
    end_of_step = (step + 1) * num_blocks - 1
    first_later, last_later = t_star + 1, end_of_step
    aggregating = (config.start_aggregating_from, config.stop_aggregating_at - 1)
    if first_later <= last_later and max(first_later, aggregating[0]) <= min(last_later, aggregating[1]):
        return None
    return step


def masks_from_history(
    history: torch.Tensor,
    entity_mask: torch.Tensor,
    grid: tuple[int, int],
    config: DeLeakerConfig,
    num_entities: int,
) -> torch.Tensor:
    """The masks a block computes from ``history`` ``(1, E_max, gh * gw)``: ``(num_entities, gh, gw)`` bool, CPU,
    one per entity of the request in its order (rows beyond them are padding)."""
    history = history.detach().to("cpu", torch.float32)
    present = entity_mask.detach().to("cpu").bool().any(-1)
    masks = entity_image_masks(history, present, grid, config)
    return masks[0, :num_entities].reshape(num_entities, grid[0], grid[1]).clone()
