"""A tiny FLUX.1 with random weights and real, in-process trained tokenizers: tests and demos need no downloads.

Every part is the real diffusers/transformers class FLUX.1-dev uses, only small:

- scheduler: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's dynamic-shifting config;
- vae: ``AutoencoderKL`` with 3 resolution levels (``vae_scale_factor = 4``), so a 64x64 image is a 16x16 latent,
  packed into an 8x8 grid of image tokens;
- text_encoder / tokenizer: a 2-layer ``CLIPTextModel`` and a byte-level BPE ``CLIPTokenizer`` (77 tokens);
- text_encoder_2 / tokenizer_2: a 2-layer ``T5EncoderModel`` (gated-GELU, as T5 v1.1) and a Unigram
  ``T5TokenizerFast`` with a Metaspace pre-tokenizer, ``</s>`` appended, ``<pad>``/``<unk>``, no sentinels;
- transformer: ``FluxTransformer2DModel`` with 2 double-stream and 2 single-stream blocks, 2 heads x 16 dims,
  guidance embedding (as FLUX.1-dev).

``schnell=True`` gives the FLUX.1-schnell shape instead: the same parts and sizes, a transformer without guidance
embedding (``guidance_embeds=False``) and schnell's scheduler (no dynamic shifting, ``shift = 1``), so a 4-step
schedule is 1, 0.75, 0.5, 0.25 at every resolution.

Weights depend only on ``seed``; the tokenizers do not depend on it (they are trained on the embedded corpus,
deterministically, once per process). ``save_tiny_flux`` writes the ordinary diffusers folder that
``FluxPipeline.from_pretrained(path)`` (and ``--model PATH``) reads offline.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast, T5Config, T5EncoderModel, T5TokenizerFast

#: The name the CLI and the tests use for this model (``--model tiny``).
TINY_MODEL_NAME = "tiny"

#: CLIP's context length, as FLUX.1's ``tokenizer.model_max_length``.
CLIP_MAX_LENGTH = 77

# Sizes. The transformer's head dim (16) is the sum of the RoPE axes dims; its text width is T5's d_model and its
# pooled width is CLIP's hidden size, as in FLUX.1.
_VAE_LATENT_CHANNELS = 4
_VAE_BLOCK_OUT_CHANNELS = (8, 16, 16)
_CLIP_HIDDEN = 32
_T5_D_MODEL = 32
_HEADS = 2
_HEAD_DIM = 16
_AXES_DIMS_ROPE = (4, 6, 6)
_CLIP_VOCAB_SIZE = 1000
_T5_VOCAB_SIZE = 1000
_T5_MAX_PIECE = 16

# Offsets added to ``seed`` per module, so each module's weights do not depend on the order they are built in.
_SEED_OFFSETS = {"vae": 0, "text_encoder": 1, "text_encoder_2": 2, "transformer": 3}

# FLUX.1-dev's scheduler_config.json.
_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# FLUX.1-schnell's scheduler_config.json: a fixed shift of 1 (no shift), whatever the resolution.
_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {**_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}

# The tokenizers' training text: every prompt of the reference examples (slim_examples.jsonl) plus plain English
# about animals, fruit and vegetables, colours, scenes and styles. Words outside it still tokenize (CLIP: byte-level
# alphabet; T5: the ASCII alphabet is in the Unigram vocabulary), just into more pieces.
_CORPUS = """
A bat and an owl are perched side by side on a tree branch.
A cow and a horse in a farm
The dolphin and the whale are cuddling together
An elephant and a moose are sitting back to back in a 3D render
A bat is flying high in the night sky while an owl is perched on a tree branch and a moth flutters
A strawberry, a radish, and a cherry sit together.
A crow tilts its head curiously, while a magpie pecks at the ground and a blue jay sings from a tree
A cat stretches lazily in the sun, while a cheetah scans the savanna and a leopard lounges on a tree branch.
An eggplant, a plum, and a fig are laid out on a napkin
A tomato, a bell pepper, and paprika are arranged side-by-side
A cat and a cheetah are splashing each other with water in a shallow river
In a 3D render a bee and a butterfly are holding onto each other tightly
A parrot and a toucan are one playfully tugging on the other's tail
A koala and a sloth are entwined together while hanging from a branch
In a pop art style, A hippopotamus and a rhinoceros are one gently pushing the other with its nose.
A zebra and a horse are rolling in the sand together, covering themselves in dust.
A dog and a cat are playing in the garden.
A lion, a tiger and a bear walk through the forest.
A fox and a rabbit hide in the tall grass near a wolf.
A giraffe and a camel stand in the desert under a hot sun.
A penguin and a seal swim in the cold ocean near the ice.
A frog and a turtle rest on a log in the pond.
A duck, a goose and a swan float on the lake.
A mouse and a squirrel share an acorn under an oak tree.
A monkey and a gorilla climb in the jungle.
A shark and an octopus meet at the bottom of the sea.
A snake and a lizard bask on a warm rock.
A deer and a fox drink from a quiet stream at dawn.
A pig, a sheep and a goat wait by the barn door.
A kangaroo and a panda eat bamboo in the zoo.
A hamster, a puppy and a kitten sleep on a soft blanket.
An eagle and a hawk soar above the mountains.
A chicken and a rooster walk across the yard.
A bird sings on a fence while a dog barks.
An apple, a banana and an orange lie on a wooden table.
A pear, a peach and a grape sit in a bowl.
A lemon, a lime and a mango are sliced on a plate.
A pineapple, a watermelon and a kiwi are at the market.
A carrot, a potato and an onion are in a basket.
A cucumber, a lettuce and a pumpkin grow in the garden.
A blueberry, a raspberry and a blackberry are on a spoon.
A coconut, an avocado and an apricot are on the kitchen counter.
A red car and a blue bus drive down the street.
A green tree and a yellow flower in the park.
A white cat and a black dog on a brown sofa.
A pink balloon and a purple kite fly in the gray sky.
An orange house with a red roof and a golden door.
A silver spoon, a wooden chair and a glass vase.
A beautiful sunset over the beach with waves and palm trees.
A snowy mountain village at night with bright stars.
A busy city street in the rain with people and umbrellas.
A cozy room with a fireplace, a lamp and a big window.
A small boat on a calm river in the morning light.
A castle on a hill surrounded by clouds and fog.
A photo of a man and a woman sitting on a bench.
A boy and a girl run across a field of flowers.
A watercolor painting of a cottage in the countryside.
An oil painting of a still life with fruit and a candle.
A photograph, a sketch, a cartoon, an illustration, a drawing.
A highly detailed digital art in the style of anime.
A realistic portrait with soft lighting and a shallow depth of field.
A cute baby animal, fluffy fur, big eyes, studio lighting, high quality.
Two dogs, three cats, four birds, five fish, one horse, 1 2 3 4 5 6 7 8 9 0.
The first, the second, the last; big, small, tall, short, old, young, happy, sad.
They are playing, running, jumping, swimming, eating, sleeping, looking, holding, standing.
He is near her; she is next to him; it is on top of that; this is under those.
A category of categories, a catalog, a catapult and a caterpillar.
Left, right, up, down, front, back, inside, outside, above, below, between, behind.
"""


def corpus_lines() -> list[str]:
    return [line for line in _CORPUS.strip().splitlines() if line.strip()]


@functools.cache
def _clip_vocab_and_merges() -> tuple[str, tuple[tuple[str, str], ...]]:
    """Train CLIP's byte-level BPE on the corpus; returns (vocab as JSON, merges). Cached per process.

    Words come from CLIPTokenizer's own normalizer and pre-tokenizer (lowercase, CLIP's split regex, byte level),
    so the pieces are exactly those the wrapper looks up. The merge loop is ours, not ``tokenizers.BpeTrainer``:
    that trainer breaks count ties in hash-map order, which changes from process to process, and the tiny model
    must be the same in every process. Ties here go to the lexicographically smallest pair.
    """
    backend = CLIPTokenizerFast().backend_tokenizer  # empty vocabulary: only its normalizer/pre-tokenizer are used
    words: Counter[str] = Counter()
    for line in corpus_lines():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[word] += 1
    # A word's last symbol carries the end-of-word suffix, as in CLIP.
    splits = {w: (*w[:-1], w[-1] + "</w>") for w in sorted(words)}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = list(dict.fromkeys([*alphabet, *(ch + "</w>" for ch in alphabet)]))
    merges = learn_bpe_merges(words, splits, pieces, _CLIP_VOCAB_SIZE - 2)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    for special in ("<|startoftext|>", "<|endoftext|>"):  # last, as in CLIP's vocabulary
        vocab[special] = len(vocab)
    return json.dumps(vocab), tuple(merges)


def learn_bpe_merges(
    words: Counter[str], splits: dict[str, tuple[str, ...]], pieces: list[str], vocab_size: int
) -> tuple[tuple[str, str], ...]:
    """Learn BPE merges greedily: the most frequent adjacent pair of symbols, ties to the lexicographically smallest
    (deterministic in every process, unlike ``tokenizers.BpeTrainer``), until ``pieces`` holds ``vocab_size``
    pieces or no pair occurs twice. ``words`` counts each word, ``splits`` holds its initial symbols (rewritten
    in place); each new merged piece is appended to ``pieces`` (id order). Returns the merges in order. The tiny
    CLIP (tiny.py) and the tiny FLUX.2 tokenizers (tiny_flux2.py) both train with it."""
    known = set(pieces)
    merges: list[tuple[str, str]] = []
    while len(pieces) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        if best[0] + best[1] not in known:
            known.add(best[0] + best[1])
            pieces.append(best[0] + best[1])
        for word, symbols in splits.items():
            splits[word] = _merge_pair(symbols, best)
    return tuple(merges)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """Train a SentencePiece-like Unigram on the corpus; returns (piece, log-prob), <pad>, </s>, <unk> first.

    Cached per process. SentencePiece's recipe, small: seed pieces are the words and frequent substrings of the
    Metaspace-split corpus (score frequency x length), then a few hard-EM rounds in which ``tokenizers``' Unigram
    model segments every word (Viterbi) and each piece's log-probability becomes its share of the segmentations.
    (``tokenizers.UnigramTrainer`` is not used: like the BPE trainer it breaks ties in per-process hash order.)
    Every printable ASCII character stays in the vocabulary, so any ASCII word tokenizes without <unk>.
    """
    specials = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
    words: Counter[str] = Counter()
    for line in corpus_lines():
        for word in line.split():
            words["▁" + word] += 1  # Metaspace with prepend_scheme="always"
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁").union(*words))
    substrings: Counter[str] = Counter()
    for word, count in words.items():
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + _T5_MAX_PIECE) + 1):
                substrings[word[i:j]] += count
    # Seeds: every whole word of the corpus (so its words are one or two pieces, as common words in T5's
    # vocabulary are) and every substring seen at least twice.
    weights = {piece: float(count * len(piece)) for piece, count in substrings.items() if count >= 2}
    for word, count in words.items():
        # Words split from their punctuation ("▁strawberry," -> "▁strawberry", ","), as text usually comes.
        for piece in re.findall(r"▁?\w+|▁?[^\w▁]+", word):
            if len(piece) > 1:
                weights[piece] = weights.get(piece, 0.0) + count * len(piece)
    for _ in range(4):
        scores = _log_probs(weights, chars)
        unigram = models.Unigram([(p, 0.0) for p in specials] + sorted(scores.items()), unk_id=2)
        usage: Counter[str] = Counter()
        for word, count in sorted(words.items()):
            for token in unigram.tokenize(word):
                usage[token.value] += count
        kept = sorted((p for p in weights if usage[p] > 0), key=lambda p: (-usage[p], p))
        weights = {p: float(usage[p]) for p in kept[: _T5_VOCAB_SIZE - len(specials) - len(chars)]}
    scores = _log_probs(weights, chars)
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return tuple([(p, 0.0) for p in specials] + ranked)


def _log_probs(weights: dict[str, float], chars: list[str]) -> dict[str, float]:
    """Pieces' log-probabilities from their weights; single characters get less than any piece (a fallback)."""
    total = sum(weights.values()) + len(chars)
    scores = {p: math.log(w / total) for p, w in weights.items()}
    floor = min(scores.values(), default=0.0) - 1.0
    for ch in chars:
        scores.setdefault(ch, floor)
    return scores


