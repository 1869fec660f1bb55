"""`GenerationResult`: what one generation of a runtime gives back (FLUX.1's `DeLeakerRuntime`, FLUX.2's
`Flux2Runtime`), and `CallableRuntime`, the ``rt(prompt, entities, ...)`` call that gives it, in a module of their
own so that both runtimes share them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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


class CallableRuntime:
    """What both runtimes (`DeLeakerRuntime`, `Flux2Runtime`) do when called: make the `GenerationRequest` from
    the arguments and pass it to their ``generate``."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """One image for ``request``; each runtime defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define generate")

    def __call__(
        self,
        prompt: str,
        entities: Sequence[str],
        *,
        seed: int = 0,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        deleaker: bool = True,
    ) -> GenerationResult:
        """Generate one image; see `GenerationRequest` for the arguments (steps/guidance None: the model's).
        Returns image and per-stage timings."""
        return self.generate(GenerationRequest(prompt, entities, seed, steps, guidance, height, width, deleaker))
