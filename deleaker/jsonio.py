"""Strict JSON for everything a user hands us (prompts lines, manifests, ONNX metadata, request bodies).

Python's ``json.loads`` keeps the last of two equal keys (``{"seed": 1, "seed": 2}`` is seed 2). A user's file
that says one thing twice is ambiguous, so we refuse it instead of guessing which value they meant. It also accepts
``NaN``/``Infinity``, which are not JSON: refused on request (``allow_nan=False``), for readers whose own checks
would not name a non-finite number better (a manifest's knobs say "must be a finite number" themselves). Needs no
torch: the CLI checks input with it before loading a model.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import DeLeakerError


class StrictJSONError(DeLeakerError, ValueError):
    """JSON that a strict reader refuses: a key given twice in one object, or NaN/Infinity.

    A ``ValueError`` like ``json.JSONDecodeError``, so callers that already turn bad JSON into their own error
    keep doing so.
    """


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise StrictJSONError(f"duplicate key {key!r:.80} in a JSON object; give each key once")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON; numbers must be finite")


def loads_strict(text: str | bytes, *, allow_nan: bool = True) -> Any:
    """``json.loads`` that refuses a key repeated in one object (and, with ``allow_nan=False``, the non-standard
    NaN/Infinity constants).

    Raises `StrictJSONError` for those, ``json.JSONDecodeError`` for text that is not JSON, ``ValueError`` for an
    int json cannot convert (more than 4300 digits) and ``RecursionError`` for nesting too deep, as ``json.loads``.
    """
    return json.loads(
        text, object_pairs_hook=_object_without_duplicates, parse_constant=None if allow_nan else _refuse_constant
    )
