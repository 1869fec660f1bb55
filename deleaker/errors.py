"""Typed errors. Library code raises these; only the CLI prints them and exits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # errors are imported where torch is not (the CLI's fast paths)
    import torch


class DeLeakerError(Exception):
    """Base class of every error deleaker-trt raises on purpose."""


class ConfigError(DeLeakerError, ValueError):
    """A DeLeaker option has a wrong type or value."""


class ShapeError(DeLeakerError, ValueError):
    """A tensor has the wrong shape, dtype or device for the op."""


class EntityError(DeLeakerError, ValueError):
    """The entities do not fit the prompt (not found, duplicated, overlapping, too few or too many)."""


class NonFiniteError(DeLeakerError, ArithmeticError):
    """The latents after a denoising step, or the decoded image, hold NaN or inf: there is no image to give.

    ``latents``: what the runtime's ``generate(record_latents=True)`` had recorded, the finite steps before the
    failure (None when it was not recording), so that a comparison can still report them.
    """

    def __init__(self, message: str, *, latents: Optional[list[torch.Tensor]] = None) -> None:
        super().__init__(message)
        self.latents = latents
