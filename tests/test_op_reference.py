"""`deleaker.deleaker_attention` against the independent float64 reference of ``slow_reference.py``.

Random q/k/v alone give salt-and-pepper masks that the opening erases, so every case is *structured*: each
entity's text keys share a direction ``u_e`` and the image queries of a chosen set of grid cells (its "blob") get
a copy of ``u_e`` added, so the entity's affinity is high exactly there. Cases whose decisions sit within a
relative 1e-5 of a threshold are reseeded, so masks must match exactly; each test asserts that it really
exercises the rule it is about.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import slow_reference as slow
from deleaker import DeLeakerConfig, deleaker_attention, deleaker_attention_decomposed, ops
from deleaker.library import call_attention

Cell = Tuple[int, int]
MARGIN = 1e-5  # relative distance to a threshold below which a case counts as a near-tie and is reseeded

# Windows small enough to reach in a few block steps; the tests pick t around them.
WINDOWS = dict(start_aggregating_from=2, stop_aggregating_at=10, start_intervention_from=3, stop_intervention_at=20)
CONFIG = DeLeakerConfig(**WINDOWS)


def rect(r0: int, r1: int, c0: int, c1: int) -> List[Cell]:
    """The cells of rows ``r0..r1-1`` x columns ``c0..c1-1``."""
    return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]


@dataclass
class Case:
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor
    v: torch.Tensor
    entity_mask: torch.Tensor  # (E_max, T) bool
    grid: Tuple[int, int]

    @property
    def text_len(self) -> int:
        return self.entity_mask.shape[1]

    def to(self, dtype: torch.dtype) -> "Case":
        return dataclasses.replace(self, q=self.q.to(dtype), k=self.k.to(dtype), v=self.v.to(dtype))


def make_case(
    seed: int,
    *,
    grid: Tuple[int, int],
    entities: Sequence[Sequence[int]],
    blobs: Sequence[Sequence[Sequence[Cell]]],
    e_max: Optional[int] = None,
    heads: int = 2,
    dim: int = 16,
    text_len: int = 8,
    negative_token: bool = False,
) -> Case:
    """A structured case. ``entities[e]``: entity e's text positions; ``blobs[b][e]``: the cells aligned with e.

    ``negative_token``: the last token of each multi-token entity points against ``u_e`` in every head, so
    strengthened logits come in both signs.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(blobs)
    gh, gw = grid
    tokens = text_len + gh * gw
    e_max = len(entities) if e_max is None else e_max
    q = 0.35 * torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    # Orthonormal entity directions per head, so entities do not pull on each other's blobs.
    basis = torch.linalg.qr(torch.randn(heads, dim, dim, generator=g, dtype=torch.float64)).Q  # (H, D, D)
    key_scale, gain = 2.0, 1.25 * math.sqrt(dim)  # a blob query's logit to its entity rises by ~2.5
    span = basis[:, :, : len(entities)]  # (H, D, E)
    entity_mask = torch.zeros(e_max, text_len, dtype=torch.bool)
    for e, token_ids in enumerate(entities):
        u = basis[:, :, e]  # (H, D)
        for n, t in enumerate(token_ids):
            entity_mask[e, t] = True
            # Entity keys carry no noise along any entity direction: a blob query must not favour another entity.
            noise = k[:, :, t]  # (B, H, D)
            k[:, :, t] = noise - torch.einsum("bhd,hde,hfe->bhf", noise, span, span)
            sign = -0.5 if (negative_token and len(token_ids) > 1 and n == len(token_ids) - 1) else 1.0
            k[:, :, t] += sign * key_scale * u[None]
        for b in range(batch):
            for r, c in blobs[b][e]:
                q[b, :, text_len + r * gw + c] += gain * u
    return Case(q.float(), k.float(), v.float(), entity_mask, grid)


def reference(case: Case, t: int, history: Optional[torch.Tensor], config: DeLeakerConfig) -> slow.SlowResult:
    return slow.slow_deleaker_attention_detailed(
        case.q, case.k, case.v, case.entity_mask, case.grid, t, history, config
    )


def checked_case(
    seed: int, t: int, config: DeLeakerConfig, history_from: Optional[dict] = None, **kwargs
) -> Tuple[Case, Optional[torch.Tensor], slow.SlowResult]:
    """`make_case`, reseeded until no decision is a near-tie; optionally with a history from a sibling case."""
    for attempt in range(20):
        s = seed + 7919 * attempt
        case = make_case(s, **kwargs)
        history = None
        if history_from is not None:
            # A history as a previous block would leave it: the affinity of a sibling case (absent rows zero).
            sibling = make_case(s + 1, **{**kwargs, **history_from})
            probs = slow.logits_and_probs(sibling.q, sibling.k)[1]
            history = slow.entity_affinity(probs, sibling.entity_mask, sibling.text_len).float()
        ref = reference(case, t, history, config)
        if ref.text_margin > MARGIN and ref.image_margin > MARGIN:
            return case, history, ref
    raise AssertionError(f"no case without near-ties from seed {seed}")


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def op_intermediates(case: Case, t: int, history: Optional[torch.Tensor], config: DeLeakerConfig) -> Dict:
    """The op's own step functions chained as the spec orders them (fp32), for mask-level comparisons."""
    qf, kf = case.q.float(), case.k.float()
    T = case.text_len
    probs = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(qf.shape[-1]), dim=-1)
    present = case.entity_mask.any(-1)
    affinity = ops.entity_affinity(probs[:, :, T:, :T], case.entity_mask)
    if history is None:
        history = torch.zeros_like(affinity)
    new_history, source = ops.update_history(history, affinity, present, t, config)
    raw = ops.entity_image_masks(source, present, case.grid, dataclasses.replace(config, do_smoothing=False))
    masks = ops.entity_image_masks(source, present, case.grid, config)
    weaken, strengthen = ops.image_text_edits(masks, case.entity_mask)
    cut = ops.image_image_suppression(probs[:, :, T:, T:], masks, config)
    return dict(affinity=affinity, history=new_history, source=source, raw=raw, masks=masks, weaken=weaken,
                strengthen=strengthen, cut=cut)


