"""Which model options each backend takes: one table, read by the CLI's checks before torch loads (`RuntimeSpec`)
and by `DeLeakerRuntime.from_model` / ``from_components`` (a light module: no torch).

Each check lives here once; the two callers differ only in how the error names an option (a keyword argument,
``compile``, or a CLI flag, ``--compile``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from deleaker.errors import ConfigError

from .defaults import FP8_SCALES


@dataclass(frozen=True)
class TorchOnlyOption:
    """An option only the torch backend of a model takes, and what it does (said when it is refused)."""

    name: str
    flag: str
    purpose: str
    #: Said after the refusal: where else to find what the option gives.
    elsewhere: str = ""


#: The torch backend's own options, in the order they are checked.
TORCH_ONLY_OPTIONS = (
    TorchOnlyOption("compile", "--compile", "torch.compile of the transformer"),
    TorchOnlyOption("fp8", "--fp8", "FP8 linears in PyTorch", elsewhere="FP8 engines: build --precision fp8"),
    TorchOnlyOption("offload_encoders", "--offload-encoders", "text encoders kept in CPU memory for a GPU run"),
)


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def check_backend_options(
    backend: Optional[str], options: Mapping[str, Any], *, engines: bool = False, as_flags: bool = False
) -> None:
    """Raise `ConfigError` when ``options`` (``compile``, ``fp8``, ``offload_encoders``) have a wrong type or value,
    or are given to a backend that does not take them.

    ``backend``: the backend that runs the model (None: the default, onnxruntime); ``engines``: the runtime loads
    an engine directory (none of these options apply). ``as_flags``: name options as the CLI's flags.
    """
    for key in ("compile", "offload_encoders"):
        if not isinstance(options.get(key, False), bool):
            raise ConfigError(f"{key} must be True or False, got {options[key]!r:.40}")
    fp8 = options.get("fp8")
    if fp8 is not None and fp8 not in FP8_SCALES:
        raise ConfigError(f"fp8 scales must be one of {FP8_SCALES}, got {fp8!r:.40}")
    if backend == "torch" and not engines:
        return
    for option in TORCH_ONLY_OPTIONS:
        if not _is_set(options.get(option.name)):
            continue
        elsewhere = f" ({option.elsewhere})" if option.elsewhere else ""
        if as_flags:
            used = "an engine directory" if engines else f"the {backend or 'onnxruntime'} backend"
            raise ConfigError(
                f"{option.flag} applies to the torch backend of a model (--model ... --backend torch), not to "
                f"{used}{elsewhere}"
            )
        raise ConfigError(
            f"{option.name} applies to the torch backend only ({option.purpose}), not {backend}; use "
            f"backend='torch' (--backend torch){elsewhere}"
        )


def check_flux2_options(
    model: Any, backend: Optional[str], options: Mapping[str, Any], *, loras: bool = False, as_flags: bool = False
) -> None:
    """Raise `ConfigError` for what the runtime does not run on a FLUX.2 model (``model`` names it in the
    message): any backend but torch (None, the CLI's default, means torch here), and the torch backend's
    ``compile``, ``fp8``, ``offload_encoders`` and LoRA adapters, which are FLUX.1's so far (`Flux2Runtime`)."""
    if backend not in (None, "torch"):
        what = "--backend torch (the default for a FLUX.2 folder)" if as_flags else "backend='torch'"
        raise ConfigError(
            f"{model} is a FLUX.2 model, which the runtime runs with the torch backend only (its {backend} backend "
            f"and engines run FLUX.1 so far): use {what}"
        )
    refused = [option for option in TORCH_ONLY_OPTIONS if _is_set(options.get(option.name))]
    if loras:
        refused.append(TorchOnlyOption("loras", "--lora", "LoRA adapters"))
    if refused:
        option = refused[0]
        name = option.flag if as_flags else option.name
        raise ConfigError(
            f"{name} ({option.purpose}) is not available for a FLUX.2 model ({model}) so far: the runtime runs "
            "FLUX.2 eagerly in its own dtype, without adapters; drop it"
        )
