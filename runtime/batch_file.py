"""A ``--prompts`` file: JSON Lines, one ``{"prompt", "entities"[, "seed"]}`` object per line (the format of
slim_examples.jsonl), read and checked line by line (`read_prompts`); `parse_prompts_line` and
`check_prompt_record` serve the HTTP API's JSON Lines too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from deleaker.errors import DeLeakerError
from deleaker.jsonio import StrictJSONError, loads_strict

#: Longest line of a ``--prompts`` file: far above any prompt that fits T5 (see `request.MAX_PROMPT_CHARS`).
MAX_LINE_BYTES = 1 << 20


class BatchFileError(DeLeakerError, ValueError):
    """A line of a ``--prompts`` JSONL file is not ``{"prompt": str, "entities": [str, ...], "seed"?: int}``."""


#: Keys a prompts line may not set: the options set them for every line.
PER_RUN_SETTINGS = {
    "steps": "--steps",
    "guidance": "--guidance",
    "height": "--height",
    "width": "--width",
    "max_sequence_length": "--text-len",
    "text_len": "--text-len",
    "max_entities": "--max-entities",
}


def read_prompts(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line of a JSONL prompts file (format of slim_examples.jsonl).

    Each record is a JSON object with ``prompt`` (str), ``entities`` (list of str) and optionally ``seed`` (int);
    keys the options set for the whole run (`PER_RUN_SETTINGS`) are refused, other keys are ignored. The file is
    UTF-8 (a byte-order mark is allowed), each line at most `MAX_LINE_BYTES`.
    Raises `BatchFileError` naming the line.
    """
    path = Path(path)
    if path.is_dir():
        raise BatchFileError(f"prompts file {path} is a directory; give a JSONL file")
    if not path.exists():
        raise BatchFileError(f"prompts file {path} does not exist")
    if not path.is_file():
        raise BatchFileError(f"prompts file {path} is not a regular file")
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        with path.open("rb") as handle:
            # A line of MAX_LINE_BYTES and its "\r\n" still reads whole; anything longer reads as too long.
            for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 2), b""), start=1):
                record = parse_prompts_line(raw, f"{path} line {number}", first=number == 1)
                if record is not None:
                    records.append((number, record))
    except OSError as exc:
        raise BatchFileError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    if not records:
        raise BatchFileError(f"prompts file {path} has no prompts")
    return records


def parse_prompts_line(
    raw: bytes, where: str, *, first: bool, image_settings: tuple[str, ...] = ()
) -> Optional[dict[str, Any]]:
    """The record of one line (None for a blank line); raises `BatchFileError` prefixed with ``where``.
    ``first``: a UTF-8 byte-order mark is allowed; ``image_settings`` as `check_prompt_record`."""
    if len(raw.removesuffix(b"\n").removesuffix(b"\r")) > MAX_LINE_BYTES:
        raise BatchFileError(f"{where}: longer than {MAX_LINE_BYTES} bytes; one JSON object per line, one prompt each")
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        return None
    try:
        record = loads_strict(text, allow_nan=False)
    except json.JSONDecodeError as exc:
        raise BatchFileError(f"{where}: not JSON ({exc.msg})") from None
    except StrictJSONError as exc:
        raise BatchFileError(f"{where}: {exc}") from None
    except ValueError as exc:  # a number json cannot convert: an int of more than 4300 digits
        raise BatchFileError(f"{where}: unreadable JSON ({str(exc):.120})") from None
    except RecursionError:
        raise BatchFileError(f"{where}: JSON nested too deeply; expected a flat object") from None
    check_prompt_record(record, where, image_settings=image_settings)
    return record


def check_prompt_record(record: Any, where: str, *, image_settings: tuple[str, ...] = ()) -> None:
    """Raise `BatchFileError` prefixed with ``where`` unless ``record`` is a prompts line's object: ``prompt`` (str),
    ``entities`` (list of str), optional ``seed`` (non-negative int), no key of `PER_RUN_SETTINGS` other than
    ``image_settings`` (the keys a caller takes per image, e.g. the HTTP API's steps, guidance, height, width;
    their values are checked by `ImageSettings`)."""
    if not isinstance(record, dict):
        raise BatchFileError(f"{where}: expected a JSON object {{\"prompt\": ..., \"entities\": [...]}}, "
                             f"got {type(record).__name__}")
    if not isinstance(record.get("prompt"), str):
        raise BatchFileError(f"{where}: 'prompt' must be a string")
    entities = record.get("entities")
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        raise BatchFileError(f"{where}: 'entities' must be a list of strings")
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BatchFileError(f"{where}: 'seed' must be a non-negative int, got {seed!r:.40}")
    # What the options set for every line: a line that sets it would be ignored silently (other keys, such as the
    # SLIM examples' "subset", are not settings and are ignored).
    per_run = sorted((record.keys() & PER_RUN_SETTINGS.keys()) - set(image_settings))
    if per_run:
        options = ", ".join(f"{key!r} by {PER_RUN_SETTINGS[key]}" for key in per_run)
        raise BatchFileError(
            f"{where}: set for the whole run, not per line: {options}; a line takes prompt, entities and seed"
        )