def assert_matches(case: Case, t, history, config: DeLeakerConfig, ref: slow.SlowResult, tol: float = 1e-4) -> Tuple:
    """Run the op and check it against ``ref``: masks identical, output and history close, dtypes."""
    out, new_history = deleaker_attention(
        case.q, case.k, case.v, case.entity_mask, grid=case.grid, block_step=t, history=history, config=config
    )
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert new_history.dtype == torch.float32
    assert new_history.shape == (case.q.shape[0], case.entity_mask.shape[0], case.grid[0] * case.grid[1])
    torch.testing.assert_close(new_history.double(), ref.history, rtol=1e-5, atol=1e-9)
    err = rel_l2(out, ref.out)
    assert err < tol, f"relative L2 error {err:.3g} >= {tol}"
    if ref.intervened:
        mid = op_intermediates(case, int(t), history, config)
        torch.testing.assert_close(mid["affinity"].double(), ref.affinity, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(mid["source"].double(), ref.source, rtol=1e-5, atol=1e-9)
        assert torch.equal(mid["raw"], ref.raw_masks), "thresholded masks differ"
        assert torch.equal(mid["masks"], ref.masks), "smoothed masks differ"
        assert torch.equal(mid["weaken"], ref.weaken) and torch.equal(mid["strengthen"], ref.strengthen)
        if config.do_image_image:
            assert torch.equal(mid["cut"], ref.image_image_cut), "image-image cuts differ"
    return out, new_history


# --- scenarios: (grid, entities, blobs per sample, e_max) ------------------------------------------------------

SCENARIOS = {
    # A 2x2 blob in the top-left corner survives the opening only because out-of-grid neighbours are ignored;
    # the other blob misses its corner cell (filled by the closing) and has a far speck (removed by the opening).
    "e2_corner_hole_speck": dict(
        grid=(9, 11), entities=[(1,), (4, 5)], e_max=4,
        blobs=[[rect(0, 2, 0, 2), [c for c in rect(5, 9, 7, 11) if c != (8, 10)] + [(0, 10)]]],
    ),
    "e3_emax4": dict(
        grid=(9, 11), entities=[(0,), (2, 3), (6,)], e_max=4,
        blobs=[[rect(0, 3, 0, 4), rect(5, 9, 7, 11), rect(4, 7, 1, 4)]],
    ),
    "e4_emax4": dict(
        grid=(9, 11), entities=[(0,), (2,), (4, 5), (7,)], e_max=4, heads=3, text_len=9,
        blobs=[[rect(0, 3, 0, 3), rect(0, 3, 8, 11), rect(6, 9, 0, 3), rect(6, 9, 8, 11)]],
    ),
    "e2_emax2_5x7": dict(
        grid=(5, 7), entities=[(1, 2), (5,)], dim=8,
        blobs=[[rect(0, 2, 0, 3), rect(3, 5, 4, 7)]],
    ),
    "e3_b2": dict(
        grid=(7, 9), entities=[(1,), (3, 4), (6,)], e_max=4,
        blobs=[[rect(0, 3, 0, 3), rect(4, 7, 6, 9), rect(0, 3, 5, 8)],
               [rect(4, 7, 0, 4), rect(0, 3, 3, 6), rect(3, 6, 6, 9)]],
    ),
    "e2_1x16": dict(
        grid=(1, 16), entities=[(2,), (5,)], e_max=4,
        blobs=[[[(0, c) for c in range(1, 5)], [(0, c) for c in range(10, 14)] + [(0, 7)]]],
    ),
    "e2_13x1": dict(
        grid=(13, 1), entities=[(0, 1), (3,)], e_max=3, heads=3, dim=12,
        blobs=[[[(r, 0) for r in range(0, 3)], [(r, 0) for r in range(8, 12)]]],
    ),
}


def scenario_case(name: str, seed: int, t: int, config: DeLeakerConfig, **extra):
    return checked_case(seed, t, config, **{**SCENARIOS[name], **extra})


def assert_exercised(case: Case, ref: slow.SlowResult) -> None:
    """Each present entity has a non-empty mask in every sample, absent ones none, and something is cut."""
    present = case.entity_mask.any(-1)
    for b in range(ref.masks.shape[0]):
        for e in range(ref.masks.shape[1]):
            assert bool(ref.masks[b, e].any()) == bool(present[e]), f"mask of entity {e}, sample {b}"
    assert bool(ref.weaken.any()) and bool(ref.strengthen.any())


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("seed", [0, 1])
def test_structured_cases_match_reference(name: str, seed: int) -> None:
    t = 6  # inside both windows, after the history start: the source is the running mean
    case, history, ref = scenario_case(name, 100 * seed + 3, t, CONFIG, history_from={})
    assert_exercised(case, ref)
    assert bool(ref.image_image_cut.any()), "the image-image rule cut nothing"
    assert_matches(case, t, history, CONFIG, ref)


def test_smoothing_really_changes_the_corner_case() -> None:
    case, _, ref = scenario_case("e2_corner_hole_speck", 5, 4, CONFIG)
    gw = case.grid[1]
    masks, raw = ref.masks[0], ref.raw_masks[0]
    assert bool(raw[1, 0 * gw + 10]) and not bool(masks[1, 0 * gw + 10]), "the speck is opened away"
    assert not bool(raw[1, 8 * gw + 10]) and bool(masks[1, 8 * gw + 10]), "the missing corner is closed"
    assert all(bool(masks[0, r * gw + c]) for r, c in rect(0, 2, 0, 2)), "the corner blob survives"
    assert_matches(case, 4, None, CONFIG, ref)


# --- dtypes and the custom op ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float64, 1e-4)]
)
def test_dtypes(dtype: torch.dtype, tol: float) -> None:
    for attempt in range(10):
        case = make_case(11 + attempt, **SCENARIOS["e3_emax4"]).to(dtype)
        ref = reference(case, 6, None, CONFIG)  # the reference upcasts the same (rounded) inputs
        if ref.text_margin > MARGIN and ref.image_margin > MARGIN:
            break
    assert_exercised(case, ref)
    out, history = assert_matches(case, 6, None, CONFIG, ref, tol=tol)
    assert out.dtype == dtype and history.dtype == torch.float32


