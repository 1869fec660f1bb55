"""Tiny FLUX.2 [dev] and [klein] with random weights and real, in-process trained tokenizers (tests, no downloads).

Every part is the real diffusers/transformers class the FLUX.2 pipelines take, only small:

- scheduler: ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (the pipelines pass ``mu``);
- vae: ``AutoencoderKLFlux2`` with 3 resolution levels (``vae_scale_factor = 4``) and 4 latent channels, so a
  64x64 image is 16x16 latent cells, patchified 2x2 into an 8x8 grid of 16-channel image tokens;
- transformer: ``Flux2Transformer2DModel`` with 2 double-stream and 2 parallel single-stream blocks, 2 heads x 16
  dims, 4 RoPE axes (t, h, w, l) of 4 dims; guidance embedding for [dev], none for [klein];
- [dev] text_encoder / tokenizer: a ``Mistral3ForConditionalGeneration`` (Mistral text model of 31 layers, so
  the pipeline's default ``text_encoder_out_layers=(10, 20, 30)`` exist; a 1-layer Pixtral vision tower) and a
  byte-level BPE tokenizer with Mistral's control tokens (``<s>``, ``[INST]``, ``[SYSTEM_PROMPT]``, ``[IMG]``...)
  and a Mistral-3-style chat template (the real model wraps it in a ``PixtralProcessor``: see
  `build_tiny_mistral3_tokenizer`);
- [klein] text_encoder / tokenizer: a ``Qwen3ForCausalLM`` of 28 layers (default layers ``(9, 18, 27)``) and a
  ``Qwen2TokenizerFast`` (Qwen's pre-tokenizer, byte-level BPE, ``<|im_start|>``/``<|im_end|>``) with a
  Qwen3-style chat template (``enable_thinking=False`` writes the empty ``<think>`` block).

The BPE vocabularies are trained here on `deleaker.tiny`'s corpus plus diffusers' FLUX.2 system message (so the
templated prompt stays short), with our own merge loop: ties go to the smallest pair, so the tokenizers are the
same in every process. Weights depend only on ``seed``. ``save_tiny_flux2``/``save_tiny_flux2_klein`` write the
ordinary diffusers folders that ``Flux2Pipeline``/``Flux2KleinPipeline.from_pretrained(path)`` read offline.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    MistralConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .tiny import corpus_lines, learn_bpe_merges

#: Names the CLI and tests use for these models (``--model tiny-flux2``, ``--model tiny-flux2-klein``).
TINY_FLUX2_NAME = "tiny-flux2"
TINY_FLUX2_KLEIN_NAME = "tiny-flux2-klein"

# Sizes. The transformer's head dim (16) is the sum of its 4 RoPE axes; its text width is 3 x the text encoder's
# hidden size, as the pipelines stack 3 hidden-state layers.
_VAE_LATENT_CHANNELS = 4
_VAE_BLOCK_OUT_CHANNELS = (8, 16, 16)
_TEXT_HIDDEN = 16
_HEADS = 2
_HEAD_DIM = 16
_AXES_DIMS_ROPE = (4, 4, 4, 4)
_BPE_VOCAB_SIZE = 1200
_MISTRAL_LAYERS = 31  # Flux2Pipeline reads hidden states 10, 20, 30
_QWEN3_LAYERS = 28  # Flux2KleinPipeline reads hidden states 9, 18, 27

_SEED_OFFSETS = {"vae": 0, "text_encoder": 1, "transformer": 2}

_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

#: Mistral's control tokens, in the order of their ids (before the byte alphabet).
_MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>",
)
#: Qwen3's control tokens (appended after the BPE vocabulary, as in Qwen's).
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_THINK_TOKENS = ("<think>", "</think>")

# Our own templates, written in the layout of Mistral 3's and Qwen3's (the control tokens and where the system
# message, the user text and the generation prompt go); text blocks are written verbatim.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first = messages[0]['content'] %}"
    "{%- set system_text = first if first is string else first[0]['text'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{{- '[SYSTEM_PROMPT]' + system_text + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST]' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('only text and image blocks are supported') }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- (message['content'] if message['content'] is string else message['content'][0]['text']) + eos_token }}"
    "{%- else %}{{- raise_exception('only user, system and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _qwen_pre_tokenizer() -> Any:
    """Qwen2's pre-tokenizer (its split regex, then byte level), as ``Qwen2TokenizerFast`` builds it."""
    return Qwen2TokenizerFast(vocab={"<|endoftext|>": 0}, merges=[]).backend_tokenizer.pre_tokenizer


def _training_lines() -> list[str]:
    # The system message twice: its words then merge into a few pieces each, as in a real vocabulary.
    return [*corpus_lines(), *SYSTEM_MESSAGE.splitlines() * 2, "user assistant system think"]


