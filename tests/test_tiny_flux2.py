"""The tiny FLUX.2 [dev] and [klein] (deleaker.tiny_flux2): real classes, deterministic, offline, chat templates."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from deleaker.tiny_flux2 import (
    build_tiny_flux2_components,
    build_tiny_flux2_klein_components,
    build_tiny_mistral3_tokenizer,
    build_tiny_qwen3_tokenizer,
)


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("build", [build_tiny_flux2_components, build_tiny_flux2_klein_components],
                         ids=["dev", "klein"])
def test_weights_depend_only_on_the_seed_and_leave_the_global_rng_alone(build):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build(0), build(0), build(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    for name in ("vae", "text_encoder", "transformer"):
        assert _digest(a[name]) == _digest(b[name])
        assert _digest(a[name]) != _digest(c[name])
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        build(-1)


def test_components_have_flux2_structure():
    dev, klein = build_tiny_flux2_components(), build_tiny_flux2_klein_components()
    for parts in (dev, klein):
        assert isinstance(parts["vae"], AutoencoderKLFlux2)
        transformer = parts["transformer"]
        assert isinstance(transformer, Flux2Transformer2DModel)
        assert (transformer.config.num_layers, transformer.config.num_single_layers) == (2, 2)
        assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
        # The pipelines stack three hidden-state layers of the text encoder into the transformer's text width.
        assert transformer.config.joint_attention_dim == 3 * parts["text_encoder"].config.get_text_config().hidden_size
    assert isinstance(dev["text_encoder"], Mistral3ForConditionalGeneration)
    assert dev["text_encoder"].config.text_config.num_hidden_layers == 31  # hidden states 10, 20, 30 exist
    assert dev["transformer"].config.guidance_embeds
    assert isinstance(klein["text_encoder"], Qwen3ForCausalLM)
    assert klein["text_encoder"].config.num_hidden_layers == 28  # hidden states 9, 18, 27 exist
    assert not klein["transformer"].config.guidance_embeds and klein["is_distilled"] is False


def test_chat_templates_write_the_control_tokens_of_their_models():
    mistral, qwen = build_tiny_mistral3_tokenizer(), build_tiny_qwen3_tokenizer()
    dev_text = mistral.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": "S"}]},
         {"role": "user", "content": [{"type": "text", "text": "a cat"}]}],
        tokenize=False,
    )
    assert dev_text == "<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST]a cat[/INST]"
    ids = mistral(dev_text, add_special_tokens=False)["input_ids"]
    assert mistral.convert_ids_to_tokens(ids[:2]) == ["<s>", "[SYSTEM_PROMPT]"]
    klein_text = qwen.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)
    assert klein_text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokens = qwen.convert_ids_to_tokens(qwen(klein_text)["input_ids"])
    assert tokens[0] == "<|im_start|>" and "<think>" in tokens and "</think>" in tokens
    assert qwen.tokenize("A cat and a cheetah") == ["A", "Ġcat", "Ġand", "Ġa", "Ġcheetah"]


_VOCAB_DIGEST = """
import hashlib, json
from deleaker.tiny_flux2 import build_tiny_mistral3_tokenizer, build_tiny_qwen3_tokenizer
vocabs = [build_tiny_qwen3_tokenizer().get_vocab(), build_tiny_mistral3_tokenizer().get_vocab()]
print(hashlib.sha256(json.dumps(vocabs, sort_keys=True).encode()).hexdigest())
"""


def test_tokenizers_are_the_same_in_another_process():
    vocabs = [build_tiny_qwen3_tokenizer().get_vocab(), build_tiny_mistral3_tokenizer().get_vocab()]
    here = hashlib.sha256(json.dumps(vocabs, sort_keys=True).encode()).hexdigest()
    other = subprocess.run([sys.executable, "-c", _VOCAB_DIGEST], capture_output=True, text=True, check=True,
                           timeout=300)
    assert other.stdout.strip().splitlines()[-1] == here