@pytest.mark.parametrize("step, offset, num_blocks", [(1, 2, 4), (0, 1, 4), (3, 0, 4), (0, 6, 7)])
def test_custom_op_is_the_op(step: int, offset: int, num_blocks: int) -> None:
    case, history, _ = scenario_case("e3_b2", 21, step * num_blocks + offset, CONFIG, history_from={})
    for block_step in (step * num_blocks + offset, torch.tensor(step * num_blocks + offset)):
        want = deleaker_attention(case.q, case.k, case.v, case.entity_mask, grid=case.grid, block_step=block_step,
                                  history=history, config=CONFIG)
        got = call_attention(case.q, case.k, case.v, case.entity_mask, history, torch.tensor(step, dtype=torch.int64),
                             block_offset=offset, num_blocks=num_blocks, grid=case.grid, config=CONFIG)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- windows and block steps ----------------------------------------------------------------------------------

WINDOW_CONFIG = DeLeakerConfig(start_aggregating_from=1, stop_aggregating_at=50, start_intervention_from=4,
                               stop_intervention_at=8)


@pytest.mark.parametrize("t", [0, 3, 4, 5, 8, 9, 30])
def test_intervention_window(t: int) -> None:
    case, history, ref = scenario_case("e2_corner_hole_speck", 31, t, WINDOW_CONFIG, history_from={})
    inside = 4 <= t <= 8
    assert ref.intervened == inside
    out, _ = assert_matches(case, t, history, WINDOW_CONFIG, ref)
    plain = slow.plain_attention(case.q, case.k, case.v)
    if inside:
        assert_exercised(case, ref)
        assert rel_l2(out, plain) > 1e-2, "the intervention should change the output"
    else:
        assert rel_l2(out, plain) < 1e-5
        sdpa = torch.nn.functional.scaled_dot_product_attention(case.q, case.k, case.v)
        torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0, 2, 3, 6, 8, 9, 25])
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32])
def test_block_step_tensor_equals_int(t: int, int_dtype: torch.dtype) -> None:
    config = DeLeakerConfig(start_aggregating_from=2, stop_aggregating_at=8, start_intervention_from=3,
                            stop_intervention_at=8)
    case = make_case(41, **SCENARIOS["e3_b2"])
    history = torch.rand(2, 4, 63, generator=torch.Generator().manual_seed(1)) * case.entity_mask.any(-1)[None, :, None]
    args = (case.q, case.k, case.v, case.entity_mask)
    a = deleaker_attention(*args, grid=case.grid, block_step=t, history=history, config=config)
    b = deleaker_attention(*args, grid=case.grid, block_step=torch.tensor(t, dtype=int_dtype), history=history,
                           config=config)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_text_query_rows_never_edited() -> None:
    case, history, ref = scenario_case("e4_emax4", 51, 6, CONFIG, history_from={})
    assert_exercised(case, ref)
    out, _ = assert_matches(case, 6, history, CONFIG, ref)
    T = case.text_len
    plain = slow.plain_attention(case.q, case.k, case.v)
    assert rel_l2(out[:, :, :T], plain[:, :, :T]) < 1e-5
    assert torch.equal(ref.edited_logits[:, :, :T], ref.logits[:, :, :T])
    assert rel_l2(out[:, :, T:], plain[:, :, T:]) > 1e-2


