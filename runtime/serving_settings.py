"""How ``deleaker-trt serve`` runs its Ray Serve deployment (replicas, batching, queue bounds, resources), checked
without Ray or torch so that a bad option answers before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from deleaker.config import shown
from deleaker.errors import ConfigError

from .spec import RuntimeSpec

#: File suffix of a TensorRT engine in an engine folder (an ONNX folder runs on the CPU).
ENGINE_SUFFIX = ".plan"


@dataclass(frozen=True)
class ServeSettings:
    """How the deployment runs (checked when made; every field has a safe default for one CPU machine).

    replicas: a fixed replica count; ``autoscale``: ``(min, max)`` replicas instead (Ray adds replicas when each
    has more than ``max_batch_size`` requests in flight). max_batch_size: requests per ``@serve.batch`` batch;
    batch_wait_s: how long a batch waits to fill. max_ongoing_requests: requests a replica holds at once (its
    batch being filled and run); max_queued_requests: requests waiting for a replica before 503.
    num_cpus: CPUs Ray reserves per replica; num_gpus: GPUs per replica, None: 1 when the runtime runs on a GPU
    (a TensorRT engine folder, ``device="cuda..."``), else 0. request_timeout_s: the proxy gives up on a request
    (504) after this long.
    """

    replicas: int = 1
    autoscale: Optional[tuple[int, int]] = None
    max_batch_size: int = 4
    batch_wait_s: float = 0.05
    max_ongoing_requests: int = 8
    max_queued_requests: int = 16
    num_cpus: float = 1.0
    num_gpus: Optional[float] = None
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        ints = {"replicas": (1, 1024), "max_batch_size": (1, 64), "max_ongoing_requests": (1, 4096),
                "max_queued_requests": (1, 1 << 20)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an int in [{low}, {high}], got {shown(value)}")
        numbers = {"batch_wait_s": (0.0, 10.0), "num_cpus": (0.0, 1024.0), "request_timeout_s": (1.0, 86400.0)}
        if self.num_gpus is not None:
            numbers["num_gpus"] = (0.0, 64.0)
        for name, (low, high) in numbers.items():
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not low <= value <= high):
                raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}], got {shown(value)}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                f"({self.max_batch_size}): a replica could never fill a batch"
            )
        if self.autoscale is not None:
            pair = self.autoscale
            if (not isinstance(pair, tuple) or len(pair) != 2 or
                    any(isinstance(n, bool) or not isinstance(n, int) for n in pair) or not 1 <= pair[0] <= pair[1]):
                raise ConfigError(f"autoscale must be (min, max) replicas with 1 <= min <= max, got {shown(pair)}")
            if self.replicas != 1:
                raise ConfigError("give replicas or autoscale, not both")


def needs_gpu(spec: RuntimeSpec) -> bool:
    """Whether a runtime opened from ``spec`` runs on a GPU (a replica then asks Ray for one)."""
    if spec.device is not None:
        return spec.device.startswith("cuda")
    if spec.backend == "tensorrt":
        return True
    if spec.engines is not None and spec.backend is None:
        return any(Path(spec.engines).glob(f"*{ENGINE_SUFFIX}"))  # TensorRT plans run on the GPU
    if spec.model is not None and spec.backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False