@functools.cache
def _byte_level_bpe() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Train a byte-level BPE on the corpus with Qwen's pre-tokenizer; returns (pieces in id order, merges).

    Cached per process; deterministic (ties go to the lexicographically smallest pair). Both tiny FLUX.2
    tokenizers use it: the byte alphabet first, then one piece per merge."""
    pre_tokenizer = _qwen_pre_tokenizer()
    words: Counter[str] = Counter()
    for line in _training_lines():
        for word, _ in pre_tokenizer.pre_tokenize_str(line):
            words[word] += 1
    splits = {w: tuple(w) for w in sorted(words)}
    pieces: list[str] = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_bpe_merges(words, splits, pieces, _BPE_VOCAB_SIZE)
    return tuple(pieces), tuple(merges)


def build_tiny_qwen3_tokenizer() -> Qwen2TokenizerFast:
    """A fresh Qwen3-style tokenizer (the trained BPE, Qwen's control tokens, a Qwen3-style chat template)."""
    pieces, merges = _byte_level_bpe()
    vocab = {piece: i for i, piece in enumerate(pieces)}
    for special in (*_QWEN_SPECIALS, *_QWEN_THINK_TOKENS):
        vocab[special] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=40960,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(list(_QWEN_THINK_TOKENS))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_mistral3_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh Mistral-3-style tokenizer: the trained BPE behind Mistral's control tokens, ``<s>`` prepended, and a
    Mistral-3-style chat template.

    FLUX.2 [dev] ships a ``PixtralProcessor`` (this tokenizer plus an image processor) as its ``tokenizer``;
    ``Flux2Pipeline`` encodes text-only prompts through ``apply_chat_template``, which the tokenizer alone has
    with the same result (the template starts with ``<s>``, so neither adds another). The processor is not built
    here: transformers' ``PixtralProcessor`` needs torchvision, which this project does not depend on."""
    pieces, merges = _byte_level_bpe()
    vocab = {piece: i for i, piece in enumerate((*_MISTRAL_SPECIALS, *pieces))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>", fuse_unk=False))
    backend.pre_tokenizer = _qwen_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=131072,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_MISTRAL_SPECIALS[3:10])})
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tokenizer


def _vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=_VAE_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    )


def _transformer(guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _VAE_LATENT_CHANNELS,  # 2x2 latent patches are packed into channels
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=3 * _TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=_AXES_DIMS_ROPE,
        guidance_embeds=guidance_embeds,
    )


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _seeded_components(
    seed: int, tokenizer: Any, text_encoder: Callable[[], torch.nn.Module], guidance_embeds: bool
) -> dict[str, Any]:
    """The components both tiny FLUX.2 pipelines take: the VAE, ``text_encoder()`` and the transformer, each made
    under its own seed (``seed * 16`` + its offset, so one part's change leaves the others' weights as they were),
    in eval mode; the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16 + _SEED_OFFSETS["vae"])
        vae = _vae()
        torch.manual_seed(seed * 16 + _SEED_OFFSETS["text_encoder"])
        encoder = text_encoder()
        torch.manual_seed(seed * 16 + _SEED_OFFSETS["transformer"])
        transformer = _transformer(guidance_embeds=guidance_embeds)
    for module in (vae, encoder, transformer):
        module.eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_flux2_components(seed: int = 0) -> dict[str, Any]:
    """Everything ``diffusers.Flux2Pipeline(**components)`` (FLUX.2 [dev]) takes, small and random, deterministic
    in ``seed``; new modules each call; the global torch RNG is left as it was."""
    _check_seed(seed)
    tokenizer = build_tiny_mistral3_tokenizer()

    def text_encoder() -> torch.nn.Module:
        return Mistral3ForConditionalGeneration(
            Mistral3Config(
                text_config=MistralConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=_TEXT_HIDDEN,
                    intermediate_size=32,
                    num_hidden_layers=_MISTRAL_LAYERS,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=2048,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                vision_config=PixtralVisionConfig(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                ),
                image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
                spatial_merge_size=2,
                tie_word_embeddings=False,
            )
        )

    return _seeded_components(seed, tokenizer, text_encoder, guidance_embeds=True)


def build_tiny_flux2_klein_components(seed: int = 0) -> dict[str, Any]:
    """Everything ``diffusers.Flux2KleinPipeline(**components)`` (FLUX.2 [klein]) takes, small and random,
    deterministic in ``seed`` (``is_distilled=False``: guidance above 1 runs true CFG, as the base [klein])."""
    _check_seed(seed)
    tokenizer = build_tiny_qwen3_tokenizer()

    def text_encoder() -> torch.nn.Module:
        return Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=_TEXT_HIDDEN,
                intermediate_size=32,
                num_hidden_layers=_QWEN3_LAYERS,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    return {**_seeded_components(seed, tokenizer, text_encoder, guidance_embeds=False), "is_distilled": False}


def save_tiny_flux2(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny FLUX.2 [dev] as a diffusers folder that ``Flux2Pipeline.from_pretrained(path)`` reads
    offline; returns ``path``."""
    path = Path(path)
    Flux2Pipeline(**build_tiny_flux2_components(seed)).save_pretrained(path)
    return path


def save_tiny_flux2_klein(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny FLUX.2 [klein] as a diffusers folder that ``Flux2KleinPipeline.from_pretrained(path)`` reads
    offline; returns ``path``."""
    path = Path(path)
    Flux2KleinPipeline(**build_tiny_flux2_klein_components(seed)).save_pretrained(path)
    return path