# --- history -------------------------------------------------------------------------------------------------

HISTORY_CONFIG = DeLeakerConfig(start_aggregating_from=3, stop_aggregating_at=6, start_intervention_from=0,
                                stop_intervention_at=100)
# The sibling that gives the history has its blobs elsewhere, so the source visibly depends on the history.
MOVED_BLOBS = dict(blobs=[[rect(4, 7, 0, 3), rect(0, 3, 5, 9)]])


@pytest.mark.parametrize("t", range(0, 9))
def test_history_update_rule(t: int) -> None:
    case, history, ref = scenario_case("e2_corner_hole_speck", 61, t, HISTORY_CONFIG, history_from=MOVED_BLOBS)
    assert bool(history[:, :2].gt(0).all()) and bool(history[:, 2:].eq(0).all())
    _, new_history = assert_matches(case, t, history, HISTORY_CONFIG, ref)
    c = ref.affinity.float()
    start, stop = 3, 6
    if t == start:
        torch.testing.assert_close(new_history, c, rtol=1e-5, atol=1e-9)
    elif start < t < stop:
        m = t - start
        torch.testing.assert_close(new_history, history * m / (m + 1) + c / (m + 1), rtol=1e-5, atol=1e-9)
    else:
        assert torch.equal(new_history, history), "outside the aggregation window the history is unchanged"
    # The source: the updated history after the start, this block's affinity before and at it.
    want_source = ref.history if t > start else ref.affinity
    assert torch.equal(ref.source, want_source)
    if t > start:
        from_affinity = reference(case, t, history, dataclasses.replace(HISTORY_CONFIG, use_history=False))
        assert not torch.equal(ref.masks, from_affinity.masks), "the history should move the masks"
    assert bool(new_history[:, 2:].eq(0).all()), "absent entities' rows stay zero"


@pytest.mark.parametrize("t", [3, 4, 5])
def test_history_none_is_zeros(t: int) -> None:
    case, _, ref = scenario_case("e3_emax4", 71, t, HISTORY_CONFIG)
    zeros = torch.zeros(1, 4, 99)
    args = (case.q, case.k, case.v, case.entity_mask)
    a = deleaker_attention(*args, grid=case.grid, block_step=t, history=None, config=HISTORY_CONFIG)
    b = deleaker_attention(*args, grid=case.grid, block_step=t, history=zeros, config=HISTORY_CONFIG)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_matches(case, t, None, HISTORY_CONFIG, ref)
    m = t - 3
    torch.testing.assert_close(a[1], ref.affinity.float() / (m + 1), rtol=1e-5, atol=1e-9)
    assert bool(a[1][:, 3].eq(0).all())


@pytest.mark.parametrize("t", [2, 4, 7])
def test_use_history_false(t: int) -> None:
    config = dataclasses.replace(HISTORY_CONFIG, use_history=False)
    case, history, ref = scenario_case("e2_corner_hole_speck", 81, t, config, history_from=MOVED_BLOBS)
    _, new_history = assert_matches(case, t, history, config, ref)
    assert torch.equal(new_history, history), "use_history=False returns the history unchanged"
    assert torch.equal(ref.source, ref.affinity)
    _, none_history = deleaker_attention(case.q, case.k, case.v, case.entity_mask, grid=case.grid, block_step=t,
                                         history=None, config=config)
    assert bool(none_history.eq(0).all())


def test_threaded_block_steps_like_a_model() -> None:
    """Block steps 0..K with the history threaded through, op and reference each carrying their own."""
    config = DeLeakerConfig(start_aggregating_from=2, stop_aggregating_at=7, start_intervention_from=3,
                            stop_intervention_at=9)
    spec = dict(SCENARIOS["e3_b2"])
    op_history, ref_history = None, None
    intervened = 0
    frozen = None
    for t in range(12):
        case = make_case(1000 + t, **spec)
        ref = reference(case, t, ref_history, config)
        assert ref.text_margin > MARGIN and ref.image_margin > MARGIN, f"near-tie at block step {t}"
        out, op_history = deleaker_attention(case.q, case.k, case.v, case.entity_mask, grid=case.grid, block_step=t,
                                             history=op_history, config=config)
        assert op_history.dtype == torch.float32
        torch.testing.assert_close(op_history.double(), ref.history, rtol=1e-5, atol=1e-9)
        assert rel_l2(out, ref.out) < 1e-4, f"block step {t}"
        if ref.intervened:
            intervened += 1
            assert_exercised(case, ref)
        if t == 6:
            frozen = op_history.clone()
        if t >= 7:
            assert torch.equal(op_history, frozen), "after stop_aggregating_at the history is frozen"
        ref_history = ref.history
    assert intervened == 7


# --- the switches --------------------------------------------------------------------------------------------

