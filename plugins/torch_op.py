"""The PyTorch fast path of DeLeaker attention: PyTorch's fused attention with statistics, then our CUDA kernels.

Per call (``FAST_PATH.md``): the plain output ``o`` and the row log-sum-exp ``l`` of every row come from the best
fused attention PyTorch has on the device (cuDNN, else flash, else memory-efficient, else plain math); then the
kernels of ``csrc/`` do only what DeLeaker adds and edit ``o`` in place on the rows of the entity masks.

Each provider's LSE convention (natural log or log2, shape ``(B, H, N)``, ``(B, H, N, 1)`` or padded) is checked
against ``torch.logsumexp`` once per (device, dtype, head dim), on the first call, outside any CUDA-graph
capture; a provider that disagrees (or raises) is skipped for the next. The kernel library is initialised once per
device the same way (``deleaker_init``: shared-memory limits, SM count). After that a call makes no host
synchronisation and no lazy setup, so it can be captured in a CUDA graph; a device ``block_step`` is read by the
kernels.

Importing this module registers `cuda_kernel` as the CUDA kernel of the core's op ``torch.ops.deleaker.attention``
(``deleaker.library``): the dependency runs from the plugins to the core, never back. Inputs the kernels do not
take (float32, other head dims, sizes beyond their grids) and a machine where the kernel library does not load
run the op's PyTorch reference.

Over 400 lines, one job (the fast path's host side): the fused-attention providers with their one-time LSE check,
the launch of the kernels over one workspace, and the debug views that read that workspace back share its layout
and checks; apart, each would need the others' internals.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

import torch

from deleaker.config import DeLeakerConfig
from deleaker.decomposed import DEFAULT_FALLBACK_THRESHOLD, check_fallback_threshold, plain_attention_with_lse
from deleaker.errors import ShapeError
from deleaker.library import attention, block_step_of, config_from_knobs, reference_kernel
from deleaker.ops import check_attention_inputs

from . import kernels

Tensor = torch.Tensor
BlockStep = Union[int, Tensor]

_DTYPES = {torch.float16: kernels.DTYPE_FLOAT16, torch.bfloat16: kernels.DTYPE_BFLOAT16}
_HEAD_DIMS = (64, 128)


@functools.cache
def _library_or_none() -> "kernels.KernelLibrary | None":
    try:
        return kernels.load_library()
    except Exception:  # noqa: BLE001 - is_available() must never raise; the cause is re-raised by library()
        return None


def is_available() -> bool:
    """True iff a CUDA device is present and the kernel library loads (building it if allowed). Never raises."""
    try:
        return torch.cuda.is_available() and _library_or_none() is not None
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "not available"
        return False


def _takes(q: Tensor) -> bool:
    return bool(q.is_cuda and q.dtype in _DTYPES and q.dim() == 4 and q.shape[-1] in _HEAD_DIMS)


def supports(q: Tensor, entity_mask: Tensor) -> bool:
    """True for CUDA ``q`` of dtype float16 / bfloat16 with head dim 64 or 128 (the kernels' instantiations),
    at most ``kernels.MAX_ENTITIES`` entity rows and sizes within the kernels' grids (`kernel_shape_problem`);
    callers run the reference otherwise."""
    return _takes(q) and kernel_shape_problem(q, entity_mask) is None


def _refuse_under_capture(what: str) -> None:
    if torch.cuda.is_current_stream_capturing():
        raise kernels.KernelLaunchError(
            f"{what} must run once outside CUDA-graph capture: make one eager call on this device (and dtype) "
            f"before capturing"
        )


@functools.cache
def initialised_library(device_index: int) -> "kernels.KernelLibrary":
    """The kernel library, with ``deleaker_init`` done on CUDA device ``device_index`` (once, never under capture)."""
    library = kernels.load_library()
    with torch.cuda.device(device_index):
        _refuse_under_capture("the kernel library's init")
        library.init()
    return library


# ---- plain attention with LSE: the providers and their one-time check -------------------------------------------


@dataclass(frozen=True)
class AttentionProvider:
    """A fused attention that returns the row LSE; ``lse_factor`` turns its LSE into natural log (1 or ln 2)."""

    name: str
    attention: Callable[[Tensor, Tensor, Tensor, float], Tuple[Tensor, Tensor]]  # -> (o, raw LSE)
    lse_factor: float = 1.0

    def run(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
        """``(o, lse)``: ``o`` ``(B, H, N, D)`` like ``q``, ``lse`` ``(B, H, N)`` float32, natural log, rows
        contiguous."""
        o, raw = self.attention(q, k, v, scale)
        lse = _normalised_lse(raw, q.shape[2])
        if self.lse_factor != 1.0:
            lse = lse * self.lse_factor
        return o, lse if lse.stride(-1) == 1 else lse.contiguous()


def _normalised_lse(raw: Tensor, tokens: int) -> Tensor:
    """``(B, H, N)`` float32 from ``(B, H, N)``, ``(B, H, N, 1)`` or ``(B, H, >= N)`` (padded rows dropped)."""
    lse = raw.squeeze(-1) if raw.dim() == 4 and raw.shape[-1] == 1 else raw
    if lse.dim() != 3 or lse.shape[-1] < tokens:
        raise ShapeError(f"unexpected LSE shape {tuple(raw.shape)} for {tokens} rows")
    return lse[..., :tokens].to(torch.float32)


def _cudnn(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _flash(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _efficient(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return out[0], out[1]


#: In order of preference; plain math (``deleaker.decomposed.plain_attention_with_lse``, memory N^2) comes last.
PROVIDERS = (
    AttentionProvider("cudnn", _cudnn),
    AttentionProvider("flash", _flash),
    AttentionProvider("efficient", _efficient),
    AttentionProvider("math", plain_attention_with_lse),
)


def lse_factor(provider: AttentionProvider, q: Tensor, k: Tensor, v: Tensor, scale: float) -> float | None:
    """1.0 or ln 2 if ``provider``'s output and LSE agree with plain math on ``q, k, v`` (natural log or log2);
    None if it disagrees or raises."""
    try:
        o, lse = provider.run(q, k, v, scale)
    except (RuntimeError, ShapeError, NotImplementedError):
        return None
    o_ref, lse_ref = plain_attention_with_lse(q, k, v, scale)
    err = float((o.float() - o_ref.float()).norm() / o_ref.float().norm())
    if not err < 2e-2:
        return None
    for factor in (1.0, math.log(2.0)):
        if torch.allclose(lse * factor, lse_ref, rtol=1e-4, atol=1e-3):
            return factor
    return None


@functools.cache
def checked_provider(device_index: int, dtype: torch.dtype, head_dim: int) -> AttentionProvider:
    """The first provider of `PROVIDERS` whose output and LSE agree with plain math on a probe of this device,
    dtype and head dim (checked once, never under capture; the probe synchronises)."""
    with torch.cuda.device(device_index):
        _refuse_under_capture("the check of the fused attention's LSE convention")
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 2, 333, head_dim, generator=g, device="cuda").to(dtype) for _ in range(3))
        scale = 1.0 / math.sqrt(head_dim)
        for provider in PROVIDERS:
            factor = lse_factor(provider, q, k, v, scale)
            if factor is not None:
                return AttentionProvider(provider.name, provider.attention, factor)
    raise kernels.KernelLaunchError(f"no fused attention agrees with plain math on cuda:{device_index} {dtype}")


# ---- the op ------------------------------------------------------------------------------------------------------


def deleaker_attention_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
) -> Tuple[Tensor, Tensor]:
    """`deleaker.deleaker_attention` on the fused attention and the CUDA kernels.

    Args:
        q, k, v: ``(B, H, N, D)`` float16 / bfloat16 CUDA tensors, text tokens first, ``D`` in (64, 128).
        entity_mask: ``(E_max, T)`` bool, ``E_max <= 8``.
        grid: ``(gh, gw)`` with ``gh * gw == N - T``.
        block_step: int, or an integer tensor (on the device it is read by the kernels: no host sync).
        history: ``None`` (zeros) or ``(B, E_max, gh * gw)`` float32.
        config: the knobs, used as given.
        fallback_threshold: rows whose normaliser Z is below it are recomputed exactly (in (0, 1]).

    Returns:
        ``out`` ``(B, H, N, D)`` like ``q`` and the new history ``(B, E_max, gh * gw)`` float32.
    """
    out, new_history, _ = _run(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config,
        fallback_threshold=fallback_threshold, debug=False,
    )
    return out, new_history


def deleaker_attention_cuda_debug(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """`deleaker_attention_cuda` plus the intermediates, read from the workspace (see `debug_views`), and the
    name of the fused attention used (``views["provider"]``, a str)."""
    return _run(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config,
        fallback_threshold=fallback_threshold, debug=True,
    )


def _strides(x: Tensor) -> Tuple[int, int, int]:
    """Batch, head and row strides in elements; 0 for a dimension of size 1 (whose stride is never used)."""
    return _zeroed_strides(tuple(x.shape), x.stride())


def _zeroed_strides(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> Tuple[int, int, int]:
    # One shape and one stride query per tensor: each x.stride(d) / x.shape[d] is a call into torch (host time).
    return (
        stride[0] if shape[0] > 1 else 0,
        stride[1] if shape[1] > 1 else 0,
        stride[2] if shape[2] > 1 else 0,
    )


def _rows_ok(x: Tensor) -> bool:
    # The kernels read rows with 16-byte accesses: the last dimension contiguous, every other stride 8-aligned.
    shape, stride = tuple(x.shape), x.stride()
    batch, head, row = _zeroed_strides(shape, stride)
    return (
        (stride[-1] == 1 or shape[-1] == 1)
        and batch % 8 == 0
        and head % 8 == 0
        and row % 8 == 0
        and x.data_ptr() % 16 == 0
    )


def _contiguous_rows(x: Tensor) -> Tensor:
    return x if _rows_ok(x) else x.clone(memory_format=torch.contiguous_format)


def _check_tensor(name: str, x: Tensor, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(x.shape) != shape or x.dtype != dtype or x.device != device:
        raise ShapeError(
            f"{name} must be a {dtype} tensor of shape {shape} on {device}, got {x.dtype} {tuple(x.shape)} on "
            f"{x.device}"
        )


def _run(q, k, v, entity_mask, *, grid, block_step, history, config, fallback_threshold, debug):
    check_attention_inputs(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config)
    if not _takes(q):
        raise ShapeError(
            f"the CUDA kernels take CUDA float16/bfloat16 q, k, v with head dim in {_HEAD_DIMS}, got "
            f"{q.dtype} on {q.device} with head dim {q.shape[-1]}"
        )
    _check_kernel_shapes(q, entity_mask)
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    library = initialised_library(device_index)
    provider = checked_provider(device_index, q.dtype, q.shape[-1])
    with torch.cuda.device(device_index):
        plain, lse = provider.run(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        out, new_history, views = launch_kernels(
            library, q, k, v, entity_mask, out=_contiguous_rows(plain), lse=lse, grid=grid, block_step=block_step,
            history=history, config=config, stream=torch.cuda.current_stream().cuda_stream,
            debug=debug, fallback_threshold=fallback_threshold,
        )
    if views is not None:
        views["provider"] = provider.name
    return out, new_history, views


def kernel_shape_problem(q: Tensor, entity_mask: Tensor) -> str | None:
    """Why the kernels cannot take ``q`` ``(B, H, N, D)`` and ``entity_mask`` ``(E_max, T)`` (already checked as
    inputs of the op), or None. The library refuses the same sizes at launch, but only after the fused attention
    ran: a batch or head count beyond its launch grids used to reach it from `supports` (which said yes)."""
    if q.dtype not in _DTYPES or q.shape[-1] not in _HEAD_DIMS:
        return (
            f"the kernels take float16/bfloat16 q with head dim in {_HEAD_DIMS}, got {q.dtype} with head dim "
            f"{q.shape[-1]}"
        )
    if entity_mask.shape[0] > kernels.MAX_ENTITIES:
        return f"the CUDA kernels take at most {kernels.MAX_ENTITIES} entity rows, got {entity_mask.shape[0]}"
    batch, heads, tokens, _ = q.shape
    image_tokens = tokens - entity_mask.shape[1]
    for name, value, limit in (
        ("batch", batch, kernels.MAX_KERNEL_BATCH),
        ("heads", heads, kernels.MAX_HEADS),
        ("image tokens (gh * gw)", image_tokens, kernels.MAX_IMAGE_TOKENS),
        ("tokens (N)", tokens, kernels.MAX_TOKENS),
    ):
        if value > limit:
            return f"the CUDA kernels take {name} up to {limit}, got {value}"
    return None


def _check_kernel_shapes(q: Tensor, entity_mask: Tensor) -> None:
    problem = kernel_shape_problem(q, entity_mask)
    if problem is not None:
        raise ShapeError(problem)


def launch_kernels(
    library: "kernels.KernelLibrary",
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    out: Tensor,
    lse: Tensor,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
    stream: int,
    debug: bool,
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor] | None]:
    """Tensors to `kernels.DeLeakerParams`, one launch of ``library`` on ``stream``, and the outputs.

    The one place tensors become kernel arguments. It takes whatever memory ``library`` addresses: CUDA tensors
    for the real library, CPU tensors for the CPU emulation of the tests (``tests/cuda_emulator``). ``library``
    must be initialised on the current device. A tensor ``block_step`` on ``q``'s device is read by the kernels;
    one on the CPU next to CUDA inputs is read here. Inputs are checked by the caller.

    Args:
        out: ``(B, H, N, D)`` like ``q``: the plain attention output ``softmax(s) v`` of every row, edited in place
            (rows of the entity masks); last dimension contiguous, other strides multiples of 8.
        lse: ``(B, H, N)`` float32, the natural-log row log-sum-exp of ``s = q k^T / sqrt(D)``, rows contiguous.

    Returns:
        ``(out, new_history, views)``; ``views`` (see `debug_views`) only with ``debug``, else None.
    """
    _check_kernel_shapes(q, entity_mask)
    check_fallback_threshold(fallback_threshold)
    num_entities, text_len = entity_mask.shape
    batch, heads, tokens, head_dim = q.shape
    image_tokens = grid[0] * grid[1]
    q, k, v = (_contiguous_rows(x) for x in (q, k, v))
    _check_tensor("out", out, tuple(q.shape), q.dtype, q.device)
    if not _rows_ok(out):
        raise ShapeError("out must have a contiguous last dimension, 16-byte aligned rows and strides of 8 elements")
    _check_tensor("lse", lse, (batch, heads, tokens), torch.float32, q.device)
    if lse.stride(-1) != 1:
        raise ShapeError(f"lse rows must be contiguous (stride 1 over N), got strides {lse.stride()}")
    new_history = torch.empty((batch, num_entities, image_tokens), dtype=torch.float32, device=q.device)
    if debug:
        new_history.fill_(math.nan)  # poison: an element the kernels do not write shows in tests
    history_in = history.contiguous() if history is not None else None
    mask_bytes = entity_mask.to(torch.uint8).contiguous()
    plain = out.clone() if debug else None

    step_tensor = None
    if isinstance(block_step, torch.Tensor) and block_step.device != q.device and block_step.device.type == "cpu":
        block_step = int(block_step.reshape(()))  # a CPU scalar costs no device sync
    if not isinstance(block_step, torch.Tensor) and block_step >= 2**31:
        # The params' block offset is an int32; the device step is an int64, as the op's contract allows. Copying
        # it to the device is no capturable work: a graph must be given the step as a device tensor.
        if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ShapeError(
                f"a Python block step of 2**31 or more ({block_step}) cannot be captured in a CUDA graph: pass the "
                "step as an int64 device tensor"
            )
        block_step = torch.tensor(block_step, dtype=torch.int64, device=q.device)
    if isinstance(block_step, torch.Tensor):
        step_tensor = block_step.reshape(()).to(device=q.device, dtype=torch.int64)
        block_offset, num_blocks = 0, 1
    else:
        block_offset, num_blocks = int(block_step), 1

    template, workspace_bytes = _launch_template(
        library, tuple(q.shape), q.dtype, q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(), text_len,
        num_entities, (int(grid[0]), int(grid[1])), config, float(fallback_threshold),
    )
    params = kernels.DeLeakerParams.from_buffer_copy(template)
    params.q, params.k, params.v, params.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    params.lse, params.entity_mask = lse.data_ptr(), mask_bytes.data_ptr()
    params.history_in = history_in.data_ptr() if history_in is not None else None
    params.history_out = new_history.data_ptr()
    params.step = step_tensor.data_ptr() if step_tensor is not None else None
    params.block_offset, params.num_blocks = block_offset, num_blocks
    # The kernels want it 256-byte aligned: CUDA allocations are; host memory (the emulator's) may not be.
    raw_workspace = torch.empty(workspace_bytes + 512, dtype=torch.uint8, device=q.device)
    if debug:
        raw_workspace.fill_(0xFF)  # poison (NaN as floats): a kernel that reads what nobody wrote shows in tests
    start = -raw_workspace.data_ptr() % 256
    workspace = raw_workspace[start : start + max(workspace_bytes, 256)]
    library.launch(params, workspace.data_ptr(), workspace_bytes, stream)
    views = debug_views(library, params, workspace, plain=plain, lse=lse) if debug else None
    # Temporaries (workspace, copies) may be freed now: the caching allocator reuses their memory only for work
    # queued later on this stream, so after the kernels.
    return out, new_history, views


@functools.lru_cache(maxsize=256)
def _launch_template(
    library: "kernels.KernelLibrary",
    shape: Tuple[int, int, int, int],
    dtype: torch.dtype,
    q_stride: Tuple[int, ...],
    k_stride: Tuple[int, ...],
    v_stride: Tuple[int, ...],
    o_stride: Tuple[int, ...],
    lse_stride: Tuple[int, ...],
    text_len: int,
    num_entities: int,
    grid: Tuple[int, int],
    config: DeLeakerConfig,
    fallback_threshold: float,
) -> Tuple["kernels.DeLeakerParams", int]:
    """The per-shape host state of a launch: `kernels.DeLeakerParams` with every field but the pointers and the
    block step filled in (a template each call copies), and the workspace size the library asks for. Built once
    per (library, shape, strides, knobs), keyed by the tensors' own ``stride()`` tuples: a call then copies the
    structure and sets its pointers instead of building it field by field and asking the library again (host
    time per call, issue 21 item 5)."""
    batch, heads, tokens, head_dim = shape
    strides = {}
    for name, stride in (("q", q_stride), ("k", k_stride), ("v", v_stride), ("o", o_stride)):
        for dim, value in zip(("batch", "head", "row"), _zeroed_strides(shape, stride)):
            strides[f"{name}_{dim}_stride"] = value
    params = kernels.DeLeakerParams(
        **strides,
        lse_batch_stride=lse_stride[0],
        lse_head_stride=lse_stride[1],
        batch=batch,
        heads=heads,
        tokens=tokens,
        text_tokens=text_len,
        head_dim=head_dim,
        grid_h=grid[0],
        grid_w=grid[1],
        num_entities=num_entities,
        dtype=_DTYPES[dtype],
        softmax_scale=1.0 / math.sqrt(head_dim),
        fallback_threshold=fallback_threshold,
        **kernels.config_fields(config),
        reserved=0,
    )
    return params, library.workspace_bytes(params)


def debug_views(
    library: "kernels.KernelLibrary", params: "kernels.DeLeakerParams", workspace: Tensor, *, plain: Tensor,
    lse: Tensor
) -> Dict[str, Tensor]:
    """The intermediates of one launch, read from its workspace (waits for nothing: call after the kernels ran).

    Always valid: ``plain`` ``(B, H, N, D)`` (``out`` before the launch), ``lse`` ``(B, H, N)``, ``source``
    ``(B, E, Nimg)`` float32 and ``affinity`` (zeros where the window did not need it). Valid inside the
    intervention window only: ``raw_masks`` and ``masks`` ``(B, E, Nimg)`` bool, ``union_count`` ``(B,)`` int32,
    ``union_index`` ``(B, Nimg)`` int32 (U first), ``thresholds`` ``(B, E, E)`` float32 (NaN where a pair cuts
    nothing, and everywhere when ``do_image_image`` is off), ``z`` ``(B, H, Nimg)`` float32 (1 outside U),
    ``fallback`` ``(B, H, Nimg)`` bool (rows recomputed exactly), ``fallback_count`` ``()`` int32 and, when the
    union fits one band, ``cut`` ``(B, Nimg, Nimg)`` bool (the cut image-image logits).
    """
    layout = library.workspace_layout(params)
    b, h, e = params.batch, params.heads, params.num_entities
    n = params.grid_h * params.grid_w
    device = workspace.device

    def view(offset: int, dtype: torch.dtype, shape: Tuple[int, ...]) -> Tensor:
        count = math.prod(shape)
        size = torch.empty(0, dtype=dtype).element_size()
        return workspace[offset : offset + count * size].view(dtype).reshape(shape).clone()

    # Outside the window (or before the union kernel) counts are whatever the workspace held: clamp them.
    union_count = view(layout.union_count, torch.int32, (b,)).clamp(0, n)
    union_index = view(layout.union_index, torch.int32, (b, n)).long()
    in_union = torch.zeros(b, n, dtype=torch.bool, device=device)
    for i in range(b):
        count = int(union_count[i])
        in_union[i, union_index[i, :count]] = True
    z = view(layout.z, torch.float32, (b, h, n))
    z = torch.where(in_union[:, None, :], z, torch.ones_like(z))

    bands, band_rows = int(layout.bands), int(layout.band_rows)
    counts = view(layout.fallback_counts, torch.int32, (b, h, bands)).clamp(0, band_rows)
    rows = view(layout.fallback_rows, torch.int32, (b, h, n)).long()
    fallback = torch.zeros(b, h, n, dtype=torch.bool, device=device)
    for i in range(b):
        for j in range(h):
            for band in range(bands):
                listed = rows[i, j, band * band_rows : band * band_rows + int(counts[i, j, band])]
                fallback[i, j, union_index[i, listed]] = True

    views = {
        "plain": plain,
        "lse": lse,
        "affinity": view(layout.affinity, torch.float32, (b, e, n)),
        "source": view(layout.source, torch.float32, (b, e, n)),
        "raw_masks": view(layout.raw_masks, torch.uint8, (b, e, n)).bool(),
        "masks": view(layout.masks, torch.uint8, (b, e, n)).bool(),
        "union_count": union_count,
        "union_index": union_index.to(torch.int32),
        "thresholds": (
            view(layout.thresholds, torch.float32, (b, e, e))
            if params.do_image_image
            else torch.full((b, e, e), math.nan, device=device)
        ),
        "z": z,
        "fallback": fallback,
        "fallback_count": view(layout.fallback_count, torch.int32, ()),
    }
    if bands == 1:
        cut = torch.zeros(b, n, n, dtype=torch.bool, device=device)
        if params.do_image_image:
            tiles = int(layout.tiles)
            words = view(layout.cut_bits, torch.int64, (b, band_rows, tiles))
            bits = ((words[..., None] >> torch.arange(64, device=device)) & 1).bool().reshape(b, band_rows, -1)
            for i in range(b):
                count = int(union_count[i])
                members = union_index[i, :count]
                cut[i, members[:, None], members[None, :]] = bits[i, :count, :count]
        views["cut"] = cut
    return views


# ---- the op's CUDA kernel --------------------------------------------------------------------------------------


@attention.register_kernel("cuda")
def cuda_kernel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    history: Tensor,
    step: Tensor,
    block_offset: int,
    num_blocks: int,
    grid_h: int,
    grid_w: int,
    *knobs,
) -> Tuple[Tensor, Tensor]:
    """``torch.ops.deleaker.attention`` on CUDA: `deleaker_attention_cuda` where the kernels take the inputs and
    are built, the PyTorch reference otherwise. A device step is read by the kernels (no host synchronisation)."""
    mask = entity_mask.to(torch.bool)
    if not (is_available() and supports(q, mask)):
        return reference_kernel(q, k, v, mask, history, step, block_offset, num_blocks, grid_h, grid_w, *knobs)
    out, new_history = deleaker_attention_cuda(
        q,
        k,
        v,
        mask,
        grid=(grid_h, grid_w),
        block_step=block_step_of(step, block_offset, num_blocks),
        history=history,
        config=config_from_knobs(*knobs),
    )
    # The op's outputs are contiguous (its fake implementation says so to the compiler); the fused attention may
    # give q's layout.
    return out.contiguous(), new_history
