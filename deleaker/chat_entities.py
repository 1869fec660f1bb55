"""Entities in a chat-templated prompt (FLUX.2): token positions in the text the transformer sees.

FLUX.2's pipelines do not encode the prompt alone: ``Flux2Pipeline`` ([dev], Mistral 3) wraps it in a chat with a
system message, ``Flux2KleinPipeline`` ([klein], Qwen3) in a user turn plus an empty thinking block, and the text
embeddings index the tokens of that templated text, padded to ``max_sequence_length``. The rules of
`deleaker.entities` hold (whole words, case-insensitive, first occurrence, overlap and duplicates refused), with:

- Entities are found in the user's text only (for [dev] as ``format_input`` passes it: without ``[IMG]``), then
  located in the templated text by where the template puts that text: a word of the template or of the system
  message ("image", "user", "assistant"...) never matches an entity, even where it comes first.
- Positions come from the tokenization the pipeline runs (``padding="max_length"``, ``truncation=True``, the
  tokenizer's padding side): each entity's tokens are those whose character span overlaps its occurrence, plus a
  whitespace-only token in front of them inside the user's text. A token that overlaps an entity and also covers
  template characters is refused (`EntityError`), as is an entity that truncation cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .entities import (
    DEFAULT_MAX_ENTITIES,
    check_entities,
    check_prompt,
    find_spans,
    tokens_of_span,
    check_disjoint_entities,
    check_entity_rows,
)
from .errors import ConfigError, EntityError

if TYPE_CHECKING:
    import torch

#: Put in place of the user's text to find where the template writes it: private-use characters, which no
#: template or system message contains (checked: it must occur exactly once).
_SENTINEL = "\ue000\ue001\ue002"


@dataclass(frozen=True)
class ChatPrompt:
    """How a pipeline turns a prompt into the token ids its text encoder reads.

    Attributes:
        name: the model family, for messages ("FLUX.2 [dev]").
        user_text: the user's text as the pipeline puts it into the chat (e.g. without ``[IMG]``).
        render: ``(tokenizer, user_text) -> str``, the templated text, exactly as the pipeline renders it.
        add_special_tokens: ``(tokenizer, templated_text) -> bool``, what the pipeline's tokenizer call passes.
    """

    name: str
    user_text: Callable[[str], str]
    render: Callable[[Any, str], str]
    add_special_tokens: Callable[[Any, str], bool]


def flux2_dev_chat(system_message: str) -> ChatPrompt:
    """``Flux2Pipeline``'s chat: ``format_input`` (system message, then the user's text without ``[IMG]``),
    ``apply_chat_template(add_generation_prompt=False)``. The tokenizer is a ``PixtralProcessor`` (the real model)
    or its tokenizer alone (the tiny model): a processor adds special tokens unless the text starts with BOS, a
    tokenizer's ``apply_chat_template`` never does."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    def render(tokenizer: Any, text: str) -> str:
        # format_input strips "[IMG]" itself; the text given here has none left, so it arrives verbatim.
        messages = format_input(prompts=[text], system_message=system_message)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)[0]

    def add_special(tokenizer: Any, templated: str) -> bool:
        inner = text_tokenizer(tokenizer)
        if inner is tokenizer:
            return False
        return not (inner.bos_token is not None and templated.startswith(inner.bos_token))

    return ChatPrompt("FLUX.2 [dev]", lambda p: p.replace("[IMG]", ""), render, add_special)