SWITCHES = ["do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening", "use_history"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_off_alone(switch: str) -> None:
    config = dataclasses.replace(CONFIG, **{switch: False})
    case, history, ref = scenario_case("e2_corner_hole_speck", 91, 6, config, history_from=MOVED_BLOBS)
    out, _ = assert_matches(case, 6, history, config, ref)
    full, _ = deleaker_attention(case.q, case.k, case.v, case.entity_mask, grid=case.grid, block_step=6,
                                 history=history, config=CONFIG)
    assert rel_l2(out, full) > 1e-4, f"switching {switch} off should change the output"


def test_all_edits_off_is_plain_attention() -> None:
    config = dataclasses.replace(CONFIG, do_image_image=False, do_image_text_strengthening=False,
                                 do_image_text_weakening=False)
    case, history, ref = scenario_case("e3_emax4", 95, 6, config, history_from={})
    out, _ = assert_matches(case, 6, history, config, ref)
    assert rel_l2(out, slow.plain_attention(case.q, case.k, case.v)) < 1e-5


def test_per_sample_statistics() -> None:
    case, history, ref = scenario_case("e3_b2", 101, 6, CONFIG, history_from={})
    assert not torch.equal(ref.masks[0], ref.masks[1])
    out, new_history = assert_matches(case, 6, history, CONFIG, ref)
    for b in range(2):
        one = dataclasses.replace(case, q=case.q[b:b + 1], k=case.k[b:b + 1], v=case.v[b:b + 1])
        out_b, hist_b = deleaker_attention(one.q, one.k, one.v, one.entity_mask, grid=one.grid, block_step=6,
                                           history=history[b:b + 1], config=CONFIG)
        torch.testing.assert_close(out_b, out[b:b + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hist_b, new_history[b:b + 1], rtol=1e-5, atol=1e-9)


def test_thresholds_are_per_sample() -> None:
    """Sample 1 is an affine copy of sample 0 (a x + b, a > 0): per-sample thresholds give identical decisions."""
    g = torch.Generator().manual_seed(7)
    grid = (6, 8)
    source0 = torch.rand(1, 3, 48, generator=g)
    source = torch.cat([source0, 10.0 * source0 + 5.0])
    present = torch.tensor([True, True, True])
    for smoothing in (False, True):
        config = DeLeakerConfig(do_smoothing=smoothing)
        masks = ops.entity_image_masks(source, present, grid, config)
        assert bool(masks[0].any()) or smoothing  # random sources are specks that the opening may erase
        assert torch.equal(masks[0], masks[1])
        assert torch.equal(masks[:1], ops.entity_image_masks(source0, present, grid, config))
    masks = ops.entity_image_masks(source, present, grid, DeLeakerConfig(do_smoothing=False))
    probs0 = torch.rand(1, 2, 48, 48, generator=g)
    probs = torch.cat([probs0, 3.0 * probs0 + 1.0])
    cut = ops.image_image_suppression(probs, masks, DeLeakerConfig())
    assert bool(cut[0].any()) and torch.equal(cut[0], cut[1])
    ref_cut, _ = slow.image_image_cut(probs.double(), masks, 0, 1.0)
    assert torch.equal(cut, ref_cut)


# --- strengthening, -inf, image-image regions -----------------------------------------------------------------


# alpha <= 0 is refused by DeLeakerConfig (it would invert or flatten the entity's own attention).
@pytest.mark.parametrize("alpha", [1.2, 2.0, 0.5, 0.01, 10.0])
def test_k_strength_on_both_signs(alpha: float) -> None:
    config = dataclasses.replace(CONFIG, k_strength=alpha)
    case, history, ref = scenario_case("e2_emax2_5x7", 111, 6, config, history_from={}, negative_token=True)
    strengthened = ref.logits[:, :, case.text_len:, :case.text_len][ref.strengthen[:, None].expand(
        -1, ref.logits.shape[1], -1, -1) & ~ref.weaken[:, None]]
    assert bool((strengthened > 0).any()) and bool((strengthened < 0).any()), "both signs must be strengthened"
    assert_matches(case, 6, history, config, ref)


# Two entities whose blobs overlap: cells in both masks have their own entity's tokens cut (weakening wins),
# whatever alpha does to them first.
OVERLAP = dict(grid=(7, 9), entities=[(1, 2), (5,)], e_max=4, blobs=[[rect(0, 3, 0, 4), rect(0, 3, 2, 6)]])


@pytest.mark.parametrize("alpha", [1.2, 0.01, 10.0])
def test_weakened_logits_stay_minus_inf(alpha: float) -> None:
    config = dataclasses.replace(CONFIG, k_strength=alpha)
    case, history, ref = checked_case(121, 6, config, **OVERLAP)
    both = ref.weaken & ref.strengthen
    assert bool(both.any()), "the masks must overlap"
    edited = ref.edited_logits[:, :, case.text_len:, :case.text_len]
    assert bool(torch.isneginf(edited[both[:, None].expand_as(edited)]).all())
    out, _ = assert_matches(case, 6, history, config, ref)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("alpha", [1.2, 0.01, 10.0])
def test_minus_inf_logit_is_not_strengthened(alpha: float) -> None:
    """A logit that is -inf before the edits (here an fp32 overflow) stays -inf whatever alpha."""
    config = dataclasses.replace(CONFIG, k_strength=alpha)
    case = make_case(141, **SCENARIOS["e2_emax2_5x7"])
    T = case.text_len
    q, k = case.q.clone(), case.k.clone()
    # Only token 2 (entity 0's second token) has a coordinate 0: its logit from every image query overflows.
    q[..., :, 0] = 0.0
    k[..., :, 0] = 0.0
    q[..., T:, 0] = 1e20
    k[..., 2, 0] = -1e20
    case = dataclasses.replace(case, q=q, k=k)
    ref = reference(case, 6, None, config)
    assert ref.text_margin > MARGIN and ref.image_margin > MARGIN
    image_text = ref.logits[:, :, T:, :T]
    assert bool((torch.isneginf(image_text) & ref.strengthen[:, None]).any()), "a strengthened logit must be -inf"
    assert_exercised(case, ref)
    out, _ = assert_matches(case, 6, None, config, ref)
    assert bool(torch.isfinite(out).all())


def test_one_cell_image_image_region_cuts_nothing() -> None:
    config = dataclasses.replace(CONFIG, do_smoothing=False)
    spec = dict(grid=(5, 7), entities=[(1,), (4,)], e_max=4, blobs=[[[(1, 1)], [(3, 5)]]])
    case, history, ref = checked_case(131, 6, config, **spec)
    assert ref.masks[0, 0].sum() == 1 and ref.masks[0, 1].sum() == 1
    assert not bool(ref.image_image_cut.any())
    assert_matches(case, 6, history, config, ref)


# --- thresholds and morphology, directly ----------------------------------------------------------------------


def test_text_threshold_is_strict() -> None:
    config = DeLeakerConfig(std_mul_text=0.0, do_smoothing=False)
    source = torch.tensor([[[1.0, 2.0, 3.0, 2.0, 2.0]]])  # mean 2: the 2s sit exactly on the threshold
    masks = ops.entity_image_masks(source, torch.tensor([True]), (1, 5), config)
    assert masks.tolist() == [[[False, False, True, False, False]]]
    assert torch.equal(masks, slow.threshold_masks(source.double(), [True], 0.0)[0])


def test_text_threshold_uses_unbiased_std() -> None:
    # mean 0.2; biased std 0.4 puts the threshold at 0.98 (ones in), unbiased 0.4216 at 1.022 (ones out).
    config = DeLeakerConfig(std_mul_text=1.95, do_smoothing=False)
    source = torch.tensor([[[0.0] * 8 + [1.0, 1.0]]])
    masks = ops.entity_image_masks(source, torch.tensor([True]), (2, 5), config)
    assert not bool(masks.any())
    assert torch.equal(masks, slow.threshold_masks(source.double(), [True], 1.95)[0])
    looser = ops.entity_image_masks(source, torch.tensor([True]), (2, 5), dataclasses.replace(config,
                                                                                              std_mul_text=1.8))
    assert int(looser.sum()) == 2


def test_absent_entity_never_gets_a_mask() -> None:
    source = torch.rand(2, 3, 12, generator=torch.Generator().manual_seed(0))
    masks = ops.entity_image_masks(source, torch.tensor([True, False, True]), (3, 4),
                                   DeLeakerConfig(do_smoothing=False))
    assert not bool(masks[:, 1].any()) and bool(masks[:, 0].any())


def test_image_image_threshold_strict_unbiased_per_pair() -> None:
    nimg = 10
    probs = torch.zeros(1, 1, nimg, nimg)
    # Pair (0, 1): region {0} x {1..9}; values 7 zeros and 2 ones: mean 2/9, unbiased std 0.441, biased 0.416.
    probs[0, 0, 0, 8] = probs[0, 0, 0, 9] = 1.0
    masks = torch.zeros(1, 2, nimg, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[0, 1, 1:] = True
    cut = ops.image_image_suppression(probs, masks, DeLeakerConfig(std_mul_image_image=1.8))
    assert not bool(cut.any()), "1.8 * unbiased std puts the threshold above 1"
    cut = ops.image_image_suppression(probs, masks, DeLeakerConfig(std_mul_image_image=1.7))
    assert cut[0].nonzero().tolist() == [[0, 8], [0, 9]]
    # Strict: with std_mul 0 the threshold is the mean; values equal to it are not cut.
    probs2 = torch.zeros(1, 1, nimg, nimg)
    probs2[0, 0, 0, 1:4] = torch.tensor([1.0, 2.0, 3.0])
    masks2 = torch.zeros(1, 2, nimg, dtype=torch.bool)
    masks2[0, 0, 0] = True
    masks2[0, 1, 1:4] = True
    cut2 = ops.image_image_suppression(probs2, masks2, DeLeakerConfig(std_mul_image_image=0.0))
    assert cut2[0].nonzero().tolist() == [[0, 3]]
    for p, m, k, c in ((probs, masks, 1.8, None), (probs2, masks2, 0.0, cut2)):
        ref_cut, _ = slow.image_image_cut(p.double(), m, 0, k)
        assert torch.equal(ref_cut, c if c is not None else torch.zeros_like(ref_cut))


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (7, 1), (2, 2), (2, 3), (3, 3), (5, 7), (7, 9), (9, 11)])
def test_morphology_matches_neighbour_loops(grid: Tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(grid[0] * 100 + grid[1])
    density = torch.linspace(0.2, 0.8, 24)[:, None, None]
    masks = torch.rand(24, 1, grid[0] * grid[1], generator=g) < density
    assert torch.equal(ops.smooth_masks(masks, grid), slow.smooth_masks(masks, grid))


@pytest.mark.parametrize("corner", [(0, 0), (0, 7), (5, 0), (5, 7)])
def test_corner_blob_survives_opening(corner: Cell) -> None:
    gh, gw = 7, 9
    r0, c0 = corner
    cells = rect(r0, r0 + 2, c0, c0 + 2)
    mask = torch.zeros(1, 1, gh * gw, dtype=torch.bool)
    for r, c in cells:
        mask[0, 0, r * gw + c] = True
    assert torch.equal(ops.smooth_masks(mask, (gh, gw)), mask), "a 2x2 blob in a corner is its own opening"
    middle = torch.zeros_like(mask)
    for r, c in rect(2, 4, 3, 5):
        middle[0, 0, r * gw + c] = True
    assert not bool(ops.smooth_masks(middle, (gh, gw)).any()), "a 2x2 blob inside the grid is opened away"


# --- constant statistics: std exactly 0 --------------------------------------------------------------------------
#
# A map or region whose values are all equal has std 0 and nothing strictly above its mean: no mask, no cut, for
# any std multiplier. A float32 mean of equal values can be an ulp off them, which once gave full masks (and every
# image query's other-entity text cut) for uniform attention; these inputs pin the exact answer in every
# implementation (this module's two ops; the ONNX decomposition and the kernels reuse the builders).

#: (T, grid, split) shapes where a plain float32 mean of 1/N over the grid is not 1/N; with ``split`` (every text
#: token in one of two entities), shapes where a matrix product gave the image tokens affinities an ulp apart.
UNIFORM_SHAPES = [(5, (8, 8), False), (7, (5, 7), False), (13, (3, 3), False), (32, (5, 7), False),
                  (7, (16, 16), False), (127, (1, 127), True), (65, (1, 127), True), (33, (9, 7), True)]


def uniform_attention_inputs(text_len: int, grid: Tuple[int, int], head_dim: int = 16, seed: int = 0,
                             dtype: torch.dtype = torch.float32, split: bool = False):
    """Zero queries (every attention row uniform, so every entity map is constant), random k and v, entity mask
    ``(4, T)`` with entities on tokens 1 and 3, or with ``split`` ``(2, T)`` with entities on the even and the odd
    tokens (multi-token entities: each affinity is a sum of many equal terms; a matrix product with two columns
    took another path through its tiles than with four). -> ``(q, k, v, entity_mask)``."""
    g = torch.Generator().manual_seed(seed)
    tokens = text_len + grid[0] * grid[1]
    q = torch.zeros(1, 2, tokens, head_dim)
    k, v = (torch.randn(1, 2, tokens, head_dim, generator=g) for _ in range(2))
    entity_mask = torch.zeros(2 if split else 4, text_len, dtype=torch.bool)
    if split:
        entity_mask[0, 0::2] = entity_mask[1, 1::2] = True
    else:
        entity_mask[0, 1] = entity_mask[1, 3] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), entity_mask


def constant_region_blocks(side: int) -> Tuple[List[Cell], List[Cell]]:
    """The two entity regions of `constant_region_inputs` on its ``2 side x 2 side`` grid: the top-left and the
    bottom-right ``side x side`` blocks."""
    return rect(0, side, 0, side), rect(side, 2 * side, side, 2 * side)


def constant_region_inputs(head_dim: int = 16, seed: int = 3, dtype: torch.dtype = torch.float32, side: int = 3):
    """T = 4, a ``2 side x 2 side`` grid, entities on tokens 0 and 2. The image queries of each block of
    `constant_region_blocks` point at their entity's token and are identical within the block, as are the image
    keys, so pbar takes one value over each region M_e x M_f. -> ``(q, k, v, entity_mask)``."""
    g = torch.Generator().manual_seed(seed)
    text_len, heads, gw = 4, 2, 2 * side
    tokens = text_len + gw * gw
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=g) for _ in range(3))
    entity_mask = torch.zeros(4, text_len, dtype=torch.bool)
    entity_mask[0, 0] = entity_mask[1, 2] = True
    for token, cells in zip((0, 2), constant_region_blocks(side)):
        direction, query, key = (torch.randn(heads, head_dim, generator=g) for _ in range(3))
        k[0, :, token] = 2.0 * direction
        for r, c in cells:
            q[0, :, text_len + r * gw + c] = query + 2.0 * direction
            k[0, :, text_len + r * gw + c] = key
    return q.to(dtype), k.to(dtype), v.to(dtype), entity_mask


