"""The CUDA kernels' real source on the CPU, through the CUDA emulator of ``tests/cuda_emulator``.

The same checks as the GPU tests (``kernel_checks.py``: every intermediate against the decomposed op, the fast
path's specification) on shapes that stay quick on two cores, with the plain output and LSE from plain PyTorch
math, plus what only an emulator can show: results that do not depend on the order threads run in between
barriers (a missing barrier shows up as a difference), nor on the SM count that sizes the image-image
statistics' grid, nor on the band size the union is corrected in; launches that skip the kernels a
host-known window does not need; the explicit init; and mutants of the kernel source that these checks must
catch.

None of this says anything about speed or about real hardware; the GPU tests say that, on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cuda_emulator
import trt_plugin_host
from deleaker.decomposed import decomposed_intermediates, plain_attention_with_lse
from deleaker.export import onnx_node
from deleaker.plugins import kernels, kernels_build, torch_op
from deleaker import deleaker_attention_reference
from deleaker.errors import ShapeError
from deleaker.ops import smooth_masks
from kernel_checks import (
    CONFIG,
    INSIDE,
    assert_correction_matches,
    assert_masks_match,
    assert_statistics_match,
    check_union,
    check_constant_statistics,
    check_corrections_beyond_fp16_fall_back,
    check_fallback,
    check_history_threaded,
    check_matches_decomposed,
    check_overflowing_corrections_fall_back,
    check_plain_outside_window,
    check_switch_off,
    mostly_cut_inputs,
    rel_l2,
    shape_id,
    structured_inputs,
)

# Quick on the emulator (a second to a few seconds each) and still covering: grids 7x9, 16x16, 20x24 and 33x33,
# T = 77, 256 and 512, 2 to 4 entities with E_max 4 and 8, B = 1 and 2, head dims 64 and 128.
SHAPES = [
    # batch, heads, T, grid, head_dim, entities, E_max
    (1, 2, 77, (7, 9), 64, 2, 4),
    (1, 2, 256, (16, 16), 128, 4, 4),
    (2, 2, 512, (20, 24), 64, 4, 8),
    (1, 2, 77, (33, 33), 64, 3, 8),
]


#: The banded variant: bands of 64 rows (several bands on the test shapes), and only 2 stored pbar tiles per sample
#: (the cut bits of every later tile recompute pbar instead of reading what the statistics stored).
BANDED = ("DELEAKER_BAND_ROWS=64", "DELEAKER_PBAR_TILES=2")


@functools.cache
def _build_all() -> dict:
    """Every library this module uses (plain, banded, each mutant), built two at a time: g++ runs one core each."""
    variants = [((), ()), ((), BANDED), *(((mutation,), ()) for mutation in MUTANTS.values())]
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda variant: cuda_emulator.build_emulated_library(*variant), variants))
    return dict(zip(variants, paths))


@functools.cache
def _load(mutations: tuple, defines: tuple) -> cuda_emulator.EmulatedLibrary:
    library = cuda_emulator.EmulatedLibrary(_build_all()[(mutations, defines)])
    library.init()
    return library


def emulated_library(mutations: tuple = (), defines: tuple = ()) -> cuda_emulator.EmulatedLibrary:
    """The emulated library (built once per set of mutations and defines, initialised on device 0); skips the
    test where no C++ compiler is found."""
    try:
        return _load(mutations, defines)
    except cuda_emulator.EmulatorBuildError as exc:
        if "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def library():
    lib = emulated_library()
    yield lib
    lib.configure()


def runner(library):
    """`kernel_checks.KernelRun` on the emulated library: o and the LSE from plain math (host tensors,
    synchronous)."""

    def run(q, k, v, entity_mask, *, grid, block_step, history, config, fallback_threshold=0.5):
        plain, lse = plain_attention_with_lse(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        return torch_op.launch_kernels(
            library, q, k, v, entity_mask, out=plain, lse=lse, grid=grid, block_step=block_step, history=history,
            config=config, stream=0, debug=True, fallback_threshold=fallback_threshold,
        )

    return run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_matches_decomposed_inside_window(library, shape, dtype):
    seed = 10 * SHAPES.index(shape) + (dtype == torch.bfloat16)
    check_matches_decomposed(runner(library), shape, dtype, seed, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_outside_window_out_is_the_plain_attention(library, dtype, head_dim):
    check_plain_outside_window(runner(library), dtype, head_dim, (9, 11), device="cpu")


@pytest.mark.parametrize(
    "switch",
    ["do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening", "use_history"],
)
def test_each_switch_off_matches_decomposed(library, switch):
    check_switch_off(runner(library), switch, device="cpu")


@pytest.mark.parametrize("use_history", [True, False])
def test_history_threaded_over_block_steps(library, use_history):
    check_history_threaded(runner(library), use_history, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rows_almost_all_cut_fall_back(library, dtype):
    check_fallback(runner(library), dtype, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_constant_statistics_give_no_mask_and_no_cut(library, dtype, head_dim):
    check_constant_statistics(runner(library), dtype, head_dim, device="cpu")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_whose_correction_overflows_fall_back(library, head_dim):
    check_overflowing_corrections_fall_back(runner(library), head_dim, device="cpu")


def test_corrections_beyond_fp16_fall_back(library):
    check_corrections_beyond_fp16_fall_back(runner(library), device="cpu")


def test_tiny_maps_give_the_masks_of_any_scaled_copy(library):
    """A history of tiny values (about 1e-30, as sharp attention gives; the source map past the aggregation window)
    gives the masks of the same history scaled to 1, in the kernels (float64 statistics) and in the decomposed op
    (whose float32 std of such maps used to underflow to 0, masking each map's maximum)."""
    config = dataclasses.replace(CONFIG, do_smoothing=False)
    grid = (9, 11)
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, 64, 3, 4, torch.bfloat16, 11, device="cpu")
    history = torch.rand(1, 4, 99, generator=torch.Generator().manual_seed(11))
    history[:, 3] = 0.0  # the absent entity
    step = CONFIG.stop_intervention_at  # inside the intervention window, past the aggregation: source = history
    masks = []
    for scale in (1.0, 1e-30):
        _, _, views = runner(library)(q, k, v, entity_mask, grid=grid, block_step=step, history=history * scale,
                                      config=config)
        ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=step, history=history * scale,
                                       config=config)
        assert torch.equal(views["masks"], ref.masks), scale
        masks.append(views["masks"])
    assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) > 10


