"""Defaults shared by the runtime and the CLI (a light module: the CLI's ``--help`` imports no model code)."""

from pathlib import Path
from typing import Any

from deleaker.errors import ConfigError
from deleaker.plugins.kernels import MAX_ENTITIES

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


def check_text_len(value: Any) -> None:
    """Raise `ConfigError` unless ``value`` is an int in [1, `MAX_TEXT_LEN`]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TEXT_LEN:
        raise ConfigError(f"text_len must be an int in [1, {MAX_TEXT_LEN}] (T5 tokens), got {value!r:.40}")


def check_max_entities(value: Any) -> None:
    """Raise `ConfigError` unless ``value`` is an int in [2, `MAX_ENTITIES`] (the kernels' limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_ENTITIES:
        raise ConfigError(
            f"max_entities must be an int in [2, {MAX_ENTITIES}] (the kernels take at most {MAX_ENTITIES} "
            f"entities), got {value!r:.40}"
        )


def check_model_source(model: Any) -> None:
    """Raise `ConfigError` unless ``model`` is ``"tiny"`` (the built-in model, `deleaker.tiny.TINY_MODEL_NAME`,
    spelled out: that module imports torch) or names a directory."""
    if str(model) != "tiny" and not Path(model).is_dir():
        raise ConfigError(f"model {str(model)!r:.200} is neither 'tiny' nor a directory")