def constant_region_masks(side: int = 3) -> torch.Tensor:
    """``(1, 4, (2 side)^2)`` bool: the masks `constant_region_inputs` must give (its two blocks)."""
    gw = 2 * side
    masks = torch.zeros(1, 4, gw * gw, dtype=torch.bool)
    for e, cells in enumerate(constant_region_blocks(side)):
        for r, c in cells:
            masks[0, e, r * gw + c] = True
    return masks


CONSTANT_WINDOWS = dict(start_aggregating_from=0, start_intervention_from=0)


@pytest.mark.parametrize("text_len, grid, split", UNIFORM_SHAPES)
@pytest.mark.parametrize("std_mul_text", [1.0, 0.0, -1.0])
def test_uniform_attention_gets_no_mask(text_len: int, grid: Tuple[int, int], split: bool, std_mul_text: float) -> None:
    q, k, v, entity_mask = uniform_attention_inputs(text_len, grid, split=split)
    config = DeLeakerConfig(**CONSTANT_WINDOWS, use_history=False, std_mul_text=std_mul_text)
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
    source = ops.entity_affinity(torch.softmax(q @ k.transpose(-1, -2), -1)[:, :, text_len:, :text_len], entity_mask)
    assert all(torch.unique(source[0, e]).numel() == 1 for e in range(2)), "each entity map is constant"
    assert not bool(ops.entity_image_masks(source, entity_mask.any(-1), grid, config).any())
    ref = slow.slow_deleaker_attention_detailed(q, k, v, entity_mask, grid, 5, None, config)
    assert not bool(ref.masks.any())
    for op in (deleaker_attention, deleaker_attention_decomposed):
        out, _ = op(q, k, v, entity_mask, grid=grid, block_step=5, history=None, config=config)
        assert rel_l2(out, plain) < 1e-6, op.__name__


