"""DeLeaker for FLUX.1: the PyTorch reference (op, diffusers processor and pipeline, tiny offline model).

Importing this package needs neither a GPU, TensorRT nor compiled kernels.
"""

from .config import REFERENCE_NUM_BLOCKS, DeLeakerConfig
from .errors import ConfigError, DeLeakerError, EntityError, ShapeError
from .decomposed import deleaker_attention_decomposed
from .ops import deleaker_attention, deleaker_attention_reference

__all__ = [
    "REFERENCE_NUM_BLOCKS",
    "ConfigError",
    "DeLeakerConfig",
    "DeLeakerError",
    "EntityError",
    "ShapeError",
    "deleaker_attention",
    "deleaker_attention_decomposed",
    "deleaker_attention_reference",
]
