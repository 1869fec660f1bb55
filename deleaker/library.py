"""``torch.ops.deleaker.attention``: DeLeaker attention as one PyTorch custom op.

This is the seam shared by the diffusers processor, the ONNX exporter (which translates it into one
``DeLeakerAttention`` node) and the CUDA kernels. Its inputs mirror the ONNX node: the per-call state is
tensors (entity mask, history, denoising step), and the block's place and the knobs are constants.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

from .config import DeLeakerConfig
from .ops import deleaker_attention

Tensor = torch.Tensor


@torch.library.custom_op("deleaker::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    history: Tensor,
    step: Tensor,
    block_offset: int,
    num_blocks: int,
    grid_h: int,
    grid_w: int,
    std_mul_text: float,
    std_mul_image_image: float,
    k_strength: float,
    start_aggregating_from: int,
    stop_aggregating_at: int,
    start_intervention_from: int,
    stop_intervention_at: int,
    use_history: bool,
    do_smoothing: bool,
    do_image_image: bool,
    do_image_text_strengthening: bool,
    do_image_text_weakening: bool,
) -> Tuple[Tensor, Tensor]:
    config = DeLeakerConfig(
        std_mul_text=std_mul_text,
        std_mul_image_image=std_mul_image_image,
        k_strength=k_strength,
        start_aggregating_from=start_aggregating_from,
        stop_aggregating_at=stop_aggregating_at,
        start_intervention_from=start_intervention_from,
        stop_intervention_at=stop_intervention_at,
        use_history=use_history,
        do_smoothing=do_smoothing,
        do_image_image=do_image_image,
        do_image_text_strengthening=do_image_text_strengthening,
        do_image_text_weakening=do_image_text_weakening,
    )
    step = step.reshape(())
    # A CPU step is read without any device synchronisation, so the reference can skip work outside the window.
    block_step = int(step) * num_blocks + block_offset if step.device.type == "cpu" else step * num_blocks + block_offset
    return deleaker_attention(
        q, k, v, entity_mask.to(torch.bool), grid=(grid_h, grid_w), block_step=block_step, history=history, config=config
    )


@attention.register_fake
def _(q, k, v, entity_mask, history, step, block_offset, num_blocks, grid_h, grid_w, *knobs):
    return torch.empty_like(q), torch.empty_like(history)


def config_kwargs(config: DeLeakerConfig) -> dict:
    """The knobs of ``config`` as keyword arguments of `attention` (and attributes of the ONNX node)."""
    return dataclasses.asdict(config)


def call_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    history: Tensor,
    step: Tensor,
    *,
    block_offset: int,
    num_blocks: int,
    grid: Tuple[int, int],
    config: DeLeakerConfig,
) -> Tuple[Tensor, Tensor]:
    """`attention` with the knobs given as one config. ``q, k, v``: ``(B, H, N, D)``; ``step``: int64 scalar."""
    return torch.ops.deleaker.attention(
        q,
        k,
        v,
        entity_mask,
        history,
        step,
        block_offset=block_offset,
        num_blocks=num_blocks,
        grid_h=grid[0],
        grid_w=grid[1],
        **config_kwargs(config),
    )
