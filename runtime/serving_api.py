"""The HTTP API of ``deleaker-trt serve``, without Ray: a ``POST /generate`` body becomes a `GenerationRequest`
(refused with the CLI's messages), a generated image becomes the reply (PNG with its provenance record, or JSON).

A body is one JSON object with the keys of a ``--prompts`` line (``prompt``, ``entities``, optional ``seed``) plus
the per-image settings the CLI takes as options (``steps``, ``guidance``, ``height``, ``width``; one side given
alone sets both, as ``--height``/``--width``). It is read with the strict JSON reader (a key given twice, NaN and
Infinity are refused) and checked as a prompts line and as `ImageSettings`; a key outside these is refused (a
misspelt setting would otherwise be ignored). What needs the model (T5 tokens, entity tokens, the resolution's
multiple) is checked by the runtime before the request joins a batch. Light: no torch, no Ray.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any, Mapping

from .batch_file import MAX_LINE_BYTES, PER_RUN_SETTINGS, BatchFileError, parse_prompts_line
from .request import GenerationRequest, ImageSettings

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import GenerationResult

#: Keys of a ``POST /generate`` body: a prompts line's and the per-image settings.
BODY_KEYS = ("prompt", "entities", "seed", "steps", "guidance", "height", "width")
#: Per-image settings a body may set (a prompts line may not: the CLI's options set them for the whole run).
IMAGE_SETTINGS = ("steps", "guidance", "height", "width")
#: Largest body, as the longest prompts line.
MAX_BODY_BYTES = MAX_LINE_BYTES
WHERE = "the request body"


class RequestBodyError(BatchFileError):
    """A ``POST /generate`` body that is not a request (the HTTP API answers 400 with its message)."""


def parse_generate_body(body: bytes) -> GenerationRequest:
    """The request of a ``POST /generate`` body; raises a `DeLeakerError` (the CLI's message) for a bad one."""
    if not isinstance(body, (bytes, bytearray)):
        raise RequestBodyError(f"{WHERE} must be bytes, got {type(body).__name__}")
    if len(body) > MAX_BODY_BYTES:
        raise RequestBodyError(f"{WHERE} is longer than {MAX_BODY_BYTES} bytes; one JSON object, one prompt")
    try:
        # Keys beyond a line's are refused below, each named (T and E_max included), not as a prompts line's.
        record = parse_prompts_line(bytes(body), WHERE, first=True, image_settings=tuple(PER_RUN_SETTINGS))
    except RequestBodyError:
        raise
    except BatchFileError as exc:
        raise RequestBodyError(str(exc)) from None
    if record is None:
        raise RequestBodyError(f"{WHERE} is empty; send a JSON object {{\"prompt\": ..., \"entities\": [...]}}")
    unknown = sorted(set(record) - set(BODY_KEYS))
    if unknown:
        raise RequestBodyError(
            f"{WHERE}: unknown key(s) {unknown}; allowed: {', '.join(BODY_KEYS)} (T and E_max are the server's)"
        )
    settings = ImageSettings(
        seed=record.get("seed", 0),
        steps=record.get("steps"),  # None: the model's (the runtime fills it in)
        guidance=record.get("guidance"),
        height=record.get("height"),
        width=record.get("width"),
    ).square()
    return settings.request(record["prompt"], record["entities"])


def error_body(message: str) -> bytes:
    """The JSON of an error reply: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


def generation_error_message(exc: BaseException) -> str:
    """What a 500 reply says: the error's type and message (a typed library error, or anything else)."""
    return f"{type(exc).__name__}: {str(exc)[:2000]}"


def json_reply(png: bytes, result: "GenerationResult", record: Mapping[str, Any], batch_size: int) -> bytes:
    """The ``Accept: application/json`` reply: the PNG (with its record) in base64, the record, the timings and the
    size of the batch the request ran in."""
    return json.dumps(
        {
            "image_png_base64": base64.b64encode(png).decode("ascii"),
            "record": dict(record),
            "timings": {name: float(value) for name, value in result.timings.items()},
            "batch_size": int(batch_size),
        },
        allow_nan=False,
    ).encode()


def wants_json(accept: str) -> bool:
    """True when an ``Accept`` header asks for JSON rather than the PNG."""
    return "application/json" in (accept or "").lower()


__all__ = [
    "BODY_KEYS",
    "RequestBodyError",
    "error_body",
    "generation_error_message",
    "json_reply",
    "parse_generate_body",
    "wants_json",
]
