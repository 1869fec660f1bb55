"""The CUDA fast path (PyTorch's fused attention, then our kernels) against the decomposed op on a GPU (skipped
without one).

The checks themselves live in ``kernel_checks.py``; ``test_kernels_emulated.py`` runs the same checks on the CPU
emulation of the same source. Only what needs a real device stays here: the fused attention's LSE convention,
the FLUX.1-dev shape and 2048x2048, CUDA graphs, the device step, the torch op's typed errors on CUDA tensors.
Every run goes through ``deleaker_attention_cuda_debug``, which poisons the workspace and the history output
(NaN) before the kernels run.
"""

from __future__ import annotations

import math

import pytest
import torch

from deleaker import ShapeError
from deleaker.decomposed import decomposed_intermediates
from kernel_checks import (
    CONFIG,
    INSIDE,
    check_fallback,
    check_history_threaded,
    check_matches_decomposed,
    check_corrections_beyond_fp16_fall_back,
    check_overflowing_corrections_fall_back,
    check_plain_outside_window,
    check_switch_off,
    rel_l2,
    shape_id,
    structured_inputs,
)

pytestmark = pytest.mark.gpu

SHAPES = [
    # batch, heads, T, grid, head_dim, entities, E_max
    (1, 2, 77, (7, 9), 64, 2, 4),
    (2, 3, 77, (33, 33), 128, 3, 4),
    (1, 2, 256, (16, 16), 128, 4, 4),
    (2, 2, 512, (20, 24), 64, 4, 8),
    (1, 4, 256, (32, 32), 128, 2, 4),
    (1, 2, 77, (33, 33), 64, 3, 8),
]
#: FLUX.1-dev at 1024x1024 (24 heads x 128, a 64x64 grid, T = 512).
FLUX_1024 = (1, 24, 512, (64, 64), 128, 4, 4)
#: 2048x2048: a 128x128 grid, 4 bands of the union. Two heads keep the float64 reference within a GPU's memory.
FLUX_2048 = (1, 2, 512, (128, 128), 128, 3, 4)


