"""The benchmark inputs (``benchmarks/attention_inputs.py``): the stripes become the masks the op forms, for two,
four and eight entities (E_max 4 and 8), at the union asked, so the device check's per-entity-count timings measure
what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from deleaker import DeLeakerConfig
from deleaker.decomposed import decomposed_intermediates

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from attention_inputs import entity_rows, stripe_columns, stripe_inputs, stripe_rows  # noqa: E402


@pytest.mark.parametrize("entities, coverage", [(2, 0.25), (4, 0.25), (4, 0.5), (8, 0.25)])
def test_stripes_are_the_masks_the_op_forms(entities, coverage):
    grid = (64, 64)
    (q, k, v), entity_mask, intended = stripe_inputs(1, 2, 77, grid, 64, coverage=coverage, entities=entities,
                                                     dtype=torch.float32, device="cpu", seed=3)
    assert entity_mask.shape == (entity_rows(entities), 77) and intended.shape == (1, entity_rows(entities), 4096)
    got = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=100, history=None,
                                   config=DeLeakerConfig())
    assert torch.equal(got.masks, intended)
    assert int(intended[0].sum(-1).count_nonzero()) == entities  # every entity present, the rest absent
    union = float(intended.any(1).float().mean())
    assert abs(union - coverage) < 0.02, union


def test_many_entities_get_shortened_stripes_and_eight_rows():
    assert entity_rows(4) == 4 and entity_rows(5) == 8 and entity_rows(8) == 8
    with pytest.raises(ValueError, match=r"entities must be in \[1, 8\]"):
        entity_rows(9)
    assert stripe_rows(64, 64, 0.25, 2) == range(0, 64)  # two entities: full-height stripes, as before
    rows = stripe_rows(64, 64, 0.25, 8)
    assert len(stripe_columns(64, 0.25, 8)[0]) == 3 and 3 <= len(rows) < 64
    with pytest.raises(ValueError, match="text_len 20 is too short"):
        stripe_inputs(1, 1, 20, (32, 32), 64, coverage=0.25, entities=8, device="cpu")
