"""Entities through FLUX.2's chat templates (deleaker.chat_entities): positions index the token ids the pipeline
itself feeds its text encoder, and words of the template or system message never match an entity."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

from deleaker.chat_entities import (
    chat_entity_token_mask,
    chat_entity_token_positions,
    flux2_dev_chat,
    flux2_klein_chat,
    templated_prompt,
)
from deleaker.errors import EntityError
from deleaker.tiny_flux2 import (
    build_tiny_flux2_components,
    build_tiny_flux2_klein_components,
    build_tiny_mistral3_tokenizer,
    build_tiny_qwen3_tokenizer,
)

LENGTH = 96


@pytest.fixture(scope="module")
def pipes():
    return {
        "dev": Flux2Pipeline(**build_tiny_flux2_components()),
        "klein": Flux2KleinPipeline(**build_tiny_flux2_klein_components()),
    }


def _chat(kind):
    return flux2_dev_chat(SYSTEM_MESSAGE) if kind == "dev" else flux2_klein_chat()


def _pipeline_ids(pipe, prompt, length=LENGTH) -> list[int]:
    """The token ids the stock pipeline gives its text encoder for ``prompt``."""
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            pipe.encode_prompt(prompt, device=torch.device("cpu"), max_sequence_length=length)
    finally:
        hook.remove()
    assert len(seen) == 1 and len(seen[0]) == length
    return seen[0]


def _spelled(tokenizer, ids, positions) -> str:
    return tokenizer.decode([ids[i] for i in positions]).strip()


# Each prompt names entities that also occur, earlier, in the template or the system message: "image", "AI",
# "object" and "relationships" in FLUX.2's system message; "user", "assistant" and "think" in the Qwen3 chat.
CASES = [
    ("dev", "An image of an AI robot holding an object", ["image", "AI", "object"]),
    ("dev", "Relationships: a cat[IMG] and a cheetah", ["relationships", "cheetah"]),
    ("klein", "A user hands a cat to an assistant", ["assistant", "user", "cat"]),
    ("klein", "think of a dog and a cat", ["think", "cat"]),
]


@pytest.mark.parametrize("kind,prompt,entities", CASES)
def test_positions_index_the_pipelines_own_tokens_of_the_users_text(pipes, kind, prompt, entities):
    pipe = pipes[kind]
    ids = _pipeline_ids(pipe, prompt)
    positions = chat_entity_token_positions(pipe.tokenizer, prompt, entities, _chat(kind), max_sequence_length=LENGTH)
    templated, user_text, start = templated_prompt(pipe.tokenizer, prompt, _chat(kind))
    # The template or system message spells the first entity too (before or after the user's text), and that copy
    # is not what was found.
    outside = (templated[:start] + "|" + templated[start + len(user_text):]).lower()
    assert entities[0].lower() in outside
    user_start = len(pipe.tokenizer(templated[:start], add_special_tokens=False)["input_ids"])
    for entity, found in zip(entities, positions):
        assert _spelled(pipe.tokenizer, ids, found).lower() == entity.lower()
        assert min(found) >= user_start


def test_dev_prompt_loses_img_markers_as_format_input_does(pipes):
    templated, user_text, _ = templated_prompt(pipes["dev"].tokenizer, "a cat[IMG] and a dog", _chat("dev"))
    assert user_text == "a cat and a dog" and "[IMG]" not in templated


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_is_the_tokenizers(pipes, side):
    pipe = pipes["klein"]
    tokenizer = build_tiny_qwen3_tokenizer()
    tokenizer.padding_side = side
    prompt, entities = "A user hands a cat to an assistant", ["cat", "assistant"]
    pipe_side = Flux2KleinPipeline(**{**pipe.components, "tokenizer": tokenizer})
    ids = _pipeline_ids(pipe_side, prompt)
    positions = chat_entity_token_positions(tokenizer, prompt, entities, _chat("klein"), max_sequence_length=LENGTH)
    for entity, found in zip(entities, positions):
        assert _spelled(tokenizer, ids, found) == entity
    if side == "left":
        assert positions[0][0] > LENGTH // 2  # the padding comes first


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_words_only_the_template_has_are_not_found(kind):
    tokenizer = build_tiny_mistral3_tokenizer() if kind == "dev" else build_tiny_qwen3_tokenizer()
    template_word = "speculation" if kind == "dev" else "assistant"
    with pytest.raises(EntityError, match=rf"entities not found in the prompt: \['{template_word}'\]"):
        chat_entity_token_positions(tokenizer, "A cat and a dog", ["cat", template_word], _chat(kind),
                                    max_sequence_length=LENGTH)


def test_entity_errors_of_flux1_hold(pipes):
    tokenizer, chat = pipes["klein"].tokenizer, _chat("klein")
    with pytest.raises(EntityError, match="at least 2 entities"):
        chat_entity_token_positions(tokenizer, "A cat", ["cat"], chat, max_sequence_length=LENGTH)
    with pytest.raises(EntityError, match="overlap"):
        chat_entity_token_positions(tokenizer, "a blue jay and a jay", ["blue jay", "jay"], chat,
                                    max_sequence_length=LENGTH)
    with pytest.raises(EntityError, match="duplicate"):
        chat_entity_token_positions(tokenizer, "a cat and a Cat", ["cat", "Cat"], chat, max_sequence_length=LENGTH)
    with pytest.raises(EntityError, match="cut off by max_sequence_length=8"):
        chat_entity_token_positions(tokenizer, "a cat and a dog", ["cat", "dog"], chat, max_sequence_length=8)


def test_a_template_that_rewrites_the_prompt_is_refused():
    tokenizer = build_tiny_qwen3_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(EntityError, match="changes the prompt's text"):
        chat_entity_token_positions(tokenizer, "a cat and a dog", ["cat", "dog"], _chat("klein"),
                                    max_sequence_length=LENGTH)


def test_mask_rows_follow_entities():
    tokenizer = build_tiny_qwen3_tokenizer()
    mask = chat_entity_token_mask(tokenizer, "a cat and a dog", ["dog", "cat"], _chat("klein"),
                                  max_sequence_length=32, max_entities=4)
    assert mask.shape == (4, 32) and mask.dtype == torch.bool
    assert mask[0].any() and mask[1].any() and not mask[2:].any()
    assert not (mask[0] & mask[1]).any()
