"""`GenerationResult`: what one generation of a runtime gives back (FLUX.1's `DeLeakerRuntime`, FLUX.2's
`Flux2Runtime`), in a module of its own so that both runtimes share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

from .request import GenerationRequest


@dataclass
class GenerationResult:
    """An image, the time each stage took (seconds) and, when asked for, the latents after every step.

    ``latents``: ``steps`` tensors ``(1, Nimg, C)`` float32 (CPU), in order; None unless ``record_latents``.
    ``entity_masks``: the masks DeLeaker used in its last intervening block, ``(len(entities), gh, gw)`` bool (CPU)
    on the latent grid, in the order of the request's entities; None when DeLeaker did not act or its masks cannot
    be recovered exactly (see `deleaker.runtime.entity_masks.mask_step`).
    """

    image: Image.Image
    timings: dict[str, float]
    request: GenerationRequest
    latents: Optional[list[torch.Tensor]] = None
    entity_masks: Optional[torch.Tensor] = None
    #: The most GPU memory torch allocated during the generation (GiB; every tensor of this process, the weights
    #: included); None off a GPU.
    peak_gpu_gib: Optional[float] = None
