"""``deleaker.runtime``: the lean FLUX.1 + DeLeaker runtime; ``deleaker.runtime.cli`` is the ``deleaker-trt`` CLI on top of it.

Public API (imported on first use, so ``deleaker-trt --help`` and ``import deleaker.runtime`` stay light)::

    from deleaker.runtime import DeLeakerRuntime
    rt = DeLeakerRuntime.from_model("tiny")            # ONNX Runtime (default) or backend="torch"
    rt = DeLeakerRuntime.from_engines("engines/512")   # TensorRT engines (or ONNX files) with manifests
    result = rt("A cat and a dog", ["cat", "dog"], seed=0, steps=20, guidance=3.5, height=512, width=512)
    result.image.save("out.png"); print(result.timings)

One call at a time per instance (a lock serialises concurrent calls); no global state.
"""

from __future__ import annotations

from deleaker.lazy import lazy_exports

_EXPORTS = {
    "DeLeakerRuntime": "runtime",
    "GenerationRequest": "request",
    "ResolvedRequest": "request",
    "GenerationResult": "runtime",
    "NonFiniteError": "runtime",
    "TransformerBackend": "backends",
    "TorchBackend": "backends",
    "OnnxRuntimeBackend": "backends",
    "TensorRTBackend": "tensorrt_backend",
    "BackendError": "backends",
    "MemoryBudgetError": "memory",
    "FlowMatchSchedule": "schedule",
    "flux_schedule": "schedule",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
