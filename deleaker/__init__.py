"""DeLeaker for FLUX.1: the PyTorch reference (op, diffusers processor and pipeline, tiny offline model).

Importing this package needs neither a GPU, TensorRT nor compiled kernels. Names are imported on first use, so
``deleaker.errors`` or ``deleaker.config`` (what the CLI checks input with) load without torch.
"""

from __future__ import annotations

import os

from .lazy import lazy_exports

# From a source checkout's root (``python -c ...`` run there puts the checkout first on sys.path) this folder is found
# before an installed deleaker-trt, but the subpackages live beside it (pyproject's package-dir maps plugins/,
# export/, engines/, runtime/): look there too, so `deleaker.runtime` is this checkout's, never another install's.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isfile(
    os.path.join(_CHECKOUT, "runtime", "__init__.py")
):
    __path__.append(_CHECKOUT)  # noqa: F821  (a package's own __path__)

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
