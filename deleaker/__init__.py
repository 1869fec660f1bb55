"""DeLeaker for FLUX.1: the PyTorch reference (op, diffusers processor and pipeline, tiny offline model).

Importing this package needs neither a GPU, TensorRT nor compiled kernels. Names are imported on first use, so
``deleaker.errors`` or ``deleaker.config`` (what the CLI checks input with) load without torch.
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {
    "REFERENCE_NUM_BLOCKS": "config",
    "DeLeakerConfig": "config",
    "ConfigError": "errors",
    "DeLeakerError": "errors",
    "EntityError": "errors",
    "ShapeError": "errors",
    "deleaker_attention": "library",
    "deleaker_attention_decomposed": "decomposed",
    "deleaker_attention_reference": "ops",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