def test_every_row_through_the_fallback_matches_decomposed(library):
    """fallback_threshold = 1: every edited row with Z < 1 takes the exact path, image-image cuts included."""
    views = check_matches_decomposed(runner(library), (1, 2, 77, (20, 24), 64, 3, 4), torch.bfloat16, 7, "cpu",
                                     fallback_threshold=1.0)
    assert int(views["fallback_count"]) > 100 and views["cut"].any()


def _stripe_inputs(*args, **kwargs):
    """The device check's stripe inputs (benchmarks/attention_inputs.py): masks known in advance."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from attention_inputs import stripe_inputs

    return stripe_inputs(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_eight_entities_all_present_match_decomposed(library, dtype):
    """E_max = 8 with every entity present (256 entity-bit groups possible; the union's counting sort and the
    thresholds' 64 pairs all in use): every intermediate against the decomposed op."""
    grid = (32, 32)
    (q, k, v), entity_mask, intended = _stripe_inputs(1, 2, 77, grid, 64, coverage=0.25, entities=8, dtype=dtype,
                                                      device="cpu", seed=4)
    assert entity_mask.shape[0] == 8 and bool(entity_mask.any(-1).all())
    out, history, views = runner(library)(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None,
                                          config=CONFIG)
    ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None, config=CONFIG)
    assert not out.isnan().any() and not history.isnan().any()
    assert_statistics_match(views, history, ref)
    assert_masks_match(views, ref, grid, CONFIG)
    assert torch.equal(views["masks"], intended) and bool(views["masks"].any(-1).all()), "all 8 masks present"
    assert int(torch.isfinite(views["thresholds"]).sum()) == 8 * 7, "every ordered pair of distinct entities cuts"
    assert_correction_matches(q, k, v, entity_mask, out, views, ref, CONFIG, 0.5)


