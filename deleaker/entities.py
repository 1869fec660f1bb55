"""Entities to T5 token positions and the ``(E_max, T)`` entity mask DeLeaker attention takes.

Rules (spec, "Entities to tokens"):

- Each entity must occur in the prompt as whole words, case-insensitively; runs of whitespace inside an entity
  match any whitespace run (``"blue jay"`` matches ``"Blue  jay"``). Whole words: the characters just before and
  after the match are not word characters, i.e. letters, digits, ``_`` or combining marks (``"cat"`` is not found
  in ``"category"`` but is in ``"cat's"``; ``"cafe"`` is not found in a decomposed ``"café"``).
- Only an entity's first occurrence counts. Its tokens are the T5 tokens whose character span overlaps that
  occurrence, in the prompt tokenized exactly as ``FluxPipeline`` does (``padding="max_length"``,
  ``truncation=True``, ``max_length=max_sequence_length``), so positions index the text embeddings. A bare ``▁``
  token in front of the first of them (SentencePiece splits e.g. ``"▁3D"`` into ``"▁"``, ``"3"``, ``"D"``) belongs
  to the entity too, whether the tokenizer gives that ``▁`` the span of the preceding space (a ``tokenizer.json``
  with a plain Metaspace pre-tokenizer, as google/t5-v1_1-xxl's) or of the word's first character
  (transformers' ``T5TokenizerFast`` built from a vocabulary).
- Overlap **[decision]**: entities are located independently (each at its first occurrence); two entities that
  then share a token are an error, even if a later occurrence would not overlap. E.g. ``"blue jay"`` and ``"jay"``
  in "a blue jay and a jay" is an error ("jay" first occurs inside "blue jay"); in "a jay and a blue jay" it is
  not. Predictable beats clever: the user rewrites the prompt or the entity.
- Errors (`EntityError`) come before any model work: wrong type, empty entity, fewer than `MIN_ENTITIES` or more
  than ``max_entities``, duplicates (case-insensitive), entities not found (all of them are listed), an entity
  whose tokens are cut by truncation to ``max_sequence_length``, overlapping entities.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, EntityError

if TYPE_CHECKING:  # torch is imported where the mask is made: the string checks run without it
    import torch

#: DeLeaker separates entities from each other: one entity alone has nothing to leak into.
MIN_ENTITIES = 2

#: The spec's E_max for the entity mask (FLUX pipelines and engines are built for this many rows).
DEFAULT_MAX_ENTITIES = 4


def entity_token_positions(
    tokenizer: Any,
    prompt: str,
    entities: Sequence[str],
    *,
    max_sequence_length: int,
    max_entities: int | None = None,
    encoding: Any = None,
) -> list[list[int]]:
    """T5 token positions of each entity in ``prompt``, in entity order (each list ascending, non-empty).

    ``tokenizer`` is FLUX's ``tokenizer_2`` (a fast tokenizer: offsets are needed). Positions are in
    ``[0, max_sequence_length - 1)`` (the last kept position is at least ``</s>``). ``max_entities`` (optional)
    bounds the count. ``encoding``: the prompt's untruncated encoding with offsets when the caller has it
    (``tokenizer(prompt, truncation=False, return_offsets_mapping=True)``), so the prompt is not tokenized again.
    Raises `EntityError` when the entities do not fit the prompt (see the module docstring).
    """
    names = check_entities(entities, max_entities)
    check_prompt(prompt)
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 2:
        raise ConfigError(f"max_sequence_length must be an int >= 2, got {max_sequence_length!r}")
    spans = find_spans(prompt, names)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "entity positions need a fast tokenizer with offsets (e.g. T5TokenizerFast), "
            f"got {type(tokenizer).__name__}"
        )

    # Exactly FluxPipeline's call, so positions line up with the T5 embeddings; the untruncated encoding tells
    # whether truncation cut into an entity.
    full = encoding if encoding is not None else tokenizer(
        prompt, truncation=False, return_offsets_mapping=True, verbose=False
    )
    full_offsets = [tuple(o) for o in full["offset_mapping"]]
    if len(full_offsets) <= max_sequence_length:
        kept_offsets = full_offsets  # nothing to truncate; padding has zero-width offsets, which match no entity
    else:
        kept = tokenizer(
            prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
            return_offsets_mapping=True,
        )
        kept_offsets = [tuple(o) for o in kept["offset_mapping"]]

    positions: list[list[int]] = []
    cut: list[str] = []
    for name, span in zip(names, spans):
        in_full = tokens_of_span(prompt, full_offsets, span)
        in_kept = tokens_of_span(prompt, kept_offsets, span)
        if not in_full:
            raise EntityError(f"entity {name!r} spells no T5 token (the tokenizer drops its characters)")
        if in_kept != in_full:
            cut.append(f"{name!r} (tokens {in_full[0]}..{in_full[-1]})")
        positions.append(in_kept)
    if cut:
        raise EntityError(
            f"entities cut off by max_sequence_length={max_sequence_length} (the prompt has {len(full_offsets)} "
            f"T5 tokens including </s>): {', '.join(cut)}; every entity's tokens must lie before position "
            f"{max_sequence_length - 1}: shorten the prompt or raise max_sequence_length"
        )

    check_disjoint_entities(names, positions, "T5 token(s)")
    return positions


def check_disjoint_entities(names: Sequence[str], positions: Sequence[Sequence[int]], tokens: str) -> None:
    """Raise `EntityError` if two entities share a token position; ``tokens`` names them in the message
    ("T5 token(s)" here, "token(s)" for the FLUX.2 chat prompts)."""
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            shared = sorted(set(positions[i]) & set(positions[j]))
            if shared:
                raise EntityError(
                    f"entities {names[i]!r} and {names[j]!r} overlap (both use {tokens} {shared} at their first "
                    "occurrences); entities must not share words: give each entity once, as separate words"
                )


def check_entity_rows(max_entities: Any) -> None:
    """Raise `ConfigError` unless ``max_entities`` (E_max, the entity mask's rows) is an int >= `MIN_ENTITIES`.
    (The CUDA kernels' upper bound is checked where they are used: `deleaker.runtime.defaults.check_max_entities`.)"""
    if isinstance(max_entities, bool) or not isinstance(max_entities, int) or max_entities < MIN_ENTITIES:
        raise ConfigError(f"max_entities must be an int >= {MIN_ENTITIES}, got {max_entities!r:.40}")


def entity_token_mask(
    tokenizer: Any,
    prompt: str,
    entities: Sequence[str],
    *,
    max_sequence_length: int,
    max_entities: int = DEFAULT_MAX_ENTITIES,
    encoding: Any = None,
) -> torch.Tensor:
    """The ``(max_entities, max_sequence_length)`` bool mask of entity tokens: row ``e`` marks entity ``e``'s
    T5 tokens (see `entity_token_positions`, also for ``encoding``); rows past ``len(entities)`` are all False
    (absent entities).
    """
    check_entity_rows(max_entities)
    positions = entity_token_positions(
        tokenizer, prompt, entities, max_sequence_length=max_sequence_length, max_entities=max_entities,
        encoding=encoding,
    )
    import torch

    mask = torch.zeros(max_entities, max_sequence_length, dtype=torch.bool)
    for row, cols in enumerate(positions):
        mask[row, cols] = True
    return mask


def check_entity_words(prompt: str, entities: Sequence[str], *, max_entities: int | None = None) -> list[str]:
    """The entity checks that need no tokenizer (type, count, empty, duplicates, whole words of ``prompt``);
    returns the stripped names. Raises `EntityError`. `entity_token_positions` runs these first."""
    names = check_entities(entities, max_entities)
    check_prompt(prompt)
    find_spans(prompt, names)
    return names


def check_entities(entities: Sequence[str], max_entities: int | None) -> list[str]:
    """Entity strings stripped, after the checks that need no tokenizer."""
    if max_entities is not None:
        # A bound below 2 would contradict the minimum; one that is not an int would fail the comparison below.
        check_entity_rows(max_entities)
    if isinstance(entities, str) or not isinstance(entities, Sequence):
        raise EntityError(f"entities must be a list of strings, got {entities!r}")
    names: list[str] = []
    for i, entity in enumerate(entities):
        if not isinstance(entity, str):
            raise EntityError(f"the {_ordinal(i)} entity must be a str, got {entity!r}")
        if not entity.strip():
            raise EntityError(
                f"the {_ordinal(i)} entity is empty or whitespace ({entity!r}); each entity must be words of the "
                "prompt"
            )
        if not any(ch.isalnum() for ch in entity):
            # Punctuation, symbols, emoji or invisible characters alone spell no thing T5 has a word for.
            raise EntityError(
                f"the {_ordinal(i)} entity ({entity.strip()!r:.60}) has no letter or digit; each entity must be "
                "words of the prompt"
            )
        names.append(entity.strip())
    if len(names) < MIN_ENTITIES:
        raise EntityError(f"got {len(names)} entity(ies) {names}; at least {MIN_ENTITIES} entities are needed")
    if max_entities is not None and len(names) > max_entities:
        raise EntityError(f"got {len(names)} entities {names}; at most max_entities={max_entities} are allowed")
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for name in names:
        key = " ".join(name.casefold().split())
        if key in seen:
            duplicates.append(f"{seen[key]!r} and {name!r}")
        else:
            seen[key] = name
    if duplicates:
        raise EntityError(
            f"duplicate entities (case-insensitive): {'; '.join(duplicates)}; each entity must be given once"
        )
    return names


def _ordinal(index: int) -> str:
    """``0`` -> ``"1st"``: messages count entities from one, for the command line and Python alike."""
    n = index + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: Characters of the prompt an error message quotes.
_PROMPT_SHOWN = 100


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text (a lone surrogate: JSON's ``"\\ud800"``, undecodable bytes of argv),
    or None. The fast tokenizer raises a bare `TypeError` on such text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text (at character {exc.start}: {exc.reason})"
    return None


def check_prompt(prompt: Any) -> None:
    """`EntityError` unless ``prompt`` is a str the tokenizer can take."""
    if not isinstance(prompt, str):
        raise EntityError(f"prompt must be a str, got {type(prompt).__name__}")
    problem = unicode_problem(prompt)
    if problem is not None:
        raise EntityError(f"the prompt {problem}; it must be text T5 can read")


def find_spans(prompt: str, names: list[str]) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each entity's first whole-word, case-insensitive occurrence."""
    spans: list[tuple[int, int]] = []
    missing: list[str] = []
    for name in names:
        # Matching on the original text (IGNORECASE, not .lower()) keeps character offsets exact.
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(word) for word in name.split()) + r"(?!\w)"
        span = _first_whole_word(re.compile(pattern, flags=re.IGNORECASE), prompt)
        if span is None:
            missing.append(name)
        else:
            spans.append(span)
    if missing:
        # The prompt is shown cut: prompts run to 20,000 characters and the CLI prints this as one line.
        shown = repr(prompt) if len(prompt) <= _PROMPT_SHOWN else f"{prompt[:_PROMPT_SHOWN]!r}..."
        raise EntityError(
            f"entities not found in the prompt: {missing}; each entity must occur in the prompt {shown} "
            "as whole words (case-insensitive)"
        )
    return spans


def _first_whole_word(pattern: re.Pattern[str], prompt: str) -> tuple[int, int] | None:
    """Span of the first match of ``pattern`` that is not next to a combining mark."""
    # \w does not cover combining marks, so the lookarounds alone take "cafe" for a word of "cafe\u0301" (café
    # decomposed) and "ह" for a word of "हिन्दी"; a mark continues the word it follows.
    position = 0
    while (match := pattern.search(prompt, position)) is not None:
        start, end = match.span()
        if not (end < len(prompt) and _is_mark(prompt[end])) and not (start > 0 and _is_mark(prompt[start - 1])):
            return start, end
        position = start + 1
    return None


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch).startswith("M")


def tokens_of_span(prompt: str, offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Positions of the tokens whose character span overlaps ``span`` (zero-width spans, i.e. special tokens and
    padding, are skipped), plus a whitespace-only token (a bare ``▁``) right in front of them."""
    start, end = span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if hits and hits[0] > 0:
        s, e = offsets[hits[0] - 1]
        if e > s and e <= start and not prompt[s:start].strip():
            hits.insert(0, hits[0] - 1)
    return hits
