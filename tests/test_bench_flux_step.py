"""``benchmarks/bench_flux_step.py``'s probe of what a timed DeLeaker step edited, on the tiny FLUX on the CPU.

The benchmark itself needs CUDA; its probe takes the views function as an argument, so here the decomposed op's
masks and fallback rows stand in for the kernels' debug views (test infrastructure, not the GPU path).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline

from deleaker import DeLeakerConfig
from deleaker.decomposed import decomposed_intermediates
from deleaker.entities import entity_token_mask
from deleaker.processor import DeLeakerState, install_deleaker_processors

ROOT = Path(__file__).resolve().parents[1]
TEXT_LEN = 32
# Inside the intervention window from the second step on; smoothing off, so random weights leave masks to see.
CONFIG = DeLeakerConfig(do_smoothing=False, start_aggregating_from=1, stop_aggregating_at=9, start_intervention_from=2,
                        stop_intervention_at=40, std_mul_text=0.5, std_mul_image_image=0.5)


def decomposed_views(q, k, v, entity_mask, **kwargs):
    got = decomposed_intermediates(q, k, v, entity_mask, **kwargs)
    return got.masks, got.fallback_count


def test_union_probe_sees_every_joint_attention_and_changes_nothing(tiny_components):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_flux_step

    from deleaker import processor

    transformer = copy.deepcopy(tiny_components["transformer"])
    num_blocks = install_deleaker_processors(transformer)
    gh, gw = 4, 6
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, gh * gw, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT_LEN, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 0.7), guidance=torch.full((1,), 3.5), txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, gh, gw, "cpu", torch.float32), return_dict=False,
    )
    mask = entity_token_mask(tiny_components["tokenizer_2"], "A cat and a cheetah in a river", ["cat", "cheetah"],
                             max_sequence_length=TEXT_LEN, max_entities=4)

    def step():
        state = DeLeakerState(entity_mask=mask, grid=(gh, gw), config=CONFIG, step=torch.tensor(1))
        return transformer(**inputs, joint_attention_kwargs={"deleaker_state": state})[0]

    with torch.no_grad():
        plain = step()
        seen = bench_flux_step.union_per_attention(step, decomposed_views)
        again = step()
    assert processor.call_attention.__name__ == "call_attention"  # the probe put the op back
    assert [r["block_step"] for r in seen] == list(range(num_blocks, 2 * num_blocks))  # step 1: every block, in order
    assert all(0 <= r["union"] <= 1 and r["fallback_rows"] >= 0 for r in seen)
    assert any(r["union"] > 0 for r in seen), "the masks must be non-empty somewhere, or the probe shows nothing"
    assert torch.equal(plain, again)
    summary = bench_flux_step.union_summary(seen)
    assert summary.startswith(f"{num_blocks} attentions, union min/median/max ")