def test_a_128x128_grid_forms_the_masks_and_union_exactly(library):
    """A 128x128 grid (16,384 image tokens: the largest whose morphology runs in shared memory, and 16 chunks of
    the union's counting sort): affinities against plain math, the threshold and the morphology exact, U grouped
    and complete, rows outside U untouched. (The decomposed op's image x image matrices are too large for the
    CPU here; the region and correction kernels are checked against it on the smaller grids above.)"""
    grid = (128, 128)
    (q, k, v), entity_mask, intended = _stripe_inputs(1, 1, 16, grid, 64, coverage=0.05, entities=2,
                                                      dtype=torch.bfloat16, device="cpu", seed=6)
    out, history, views = runner(library)(q, k, v, entity_mask, grid=grid, block_step=INSIDE, history=None,
                                          config=CONFIG)
    assert not out.isnan().any() and not history.isnan().any()
    # Affinities from the image rows and the entity columns only: c_e[i] = mean over T_e of exp(s - lse).
    _, lse = plain_attention_with_lse(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    s = (q[0, 0, 16:].float() @ k[0, 0, :16].float().T) / math.sqrt(q.shape[-1])
    p = torch.exp(s - lse[0, 0, 16:, None])
    tokens = entity_mask.float()
    want = (p @ tokens.T / tokens.sum(-1).clamp(min=1)).T  # (E_max, Nimg); absent rows: 0
    torch.testing.assert_close(views["affinity"][0], want, rtol=1e-4, atol=1e-7)
    source = views["source"][0].double()
    threshold = source.mean(-1, keepdim=True) + CONFIG.std_mul_text * source.std(-1, keepdim=True)
    present = entity_mask.any(-1)[:, None]
    assert torch.equal(views["raw_masks"][0], (source > threshold) & present)
    assert torch.equal(views["masks"], smooth_masks(views["raw_masks"], grid))
    assert torch.equal(views["masks"], intended)
    in_union = check_union(views, grid[0] * grid[1])
    assert 700 < int(in_union.sum()) < 800
    outside = torch.cat([torch.ones(16, dtype=torch.bool), ~in_union[0]])
    assert torch.equal(out[:, :, outside], views["plain"][:, :, outside]), "rows outside U must stay o, bit for bit"


# ---- invariances the emulator can show ------------------------------------------------------------------------


def _call(library, block_step=INSIDE, *, head_dim=64, dtype=torch.bfloat16, structured=False):
    """The mostly-cut case (every kernel runs: image-image cuts, corrected rows, fallback rows), or with
    ``structured`` a 16x16 grid with 3 entities (many image-image cuts in rows the correction keeps)."""
    if structured:
        grid = (16, 16)
        (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, head_dim, 3, 4, dtype, 3, device="cpu")
    else:
        grid = (8, 8)
        (q, k, v), entity_mask = mostly_cut_inputs(3, dtype, "cpu", head_dim=head_dim)
    return runner(library)(q, k, v, entity_mask, grid=grid, block_step=block_step, history=None, config=CONFIG)


#: Debug views written on every call; the others only inside the intervention window.
VIEWS_ALWAYS_WRITTEN = ("affinity", "source")
VIEWS_INSIDE = ("masks", "union_index", "thresholds", "cut", "z", "fallback", "fallback_count")


def _assert_identical(a, b, what: str, views=VIEWS_INSIDE) -> None:
    out_a, hist_a, views_a = a
    out_b, hist_b, views_b = b
    assert torch.equal(out_a, out_b), f"{what}: the outputs differ"
    assert torch.equal(hist_a, hist_b), f"{what}: the histories differ"
    for name in views:
        assert torch.equal(views_a[name], views_b[name]) or (
            name == "thresholds" and torch.equal(views_a[name].isnan(), views_b[name].isnan())
            and torch.equal(views_a[name].nan_to_num(), views_b[name].nan_to_num())
        ), f"{what}: {name} differs"


@pytest.mark.parametrize("structured", [False, True], ids=["mostly_cut", "structured"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_results_do_not_depend_on_thread_order(library, head_dim, structured):
    """Bit for bit the same under other thread and block orders (descending, and shuffled with three seeds)."""
    base = _call(library, head_dim=head_dim, structured=structured)
    assert base[2]["cut"].any(), "the case must cut image-image logits"
    assert structured or base[2]["fallback"].any(), "the case must take the fallback"
    for schedule_seed in (1, 7, 3, 12345):
        library.configure(schedule_seed=schedule_seed)
        try:
            other = _call(library, head_dim=head_dim, structured=structured)
        finally:
            library.configure()
        _assert_identical(base, other, f"schedule {schedule_seed}")


def test_statistics_striding_over_slots_gives_the_same_results(library):
    """On a one-SM device the image-image statistics get 2 blocks for their 256 slots (each block strides over
    many), and the persistent grids of the cut bits, the correction and the fallback 2 to 4 blocks that stride over
    every tile of U; on the 132-SM device every slot and tile has a block of its own. The slots fix the summation
    order; the band kernels' items are independent."""
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, (33, 33), 64, 3, 4, torch.bfloat16, 5, device="cpu")
    run = runner(library)
    call = functools.partial(run, q, k, v, entity_mask, grid=(33, 33), block_step=INSIDE, history=None,
                             config=CONFIG)
    base = call()
    assert int(base[2]["union_count"].max()) > 2 * 64, "the union must span 3 x 3 tiles or more"
    library.configure(device=1)
    try:
        library.init()  # device 1's own init
        strided = call()
    finally:
        library.configure()
    _assert_identical(base, strided, "one SM vs 132 SMs")


def test_bands_give_the_same_results(library):
    """The union corrected in bands of 64 rows (several cut, correction and fallback launches), with the cut bits of
    all but 2 tiles from a recomputed pbar, equals one band with every tile's pbar as the statistics stored it, bit
    for bit, with many rows through the fallback in every band."""
    banded = emulated_library(defines=BANDED)
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, (20, 24), 64, 4, 4, torch.bfloat16, 7, device="cpu")
    results = [
        runner(lib)(q, k, v, entity_mask, grid=(20, 24), block_step=INSIDE, history=None, config=CONFIG,
                    fallback_threshold=1.0)
        for lib in (library, banded)
    ]
    assert int(results[0][2]["union_count"].max()) > 2 * 64, "the union must span 3 bands or more"
    assert int(results[0][2]["fallback_count"]) > 100
    _assert_identical(*results, "bands of 64 rows vs one band", views=("z", "fallback", "fallback_count"))
    # Several bands leave no whole cut view: the checks go through Z and the output instead.
    check_matches_decomposed(runner(banded), (1, 2, 77, (20, 24), 64, 4, 4), torch.float16, 8, "cpu")


def test_host_step_skips_the_kernels_the_window_does_not_need(library):
    """A Python int step lets the launcher skip what the window does not need; a device step launches every
    kernel and lets them decide (and gives the same results)."""
    launches = []
    for step in (0, INSIDE, torch.tensor(0), torch.tensor(INSIDE)):
        before = library.launches()
        _call(library, step)
        launches.append(library.launches() - before)
    # 0: outside both windows: the mask kernel (history) only. INSIDE: entity tokens, affinity, mask, union,
    # region statistics, thresholds, then one band: cut bits, correction, fallback list, fallback.
    assert launches == [1, 10, 10, 10]
    _assert_identical(_call(library, 0), _call(library, torch.tensor(0)), "host vs device step 0",
                      VIEWS_ALWAYS_WRITTEN)
    _assert_identical(_call(library, INSIDE), _call(library, torch.tensor(INSIDE)), "host vs device step inside")


def test_launches_after_the_first_are_dependent_on_sm90_only(library):
    """On the emulated sm_90 (device 0) every launch of a call but its first is a programmatic dependent launch; on
    the emulated sm_80 (device 1) none is; the results are the same bits."""
    counts = []
    results = []
    for device in (0, 1):
        library.configure(device=device)
        try:
            library.init()
            launches, dependent = library.launches(), library.dependent_launches()
            results.append(_call(library, INSIDE))
            counts.append((library.launches() - launches, library.dependent_launches() - dependent))
        finally:
            library.configure()
    assert counts == [(10, 9), (10, 0)]
    _assert_identical(*results, "sm_90 with dependent launches vs sm_80 without")


def test_every_kernel_waits_for_the_previous_one_first():
    """A dependent launch may start before the previous kernel ends: each kernel's first statement (after its
    shared-memory declarations) must be wait_for_previous_kernel(), also in kernels that return early, or the
    chain's order breaks (the emulator runs grids one after another, so only the source can show this)."""
    kernel = re.compile(r"__global__ void __launch_bounds__\([^)]*\) (\w+)\([^)]*\) \{\n((?:.*\n){1,6})")
    found = {}
    for path in kernels_build.kernel_sources():
        for name, body in kernel.findall(path.read_text()):
            statements = [line.strip() for line in body.splitlines()]
            first = next(line for line in statements if not line.startswith(("__shared__", "using ", "constexpr ")))
            found[name] = first
    assert len(found) == 10, sorted(found)
    assert all(first == "wait_for_previous_kernel();" for first in found.values()), found


def test_a_host_step_beyond_int32_runs_as_a_device_step(library):
    """The op takes int64 block steps; the params' host offset is an int32, so a larger Python int goes to the
    kernels as a device step (it was refused). Past every window (knobs < 2**31): the plain output."""
    far = 2**31 + 3
    host = _call(library, far)
    _assert_identical(host, _call(library, torch.tensor(far)), "host vs device step 2**31 + 3", VIEWS_ALWAYS_WRITTEN)
    assert torch.equal(host[0], host[2]["plain"])


# ---- the fast path's choice of fused attention (its LSE convention check runs on any device) ------------------


def _log2_lse_attention(q, k, v, scale):
    o, lse = plain_attention_with_lse(q, k, v, scale)
    return o, (lse / math.log(2.0))[..., None]  # log2, (B, H, N, 1) as cuDNN's stats


def _padded_lse_attention(q, k, v, scale):
    o, lse = plain_attention_with_lse(q, k, v, scale)
    return o, torch.cat([lse, torch.full_like(lse[..., :5], math.inf)], dim=-1)  # (B, H, N + 5), padded rows


def _wrong_scale_attention(q, k, v, scale):
    return plain_attention_with_lse(q, k, v, 2.0 * scale)


def _refusing_attention(q, k, v, scale):
    raise RuntimeError("no kernel for these inputs")


@pytest.mark.parametrize(
    "attention, factor",
    [
        (plain_attention_with_lse, 1.0),
        (_log2_lse_attention, math.log(2.0)),
        (_padded_lse_attention, 1.0),
        (_wrong_scale_attention, None),
        (_refusing_attention, None),
    ],
)
def test_fused_attention_lse_convention_is_checked(attention, factor):
    """Natural log, log2, (B, H, N, 1) and padded LSEs are recognised and normalised; a provider that disagrees
    with plain math or raises is refused."""
    q, k, v = (torch.randn(1, 2, 70, 64).to(torch.bfloat16) for _ in range(3))
    provider = torch_op.AttentionProvider("probe", attention)
    got = torch_op.lse_factor(provider, q, k, v, 0.125)
    assert got == factor
    if factor is not None:
        o, lse = dataclasses.replace(provider, lse_factor=factor).run(q, k, v, 0.125)
        expected_o, expected_lse = plain_attention_with_lse(q, k, v, 0.125)
        assert lse.shape == (1, 2, 70) and lse.stride(-1) == 1 and torch.equal(o, expected_o)
        torch.testing.assert_close(lse, expected_lse)


# ---- errors ----------------------------------------------------------------------------------------------------


def _params(q, k, v, entity_mask, lse_buffer, **overrides) -> kernels.DeLeakerParams:
    fields = dict(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=q.data_ptr(), lse=lse_buffer.data_ptr(),
        entity_mask=entity_mask.data_ptr(), history_out=lse_buffer.data_ptr(), batch=1, heads=2, tokens=77 + 63,
        text_tokens=77, head_dim=64, grid_h=7, grid_w=9, num_entities=4, num_blocks=1, fallback_threshold=0.5,
        q_row_stride=64, k_row_stride=64, v_row_stride=64, o_row_stride=64,
    )
    return kernels.DeLeakerParams(**{**fields, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"head_dim": 96}, "head_dim must be 64 or 128"),
        ({"lse": None}, "lse .* is NULL"),
        ({"fallback_threshold": 0.0}, r"fallback_threshold must be in \(0, 1\]"),
        ({"fallback_threshold": float("nan")}, r"fallback_threshold must be in \(0, 1\]"),
    ],
)
def test_launch_errors_name_the_argument(library, overrides, message):
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, (7, 9), 64, 2, 4, torch.float16, 1, device="cpu")
    lse = torch.zeros(1, 2, 140)
    params = _params(q, k, v, entity_mask, lse, **overrides)
    with pytest.raises(kernels.KernelLaunchError, match=message) as info:
        library.launch(params, 0, 0, 0)
    assert info.value.code == kernels.ERROR_INVALID_ARGUMENT


