"""``--set KNOB=VALUE``, shared by ``run``, ``verify`` and ``build``: parsed here, checked by the library
(`DeLeakerConfig.check_overrides`) with each knob's allowed values. A light module: imported before torch."""

from __future__ import annotations

from typing import Any, Callable

import click

from deleaker.errors import ConfigError


def knob_option(help_text: str) -> Callable:
    """The repeatable ``--set KNOB=VALUE`` option, stored as ``overrides``."""
    return click.option("--set", "overrides", multiple=True, metavar="KNOB=VALUE", help=help_text)


def knob_overrides(values: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """``("k_strength=1.5", "use_history=false")`` -> ``(("k_strength", 1.5), ("use_history", False))``.

    A knob given twice is refused (`ConfigError`): which of two values was meant is a guess, and the TensorRT
    plugin refuses a field given twice too."""
    parsed: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in values:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise click.BadParameter(f"expected KNOB=VALUE, got {item!r}", param_hint="--set")
        if name in given:
            raise ConfigError(f"--set {name} is given twice ({given[name]!r} and {item!r}); give each knob once")
        given[name] = item
        parsed[name] = _knob_value(text.strip())
    return tuple(parsed.items())


def _knob_value(text: str) -> Any:
    """``true``/``false`` (any case), an int, or a float: also ``inf``/``nan``. The config then refuses what is
    out of range, and the text itself when it is none of these, with the knob's allowed values (one message and
    exit 1 for every bad value, as `LibraryChecked` does for the options)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text
