"""The runtime's defaults, shared with the CLI (a light module: the CLI's ``--help`` imports no model code). The
sizes every layer checks are `deleaker.export.limits`; the default E_max is `deleaker.entities.DEFAULT_MAX_ENTITIES`.
"""

#: Backends by where the transformer comes from.
BACKENDS = ("onnxruntime", "tensorrt", "torch")
#: Backends `DeLeakerRuntime.from_model` can run the transformer with.
MODEL_BACKENDS = ("onnxruntime", "torch")
#: The embedded default: runs on a fresh CPU-only machine with the ``[onnx]`` extra, and is what engines are
#: built from, so the default path exercises the exported graph.
DEFAULT_MODEL_BACKEND = "onnxruntime"
#: Authors' runs: 20 steps, guidance 3.5, T = 256; E_max = 4 (the spec's).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
DEFAULT_TEXT_LEN = 256
#: FP8 scales of the torch backend's linears (``--fp8``; `deleaker.fp8_linear.GRANULARITIES`, which needs torch).
FP8_SCALES = ("row", "tensor")
