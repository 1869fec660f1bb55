"""FLUX's image geometry, as ``FluxPipeline`` computes it: pixels -> VAE latent cells -> 2x2-patch tokens.

Kept free of diffusers and transformers so light modules (the I/O contract, the runtime) can use it.
"""

from __future__ import annotations

from typing import Any, Mapping


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell of a VAE config (``vae.config`` or its config.json dict)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def latent_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """The ``(gh, gw)`` token grid of an image: VAE downsampling, then 2x2 patches."""
    return int(height) // (vae_scale_factor * 2), int(width) // (vae_scale_factor * 2)