@pytest.mark.parametrize(
    "shape, text_len, message",
    [
        ((65536, 1, 2, 64), 1, r"batch up to 65535, got 65536"),
        ((1, 65536, 2, 64), 1, r"heads up to 65535, got 65536"),
        ((1, 1, 65535 * 64 + 2, 64), 1, r"image tokens \(gh \* gw\) up to 4194240, got 4194241"),
    ],
)
def test_sizes_beyond_the_kernels_grids_are_not_supported(shape, text_len, message):
    """`supports` says no (the caller runs the reference) and the fast path refuses with a ShapeError before any
    work, for sizes the library's launch grids cannot take; it used to say yes, and the library refused only after
    the fused attention had run. Meta tensors: no memory."""
    q = torch.empty(shape, dtype=torch.float16, device="meta")
    entity_mask = torch.zeros(4, text_len, dtype=torch.bool, device="meta")
    assert re.search(message, torch_op.kernel_shape_problem(q, entity_mask))
    limits = [kernels.MAX_KERNEL_BATCH, kernels.MAX_HEADS, text_len + kernels.MAX_IMAGE_TOKENS]
    at_limit = torch.empty([min(d, m) for d, m in zip(shape[:3], limits)] + [64], dtype=torch.float16, device="meta")
    assert torch_op.kernel_shape_problem(at_limit, entity_mask) is None


