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
#: Authors' runs: 20 steps, guidance 3.5, T = 256; E_max = 4 (the spec's). ``DEFAULT_STEPS`` and
#: ``DEFAULT_GUIDANCE`` are a model's with a guidance embedding (FLUX.1-dev); see `default_steps`.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
#: A model without a guidance embedding (FLUX.1-schnell, timestep-distilled): 4 steps, as its model card runs it.
UNGUIDED_STEPS = 4
DEFAULT_TEXT_LEN = 256
#: FP8 scales of the torch backend's linears (``--fp8``; `deleaker.fp8_linear.GRANULARITIES`, which needs torch).
FP8_SCALES = ("row", "tensor")


def default_steps(guidance_embeds: bool) -> int:
    """The step count a request without one gets: 4 for a model without a guidance embedding (FLUX.1-schnell is
    distilled for 1 to 4 steps), `DEFAULT_STEPS` otherwise, as diffusers' model cards run them."""
    return DEFAULT_STEPS if guidance_embeds else UNGUIDED_STEPS


def default_guidance(guidance_embeds: bool) -> "float | None":
    """The guidance a request without one gets: `DEFAULT_GUIDANCE`, or None for a model without a guidance
    embedding (it has no guidance to use; diffusers ignores one)."""
    return DEFAULT_GUIDANCE if guidance_embeds else None
