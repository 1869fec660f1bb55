"""`deleaker.deleaker_attention_decomposed` (the fast path's specification) against the float64 reference.

The decomposed op computes DeLeaker as the fast path does: a plain attention with statistics (output rounded to
the input dtype, LSE float32), then a float32 correction of the edited rows and an exact fallback for rows with a
small normaliser Z. Here it must equal the independent float64 reference of ``slow_reference.py`` step by step
(masks, thresholds, cuts identical; Z equal to the edited softmax's normaliser), in fp32 to 1e-4, and stay as
accurate as the reference op in bf16/fp16, also on rows whose mass is almost all cut (Z near 0.02).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import slow_reference as slow
from deleaker import DeLeakerConfig, ShapeError, deleaker_attention, deleaker_attention_decomposed
from deleaker.decomposed import decomposed_intermediates
from test_op_reference import (
    CONFIG,
    MARGIN,
    MOVED_BLOBS,
    SCENARIOS,
    SWITCHES,
    Case,
    assert_exercised,
    checked_case,
    make_case,
    rect,
    reference,
    rel_l2,
    scenario_case,
)


def intermediates(case: Case, t, history, config: DeLeakerConfig, **kwargs):
    return decomposed_intermediates(case.q, case.k, case.v, case.entity_mask, grid=case.grid, block_step=t,
                                    history=history, config=config, **kwargs)


def edited_normaliser(ref: slow.SlowResult, text_len: int) -> torch.Tensor:
    """Z of the spec's edited logits: sum_j exp(s'_ij - l_i), l the pre-intervention LSE. (B, H, Nimg) float64."""
    s, s_edit = ref.logits[:, :, text_len:], ref.edited_logits[:, :, text_len:]
    return torch.exp(s_edit - torch.logsumexp(s, dim=-1, keepdim=True)).sum(-1)


def assert_steps_match(case: Case, t, history, config: DeLeakerConfig, ref: slow.SlowResult, tol: float = 1e-4):
    got = intermediates(case, t, history, config)
    T = case.text_len
    assert got.out.dtype == case.q.dtype and got.out.shape == case.q.shape
    torch.testing.assert_close(got.history.double(), ref.history, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.lse.double(), torch.logsumexp(ref.logits, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.affinity.double(), ref.affinity, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.source.double(), ref.source, rtol=1e-5, atol=1e-9)
    err = rel_l2(got.out, ref.out)
    assert err < tol, f"relative L2 error {err:.3g} >= {tol}"
    if ref.intervened:
        assert torch.equal(got.raw_masks, ref.raw_masks), "thresholded masks differ"
        assert torch.equal(got.masks, ref.masks), "masks differ"
        if config.do_image_image:
            assert torch.equal(got.cut, ref.image_image_cut), "image-image cuts differ"
        edited = got.masks.any(1)[:, None].expand_as(got.z)
        torch.testing.assert_close(got.z[edited].double(), edited_normaliser(ref, T)[edited], rtol=1e-4, atol=1e-6)
    else:
        assert not got.masks.any() and not got.cut.any() and not got.fallback.any()
    unedited = ~got.masks.any(1)  # (B, Nimg)
    assert bool(got.z.eq(1.0).permute(0, 2, 1)[unedited].all()), "unedited rows have Z = 1"
    assert not got.fallback.permute(0, 2, 1)[unedited].any(), "unedited rows never fall back"
    # Rows no mask contains, and text rows, are the plain output itself, bit for bit.
    assert torch.equal(got.out[:, :, :T], got.plain[:, :, :T])
    assert torch.equal(got.out[:, :, T:].permute(0, 2, 1, 3)[unedited], got.plain[:, :, T:].permute(0, 2, 1, 3)[unedited])
    return got


# --- fp32: equal to the float64 reference, step by step --------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("seed", [0, 1])
def test_structured_cases_match_reference(name: str, seed: int) -> None:
    t = 6
    case, history, ref = scenario_case(name, 100 * seed + 3, t, CONFIG, history_from={})
    assert_exercised(case, ref)
    assert bool(ref.image_image_cut.any()), "the image-image rule cut nothing"
    got = assert_steps_match(case, t, history, CONFIG, ref)
    # Thresholds: NaN exactly where a pair cuts nothing (e == f, or a region of fewer than 2 cells).
    counts = torch.einsum("bei,bfj->bef", got.masks.double(), got.masks.double())
    off = (counts < 2) | torch.eye(counts.shape[1], dtype=torch.bool)
    assert torch.equal(torch.isnan(got.thresholds), off)


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_off_alone(switch: str) -> None:
    config = dataclasses.replace(CONFIG, **{switch: False})
    case, history, ref = scenario_case("e2_corner_hole_speck", 91, 6, config, history_from=MOVED_BLOBS)
    assert_steps_match(case, 6, history, config, ref)


@pytest.mark.parametrize("t", [0, 3, 4, 5, 8, 9, 30])
def test_intervention_window_and_tensor_step(t: int) -> None:
    config = DeLeakerConfig(start_aggregating_from=1, stop_aggregating_at=50, start_intervention_from=4,
                            stop_intervention_at=8)
    case, history, ref = scenario_case("e3_b2", 31, t, config, history_from={})
    got = assert_steps_match(case, t, history, config, ref)
    if not 4 <= t <= 8:
        assert torch.equal(got.out, got.plain)
    as_tensor = intermediates(case, torch.tensor(t), history, config)
    assert torch.equal(as_tensor.out, got.out) and torch.equal(as_tensor.history, got.history)
    assert torch.equal(as_tensor.masks, got.masks) and torch.equal(as_tensor.z, got.z)


def test_threaded_block_steps_like_a_model() -> None:
    config = DeLeakerConfig(start_aggregating_from=2, stop_aggregating_at=7, start_intervention_from=3,
                            stop_intervention_at=9)
    op_history, ref_history = None, None
    for t in range(12):
        case = make_case(1000 + t, **SCENARIOS["e3_b2"])
        ref = reference(case, t, ref_history, config)
        assert ref.text_margin > MARGIN and ref.image_margin > MARGIN, f"near-tie at block step {t}"
        out, op_history = deleaker_attention_decomposed(case.q, case.k, case.v, case.entity_mask, grid=case.grid,
                                                        block_step=t, history=op_history, config=config)
        torch.testing.assert_close(op_history.double(), ref.history, rtol=1e-5, atol=1e-9)
        assert rel_l2(out, ref.out) < 1e-4, f"block step {t}"
        ref_history = ref.history


@pytest.mark.parametrize("alpha", [1.2, 2.0, 0.5, 0.0, -1.0])
def test_k_strength_on_both_signs(alpha: float) -> None:
    config = dataclasses.replace(CONFIG, k_strength=alpha)
    case, history, ref = scenario_case("e3_emax4", 17, 6, config, negative_token=True, history_from={})
    assert_steps_match(case, 6, history, config, ref)


# --- low precision, and rows whose mass is almost all cut -------------------------------------------------------


def low_precision_errors(case: Case, t: int, config: DeLeakerConfig, dtype: torch.dtype, **kwargs):
    """Relative L2 errors vs the float64 reference on the same rounded inputs: (decomposed, reference op)."""
    low = case.to(dtype)
    ref = reference(low, t, None, config)
    got = intermediates(low, t, None, config, **kwargs)
    op_out, _ = deleaker_attention(low.q, low.k, low.v, low.entity_mask, grid=low.grid, block_step=t, history=None,
                                   config=config)
    return got, ref, rel_l2(got.out, ref.out), rel_l2(op_out, ref.out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["e3_emax4", "e4_emax4", "e3_b2"])
def test_low_precision_as_accurate_as_the_reference(dtype: torch.dtype, name: str) -> None:
    for attempt in range(10):
        case = make_case(11 + attempt, **SCENARIOS[name])
        got, ref, err, ref_err = low_precision_errors(case, 6, CONFIG, dtype)
        if ref.text_margin > MARGIN and ref.image_margin > MARGIN:
            break
    assert_exercised(case.to(dtype), ref)
    assert torch.equal(got.masks, ref.masks)
    assert err < 1e-2
    # The plain output's rounding is divided by Z >= 0.5 on edited rows, then rounded again: within 2x.
    assert err <= 2.0 * ref_err, f"{dtype}: decomposed {err:.3g} vs reference {ref_err:.3g}"


def mostly_cut_case(seed: int) -> Case:
    """Two entities whose blobs overlap in a 4x4 square: those rows are in both masks, so both entities' text
    tokens are cut there, and their queries put ~98% of their mass on those tokens: Z near 0.02."""
    spec = dict(grid=(8, 8), entities=[(1,), (4,)], e_max=3, heads=2, dim=16, text_len=8,
                blobs=[[rect(0, 4, 0, 6), rect(0, 4, 2, 8)]])
    case = make_case(seed, **spec)
    T, gw = case.text_len, case.grid[1]
    overlap = [T + r * gw + c for r, c in rect(0, 4, 2, 6)]
    q, k = case.q.clone(), case.k.clone()
    # Stronger alignment of the overlap's queries with both entity keys.
    direction = (k[:, :, 1] + k[:, :, 4])[:, :, None] / 2  # (B, H, 1, D)
    q[:, :, overlap] += 3.5 * direction / direction.norm(dim=-1, keepdim=True) * math.sqrt(q.shape[-1])
    return dataclasses.replace(case, q=q, k=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_almost_all_cut_fall_back_and_stay_accurate(dtype: torch.dtype) -> None:
    config = dataclasses.replace(CONFIG, do_image_image=False)
    for seed in range(20):
        case = mostly_cut_case(seed)
        fp32 = intermediates(case, 6, None, config)
        ref32 = reference(case, 6, None, config)
        edited = fp32.masks.any(1)[:, None].expand_as(fp32.z)
        if ref32.text_margin > MARGIN and float(fp32.z[edited].min()) < 0.05:
            break
    else:
        raise AssertionError("no seed gives rows with Z near 0.02 and no near-tie")
    # fp32: the correction alone (no fallback) is already exact for these rows.
    exact32 = intermediates(case, 6, None, config, fallback_threshold=1e-9)
    assert not exact32.fallback.any() and rel_l2(exact32.out, ref32.out) < 1e-4

    got, ref, err, ref_err = low_precision_errors(case, 6, config, dtype)
    assert torch.equal(got.masks, ref.masks)
    small = got.z < 0.5
    assert bool(small.any()) and torch.equal(got.fallback, small & edited)
    assert got.fallback_count == int(small.sum())
    assert err <= 2.0 * ref_err, f"{dtype}: decomposed {err:.3g} vs reference {ref_err:.3g}"
    # Without the fallback the input dtype's rounding of o is amplified by 1/Z on those rows.
    _, _, unguarded, _ = low_precision_errors(case, 6, config, dtype, fallback_threshold=1e-9)
    assert unguarded > 3.0 * err, f"the fallback should matter here: {unguarded:.3g} vs {err:.3g}"


def test_overflowing_strengthening_falls_back_instead_of_nan() -> None:
    """exp(a * s - l) beyond float32's range makes Z infinite: the row is recomputed, never NaN."""
    config = dataclasses.replace(CONFIG, k_strength=40.0)
    case, history, ref = scenario_case("e3_emax4", 23, 6, config, history_from={})
    scaled = dataclasses.replace(case, q=case.q * 4.0)
    ref = reference(scaled, 6, history, config)
    got = intermediates(scaled, 6, history, config)
    assert torch.isfinite(got.out).all()
    assert got.fallback.any() and not torch.isfinite(got.z[got.fallback]).all()
    assert rel_l2(got.out, ref.out) < 1e-4


def test_bad_fallback_threshold_is_refused() -> None:
    case = make_case(1, **SCENARIOS["e3_emax4"])
    for bad in (0.0, -1.0, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ShapeError, match="fallback_threshold"):
            intermediates(case, 6, None, CONFIG, fallback_threshold=bad)
