"""Will a resolution fit in this machine's memory? Checked before any work, for backends that run on the CPU.

DeLeaker attention on the CPU (the PyTorch reference, and the ONNX decomposition in ONNX Runtime) materialises
the attention scores of every head, ``(B, H, N, N)`` float32 with ``N = T + Nimg``, and image-image maps
``(B, Nimg, Nimg)`` per entity pair. Their size grows with the fourth power of the image side: the tiny model at
2048x2048 would need hundreds of GB. Allocating them fails late (an exception deep in a run) or, worse, gets the
process killed by the kernel's OOM killer. `AttentionMemory.check` refuses such a resolution up front.

**The figures are estimates**: `SCORE_TENSORS` and `PAIR_TENSORS` count live tensors of each size at the peak,
fitted with a margin to peaks measured on the tiny model (2 heads, T = 32, one DeLeaker step, peak RSS above
the loaded runtime, on a 2-core CPU machine): ONNX Runtime 1.33 GiB at 512x512 and 2.89 GiB at 640x640, PyTorch
0.89 and 1.61 GiB; the estimate says 1.45 and 3.53 GiB. Models with more heads weigh the score tensors more: the
PyTorch op alone with FLUX.1's 24 heads (T = 32, 32x32 and 48x48 grids, peak RSS, 2026-11-27) peaked at 4.3
score tensors, so `SCORE_TENSORS` over-estimates it there by about 1.6x (refusing early, never late); ONNX
Runtime was not measured with 24 heads. Available memory is the kernel's ``MemAvailable`` (Linux; bounded
by a cgroup v2 limit when there is one); where it cannot be read, nothing is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from deleaker.errors import DeLeakerError

#: Live ``(B, H, N, N)`` float32 tensors at the attention's peak (estimate, see the module docstring).
SCORE_TENSORS = 7
#: Live ``(B, Nimg, Nimg)`` float32 tensors at the attention's peak (estimate), for up to `PAIRS_IN_BASE` ordered
#: entity pairs (4 entities).
PAIR_TENSORS = 9
PAIRS_IN_BASE = 4 * 3
#: More of them per ordered entity pair beyond `PAIRS_IN_BASE`: ONNX Runtime's peak on the unrolled decomposition
#: grows with the pairs (2 heads, T = 32, 512x512, peak RSS growth of one run, 2026-11-28: E_max 4 0.94 GiB, E_max 8
#: 1.63 GiB, about a quarter of a pair tensor per pair; 0.3 keeps a margin; the fixed count said 1.45 GiB for both).
PAIR_TENSORS_PER_PAIR = 0.3
_FLOAT32 = 4


class MemoryBudgetError(DeLeakerError, ValueError):
    """A request would need more memory than this machine has available (refused before any work)."""


@dataclass(frozen=True)
class AttentionMemory:
    """The sizes that decide DeLeaker attention's working memory: heads ``H``, ``T``, ``E_max`` and the patch
    (pixels per image token side, ``2 * vae_scale_factor``)."""

    heads: int
    text_len: int
    max_entities: int
    patch: int

    @classmethod
    def of(
        cls, transformer_config: Mapping[str, Any], *, text_len: int, max_entities: int, patch: int
    ) -> "AttentionMemory":
        return cls(int(transformer_config["num_attention_heads"]), int(text_len), int(max_entities), int(patch))

    def estimate_bytes(self, height: int, width: int, batch: int = 1) -> int:
        """Estimated peak bytes of one attention call at ``height x width`` pixels."""
        n_img = (height // self.patch) * (width // self.patch)
        tokens = self.text_len + n_img
        pairs = self.max_entities * (self.max_entities - 1)
        pair_tensors = PAIR_TENSORS + PAIR_TENSORS_PER_PAIR * max(0, pairs - PAIRS_IN_BASE)
        return int(_FLOAT32 * batch * (SCORE_TENSORS * self.heads * tokens * tokens + pair_tensors * n_img * n_img))

    def check(self, height: int, width: int, batch: int = 1) -> None:
        """Raise `MemoryBudgetError` when the estimate exceeds the memory available now."""
        needed = self.estimate_bytes(height, width, batch)
        available = available_bytes()
        if available is not None and needed > available:
            raise MemoryBudgetError(
                f"{height}x{width} needs an estimated {needed / 2**30:.1f} GiB for DeLeaker attention on the CPU, "
                f"this machine has {available / 2**30:.1f} GiB available; choose a smaller size"
            )


def available_bytes() -> Optional[int]:
    """Memory this process can still allocate (``MemAvailable``, within a cgroup v2 limit), or None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    limit = _cgroup_headroom()
    if available is not None and limit is not None:
        available = min(available, limit)
    return available


def _cgroup_headroom() -> Optional[int]:
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError, IndexError):
        return None