def build_tiny_tokenizers() -> tuple[CLIPTokenizerFast, T5TokenizerFast]:
    """Fresh (CLIP, T5) tokenizer objects around the cached trained vocabularies."""
    vocab_json, merges = _clip_vocab_and_merges()
    clip = CLIPTokenizerFast(vocab=json.loads(vocab_json), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)
    # Special ids 0, 1, 2 are <pad>, </s>, <unk> as in T5; no <extra_id_*> sentinels (FLUX never uses them).
    t5 = T5TokenizerFast(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=512)
    return clip, t5


def build_tiny_flux_components(seed: int = 0, *, schnell: bool = False) -> dict[str, Any]:
    """Everything ``diffusers.FluxPipeline(**components)`` takes, small and random, deterministic in ``seed``.

    ``schnell=True``: FLUX.1-schnell's shape (no guidance embedding, schnell's scheduler). Returns new modules each
    call (callers may move or modify them); the tokenizers are trained once per process.
    The global torch RNG is left as it was.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(schnell, bool):
        raise ValueError(f"schnell must be True or False, got {schnell!r}")
    tokenizer, tokenizer_2 = build_tiny_tokenizers()

    def seeded(name: str) -> None:
        torch.manual_seed(seed * 16 + _SEED_OFFSETS[name])

    # Module constructors draw their initial weights from the global RNG; fork it so callers' RNG state survives.
    with torch.random.fork_rng(devices=[]):
        seeded("vae")
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
            block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            latent_channels=_VAE_LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=64,
            # FLUX.1's latent normalisation constants; no quant convs, as FLUX.1's VAE.
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

        seeded("text_encoder")
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=_CLIP_HIDDEN,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=CLIP_MAX_LENGTH,
                hidden_act="quick_gelu",
                projection_dim=_CLIP_HIDDEN,
                # The pooled output is read at the first eos token, found by this id.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

        seeded("text_encoder_2")
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=_T5_D_MODEL,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                is_encoder_decoder=False,
                use_cache=False,
                tie_word_embeddings=False,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )

        seeded("transformer")
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * _VAE_LATENT_CHANNELS,  # 2x2 latent patches are packed into channels
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_T5_D_MODEL,
            pooled_projection_dim=_CLIP_HIDDEN,
            guidance_embeds=not schnell,
            axes_dims_rope=_AXES_DIMS_ROPE,
        )

    for module in (vae, text_encoder, text_encoder_2, transformer):
        module.eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(
            **(_SCHNELL_SCHEDULER_CONFIG if schnell else _SCHEDULER_CONFIG)
        ),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def save_tiny_flux(path: str | Path, seed: int = 0, *, schnell: bool = False) -> Path:
    """Write the tiny FLUX as a diffusers folder (``model_index.json`` + one subfolder per part); returns ``path``.

    ``FluxPipeline.from_pretrained(path)`` reloads it without network access. ``schnell=True`` writes the
    FLUX.1-schnell-shaped model (see `build_tiny_flux_components`), as a user's FLUX.1-schnell folder is laid out.
    """
    path = Path(path)
    FluxPipeline(**build_tiny_flux_components(seed, schnell=schnell)).save_pretrained(path)
    return path