def test_a_batch_beyond_the_kernels_grid_is_refused_before_any_launch(library):
    (q, k, v), entity_mask = structured_inputs(1, 1, 1, (1, 1), 64, 1, 2, torch.float16, 0, device="cpu")
    q, k, v = (x.expand(65536, -1, -1, -1) for x in (q, k, v))  # a batch of 65536, no memory
    out = torch.zeros(65536, 1, 2, 64, dtype=torch.float16)
    lse = torch.zeros(65536, 1, 2)
    before = library.launches()
    with pytest.raises(ShapeError, match="batch up to 65535, got 65536"):
        torch_op.launch_kernels(library, q, k, v, entity_mask, out=out, lse=lse, grid=(1, 1), block_step=INSIDE,
                                history=None, config=CONFIG, stream=0, debug=False)
    assert library.launches() == before and not out.any()


def test_launch_before_init_is_an_error(library, tmp_path):
    """A fresh copy of the library (its own globals) refuses to launch before deleaker_init, then works."""
    copy = tmp_path / "libdeleaker_fresh.so"
    shutil.copy(library.path, copy)
    fresh = cuda_emulator.EmulatedLibrary(copy)
    with pytest.raises(kernels.KernelLaunchError, match="deleaker_init") as info:
        _call(fresh)
    assert info.value.code == kernels.ERROR_NOT_INITIALIZED
    fresh.init()
    fresh.init()  # idempotent
    _assert_identical(_call(fresh), _call(library), "fresh library after init")



