"""Defaults shared by the runtime and the CLI (a light module: the CLI's ``--help`` imports no model code)."""

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
DEFAULT_MAX_ENTITIES = 4
#: Engine precisions (``deleaker-trt build --precision``, ``run --precision``, engine manifests); fp16 is the
#: default, as in trtexec and NVIDIA's diffusion demo.
PRECISIONS = ("fp16", "bf16", "fp8")
DEFAULT_PRECISION = "fp16"
#: Largest ``T`` (``--text-len``, engine manifests): FLUX.1's ``max_sequence_length`` goes up to 512.
MAX_TEXT_LEN = 512
#: Largest image side in pixels any runtime serves (a 2048x2048 attention already needs a large GPU).
MAX_SIDE = 2048