def skip_without_cuda() -> None:
    """Skip the calling test unless a CUDA device and the kernel library (built or buildable) are there."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from deleaker.plugins import kernels, kernels_build as build

    try:
        kernels.load_library()
    except build.NvccNotFoundError as exc:
        pytest.skip(f"the kernel library cannot be built here: {exc}")


@pytest.fixture(autouse=True)
def _cuda_and_exact_fp32():
    skip_without_cuda()
    # The fp32 references must not silently run their matmuls in TF32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cuda_op():
    from deleaker.plugins import torch_op

    return torch_op


def run_cuda(*args, **kwargs):
    """The torch op with its debug views, finished."""
    result = _cuda_op().deleaker_attention_cuda_debug(*args, **kwargs)
    torch.cuda.synchronize()
    return result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_matches_decomposed_inside_window(shape, dtype):
    seed = 10 * SHAPES.index(shape) + (dtype == torch.bfloat16)
    check_matches_decomposed(run_cuda, shape, dtype, seed, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [FLUX_1024, FLUX_2048], ids=["flux_1024", "flux_2048"])
def test_flux_shapes_match_decomposed(shape, dtype):
    views = check_matches_decomposed(run_cuda, shape, dtype, 1, device="cuda")
    assert int(views["union_count"].max()) > 64 * 4, "the masks should cover many tiles"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_outside_window_out_is_the_plain_attention(dtype, head_dim):
    check_plain_outside_window(run_cuda, dtype, head_dim, (33, 33), device="cuda")


@pytest.mark.parametrize(
    "switch",
    ["do_smoothing", "do_image_image", "do_image_text_strengthening", "do_image_text_weakening", "use_history"],
)
def test_each_switch_off_matches_decomposed(switch):
    check_switch_off(run_cuda, switch, device="cuda")


@pytest.mark.parametrize("use_history", [True, False])
def test_history_threaded_over_block_steps(use_history):
    check_history_threaded(run_cuda, use_history, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rows_almost_all_cut_fall_back(dtype):
    check_fallback(run_cuda, dtype, device="cuda")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_whose_correction_overflows_fall_back(head_dim):
    check_overflowing_corrections_fall_back(run_cuda, head_dim, device="cuda")


def test_corrections_beyond_fp16_fall_back():
    check_corrections_beyond_fp16_fall_back(run_cuda, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_attention_lse_is_natural_log_per_row(dtype, head_dim):
    """The provider chosen on this device returns o and a natural-log (B, H, N) LSE that match plain math."""
    op = _cuda_op()
    provider = op.checked_provider(torch.cuda.current_device(), dtype, head_dim)
    q, k, v = (torch.randn(2, 3, 517, head_dim, device="cuda").to(dtype) for _ in range(3))
    o, lse = provider.run(q, k, v, 1.0 / math.sqrt(head_dim))
    s = q.float() @ k.float().transpose(-1, -2) / math.sqrt(head_dim)
    assert lse.shape == (2, 3, 517) and lse.dtype == torch.float32 and lse.stride(-1) == 1
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-4, atol=1e-3)
    assert rel_l2(o, torch.softmax(s, -1) @ v.float()) < 1e-2
    print(f"fused attention on this device: {provider.name} (LSE factor {provider.lse_factor})")


def test_cuda_graph_replay_equals_eager_bit_for_bit():
    """A captured call replays with new inputs and a new device step, inside and outside the window, and equals
    an eager call bit for bit (fixed-order reductions)."""
    grid = (16, 16)
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, grid, 128, 2, 4, torch.bfloat16, seed=7)
    step = torch.tensor(0, device="cuda", dtype=torch.int64)
    history = torch.zeros(1, 4, 256, device="cuda")
    op = _cuda_op().deleaker_attention_cuda

    def call():
        return op(q, k, v, entity_mask, grid=grid, block_step=step, history=history, config=CONFIG)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up: library init and the fused attention's check, outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_history = call()

    for t, seed in ((INSIDE, 8), (0, 9), (INSIDE, 10)):
        (q2, k2, v2), _ = structured_inputs(1, 2, 77, grid, 128, 2, 4, torch.bfloat16, seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        step.fill_(t)
        history.uniform_(0.0, 1e-3)
        graph.replay()
        eager_out, eager_history = call()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager_out), t
        assert torch.equal(static_history, eager_history), t
        ref = decomposed_intermediates(q, k, v, entity_mask, grid=grid, block_step=t, history=history,
                                       config=CONFIG)
        assert rel_l2(static_out, ref.out) < 1e-2, t


def test_bad_inputs_raise_typed_errors():
    (q, k, v), entity_mask = structured_inputs(1, 2, 77, (7, 9), 64, 2, 4, torch.float16, seed=1)
    op = _cuda_op()
    assert op.is_available() and op.supports(q, entity_mask)
    assert not op.supports(q.float(), entity_mask) and not op.supports(q[..., :32].contiguous(), entity_mask)
    assert not op.supports(q, torch.zeros(op.kernels.MAX_ENTITIES + 1, 77, dtype=torch.bool, device="cuda"))
    with pytest.raises(ShapeError, match="float16/bfloat16"):
        op.deleaker_attention_cuda(
            q.float(), k.float(), v.float(), entity_mask, grid=(7, 9), block_step=0, history=None, config=CONFIG
        )
    many = torch.zeros(9, 77, dtype=torch.bool, device="cuda")
    many[0, 0] = many[1, 1] = True
    with pytest.raises(ShapeError, match="at most 8"):
        op.deleaker_attention_cuda(q, k, v, many, grid=(7, 9), block_step=0, history=None, config=CONFIG)
    with pytest.raises(ShapeError, match="grid"):
        op.deleaker_attention_cuda(q, k, v, entity_mask, grid=(9, 9), block_step=0, history=None, config=CONFIG)
    with pytest.raises(ShapeError, match="fallback_threshold"):
        op.deleaker_attention_cuda(q, k, v, entity_mask, grid=(7, 9), block_step=INSIDE, history=None,
                                   config=CONFIG, fallback_threshold=0.0)
