"""One process-wide rule for torch's tracers: an export runs alone, other torch work runs side by side.

``torch.export`` (behind ``torch.onnx.export(dynamo=True)``) keeps part of its tracing state process-wide, not per
thread (``torch.fx.traceback.current_meta``, the Python dispatcher): torch work in another thread while an export
traces can be pulled into the trace or break it (seen: ``KeyError: 'custom'`` from ``torch.fx.proxy`` in a thread
encoding a prompt while another exported). So exports take this lock exclusively (`tracing`) and the runtime's
torch work takes it shared (`torch_work`): runtimes in many threads run at once, and wait only while an export
runs (the first use of a model, size or knob set).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class _SharedExclusiveLock:
    """Many holders of the shared side at once, or one of the exclusive side; waiting exclusive holders go first
    (a steady stream of shared work cannot starve an export). The shared side is re-entrant per thread."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def shared(self) -> Iterator[None]:
        if self._depth() == 0:
            with self._condition:
                while self._exclusive or self._exclusive_waiting:
                    self._condition.wait()
                self._shared += 1
        self._local.depth = self._depth() + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                with self._condition:
                    self._shared -= 1
                    self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self._depth():
            raise RuntimeError("an export was started inside torch work of the same thread: it would wait for itself")
        with self._condition:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._condition.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


_LOCK = _SharedExclusiveLock()


def tracing():
    """Context of a ``torch.export`` / ``torch.onnx.export``: alone in the process."""
    return _LOCK.exclusive()


def torch_work():
    """Context of eager torch work that may overlap other threads' torch work, never an export."""
    return _LOCK.shared()
