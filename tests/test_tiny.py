"""The tiny offline FLUX: deterministic, a working FluxPipeline, a diffusers folder that reloads offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from deleaker.tiny import TINY_MODEL_NAME, build_tiny_flux_components, build_tiny_tokenizers, save_tiny_flux

MODULES = ("vae", "text_encoder", "text_encoder_2", "transformer")
PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"


def _weights_digest(components: dict) -> str:
    digest = hashlib.sha256()
    for name in MODULES:
        for key, tensor in sorted(components[name].state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _generate(pipe: FluxPipeline, height: int = 64, width: int = 64, output_type: str = "np", steps: int = 2):
    return pipe(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).images


def test_weights_depend_only_on_the_seed_and_leave_the_global_rng_alone(tiny_components):
    rng_before = torch.get_rng_state()
    again = build_tiny_flux_components(seed=0)
    other = build_tiny_flux_components(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _weights_digest(again) == _weights_digest(tiny_components)
    assert _weights_digest(other) != _weights_digest(tiny_components)
    # Tokenizers do not depend on the seed.
    assert other["tokenizer_2"](PROMPT).input_ids == tiny_components["tokenizer_2"](PROMPT).input_ids
    assert TINY_MODEL_NAME == "tiny"


def test_components_have_flux_structure(tiny_components):
    c = tiny_components
    assert set(c) == {
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer",
        "image_encoder", "feature_extractor",
    }  # fmt: skip
    sched = c["scheduler"].config
    assert sched.use_dynamic_shifting and sched.shift == 3.0
    assert (sched.base_shift, sched.max_shift, sched.base_image_seq_len, sched.max_image_seq_len) == (
        0.5, 1.15, 256, 4096,
    )  # fmt: skip
    vae, tr = c["vae"].config, c["transformer"].config
    assert 2 ** (len(vae.block_out_channels) - 1) == 4
    assert vae.shift_factor is not None and vae.scaling_factor != 1.0
    assert tr.in_channels == 4 * vae.latent_channels and tr.patch_size == 1
    assert sum(tr.axes_dims_rope) == tr.attention_head_dim
    assert tr.joint_attention_dim == c["text_encoder_2"].config.d_model
    assert tr.pooled_projection_dim == c["text_encoder"].config.hidden_size
    assert tr.guidance_embeds and (tr.num_layers, tr.num_single_layers) == (2, 2)


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)])
def test_flux_pipeline_runs(tiny_components, height, width):
    pipe = FluxPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    image = _generate(pipe, height, width)
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    # vae_scale_factor 4 and 2x2 packing: one image token per 8x8 pixels.
    latents = _generate(pipe, height, width, output_type="latent")
    assert latents.shape == (1, (height // 8) * (width // 8), 4 * tiny_components["vae"].config.latent_channels)


def test_clip_pooled_output_is_read_at_the_eos_token(tiny_components):
    tokenizer, encoder = tiny_components["tokenizer"], tiny_components["text_encoder"]
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos_at = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    assert 0 < eos_at < 76  # padded with eos after it; the pooled output must take the first one
    with torch.no_grad():
        out = encoder(ids)
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, eos_at], rtol=0, atol=0)


def test_tokenizers_know_the_reference_prompts(tiny_components, slim_examples):
    clip, t5 = tiny_components["tokenizer"], tiny_components["tokenizer_2"]
    for example in slim_examples:
        ids = t5(example["prompt"]).input_ids
        assert t5.unk_token_id not in ids, example["prompt"]
        for entity in example["entities"]:
            # Entity words are in the training text: few pieces each, never <unk>.
            pieces = t5(entity, add_special_tokens=False).input_ids
            assert t5.unk_token_id not in pieces and len(pieces) <= 2 * len(entity.split()), entity
        # CLIP's <unk> is <|endoftext|>: it may only close the sequence.
        clip_ids = clip(example["prompt"]).input_ids
        assert clip_ids.count(clip.eos_token_id) == 1 and clip_ids[-1] == clip.eos_token_id
    # Words never seen still tokenize, character by character at worst.
    unseen = "Xylophonists quizzically juggle 42 ZZ-tops!"
    assert t5.unk_token_id not in t5(unseen).input_ids
    assert t5.decode(t5(unseen).input_ids, skip_special_tokens=True) == unseen
    assert clip(unseen).input_ids.count(clip.eos_token_id) == 1


def test_tokenizer_2_appends_eos_and_pads_to_max_length(tiny_components):
    t5 = tiny_components["tokenizer_2"]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.get_added_vocab().keys() >= {"<pad>", "</s>", "<unk>"} and not any(
        "extra_id" in token for token in t5.get_added_vocab()
    )
    enc = t5("A cat", padding="max_length", max_length=16, truncation=True)
    ids, attention = enc.input_ids, enc.attention_mask
    n = sum(attention)
    assert len(ids) == 16 and ids[n - 1] == t5.eos_token_id and ids[n:] == [t5.pad_token_id] * (16 - n)
    assert t5.convert_ids_to_tokens(ids[: n - 1])[0].startswith("▁")  # Metaspace: words start with ▁
    # Truncation keeps </s> last.
    long = t5(" ".join(["cat"] * 40), padding="max_length", max_length=16, truncation=True).input_ids
    assert len(long) == 16 and long[-1] == t5.eos_token_id


_SUBPROCESS = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from diffusers import FluxPipeline
    from deleaker.tiny import save_tiny_flux
    save_tiny_flux(sys.argv[2], seed=0)
    pipe = FluxPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    image = pipe({prompt!r}, height=64, width=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(sys.argv[3], image)
    """
)


def _folder_digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_save_and_reload_offline_in_this_and_another_process(tiny_components, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    here = save_tiny_flux(tmp_path / "here", seed=0)
    assert json.loads((here / "model_index.json").read_text())["_class_name"] == "FluxPipeline"

    # A fresh process (offline) writes the same files byte for byte: weights and trained tokenizers alike,
    # and reloads this process's folder into the same image.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = _SUBPROCESS.format(prompt=PROMPT)
    there, image_file = tmp_path / "there", tmp_path / "image.npy"
    subprocess.run([sys.executable, "-c", script, str(here), str(there), str(image_file)], check=True, env=env)
    assert _folder_digests(there) == _folder_digests(here)

    memory = FluxPipeline(**tiny_components)
    memory.set_progress_bar_config(disable=True)
    reloaded = FluxPipeline.from_pretrained(here)
    reloaded.set_progress_bar_config(disable=True)
    for name in MODULES:
        original, loaded = tiny_components[name].state_dict(), getattr(reloaded, name).state_dict()
        assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    assert reloaded.tokenizer_2(PROMPT).input_ids == memory.tokenizer_2(PROMPT).input_ids
    assert reloaded.tokenizer(PROMPT).input_ids == memory.tokenizer(PROMPT).input_ids
    # Same weights, yet not always the same bits: tensors memory-mapped from safetensors are not 64-byte
    # aligned, so CPU kernels may take another vector path (differences ~1e-7).
    expected = _generate(memory)
    np.testing.assert_allclose(_generate(reloaded), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(image_file), expected, rtol=0, atol=1e-5)


def test_build_tiny_tokenizers_returns_fresh_objects():
    (clip_a, t5_a), (clip_b, t5_b) = build_tiny_tokenizers(), build_tiny_tokenizers()
    assert clip_a is not clip_b and t5_a is not t5_b
    assert t5_a.get_vocab() == t5_b.get_vocab() and clip_a.get_vocab() == clip_b.get_vocab()
