"""Attention inputs at FLUX.1 shapes whose entity masks cover a chosen share of the image (benchmarks, checks).

Each entity owns a vertical stripe of the latent grid: its text tokens carry a key along a direction ``u_e`` and
the image queries of its stripe carry ``u_e`` too, so the entity's affinity is high on the stripe and flat
elsewhere. A binary map covering less than half of the grid is above mean + 1 std exactly on its high part, and a
stripe at least 3 cells wide survives the 3x3 opening, so the masks are the stripes: the union covers
``coverage`` of the image (up to rounding to whole cells). With many entities (E = 8 at 25%) a full-height stripe
of 3 columns each would cover more than asked, so the stripes are then shortened to rectangles of at least 3 rows,
centred vertically. The stripes' image keys carry ``u_e`` weakly, so image-image regions have structure to cut.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: Entity rows of the mask (the kernels' E_max in FLUX deployments); more entities than this take 8 rows.
E_MAX = 4
#: The kernels' largest E_max.
E_MAX_LARGEST = 8


def entity_rows(entities: int) -> int:
    """Rows of the entity mask for ``entities`` entities: E_MAX, or 8 beyond it."""
    if not 1 <= entities <= E_MAX_LARGEST:
        raise ValueError(f"entities must be in [1, {E_MAX_LARGEST}], got {entities}")
    return E_MAX if entities <= E_MAX else E_MAX_LARGEST


def stripe_columns(grid_w: int, coverage: float, entities: int) -> list[range]:
    """The columns of each entity's stripe: ``entities`` stripes of equal width, together ``coverage`` of the grid,
    spread over the width with gaps between them."""
    if not 0.0 < coverage < 1.0 or entities < 1:
        raise ValueError(f"coverage must be in (0, 1) and entities >= 1, got {coverage}, {entities}")
    width = max(3, round(grid_w * coverage / entities))
    if width * entities > grid_w:
        raise ValueError(f"{entities} stripes of {width} columns do not fit a grid {grid_w} wide")
    gap = (grid_w - width * entities) // (entities + 1)
    return [range(gap + e * (width + gap), gap + e * (width + gap) + width) for e in range(entities)]


def stripe_rows(grid_h: int, grid_w: int, coverage: float, entities: int) -> range:
    """The rows every stripe spans: all of them, unless stripes of the width ``stripe_columns`` gives would cover
    more than ``coverage`` of the grid (then at least 3, centred)."""
    width = len(stripe_columns(grid_w, coverage, entities)[0])
    height = min(grid_h, max(3, round(coverage * grid_h * grid_w / (entities * width))))
    start = (grid_h - height) // 2
    return range(start, start + height)


def stripe_inputs(
    batch: int,
    heads: int,
    text_len: int,
    grid: Tuple[int, int],
    head_dim: int,
    *,
    coverage: float,
    entities: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """``(q, k, v)`` ``(B, H, T + gh * gw, D)``, the ``(E, T)`` bool entity mask with E = ``entity_rows(entities)``
    (4, or 8 for more than 4 entities), and the intended masks ``(B, E, gh * gw)`` bool (the stripes). Generated
    on the CPU (reproducible), then moved."""
    gh, gw = grid
    n_img = gh * gw
    e_max = entity_rows(entities)
    if text_len < 3 * entities:
        raise ValueError(f"{entities} entities take text tokens 1 .. {3 * entities - 1}: text_len {text_len} is too short")
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, text_len + n_img, head_dim)
    q = torch.randn(shape, generator=g) * 0.5
    k = torch.randn(shape, generator=g) * 0.5
    v = torch.randn(shape, generator=g)
    # Orthonormal entity directions per head; logits of a stripe query to its entity's tokens rise by ~4.
    basis = torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=g)).Q[:, :, :entities]  # (H, D, E)
    amp = (4.0 * math.sqrt(head_dim)) ** 0.5
    entity_mask = torch.zeros(e_max, text_len, dtype=torch.bool)
    intended = torch.zeros(batch, e_max, n_img, dtype=torch.bool)
    columns = torch.arange(n_img) % gw
    rows = torch.arange(n_img) // gw
    span = stripe_rows(gh, gw, coverage, entities)
    in_rows = (rows >= span.start) & (rows < span.stop)
    for e, cols in enumerate(stripe_columns(gw, coverage, entities)):
        u = F.normalize(basis[:, :, e], dim=-1)  # (H, D)
        tokens = [1 + 3 * e, 2 + 3 * e]
        entity_mask[e, tokens] = True
        k[:, :, tokens] += amp * u[None, :, None, :]
        stripe = (columns >= cols.start) & (columns < cols.stop) & in_rows
        intended[:, e] = stripe
        q[:, :, text_len:][:, :, stripe] += amp * u[None, :, None, :]
        k[:, :, text_len:][:, :, stripe] += 0.3 * amp * u[None, :, None, :]
    device = torch.device(device)
    return (
        tuple(x.to(dtype=dtype, device=device) for x in (q, k, v)),
        entity_mask.to(device),
        intended.to(device),
    )
