"""`BuildRequest`: what ``deleaker-trt build`` makes, validated without any model (a light module: no torch).

Every bound the build's manifests enforce (sides, ``T``, ``E_max``, the batch profile) is checked here, when the
request is made, so that a build that could never write its manifest is refused before it loads or exports
anything, and the CLI answers before it imports torch. The resolution's multiple needs the model's VAE: the build
checks it right after loading the model, before any export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

from deleaker.config import DeLeakerConfig
from deleaker.entities import DEFAULT_MAX_ENTITIES
from deleaker.errors import ConfigError
from deleaker.folders import check_output_folder
from deleaker.lora import LoraAdapter, check_loras
from deleaker.export.limits import PRECISIONS, check_max_entities, check_side, check_text_len
from deleaker.models import check_model_source

from .manifest import MAX_BATCH

#: Prompts the FP8 scales are calibrated on (the reference examples' kinds of scenes).
DEFAULT_CALIBRATION_PROMPTS = (
    "A bat and an owl are perched side by side on a tree branch.",
    "The dolphin and the whale are cuddling together",
    "A strawberry, a radish, and a cherry sit together.",
    "In a pop art style, A hippopotamus and a rhinoceros are one gently pushing the other with its nose.",
)
#: Flow-matching sigmas (timesteps / 1000) the calibration evaluates each prompt at: early, middle and late.
DEFAULT_CALIBRATION_SIGMAS = (1.0, 0.6, 0.2)


def check_batch(batch: Any) -> None:
    """Raise `ConfigError` unless ``batch`` is ``(min, opt, max)`` ints with ``1 <= min <= opt <= max <= MAX_BATCH``
    (the largest batch a manifest may declare)."""
    ints = isinstance(batch, (tuple, list)) and all(isinstance(b, int) and not isinstance(b, bool) for b in batch)
    if not ints or len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2] <= MAX_BATCH:
        raise ConfigError(
            f"batch must be MIN OPT MAX ints with 1 <= min <= opt <= max <= {MAX_BATCH}, got {batch!r:.80}"
        )


@dataclass(frozen=True)
class BuildRequest:
    """What to build. ``height``/``width`` in pixels, ``text_len`` = T, ``max_entities`` = E_max (fixed per engine);
    ``batch`` = (min, opt, max) of the engine's profile; ``deleaker_config``: overrides of the knobs (a mapping,
    checked here), a full `DeLeakerConfig` (used as is), or None (the defaults scaled to the model).
    ``plugin_library``: ``libdeleaker_trt_plugin.so`` (``deleaker-trt plugin``), needed for an engine;
    ``onnx_only`` builds none and takes no library. ``loras``: LoRA adapters (`deleaker.lora.LoraAdapter`, a path, or
    ``(path, scale)``) fused into the transformer before the export, recorded in the manifests."""

    model: str
    precision: str
    out_dir: Path
    height: int = 512
    width: int = 512
    text_len: int = 256
    max_entities: int = DEFAULT_MAX_ENTITIES
    batch: Tuple[int, int, int] = (1, 1, 4)
    onnx_only: bool = False
    plugin_library: Optional[Path] = None
    deleaker_config: Union[Mapping[str, Any], DeLeakerConfig, None] = None
    calibration_prompts: Tuple[str, ...] = DEFAULT_CALIBRATION_PROMPTS
    calibration_sigmas: Tuple[float, ...] = DEFAULT_CALIBRATION_SIGMAS
    workspace_bytes: Optional[int] = None
    loras: Tuple[LoraAdapter, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", check_loras(self.loras))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_model_source(self.model)  # a mistyped folder is answered here, not after torch loaded to read it
        check_side("height", self.height)
        check_side("width", self.width)
        check_text_len(self.text_len)
        check_max_entities(self.max_entities)
        check_batch(self.batch)
        check_output_folder(self.out_dir, "the output folder (--out)")
        if isinstance(self.deleaker_config, Mapping):
            DeLeakerConfig.check_overrides(self.deleaker_config)
        elif self.deleaker_config is not None and not isinstance(self.deleaker_config, DeLeakerConfig):
            raise ConfigError(
                "deleaker_config must be a mapping of knob overrides, a DeLeakerConfig or None, got "
                f"{type(self.deleaker_config).__name__}"
            )
        if self.precision == "fp8" and not self.calibration_prompts:
            raise ConfigError("fp8 needs at least one calibration prompt")
        if self.onnx_only and self.plugin_library is not None:
            raise ConfigError("the plugin library is for engine builds; an ONNX-only build takes none")
        if self.plugin_library is not None and not Path(self.plugin_library).is_file():
            state = "is not a file" if Path(self.plugin_library).exists() else "does not exist"
            raise ConfigError(
                f"plugin library {self.plugin_library} {state} (`deleaker-trt plugin --out DIR` builds it)"
            )
        if not self.onnx_only and self.plugin_library is None:
            raise ConfigError(
                "building an engine needs the DeLeaker plugin library (--plugin PATH; `deleaker-trt plugin --out DIR` "
                "builds it), or ask for the ONNX only (--onnx-only)"
            )

    @property
    def artifact_stem(self) -> str:
        return f"transformer.{self.height}x{self.width}.{self.precision}"