@pytest.mark.parametrize("std_mul_image_image", [1.0, 0.0, -1.0])
def test_constant_image_image_region_cuts_nothing(std_mul_image_image: float) -> None:
    q, k, v, entity_mask = constant_region_inputs()
    config = DeLeakerConfig(**CONSTANT_WINDOWS, std_mul_image_image=std_mul_image_image)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    masks = constant_region_masks()
    pbar = probs[:, :, 4:, 4:].mean(1)
    region = masks[0, 0, :, None] & masks[0, 1, None, :]
    assert torch.unique(pbar[0][region]).numel() == 1, "pbar is constant over M_0 x M_1"
    assert not bool(ops.image_image_suppression(probs[:, :, 4:, 4:], masks, config).any())
    no_cut = dataclasses.replace(config, do_image_image=False)
    ref = slow.slow_deleaker_attention_detailed(q, k, v, entity_mask, (6, 6), 5, None, config)
    assert torch.equal(ref.masks, masks) and not bool(ref.image_image_cut.any())
    for op in (deleaker_attention, deleaker_attention_decomposed):
        out, _ = op(q, k, v, entity_mask, grid=(6, 6), block_step=5, history=None, config=config)
        expected, _ = op(q, k, v, entity_mask, grid=(6, 6), block_step=5, history=None, config=no_cut)
        assert rel_l2(out, expected) < 1e-6, op.__name__


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e-33])
def test_tiny_entity_maps_are_thresholded_as_any_scaled_copy(scale: float) -> None:
    """The mask rule is scale-invariant, and maps of tiny affinities (about 1e-30 when attention is sharp) are
    thresholded as the float64 reference does: their float32 squares used to underflow, giving std 0 and a mask
    at the maximum of each map, even for two values (which mean + 1 std can never pass)."""
    config = DeLeakerConfig(**WINDOWS, do_smoothing=False)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 40, generator=g) * scale
    present = torch.tensor([True, True, False])
    masks = ops.entity_image_masks(source, present, (5, 8), config)
    expected, margin = slow.threshold_masks(source.double(), present.tolist(), config.std_mul_text)
    # relative_gap measures below 1e-30 against 1e-30: the margin shrinks with the scale there.
    assert margin > MARGIN * min(1.0, scale / 1e-30) and masks.any() and torch.equal(masks, expected)
    pair = torch.tensor([[[3e-33, 1e-36]]]) * (scale / 1e-30)
    assert not ops.entity_image_masks(pair, torch.tensor([True]), (2, 1), config).any()


@pytest.mark.parametrize("scale", [1.0, 1e-30])
def test_tiny_image_image_regions_are_thresholded_as_any_scaled_copy(scale: float) -> None:
    """As the entity maps: a region of tiny pbar values cuts what the float64 reference cuts."""
    config = DeLeakerConfig(**WINDOWS)
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(1, 2, 12, 12, generator=g) * scale
    masks = torch.zeros(1, 2, 12, dtype=torch.bool)
    masks[0, 0, :6], masks[0, 1, 4:] = True, True
    cut = ops.image_image_suppression(probs, masks, config)
    expected, margin = slow.image_image_cut(probs.double(), masks, 0, config.std_mul_image_image)
    assert margin > MARGIN and cut.any() and torch.equal(cut, expected)
