"""Where a runtime gets the transformer backend for a resolution: one backend for every size (PyTorch), or one per
resolution (engines, ONNX files, or exports made on first use)."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from deleaker.errors import ShapeError
from deleaker.export.limits import MAX_SIDE, check_size

from .backends import TransformerBackend
from .memory import AttentionMemory


class TransformerSource:
    """Where a runtime gets its backend for a resolution; subclasses say which resolutions they serve."""

    name: str = "?"

    def check_resolution(self, height: int, width: int) -> None:
        raise NotImplementedError

    def backend(self, height: int, width: int) -> TransformerBackend:
        raise NotImplementedError


class AnyResolution(TransformerSource):
    """One backend for every resolution that is a multiple of ``2 * vae_scale_factor`` (PyTorch).

    ``memory``: the attention's working memory, checked against what this machine has free (None: unchecked,
    e.g. on a GPU, where an allocation failure is still a typed error).
    """

    def __init__(
        self, backend: TransformerBackend, patch: int, max_pixels: int = MAX_SIDE,
        memory: Optional[AttentionMemory] = None,
    ) -> None:
        self._backend, self._patch, self._max, self._memory = backend, patch, max_pixels, memory
        self.name = backend.name

    def check_resolution(self, height: int, width: int) -> None:
        check_size(height, width, self._patch, self._max)
        if self._memory is not None:
            self._memory.check(height, width)

    def backend(self, height: int, width: int) -> TransformerBackend:
        return self._backend


class PerResolution(TransformerSource):
    """One backend per resolution: fixed ones (engines, ONNX files), or made on first use by ``factory``.

    ``memory`` as `AnyResolution`'s (for backends that run on this machine's CPU).
    """

    def __init__(
        self,
        name: str,
        patch: int,
        backends: Mapping[tuple[int, int], Callable[[], TransformerBackend]],
        factory: Optional[Callable[[int, int], TransformerBackend]] = None,
        max_pixels: int = MAX_SIDE,
        memory: Optional[AttentionMemory] = None,
    ) -> None:
        self.name, self._patch, self._factory, self._max, self._memory = name, patch, factory, max_pixels, memory
        self._loaders = dict(backends)
        self._loaded: dict[tuple[int, int], TransformerBackend] = {}

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return sorted(self._loaders)

    def check_resolution(self, height: int, width: int) -> None:
        check_size(height, width, self._patch, self._max)
        if self._factory is None and (height, width) not in self._loaders:
            allowed = ", ".join(f"{h}x{w}" for h, w in self.resolutions)
            raise ShapeError(f"no {self.name} engine for {height}x{width}; this directory has: {allowed}")
        if self._memory is not None:
            self._memory.check(height, width)

    def backend(self, height: int, width: int) -> TransformerBackend:
        key = (height, width)
        if key not in self._loaded:
            if key in self._loaders:
                self._loaded[key] = self._loaders[key]()
            elif self._factory is not None:
                self._loaded[key] = self._factory(height, width)
            else:  # check_resolution runs first; this is a programming error
                raise ShapeError(f"no backend for {height}x{width}")
        return self._loaded[key]