def flux2_klein_chat() -> ChatPrompt:
    """``Flux2KleinPipeline``'s chat: one user turn, ``add_generation_prompt=True, enable_thinking=False``, then
    the tokenizer called on that text (with its special tokens, as the pipeline calls it)."""

    def render(tokenizer: Any, text: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    return ChatPrompt("FLUX.2 [klein]", lambda p: p, render, lambda tokenizer, templated: True)


def text_tokenizer(tokenizer: Any) -> Any:
    """The fast tokenizer behind ``tokenizer`` (a processor's ``.tokenizer``, or itself)."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and not getattr(tokenizer, "is_fast", False) else tokenizer


def templated_prompt(tokenizer: Any, prompt: str, chat: ChatPrompt) -> tuple[str, str, int]:
    """``(templated_text, user_text, start)``: the text the pipeline tokenizes, the user's text in it, and the
    character offset where the template writes it. `EntityError` when the template does not write the user's text
    verbatim and exactly once (then no offset into the prompt could be trusted)."""
    user_text = chat.user_text(prompt)
    templated = chat.render(tokenizer, user_text)
    marked = chat.render(tokenizer, _SENTINEL)
    if marked.count(_SENTINEL) != 1:
        raise EntityError(f"the {chat.name} chat template does not write the prompt exactly once; entities cannot "
                          "be located in the text the model reads")
    start = marked.index(_SENTINEL)
    prefix, suffix = marked[:start], marked[start + len(_SENTINEL):]
    if templated != prefix + user_text + suffix:
        raise EntityError(f"the {chat.name} chat template changes the prompt's text; entities cannot be located in "
                          "the text the model reads")
    return templated, user_text, start


def chat_entity_token_positions(
    tokenizer: Any,
    prompt: str,
    entities: Sequence[str],
    chat: ChatPrompt,
    *,
    max_sequence_length: int,
    max_entities: int | None = None,
) -> list[list[int]]:
    """Positions, in the pipeline's padded token sequence of length ``max_sequence_length``, of each entity's
    tokens (entity order, each ascending, non-empty). Raises `EntityError` (see the module docstring)."""
    names = check_entities(entities, max_entities)
    check_prompt(prompt)
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 2:
        raise ConfigError(f"max_sequence_length must be an int >= 2, got {max_sequence_length!r}")
    encode = text_tokenizer(tokenizer)
    if not getattr(encode, "is_fast", False):
        raise TypeError(f"entity positions need a fast tokenizer with offsets, got {type(encode).__name__}")
    templated, user_text, start = templated_prompt(tokenizer, prompt, chat)
    spans = [(s + start, e + start) for s, e in find_spans(user_text, names)]
    user_span = (start, start + len(user_text))

    add_special = chat.add_special_tokens(tokenizer, templated)
    full = encode(templated, add_special_tokens=add_special, return_offsets_mapping=True, verbose=False)
    kept = encode(
        templated, add_special_tokens=add_special, padding="max_length", truncation=True,
        max_length=max_sequence_length, return_offsets_mapping=True,
    )
    full_offsets = [tuple(o) for o in full["offset_mapping"]]
    kept_offsets = [tuple(o) for o in kept["offset_mapping"]]

    positions: list[list[int]] = []
    cut: list[str] = []
    for name, span in zip(names, spans):
        in_full = _user_tokens(templated, full_offsets, span, user_span, name, chat)
        in_kept = _user_tokens(templated, kept_offsets, span, user_span, name, chat)
        if not in_full:
            raise EntityError(f"entity {name!r} spells no token (the tokenizer drops its characters)")
        if len(in_kept) != len(in_full):
            cut.append(repr(name))
        positions.append(in_kept)
    if cut:
        raise EntityError(
            f"entities cut off by max_sequence_length={max_sequence_length} (the {chat.name} chat template makes "
            f"{len(full_offsets)} tokens of this prompt, system message and control tokens included): "
            f"{', '.join(cut)}; shorten the prompt or raise max_sequence_length"
        )
    check_disjoint_entities(names, positions, "token(s)")
    return positions


def _user_tokens(
    text: str,
    offsets: list[tuple[int, int]],
    span: tuple[int, int],
    user_span: tuple[int, int],
    name: str,
    chat: ChatPrompt,
) -> list[int]:
    """The tokens of ``span`` (see `deleaker.entities.tokens_of_span`) that lie in the user's text; a leading
    whitespace token of the template is dropped, a token that spells the entity and template text is refused."""
    hits = tokens_of_span(text, offsets, span)
    if hits and offsets[hits[0]][0] < user_span[0] and offsets[hits[0]][1] <= span[0]:
        hits = hits[1:]  # the whitespace token in front is the template's, not the user's
    for i in hits:
        s, e = offsets[i]
        if s < user_span[0] or e > user_span[1]:
            raise EntityError(
                f"entity {name!r} shares a token with the {chat.name} chat template around it; put a space or a "
                "word between the entity and the start or end of the prompt"
            )
    return hits


def chat_entity_token_mask(
    tokenizer: Any,
    prompt: str,
    entities: Sequence[str],
    chat: ChatPrompt,
    *,
    max_sequence_length: int,
    max_entities: int = DEFAULT_MAX_ENTITIES,
) -> torch.Tensor:
    """The ``(max_entities, max_sequence_length)`` bool mask of the entities' tokens in the templated prompt
    (`chat_entity_token_positions`); rows past ``len(entities)`` are all False."""
    check_entity_rows(max_entities)
    positions = chat_entity_token_positions(
        tokenizer, prompt, entities, chat, max_sequence_length=max_sequence_length, max_entities=max_entities
    )
    import torch

    mask = torch.zeros(max_entities, max_sequence_length, dtype=torch.bool)
    for row, cols in enumerate(positions):
        mask[row, cols] = True
    return mask
