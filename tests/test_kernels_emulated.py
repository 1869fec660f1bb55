"""The CUDA kernels' real source on the CPU, through the CUDA emulator of ``tests/cuda_emulator``.

The same checks as the GPU tests (``kernel_checks.py``) on shapes that stay quick on two cores, plus what only
an emulator can show: results that do not depend on the order threads run in between barriers (a missing
barrier shows up as a difference), nor on the wmma accumulator's element layout (which CUDA leaves
unspecified and the flash kernel reads through a probe), nor on the SM count that sizes the image-image pass's
grid; launches that skip the kernels a host-known window does not need; and the TensorRT plugin's runtime
methods driving the kernels. Mutants of the kernel source show that these checks catch the bugs they are meant to catch.

None of this says anything about speed or about real hardware; the GPU tests say that, on a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

import cuda_emulator
import trt_plugin_host
from deleaker import deleaker_attention_reference
from deleaker.export import onnx_node
from deleaker.plugins import kernels, torch_op
from deleaker.plugins import trt_plugin as tp
from kernel_checks import (
    CONFIG,
    INSIDE,
    check_history_threaded,
    check_inside_window,
    check_plain_outside_window,
    check_switch_off,
    rel_l2,
    shape_id,
    structured_inputs,
)

# Quick on the emulator (about a second to a few seconds each) and still covering: grids 7x9, 16x16, 20x24 and
# 33x33, T = 77, 256 and 512, 2 to 5 entities with E_max 4 and 8, B = 1 and 2, head dims 64 and 128.
SHAPES = [
    # batch, heads, T, grid, head_dim, entities, E_max
    (1, 2, 77, (7, 9), 64, 2, 4),
    (1, 2, 256, (16, 16), 128, 4, 4),
    (2, 2, 512, (20, 24), 64, 4, 8),
    (1, 2, 77, (33, 33), 64, 5, 8),
]


@functools.cache
def _build(mutations: tuple) -> cuda_emulator.EmulatedLibrary:
    return cuda_emulator.EmulatedLibrary(cuda_emulator.build_emulated_library(mutations))


def emulated_library(mutations: tuple = ()) -> cuda_emulator.EmulatedLibrary:
    """The emulated library (built once per set of mutations); skips the test where no C++ compiler is found."""
    try:
        return _build(mutations)
    except cuda_emulator.EmulatorBuildError as exc:
        if "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def library():
    lib = emulated_library()
    yield lib
    lib.configure(schedule_seed=0, layout_seed=0)


def runner(library):
    """`kernel_checks.KernelRun` on the emulated library (host tensors, synchronous)."""

    def run(q, k, v, entity_mask, *, grid, block_step, history, config, out=None, new_history=None):
        return torch_op.launch_kernels(
            library, q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config,
            out=out, new_history=new_history, stream=0, debug=True,
        )

    return run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_matches_reference_inside_window(library, shape, dtype):
    seed = 10 * SHAPES.index(shape) + (dtype == torch.bfloat16)
    check_inside_window(runner(library), shape, dtype, seed, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_plain_attention_outside_window_equals_sdpa(library, dtype, head_dim):
    check_plain_outside_window(runner(library), dtype, head_dim, (9, 11), device="cpu")


@pytest.mark.parametrize(
    "switch",
    ["do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening", "use_history"],
)
def test_each_switch_off_matches_reference(library, switch):
    check_switch_off(runner(library), switch, device="cpu")


@pytest.mark.parametrize("use_history", [True, False])
def test_history_threaded_over_block_steps(library, use_history):
    check_history_threaded(runner(library), use_history, device="cpu")


def _call(library, block_step, *, seed=3, grid=(16, 16), dtype=torch.float16, head_dim=64):
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, head_dim, 3, 4, dtype, seed, device="cpu")
    return runner(library)(q, k, v, entity_mask, grid=grid, block_step=block_step, history=None, config=CONFIG)


#: Debug views written on every call; the others (lse, masks, union, cut) only inside the intervention window.
VIEWS_ALWAYS_WRITTEN = ("affinity", "source")


def _assert_identical(a, b, what: str, views=None) -> None:
    out_a, hist_a, views_a = a
    out_b, hist_b, views_b = b
    assert torch.equal(out_a, out_b), f"{what}: the outputs differ"
    assert torch.equal(hist_a, hist_b), f"{what}: the histories differ"
    for name in views or views_a:
        assert torch.equal(views_a[name], views_b[name]), f"{what}: {name} differs"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_results_do_not_depend_on_thread_order_or_fragment_layout(library, head_dim):
    """Bit for bit the same under other thread resume orders and another accumulator element layout."""
    base = _call(library, INSIDE, head_dim=head_dim, dtype=torch.bfloat16)
    assert base[2]["cut"].any() and base[2]["masks"].any(), "the case must exercise every pass"
    for schedule_seed, layout_seed in ((1, 0), (7, 0), (0, 12345), (3, 99)):
        library.configure(schedule_seed=schedule_seed, layout_seed=layout_seed)
        try:
            other = _call(library, INSIDE, head_dim=head_dim, dtype=torch.bfloat16)
        finally:
            library.configure(schedule_seed=0, layout_seed=0)
        _assert_identical(base, other, f"schedule {schedule_seed}, layout {layout_seed}")


def test_image_image_pass_striding_over_tiles_gives_the_same_results(library):
    """On a one-SM device the image-image pass gets 4 blocks for all its tiles (each block strides over
    several); on the 132-SM device every tile of these shapes has a block of its own."""
    for grid in ((20, 24), (33, 33)):
        base = _call(library, INSIDE, grid=grid)
        assert int(base[2]["union_count"].max()) > 2 * 64, "the union must span 3 x 3 tiles or more (> 4 blocks)"
        library.configure(device=1)
        try:
            strided = _call(library, INSIDE, grid=grid)
        finally:
            library.configure()
        _assert_identical(base, strided, f"one SM vs 132 SMs, grid {grid}")


def test_host_step_skips_the_kernels_the_window_does_not_need(library):
    """A Python int step lets the launcher skip stats and the image-image pass outside the windows; a device
    step launches every kernel and lets them decide (and gives the same results)."""
    launches = []
    for step in (0, INSIDE, torch.tensor(0), torch.tensor(INSIDE)):
        before = library.launches()
        _call(library, step)
        launches.append(library.launches() - before)
    # 0: outside both windows: mask (history and bookkeeping) and flash. INSIDE: stats, mask, region x2, flash.
    assert launches == [2, 5, 5, 5]
    outside = _call(library, 0), _call(library, torch.tensor(0))
    _assert_identical(*outside, "host vs device step 0", VIEWS_ALWAYS_WRITTEN)
    _assert_identical(_call(library, INSIDE), _call(library, torch.tensor(INSIDE)), "host vs device step inside")


def test_launch_errors_name_the_argument(library):
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, (7, 9), 64, 2, 4, torch.float16, 1, device="cpu")
    params = kernels.DeLeakerParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=q.data_ptr(), entity_mask=entity_mask.data_ptr(),
        history_out=q.data_ptr(), batch=1, heads=2, tokens=77 + 63, text_tokens=77, head_dim=96, grid_h=7, grid_w=9,
        num_entities=4, num_blocks=1,
    )
    with pytest.raises(kernels.KernelLaunchError, match="head_dim must be 64 or 128"):
        library.launch(params, 0, 0, 0)


# ---- mutants: the checks above catch the bugs they are for ----------------------------------------------------

MUTANTS = {
    # The probe is replaced by sm_80's layout, written out: right on sm_80 (layout 0), wrong on any other.
    "fixed_accumulator_layout": (
        "deleaker_flash.cuh",
        "row_scale[warp * 16 + (int)row_of.x[x]]",
        "row_scale[warp * 16 + lane / 4 + 8 * ((x / 2) % 2)]",
    ),
    # The barrier between writing the S tile and rescaling rows by other lanes' alphas goes.
    "missing_syncwarp": (
        "deleaker_flash.cuh",
        "    if (half == 0) row_scale[warp * 16 + r] = alpha;\n    __syncwarp();\n",
        "    if (half == 0) row_scale[warp * 16 + r] = alpha;\n",
    ),
    # A barrier reached by only some threads of the block.
    "divergent_syncthreads": (
        "deleaker_stats.cuh",
        "if (!win.need_affinity && !need_lse) return;",
        "if ((!win.need_affinity && !need_lse) || threadIdx.x == 5) return;",
    ),
}


def _mutant(name: str) -> cuda_emulator.EmulatedLibrary:
    return emulated_library((MUTANTS[name],))


def test_mutant_with_a_fixed_fragment_layout_is_caught(library):
    mutant = _mutant("fixed_accumulator_layout")
    good = _call(mutant, INSIDE)  # sm_80's layout: the hard-coded rows happen to be right
    _assert_identical(good, _call(library, INSIDE), "mutant on sm_80's layout")
    mutant.configure(layout_seed=12345)
    try:
        with pytest.raises(AssertionError, match="outputs differ"):
            _assert_identical(good, _call(mutant, INSIDE), "mutant on another layout")
    finally:
        mutant.configure()


def test_mutant_with_a_missing_barrier_is_caught(library):
    mutant = _mutant("missing_syncwarp")
    results = []
    for schedule_seed in (0, 1):
        mutant.configure(schedule_seed=schedule_seed)
        try:
            results.append(_call(mutant, INSIDE))
        finally:
            mutant.configure()
    with pytest.raises(AssertionError, match="outputs differ"):
        _assert_identical(results[0], results[1], "ascending vs descending order")


def test_mutant_with_a_divergent_barrier_fails_its_launch(library):
    mutant = _mutant("divergent_syncthreads")
    with pytest.raises(kernels.KernelLaunchError, match="wait at __syncthreads after 1 threads of their block exited"):
        _call(mutant, INSIDE)
    _call(library, INSIDE)  # the error does not stick to the (emulated) device


# ---- the TensorRT plugin's runtime path, with TensorRT's real descriptor types ----------------------------------


def _plugin_desc(trt, tensor: torch.Tensor):
    desc = trt.PluginTensorDesc()
    desc.type = tp.trt_dtype(trt, str(tensor.dtype).removeprefix("torch."))
    desc.format = trt.TensorFormat.LINEAR
    desc.dims = trt.Dims(list(tensor.shape))
    return desc


def test_tensorrt_plugin_enqueue_matches_the_reference_over_steps(library):
    """``on_shape_change`` and ``enqueue`` of our IPluginV3, called as an engine calls them (TensorRT's own
    ``PluginTensorDesc``s, addresses, a workspace of the size the plugin asked for, the step as a tensor input and
    the history threaded from one call's output to the next's input), drive the kernels; over steps crossing both
    windows the result is the reference's. TensorRT itself calls nothing here: see the module docstring of
    ``deleaker.plugins.trt_plugin``."""
    try:
        trt = tp.import_tensorrt()
    except tp.TensorRTUnavailableError as exc:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx imports: {exc}")
    grid, e_max, num_blocks, block_offset = (12, 11), 4, 2, 1
    fields = tp.PluginFields(
        block_offset=block_offset, num_blocks=num_blocks, grid_h=grid[0], grid_w=grid[1], config=CONFIG
    )
    _, creator_cls = tp.plugin_classes(trt)
    buffers: list = []
    plugin = creator_cls().create_plugin(
        tp.PLUGIN_NAME, tp.field_collection(trt, fields, buffers), trt.TensorRTPhase.RUNTIME
    )
    plugin.kernel_library = library
    plugin = plugin.attach_to_context(None)  # as TensorRT does per execution context: the clone keeps the library
    history = torch.zeros(2, e_max, grid[0] * grid[1])
    history_ref = None
    for step in range(5):  # block steps 1, 3, 5, 7, 9: before, aggregating, inside both, intervening, after
        block_step = step * num_blocks + block_offset
        (q, k, v), entity_mask = structured_inputs(2, 2, 77, grid, 64, 3, e_max, torch.bfloat16, 40 + step, "cpu")
        inputs = [q, k, v, entity_mask, history, torch.tensor([step], dtype=torch.int64)]
        outputs = [torch.full_like(q, float("nan")), torch.full_like(history, float("nan"))]
        input_desc = [_plugin_desc(trt, x) for x in inputs]
        output_desc = [_plugin_desc(trt, x) for x in outputs]
        plugin.on_shape_change(input_desc, output_desc)
        workspace_bytes = plugin.get_workspace_size(input_desc, output_desc)
        raw = torch.empty(workspace_bytes + 256, dtype=torch.uint8)
        workspace = raw.data_ptr() + (-raw.data_ptr() % 256)
        plugin.enqueue(
            input_desc, output_desc, [x.data_ptr() for x in inputs], [x.data_ptr() for x in outputs], workspace, 0
        )
        out, history = outputs
        ref_out, history_ref = deleaker_attention_reference(
            q.float(), k.float(), v.float(), entity_mask, grid=grid, block_step=block_step, history=history_ref,
            config=CONFIG,
        )
        torch.testing.assert_close(history, history_ref, rtol=1e-4, atol=1e-7, msg=f"history at step {step}")
        assert not out.isnan().any()
        assert rel_l2(out, ref_out) < 1e-2, step
    assert history.any(), "the history must have been aggregated"


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
    bad_fields = {**attrs, "do_smoothing": 3}
    with pytest.raises(trt_plugin_host.PluginDriveError, match="do_smoothing is a flag and must be 0 or 1, got 3"):
        trt_plugin_host.drive(plugin_host, plugin_host, bad_fields, [q, k, v, entity_mask, wrong_history, step],
                              outputs)
    assert outputs[0].isnan().all() and outputs[1].isnan().all(), "nothing may be written"
