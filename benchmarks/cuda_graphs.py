"""Capture a callable in a CUDA graph the way PyTorch wants it (shared by the benchmarks)."""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch


def capture_graph(fn: Callable[[], Any], warmup: int = 2) -> Tuple["torch.cuda.CUDAGraph", Any]:
    """Run ``fn`` ``warmup`` times on a side stream (lazy initialisation and allocations happen there, not in the
    capture), then capture one call. Returns the graph and what the captured call returned (its outputs are the
    graph's static outputs: a replay rewrites them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result
