"""The one place the reference reaches for the optional CUDA kernels (``deleaker.plugins``).

Importing ``deleaker`` never needs compiled kernels: they are looked up on the first CUDA call.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch


@functools.cache
def _kernel_module():
    try:
        from deleaker.plugins import torch_op
    except ImportError:
        return None
    return torch_op if torch_op.is_available() else None


def cuda_attention_or_none(q, k, v, entity_mask, *, grid, block_step, history, config) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The fused kernels' result for inputs they support, or None to let the caller run the reference."""
    module = _kernel_module()
    if module is None or not module.supports(q, entity_mask):
        return None
    return module.deleaker_attention_cuda(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config
    )
