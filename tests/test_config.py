"""`deleaker.DeLeakerConfig`: the spec's defaults, scaling to other models, resolution and validation."""

from __future__ import annotations

import dataclasses

import pytest

from deleaker import REFERENCE_NUM_BLOCKS, ConfigError, DeLeakerConfig, DeLeakerError

SPEC_DEFAULTS = dict(
    std_mul_text=1.0,
    std_mul_image_image=1.0,
    k_strength=1.2,
    start_aggregating_from=12,
    stop_aggregating_at=684,
    start_intervention_from=18,
    stop_intervention_at=1140,
    use_history=True,
    do_smoothing=True,
    do_image_image=True,
    do_image_text_strengthening=True,
    do_image_text_weakening=True,
)
WINDOWS = ("start_aggregating_from", "stop_aggregating_at", "start_intervention_from", "stop_intervention_at")


def test_defaults_are_the_spec() -> None:
    assert dataclasses.asdict(DeLeakerConfig()) == SPEC_DEFAULTS
    for name, value in SPEC_DEFAULTS.items():
        assert type(getattr(DeLeakerConfig(), name)) is type(value), name
    assert REFERENCE_NUM_BLOCKS == 57


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DeLeakerConfig().k_strength = 2.0  # type: ignore[misc]


def test_for_57_blocks_is_the_defaults() -> None:
    assert DeLeakerConfig.for_model(57) == DeLeakerConfig()


@pytest.mark.parametrize("num_blocks", [1, 4, 10, 19, 38, 57, 114])
def test_for_model_scales_the_windows(num_blocks: int) -> None:
    config = DeLeakerConfig.for_model(num_blocks)
    for name in WINDOWS:
        assert getattr(config, name) == round(SPEC_DEFAULTS[name] * num_blocks / 57), name
    for name in set(SPEC_DEFAULTS) - set(WINDOWS):
        assert getattr(config, name) == SPEC_DEFAULTS[name], "only the windows scale"


def test_for_model_4_blocks_values_and_overrides() -> None:
    # 12 * 4/57 = 0.84 -> 1, 684 * 4/57 = 48, 18 * 4/57 = 1.26 -> 1, 1140 * 4/57 = 80.
    config = DeLeakerConfig.for_model(4)
    assert (config.start_aggregating_from, config.stop_aggregating_at) == (1, 48)
    assert (config.start_intervention_from, config.stop_intervention_at) == (1, 80)
    # An overridden window is taken as given; the others still scale; other knobs pass through.
    config = DeLeakerConfig.for_model(4, start_intervention_from=7, k_strength=1.5, do_smoothing=False)
    assert config.start_intervention_from == 7
    assert (config.start_aggregating_from, config.stop_aggregating_at, config.stop_intervention_at) == (1, 48, 80)
    assert config.k_strength == 1.5 and config.do_smoothing is False


def test_for_model_override_equal_to_default_is_not_scaled() -> None:
    assert DeLeakerConfig.for_model(4, stop_intervention_at=1140).stop_intervention_at == 1140


@pytest.mark.parametrize("num_blocks", [0, -57, 5.0, True, "57", None])
def test_for_model_rejects_bad_num_blocks(num_blocks) -> None:
    with pytest.raises(ConfigError, match="num_blocks"):
        DeLeakerConfig.for_model(num_blocks)


def test_resolve() -> None:
    given = DeLeakerConfig(k_strength=2.0)
    assert DeLeakerConfig.resolve(given, 4) is given, "a full config is used as is, never rescaled"
    assert DeLeakerConfig.resolve(None, 4) == DeLeakerConfig.for_model(4)
    assert DeLeakerConfig.resolve(None, 57) == DeLeakerConfig()
    assert DeLeakerConfig.resolve({"k_strength": 2.0}, 4) == DeLeakerConfig.for_model(4, k_strength=2.0)
    assert DeLeakerConfig.resolve({}, 4) == DeLeakerConfig.for_model(4)


@pytest.mark.parametrize("bad", ["k_strength=2", 1.2, [("k_strength", 2.0)]])
def test_resolve_rejects_other_types(bad) -> None:
    with pytest.raises(ConfigError, match="DeLeakerConfig"):
        DeLeakerConfig.resolve(bad, 4)