def test_dependent_launches_can_be_turned_off_for_profiling(library, tmp_path, monkeypatch):
    """DELEAKER_DEPENDENT_LAUNCH=0 at init (a fresh copy of the library: its own globals): no dependent launch on
    the sm_90 device, the same bits."""
    copy = tmp_path / "libdeleaker_plain_launches.so"
    shutil.copy(library.path, copy)
    fresh = cuda_emulator.EmulatedLibrary(copy)
    monkeypatch.setenv("DELEAKER_DEPENDENT_LAUNCH", "0")
    fresh.init()
    launches, dependent = fresh.launches(), fresh.dependent_launches()
    result = _call(fresh)
    assert fresh.launches() - launches == 10 and fresh.dependent_launches() == dependent
    _assert_identical(result, _call(library), "without vs with dependent launches")

# ---- mutants: the checks above catch the bugs they are for ----------------------------------------------------

MUTANTS = {
    # The fallback's online softmax rescales each accumulator value by the other fragment row's factor (rows g
    # and g + 8 of the PTX ISA's m16n8 layout swapped).
    "swapped_fragment_rows": (
        "deleaker_fallback.cuh",
        "for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];",
        "for (int e = 0; e < 4; ++e) o[n][e] *= alpha[1 - e / 2];",
    ),
    # V read by ldmatrix without .trans: P V multiplies by V's 8 x 8 blocks transposed.
    "untransposed_v": (
        "deleaker_common.cuh",
        "ldmatrix_x4_trans(b, v_rows + (kk * 16 + lane % 16) * kLd + 8 * n + 8 * (lane / 16));",
        "ldmatrix_x4(b, v_rows + (kk * 16 + lane % 16) * kLd + 8 * n + 8 * (lane / 16));",
    ),
    # The barrier between the fallback's lanes writing O and 1 / l and other lanes reading them goes.
    "missing_syncwarp": (
        "deleaker_fallback.cuh",
        "= o[n][e];\n  __syncwarp();\n",
        "= o[n][e];\n",
    ),
    # The correction's tensor cores read V before every thread has loaded its share.
    "skipped_syncthreads": (
        "deleaker_correction.cuh",
        "      __syncthreads();  // V is written\n",
        "",
    ),
    # A barrier reached by only some threads of the block (one thread leaves the correction's persistent loop).
    "divergent_syncthreads": (
        "deleaker_correction.cuh",
        "  if (!window_of(p).intervene) return;\n  for_each_band_row_tile(",
        "  if (!window_of(p).intervene || threadIdx.x == 5) return;\n  for_each_band_row_tile(",
    ),
    # The first head block of a row tile to finish takes the head mean, before the other heads wrote theirs.
    "head_mean_by_first_block": (
        "deleaker_affinity.cuh",
        "blockIdx.x, 1) == p.heads - 1;",
        "blockIdx.x, 1) == 0;",
    ),
    # The arrival counters keep whatever the workspace held (a previous call's counts, or garbage).
    "arrivals_not_reset": (
        "deleaker_affinity.cuh",
        "ws.affinity_arrivals[idx] = 0;",
        "(void)idx;",
    ),
    # The correction adds what it should subtract.
    "wrong_correction_sign": (
        "deleaker_correction.cuh",
        "values[x] = from_float<Elem>((to_float(values[x]) - num_row[d0 + x]) / z);",
        "values[x] = from_float<Elem>((to_float(values[x]) + num_row[d0 + x]) / z);",
    ),
    # The union's counting sort ranks a token after itself among its warp's peers (every place one too far).
    "union_rank_off_by_one": (
        "deleaker_masks.cuh",
        "const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));",
        "const int rank_in_warp = __popc(peers & ((2u << lane) - 1u));",
    ),
    # The thresholds' tree reduction reads a level before every thread has written it.
    "threshold_tree_without_barrier": (
        "deleaker_regions.cuh",
        "    __syncthreads();  // the previous level is complete\n",
        "",
    ),
    # Every correction stands, however small its Z: the fallback is never taken.
    "fallback_never_taken": (
        "deleaker_correction.cuh",
        "return isfinite(z) && z >= fallback_threshold;",
        "return isfinite(z) && z >= 0.0f;",
    ),
}


def _mutant(name: str) -> cuda_emulator.EmulatedLibrary:
    return emulated_library((MUTANTS[name],))


