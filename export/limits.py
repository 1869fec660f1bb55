"""The sizes a DeLeaker FLUX transformer is exported, built and run at, and their checks: text length T, entity
slots E_max, image sides, engine precisions (the model a request names: `deleaker.models.check_model_source`).

One table for every boundary: the engine build request, engine manifests, the runtime's requests and the CLI's
pre-import checks call these same functions. A light module (no torch), so the CLI answers before torch loads.
"""

from __future__ import annotations

import numbers
from typing import Any

from deleaker.config import shown
from deleaker.errors import ConfigError, ShapeError
from deleaker.plugins.kernels import MAX_ENTITIES

#: Engine precisions (``deleaker-trt build --precision``, ``run --precision``, engine manifests); fp16 is the
#: default, as in trtexec and NVIDIA's diffusion demo.
PRECISIONS = ("fp16", "bf16", "fp8")
DEFAULT_PRECISION = "fp16"
#: Largest ``T`` (``--text-len``, engine manifests): FLUX.1's ``max_sequence_length`` goes up to 512.
MAX_TEXT_LEN = 512
#: Largest image side in pixels any runtime serves (a 2048x2048 attention already needs a large GPU).
MAX_SIDE = 2048


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_text_len(value: Any) -> None:
    """Raise `ConfigError` unless ``value`` is an int in [1, `MAX_TEXT_LEN`]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TEXT_LEN:
        raise ConfigError(f"text_len must be an int in [1, {MAX_TEXT_LEN}] (T5 tokens), got {value!r:.40}")


def check_max_entities(value: Any) -> None:
    """Raise `ConfigError` unless ``value`` is an int in [2, `MAX_ENTITIES`] (the kernels' limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_ENTITIES:
        raise ConfigError(
            f"max_entities must be an int in [2, {MAX_ENTITIES}] (the kernels take at most {MAX_ENTITIES} "
            f"entities), got {value!r:.40}"
        )


def check_side(side: str, value: Any) -> None:
    """Raise `ShapeError` unless ``value`` is an int in ``[1, MAX_SIDE]`` pixels (the model's multiple is checked
    where the model is known, `check_size`)."""
    if not _is_int(value) or not 1 <= value <= MAX_SIDE:
        raise ShapeError(f"{side} must be an int in [1, {MAX_SIDE}] pixels, got {shown(value)}")


def check_size(height: Any, width: Any, patch: int, max_pixels: int = MAX_SIDE) -> None:
    """Raise `ShapeError` unless both sides are ints, multiples of ``patch`` and within ``[patch, max_pixels]``.
    The message names every side that is wrong (a CLI side left out copies the other one)."""
    sides = (("height", height), ("width", width))
    for side, value in sides:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShapeError(f"{side} must be an int, got {value!r}")
    bad = [f"{side} {value}" for side, value in sides if value % patch or not patch <= value <= max_pixels]
    if bad:
        raise ShapeError(
            f"{' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not allowed: each side must be a multiple of "
            f"{patch} (2 x the VAE scale factor) between {patch} and {max_pixels}"
        )