def test_unknown_option_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as info:
        DeLeakerConfig.resolve({"k_strenght": 2.0}, 57)
    message = str(info.value)
    assert "k_strenght" in message
    for name in SPEC_DEFAULTS:
        assert name in message, f"allowed option {name} not listed"
    with pytest.raises(ConfigError, match="alpha"):
        DeLeakerConfig.for_model(57, alpha=1.0)


@pytest.mark.parametrize(
    "name, value",
    [
        ("use_history", 1),
        ("do_smoothing", "yes"),
        ("do_image_image", None),
        ("do_image_text_strengthening", 0.0),
        ("do_image_text_weakening", "False"),
        ("start_aggregating_from", 1.5),
        ("stop_aggregating_at", "684"),
        ("start_intervention_from", True),
        ("stop_intervention_at", None),
        ("start_intervention_from", -1),
        ("start_aggregating_from", -3),
        ("k_strength", "1.2"),
        ("k_strength", True),
        ("std_mul_text", float("nan")),
        ("std_mul_text", float("-inf")),
        ("k_strength", float("inf")),
        ("std_mul_image_image", None),
        # Ranges (DeLeakerConfig's docstring): k_strength in (0, 10], std_mul_* in [-10, 10], windows < 2**31.
        ("k_strength", 0.0),
        ("k_strength", -1.2),
        ("k_strength", 10.5),
        ("k_strength", 3e38),
        ("std_mul_text", 1e308),
        ("std_mul_text", -10.01),
        ("std_mul_image_image", 11),
        ("stop_intervention_at", 2**31),
        ("stop_aggregating_at", 10**23),
        ("stop_intervention_at", 1e23),
        # Too long for repr() (the message describes it), and beyond float's range (math.isfinite() overflows).
        pytest.param("stop_intervention_at", 10**5000, id="window-5000-digits"),
        pytest.param("k_strength", 10**400, id="k_strength-400-digits"),
    ],
)
def test_bad_types_and_values(name: str, value) -> None:
    with pytest.raises(ConfigError, match=name):
        DeLeakerConfig(**{name: value})
    with pytest.raises(ConfigError, match=name):
        DeLeakerConfig.for_model(57, **{name: value})


def test_range_edges_are_accepted() -> None:
    config = DeLeakerConfig(k_strength=10, std_mul_text=-10.0, std_mul_image_image=10.0, stop_intervention_at=2**31 - 1)
    assert config.stop_intervention_at == 2**31 - 1
    DeLeakerConfig(k_strength=1e-6)


def test_check_overrides_needs_no_model() -> None:
    """What the CLI runs before loading anything: unknown names, types and single-knob ranges."""
    DeLeakerConfig.check_overrides({"k_strength": 2.0, "stop_intervention_at": 5})
    with pytest.raises(ConfigError, match="unknown DeLeaker option"):
        DeLeakerConfig.check_overrides({"alpha": 1.0})
    with pytest.raises(ConfigError, match=r"k_strength must be in \(0, 10\], got -1"):
        DeLeakerConfig.check_overrides({"k_strength": -1})
    with pytest.raises(ConfigError, match=r"stop_intervention_at must be in \[0, 2\*\*31 - 1\]"):
        DeLeakerConfig.check_overrides({"stop_intervention_at": 10**23})


def test_ints_accepted_for_float_knobs() -> None:
    config = DeLeakerConfig(k_strength=2, std_mul_text=0, std_mul_image_image=-1.5)
    assert config.k_strength == 2 and config.std_mul_text == 0


@pytest.mark.parametrize(
    "start, stop",
    [("start_aggregating_from", "stop_aggregating_at"), ("start_intervention_from", "stop_intervention_at")],
)
def test_stop_before_start_rejected(start: str, stop: str) -> None:
    with pytest.raises(ConfigError, match=stop):
        DeLeakerConfig(**{start: 10, stop: 9})
    DeLeakerConfig(**{start: 10, stop: 10})  # a window of one block step is allowed


def test_config_error_is_a_deleaker_value_error() -> None:
    with pytest.raises(DeLeakerError):
        DeLeakerConfig(k_strength="x")
    with pytest.raises(ValueError):
        DeLeakerConfig(k_strength="x")


@pytest.mark.parametrize("t, inside", [(17, False), (18, True), (500, True), (1140, True), (1141, False)])
def test_intervenes_at(t: int, inside: bool) -> None:
    assert DeLeakerConfig().intervenes_at(t) is inside