@pytest.mark.parametrize("name", ["swapped_fragment_rows", "untransposed_v"])
def test_mutant_with_a_wrong_fragment_layout_is_caught(library, name):
    """A value of the tensor-core fragments taken from the wrong row, or V's blocks transposed: the rows the
    fallback recomputes (and, for V, the correction's numerators) no longer match the specification."""
    mutant = _mutant(name)
    with pytest.raises(AssertionError):
        check_fallback(runner(mutant), torch.bfloat16, device="cpu")


@pytest.mark.parametrize("name", ["missing_syncwarp", "skipped_syncthreads"])
def test_mutant_with_a_missing_barrier_is_caught(library, name):
    mutant = _mutant(name)
    results = []
    for schedule_seed in (0, 1):
        mutant.configure(schedule_seed=schedule_seed)
        try:
            results.append(_call(mutant, structured=name == "skipped_syncthreads"))
        finally:
            mutant.configure()
    with pytest.raises(AssertionError, match="outputs differ"):
        _assert_identical(results[0], results[1], "ascending vs descending order")


def test_mutant_with_a_divergent_barrier_fails_its_launch(library):
    mutant = _mutant("divergent_syncthreads")
    with pytest.raises(kernels.KernelLaunchError, match="wait at __syncthreads after 1 threads of their block exited"):
        _call(mutant)
    _call(library)  # the error does not stick to the (emulated) device


def test_mutant_in_the_union_sort_is_caught(library):
    mutant = _mutant("union_rank_off_by_one")
    with pytest.raises(AssertionError, match="not a permutation"):
        check_matches_decomposed(runner(mutant), SHAPES[1], torch.bfloat16, 11, "cpu")


def test_mutant_threshold_reduction_without_its_barrier_is_caught(library):
    """Without the barrier between levels of the thresholds' tree, the result depends on the thread order."""
    mutant = _mutant("threshold_tree_without_barrier")
    results = []
    for schedule_seed in (0, 1):
        mutant.configure(schedule_seed=schedule_seed)
        try:
            results.append(_call(mutant, structured=True))
        finally:
            mutant.configure()
    with pytest.raises(AssertionError, match="differ"):
        _assert_identical(results[0], results[1], "ascending vs descending order")


@pytest.mark.parametrize("name", ["head_mean_by_first_block", "arrivals_not_reset"])
def test_mutant_in_the_affinity_head_mean_is_caught(library, name):
    """The head mean taken by the last head block of each row tile: taken by the first one (the other heads'
    sums not written yet), or counted from a stale counter (nobody, or the wrong block, takes it)."""
    mutant = _mutant(name)
    with pytest.raises(AssertionError):
        check_matches_decomposed(runner(mutant), SHAPES[1], torch.bfloat16, 11, "cpu")


@pytest.mark.parametrize("name", ["wrong_correction_sign", "fallback_never_taken"])
def test_mutant_in_the_correction_is_caught(library, name):
    mutant = _mutant(name)
    with pytest.raises(AssertionError):
        check_fallback(runner(mutant), torch.bfloat16, device="cpu")
    check_fallback(runner(library), torch.bfloat16, device="cpu")


# ---- the C++ TensorRT plugin (plugins/trt): its host path on the emulator ----------------------------------------


@pytest.fixture(scope="module")
def plugin_host():
    """plugins/trt's sources, the emulated kernels, a host stand-in for cuDNN's attention and a driver that plays
    TensorRT's part (tests/trt_plugin_host), in one library."""
    if kernels.ABI_VERSION < 2:
        pytest.skip("the plugin needs the kernel library's C ABI version 2 (issue 11's fast path), not merged yet")
    try:
        return trt_plugin_host.emulated_plugin_library()
    except cuda_emulator.EmulatorBuildError as exc:
        if "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


CANARY_BYTES = 4096


