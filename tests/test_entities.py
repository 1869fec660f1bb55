"""Entities to T5 token positions/masks, with the tiny model's real (trained) T5 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deleaker.entities import MIN_ENTITIES, check_entity_words, entity_token_mask, entity_token_positions
from deleaker.errors import ConfigError, EntityError
from deleaker.tiny import build_tiny_tokenizers

T = 64
# shared/ lies beside the checkout (for sessions and for CI, which clones into another folder).
REFERENCE_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "slim_examples.jsonl"


def _tiny_t5():
    return build_tiny_tokenizers()[1]


def _t5_xxl_style():
    """The tiny vocabulary behind google/t5-v1_1-xxl's tokenizer.json pipeline: a plain Metaspace pre-tokenizer
    (no whitespace split), so ``▁`` tokens carry the span of the space before a word, and repeated spaces are
    folded by the normalizer. Offsets then differ from transformers' T5TokenizerFast; positions must not."""
    backend = Tokenizer.from_str(_tiny_t5().backend_tokenizer.to_str())
    backend.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["T5TokenizerFast", "t5-v1_1-xxl-style"])
def t5(request):
    return _tiny_t5() if request.param == "T5TokenizerFast" else _t5_xxl_style()


def _spelled(tokenizer, prompt: str, positions: list[int]) -> str:
    """The text of the tokens at ``positions`` in FluxPipeline's tokenization, lowercased, without ▁ or spaces."""
    ids = tokenizer(prompt, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids[0]
    text = "".join(tokenizer.convert_ids_to_tokens(ids[positions].tolist()))
    return text.replace("▁", "").replace(" ", "").lower()


def _word(entity: str) -> str:
    return entity.replace(" ", "").lower()


def test_reference_examples_map_to_masks_that_spell_the_entities(t5, slim_examples):
    for example in slim_examples:
        prompt, entities = example["prompt"], example["entities"]
        mask = entity_token_mask(t5, prompt, entities, max_sequence_length=T, max_entities=4)
        assert mask.shape == (4, T) and mask.dtype == torch.bool
        assert mask[: len(entities)].any(dim=1).all() and not mask[len(entities) :].any()
        assert not (mask.sum(dim=0) > 1).any()  # no token in two entities
        for row, entity in enumerate(entities):
            positions = mask[row].nonzero().flatten().tolist()
            assert _spelled(t5, prompt, positions) == _word(entity), (prompt, entity)
            assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous
        assert entity_token_positions(t5, prompt, entities, max_sequence_length=T) == [
            mask[row].nonzero().flatten().tolist() for row in range(len(entities))
        ]


def test_slim_examples_copy_matches_the_reference_file(slim_examples):
    if not REFERENCE_EXAMPLES.exists():
        pytest.skip(f"{REFERENCE_EXAMPLES} is not on this machine")
    lines = [json.loads(line) for line in REFERENCE_EXAMPLES.read_text().splitlines() if line.strip()]
    assert lines == list(slim_examples)


@pytest.mark.parametrize(
    "prompt, entities",
    [
        ("A crow and a blue jay sing", ["crow", "blue jay"]),
        ("A tomato, a bell pepper, and paprika", ["bell pepper", "paprika"]),
        ("A xylophone and a quokka", ["xylophone", "quokka"]),  # unseen words: many pieces each
        ("A bee and a cow in  3D", ["3D", "bee"]),  # "▁3D" or "▁", "3", "D"
    ],
)
def test_multi_token_entities(t5, prompt, entities):
    positions = entity_token_positions(t5, prompt, entities, max_sequence_length=T)
    for entity, pos in zip(entities, positions):
        assert _spelled(t5, prompt, pos) == _word(entity)
    if entities[0] != "3D":
        assert max(len(p) for p in positions) >= 2


def test_multi_word_entity_matches_any_whitespace_run(t5):
    prompt = "A crow and a Blue   jay sing"
    _, jay = entity_token_positions(t5, prompt, ["crow", "blue\tjay"], max_sequence_length=T)
    assert _spelled(t5, prompt, jay) == "bluejay"


def test_match_is_case_insensitive(t5):
    prompt = "A Cat and a DOG"
    cat, dog = entity_token_positions(t5, prompt, ["cat", "Dog"], max_sequence_length=T)
    assert _spelled(t5, prompt, cat) == "cat" and _spelled(t5, prompt, dog) == "dog"


def test_match_is_whole_words_only(t5):
    prompt = "A category of toys, a cat's bowl and a dog"
    cat, dog = entity_token_positions(t5, prompt, ["cat", "dog"], max_sequence_length=T)
    # The "cat" of "cat's", not the start of "category".
    category = entity_token_positions(t5, prompt, ["category", "dog"], max_sequence_length=T)[0]
    assert min(cat) > max(category)
    assert _spelled(t5, prompt, cat) == "cat" and _spelled(t5, prompt, dog) == "dog"
    with pytest.raises(EntityError, match=r"not found.*'cat'"):
        entity_token_positions(t5, "A category and a dog", ["cat", "dog"], max_sequence_length=T)


def test_a_combining_mark_continues_the_word(t5):
    # "\w" does not cover combining marks: "cafe" used to be found as a whole word of a decomposed "café", and "ह"
    # of "हिन्दी" (the vowel sign after it is a mark).
    decomposed = "A cafe\u0301 and a dog near a cafe"
    cafe, _ = entity_token_positions(t5, decomposed, ["cafe", "dog"], max_sequence_length=T)
    assert _spelled(t5, decomposed, cafe) == "cafe" and min(cafe) > 3  # the plain "cafe" at the end
    cafe_accent, _ = entity_token_positions(t5, decomposed, ["cafe\u0301", "dog"], max_sequence_length=T)
    assert max(cafe_accent) < min(cafe)
    with pytest.raises(EntityError, match=r"not found in the prompt: \['cafe'\]"):
        entity_token_positions(t5, "A cafe\u0301 and a dog", ["cafe", "dog"], max_sequence_length=T)
    with pytest.raises(EntityError, match=r"not found in the prompt: \['ह'\]"):
        check_entity_words("हिन्दी and a dog", ["ह", "dog"])
    assert check_entity_words("हिन्दी and a dog", ["हिन्दी", "dog"]) == ["हिन्दी", "dog"]


def test_first_occurrence_is_used(t5):
    prompt = "A cat chases a dog and another cat"
    cat, dog = entity_token_positions(t5, prompt, ["cat", "dog"], max_sequence_length=T)
    assert max(cat) < min(dog)


def test_overlap_follows_the_first_occurrence_rule(t5):
    with pytest.raises(EntityError, match=r"'blue jay' and 'jay' overlap"):
        entity_token_positions(t5, "A blue jay and a jay", ["blue jay", "jay"], max_sequence_length=T)
    # "jay" first occurs on its own here: no overlap.
    prompt = "A jay and a blue jay"
    blue_jay, jay = entity_token_positions(t5, prompt, ["blue jay", "jay"], max_sequence_length=T)
    assert max(jay) < min(blue_jay)
    assert _spelled(t5, prompt, blue_jay) == "bluejay" and _spelled(t5, prompt, jay) == "jay"


@pytest.mark.parametrize(
    "entities, message",
    [
        (["cow", "cat", "eel"], r"not found in the prompt: \['cow', 'eel'\]"),
        (["cat", "Cat"], r"duplicate entities \(case-insensitive\): 'cat' and 'Cat'"),
        (["cat", "dog", "cat"], r"duplicate.*'cat' and 'cat'"),
        (["cat"], rf"at least {MIN_ENTITIES} entities"),
        ([], rf"at least {MIN_ENTITIES} entities"),
        (["cat", "dog", "bowl", "toys", "A"], r"got 5 entities.*at most max_entities=4"),
        (["cat", "  "], r"the 2nd entity is empty or whitespace"),
        (["cat", 3], r"the 2nd entity must be a str"),
        (["cat", "."], r"the 2nd entity \('\.'\) has no letter or digit"),
        (["\u200b", "cat"], r"the 1st entity \('\\u200b'\) has no letter or digit"),
        (["cat", "🐱"], r"the 2nd entity \('🐱'\) has no letter or digit"),
        ("cat", r"entities must be a list of strings"),
    ],
)
def test_bad_entities_are_rejected_before_the_tokenizer_is_used(entities, message):
    prompt = "A cat and a dog near toys and a bowl"
    # tokenizer=None: these errors must come before any tokenization.
    with pytest.raises(EntityError, match=message):
        entity_token_mask(None, prompt, entities, max_sequence_length=T, max_entities=4)


def test_a_prompt_that_is_not_valid_unicode_is_an_entity_error(t5):
    # A lone surrogate (JSON "\ud800", undecodable argv bytes) used to reach the tokenizer: a TypeError.
    prompt = "A cat \ud800 and a dog"
    with pytest.raises(EntityError, match=r"prompt is not valid Unicode text \(at character 6"):
        entity_token_positions(t5, prompt, ["cat", "dog"], max_sequence_length=T)
    with pytest.raises(EntityError, match="prompt is not valid Unicode text"):
        check_entity_words(prompt, ["cat", "dog"])


def test_an_entity_not_found_in_a_long_prompt_quotes_only_its_start():
    # The whole prompt (up to 20,000 characters) used to be quoted in the one-line error.
    prompt = "A cat and a dog " + "in a very long garden " * 1000
    with pytest.raises(EntityError) as info:
        entity_token_mask(None, prompt, ["cat", "cow"], max_sequence_length=T)
    message = str(info.value)
    assert "not found in the prompt: ['cow']" in message and "'A cat and a dog in a very long" in message
    assert "gar'... as whole words" in message and len(message) < 300


def test_entities_cut_by_truncation_are_rejected(t5):
    prompt = "a " * 20 + "cat and a blue jay"
    n = len(t5(prompt).input_ids)  # with </s>
    # Everything fits.
    cat, jay = entity_token_positions(t5, prompt, ["cat", "blue jay"], max_sequence_length=n)
    assert max(jay) == n - 2
    # "jay" is cut off, "blue" stays: still an error, naming the entity.
    with pytest.raises(EntityError, match=r"cut off by max_sequence_length=\d+.*'blue jay'"):
        entity_token_positions(t5, prompt, ["cat", "blue jay"], max_sequence_length=n - 1)
    with pytest.raises(EntityError, match=r"cut off.*'cat'.*'blue jay'"):
        entity_token_positions(t5, prompt, ["cat", "blue jay"], max_sequence_length=8)


def test_bad_sizes_and_tokenizers_are_rejected(t5):
    with pytest.raises(ConfigError, match="max_entities must be an int >= 2"):
        entity_token_mask(t5, "A cat and a dog", ["cat", "dog"], max_sequence_length=T, max_entities=1)
    with pytest.raises(ConfigError, match="max_sequence_length must be an int >= 2"):
        entity_token_mask(t5, "A cat and a dog", ["cat", "dog"], max_sequence_length=0)
    # entity_token_positions bounds the count with max_entities: the same check as the mask's rows.
    for bad in (1, 0, "4", 2.5, True):
        with pytest.raises(ConfigError, match="max_entities must be an int >= 2"):
            entity_token_positions(t5, "A cat and a dog", ["cat", "dog"], max_sequence_length=T, max_entities=bad)
    with pytest.raises(TypeError, match="fast tokenizer"):
        entity_token_mask(object(), "A cat and a dog", ["cat", "dog"], max_sequence_length=T)


def test_mask_rows_follow_entity_order_and_match_the_pipeline_tokenization(tiny_components):
    t5 = tiny_components["tokenizer_2"]
    prompt = "A zebra and a horse are rolling in the sand"
    mask = entity_token_mask(t5, prompt, ["horse", "zebra"], max_sequence_length=16, max_entities=3)
    ids = t5(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids[0]
    assert mask.shape == (3, 16)
    assert t5.convert_ids_to_tokens(ids[mask[0]].tolist()) == ["▁horse"]
    assert t5.convert_ids_to_tokens(ids[mask[1]].tolist()) == ["▁zebra"]
    assert not mask[2].any()


def test_a_bare_metaspace_token_belongs_to_the_word_it_starts():
    # An unseen capitalised word is spelled "▁", "X", "y", ...: T5TokenizerFast gives that "▁" the span of "X",
    # the t5-v1_1-xxl pipeline the span of the space before it; both must give the same positions.
    prompt = "A Xylo and a cat"
    fast, xxl = _tiny_t5(), _t5_xxl_style()
    positions = entity_token_positions(fast, prompt, ["xylo", "cat"], max_sequence_length=T)
    assert entity_token_positions(xxl, prompt, ["xylo", "cat"], max_sequence_length=T) == positions
    ids = fast(prompt).input_ids
    assert fast.convert_ids_to_tokens([ids[i] for i in positions[0]])[0] == "▁"
    assert positions[0][0] == 1 and _spelled(fast, prompt, positions[0]) == "xylo"
