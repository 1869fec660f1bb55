"""DeLeaker's knobs, with the defaults of the spec (FLUX.1-dev, 20 steps, 57 blocks per step)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

#: Blocks per step of FLUX.1 (19 double-stream + 38 single-stream), the unit of the window defaults.
REFERENCE_NUM_BLOCKS = 57

def num_joint_blocks(transformer_config: Mapping[str, Any]) -> int:
    """Joint attentions per step of a ``FluxTransformer2DModel`` (57 for FLUX.1), from its config
    (``transformer.config`` or its config.json dict)."""
    return int(transformer_config["num_layers"]) + int(transformer_config["num_single_layers"])


#: Model families the transformer configs name: FLUX.1 (``FluxTransformer2DModel``) and FLUX.2 [dev]/[klein]
#: (``Flux2Transformer2DModel``: no pooled CLIP projection, 4 RoPE axes, fused single-stream projections).
MODEL_FAMILIES = ("flux1", "flux2")


def model_family(transformer_config: Mapping[str, Any]) -> str:
    """``"flux2"`` for a ``Flux2Transformer2DModel`` config (``transformer.config`` or its config.json dict), else
    ``"flux1"``. Told apart by their keys: FLUX.2 has ``timestep_guidance_channels`` and no
    ``pooled_projection_dim``."""
    if "pooled_projection_dim" not in transformer_config and "timestep_guidance_channels" in transformer_config:
        return "flux2"
    return "flux1"


#: Window knobs are block steps below 2**31: the graph stores them as int64 and every kernel takes them as int64,
#: and a FLUX.1 run of 1000 steps counts only 57,000 block steps.
MAX_BLOCK_STEP = 2**31 - 1
#: ``(low, high, low_included)`` of the float knobs. These ranges (and `MAX_BLOCK_STEP`) also keep every knob
#: finite wherever it is stored: float32 attributes and constants of the exported graph, the kernels' float32 and
#: int64 params (so no separate check of the graph's types is needed). ``k_strength`` multiplies an entity's own
#: logits: <= 0 would invert or flatten the attention it is meant to strengthen (disable strengthening with
#: ``do_image_text_strengthening=False``), and above 10 the softmax is saturated already while large logits
#: overflow fp16. The ``std_mul_*`` thresholds are ``mean + std_mul * std`` of probabilities: beyond +-10 std
#: nothing (or everything) is selected, and far larger values overflow float32 (inf * 0 std = NaN).
FLOAT_RANGES = {
    "std_mul_text": (-10.0, 10.0, True),
    "std_mul_image_image": (-10.0, 10.0, True),
    "k_strength": (0.0, 10.0, False),
}

#: Knobs that count block steps; scaled by ``num_blocks / 57`` for other models (see `DeLeakerConfig.for_model`).
WINDOW_FIELDS = (
    "start_aggregating_from",
    "stop_aggregating_at",
    "start_intervention_from",
    "stop_intervention_at",
)


@dataclass(frozen=True)
class DeLeakerConfig:
    """Every knob of DeLeaker attention. The window knobs count block steps ``t = step * num_blocks + offset``.

    Ranges (refused with `ConfigError` outside them): window knobs are ints in ``[0, MAX_BLOCK_STEP]`` with
    ``stop >= start``; ``k_strength`` in ``(0, 10]``; ``std_mul_text``/``std_mul_image_image`` in ``[-10, 10]``
    (see `FLOAT_RANGES`); switches are bools.
    """

    std_mul_text: float = 1.0
    std_mul_image_image: float = 1.0
    k_strength: float = 1.2
    start_aggregating_from: int = 12
    stop_aggregating_at: int = 684
    start_intervention_from: int = 18
    stop_intervention_at: int = 1140
    use_history: bool = True
    do_smoothing: bool = True
    do_image_image: bool = True
    do_image_text_strengthening: bool = True
    do_image_text_weakening: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_knob(f.name, f.type, getattr(self, f.name))
        _check_window_order(dataclasses.asdict(self))

    @classmethod
    def for_model(cls, num_blocks: int, **overrides: Any) -> "DeLeakerConfig":
        """The config for a model with ``num_blocks`` joint attentions per step.

        Window knobs that are not in ``overrides`` are the spec's defaults scaled by ``num_blocks / 57`` (rounded),
        so the windows keep their place in the denoising schedule; everything in ``overrides`` is taken as given.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"num_blocks must be a positive int, got {num_blocks!r}")
        cls.check_overrides(overrides)
        defaults = cls()
        scaled = {
            name: int(round(getattr(defaults, name) * num_blocks / REFERENCE_NUM_BLOCKS))
            for name in WINDOW_FIELDS
            if name not in overrides
        }
        return cls(**{**scaled, **overrides})

    @classmethod
    def check_overrides(cls, overrides: Mapping[str, Any]) -> None:
        """Raise `ConfigError` for an unknown knob or a value of the wrong type or outside its range.

        The checks of single knobs, without the model (`for_model` checks windows against each other once the
        defaults are scaled): what the CLI runs before loading anything."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(types))
        if unknown:
            raise ConfigError(f"unknown DeLeaker option(s) {unknown}; allowed: {sorted(types)}")
        for name, value in overrides.items():
            _check_knob(name, types[name], value)
        _check_window_order(overrides)  # the windows both of whose ends are given

    @classmethod
    def resolve(cls, config: "DeLeakerConfig | Mapping[str, Any] | None", num_blocks: int) -> "DeLeakerConfig":
        """What pipelines accept: a full config (used as is), a mapping of overrides, or None (scaled defaults)."""
        if isinstance(config, cls):
            return config
        if config is None:
            return cls.for_model(num_blocks)
        if isinstance(config, Mapping):
            return cls.for_model(num_blocks, **dict(config))
        raise ConfigError(f"deleaker_config must be a DeLeakerConfig, a mapping of options or None, got {type(config)}")

    def intervenes_at(self, block_step: int) -> bool:
        return self.start_intervention_from <= block_step <= self.stop_intervention_at


def _check_window_order(knobs: Mapping[str, Any]) -> None:
    """Raise `ConfigError` where ``knobs`` holds both ends of a window and its stop is before its start."""
    for start, stop in (("start_aggregating_from", "stop_aggregating_at"),
                        ("start_intervention_from", "stop_intervention_at")):
        if start in knobs and stop in knobs and knobs[stop] < knobs[start]:
            raise ConfigError(f"{stop} ({knobs[stop]}) must be >= {start} ({knobs[start]})")


def _check_knob(name: str, kind: Any, value: Any) -> None:
    """Raise `ConfigError` unless ``value`` has the knob's type (``kind``: its dataclass annotation) and range."""
    # Every message names the allowed values: a wrong type (text the CLI could not parse) is a bad value too.
    if kind in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"DeLeakerConfig.{name} must be a bool (true or false), got {shown(value)}")
    elif kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"DeLeakerConfig.{name} must be an int (block steps) in [0, 2**31 - 1], got {shown(value)}"
            )
        if not 0 <= value <= MAX_BLOCK_STEP:
            raise ConfigError(f"DeLeakerConfig.{name} must be in [0, 2**31 - 1] (block steps), got {shown(value)}")
    else:
        low, high, low_included = FLOAT_RANGES[name]
        interval = f"{'[' if low_included else '('}{low:g}, {high:g}]"
        # abs() < inf before isfinite: isfinite overflows on an int beyond float's range.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < math.inf:
            raise ConfigError(f"DeLeakerConfig.{name} must be a finite number in {interval}, got {shown(value)}")
        if not (low <= value if low_included else low < value) or value > high:
            raise ConfigError(f"DeLeakerConfig.{name} must be in {interval}, got {shown(value)}")


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters; an int too long to print (Python
    refuses more than 4300 digits) is described by its size."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