def _drive_with_workspace(library, attrs, inputs, outputs):
    """Asks the plugin for its workspace size (build phase), then runs the call in a workspace of exactly that
    size followed by canary bytes, which must come back untouched."""
    size = trt_plugin_host.drive(library, library, attrs, inputs, outputs)
    raw = torch.full((size + 256 + CANARY_BYTES,), 0xAB, dtype=torch.uint8)
    start = -raw.data_ptr() % 256
    trt_plugin_host.drive(library, library, attrs, inputs, outputs, raw.data_ptr() + start, size)
    canary = raw[start + size : start + size + CANARY_BYTES]
    assert bool((canary == 0xAB).all()), "the plugin wrote past the workspace it asked for"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpp_plugin_enqueue_matches_the_reference_over_steps(plugin_host, dtype):
    """The C++ plugin's methods, called in an engine's order (build phase, serialized fields, runtime phase,
    enqueue) with the step as a device scalar and the history threaded from one call to the next, run the fused
    attention stand-in and then the kernels; over steps crossing both windows the result is the reference's."""
    grid, e_max, num_blocks, block_offset = (12, 11), 4, 2, 1
    attrs = onnx_node.node_attributes(block_offset=block_offset, num_blocks=num_blocks, grid=grid, config=CONFIG)
    history = torch.zeros(2, e_max, grid[0] * grid[1])
    history_ref = None
    edited = 0.0  # how far the reference's output moves from plain attention: the window must be crossed
    for step in range(5):  # block steps 1, 3, 5, 7, 9: before, aggregating, inside both, intervening, after
        (q, k, v), entity_mask = structured_inputs(2, 2, 77, grid, 64, 3, e_max, dtype, 40 + step, "cpu")
        inputs = [q, k, v, entity_mask, history, torch.tensor(step, dtype=torch.int64)]
        outputs = [torch.full_like(q, float("nan")), torch.full_like(history, float("nan"))]
        _drive_with_workspace(plugin_host, attrs, inputs, outputs)
        out, history = outputs
        ref_out, history_ref = deleaker_attention_reference(
            q.float(), k.float(), v.float(), entity_mask, grid=grid, block_step=step * num_blocks + block_offset,
            history=history_ref, config=CONFIG,
        )
        torch.testing.assert_close(history, history_ref, rtol=1e-4, atol=1e-7, msg=f"history at step {step}")
        assert not out.isnan().any()
        assert rel_l2(out, ref_out) < 1e-2, step
        plain = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        edited = max(edited, rel_l2(ref_out, plain))
    assert history.any(), "the history must have been aggregated"
    assert edited > 1e-2, "no step edited the attention: the case does not test the correction"


def test_cpp_plugin_refuses_bad_shapes_before_any_work(plugin_host):
    grid = (12, 11)
    attrs = onnx_node.node_attributes(block_offset=0, num_blocks=1, grid=grid, config=CONFIG)
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, 64, 2, 4, torch.float16, 3, "cpu")
    step = torch.tensor(0, dtype=torch.int64)
    outputs = [torch.full_like(q, float("nan")), torch.full((1, 4, 131), float("nan"))]
    wrong_history = torch.zeros(1, 4, 131)
    with pytest.raises(trt_plugin_host.PluginDriveError, match=r"history has image tokens \(grid 12x11\) 131, expected 132"):
        trt_plugin_host.drive(plugin_host, plugin_host, attrs, [q, k, v, entity_mask, wrong_history, step], outputs)
    with pytest.raises(trt_plugin_host.PluginDriveError, match="supportsFormatCombination refused position 0"):
        trt_plugin_host.drive(plugin_host, plugin_host, attrs, [q.float(), k, v, entity_mask, wrong_history, step],
                              outputs)
    too_large = {**attrs, "grid_h": 2048, "grid_w": 2049}
    with pytest.raises(trt_plugin_host.PluginDriveError, match=r"grid_h x grid_w must be at most 4194240 image tokens "
                                                               r"\(the kernels' limit\), got 2048x2049"):
        trt_plugin_host.drive(plugin_host, plugin_host, too_large, [q, k, v, entity_mask, wrong_history, step],
                              outputs)
    bad_fields = {**attrs, "do_smoothing": 3}
    with pytest.raises(trt_plugin_host.PluginDriveError, match="do_smoothing is a flag and must be 0 or 1, got 3"):
        trt_plugin_host.drive(plugin_host, plugin_host, bad_fields, [q, k, v, entity_mask, wrong_history, step],
                              outputs)
    assert outputs[0].isnan().all() and outputs[1].isnan().all(), "nothing may be written"
    # What the kernels refuse is refused before the plain attention writes `out`: a head dim they do not take when
    # the call is prepared to run (an engine for it still builds), a batch of 0 at build.
    history = torch.zeros(1, 4, 132)
    narrow = [x[..., :32].contiguous() for x in (q, k, v)]
    narrow_out = [torch.full_like(narrow[0], float("nan")), torch.full((1, 4, 132), float("nan"))]
    assert trt_plugin_host.drive(plugin_host, plugin_host, attrs, [*narrow, entity_mask, history, step], narrow_out)
    with pytest.raises(trt_plugin_host.PluginDriveError, match="the kernels take head dim 64 or 128"):
        _drive_with_workspace(plugin_host, attrs, [*narrow, entity_mask, history, step], narrow_out)
    assert narrow_out[0].isnan().all() and narrow_out[1].isnan().all(), "nothing may be written"
    empty = [x[:0] for x in (q, k, v)]
    with pytest.raises(trt_plugin_host.PluginDriveError, match=r"q's batch must be in \[1, 65535\]"):
        trt_plugin_host.drive(plugin_host, plugin_host, attrs, [*empty, entity_mask, history[:0], step],
                              [torch.empty_like(empty[0]), torch.empty(0, 4, 132)])
