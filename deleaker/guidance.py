"""The guidance a FLUX transformer can embed: diffusers' ``FluxTransformer2DModel`` casts ``guidance`` to the
transformer's dtype and multiplies it by 1000 there, so a float16 model (or engine) overflows to inf above
65504 / 1000 = 65.504, and its image is NaN (black). bfloat16 and float32 overflow only near 3.4e35."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

#: FluxTransformer2DModel multiplies the guidance by this before its sinusoidal embedding.
GUIDANCE_EMBEDDING_SCALE = 1000


def max_guidance(dtype: torch.dtype) -> float:
    """The largest guidance magnitude whose embedding input (x 1000) is finite in ``dtype``."""
    return torch.finfo(dtype).max / GUIDANCE_EMBEDDING_SCALE if dtype.is_floating_point else math.inf


def check_finite_number(name: str, value: Any) -> None:
    """Raise `ConfigError` unless ``value`` is a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r:.40}")


def real_scalar(name: str, value: Any) -> float:
    """``value`` as a float, when it is a finite real number: every type ``FluxPipeline`` computes with (a Python
    or NumPy int, float or bool, a 0-d real torch tensor) and any other ``numbers.Real``. `ConfigError` otherwise.

    Bools pass because ``FluxPipeline`` takes them (``torch.full`` makes True 1.0): a drop-in may not refuse them."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            raise ConfigError(f"{name} must be a real number (a 0-d tensor at most), got a {tuple(value.shape)} "
                              f"{str(value.dtype).removeprefix('torch.')} tensor")
        value = value.item()
    elif isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r:.40}")
    return float(value)


def check_guidance(name: str, value: Any, dtype: torch.dtype) -> None:
    """Raise `ConfigError` unless ``value`` is a finite number (not a bool) whose embedding fits ``dtype``."""
    check_finite_number(name, value)
    limit = max_guidance(dtype)
    if abs(value) > limit:
        raise ConfigError(
            f"{name} {value!r:.40} overflows FLUX's guidance embedding in {str(dtype).removeprefix('torch.')} "
            f"(it embeds guidance x {GUIDANCE_EMBEDDING_SCALE}): at most {limit:.6g} in magnitude; FLUX.1-dev is "
            "distilled for about 1 to 10"
        )
