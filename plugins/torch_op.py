"""The PyTorch fast path of DeLeaker attention: the CUDA kernels of ``csrc/`` on torch tensors.

`deleaker.plugins_bridge` calls `is_available`, `supports` and `deleaker_attention_cuda`; the custom op
``torch.ops.deleaker.attention`` already reaches this module through `deleaker.deleaker_attention` on CUDA
inputs, so no separate CUDA kernel is registered for it (a registration would only duplicate that dispatch).

Outputs, history and workspace are allocated with torch (the caching allocator) and the kernels run on
``torch.cuda.current_stream()``, with no host synchronisation: a device ``block_step`` is read by the kernels,
so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Tuple, Union

import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import ShapeError
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
    """True for CUDA ``q`` of dtype float16 / bfloat16 with head dim 64 or 128 (the kernels' instantiations)
    and at most ``kernels.MAX_ENTITIES`` entity rows; callers run the reference otherwise."""
    return _takes(q) and entity_mask.shape[0] <= kernels.MAX_ENTITIES


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
    out: Tensor | None = None,
    new_history: Tensor | None = None,
) -> Tuple[Tensor, Tensor]:
    """`deleaker.deleaker_attention` on the CUDA kernels.

    Args:
        q, k, v: ``(B, H, N, D)`` float16 / bfloat16 CUDA tensors, text tokens first, ``D`` in (64, 128).
        entity_mask: ``(E_max, T)`` bool, ``E_max <= 8``.
        grid: ``(gh, gw)`` with ``gh * gw == N - T``.
        block_step: int, or an integer tensor (on the device it is read by the kernels: no host sync).
        history: ``None`` (zeros) or ``(B, E_max, gh * gw)`` float32.
        config: the knobs, used as given.
        out, new_history: optional preallocated outputs (contiguous, shapes and dtypes of the results);
            ``new_history`` may be ``history`` itself (updated in place).

    Returns:
        ``out`` ``(B, H, N, D)`` like ``q`` and the new history ``(B, E_max, gh * gw)`` float32.
    """
    out, new_history, _ = _run(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config,
        out=out, new_history=new_history, debug=False,
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
    out: Tensor | None = None,
    new_history: Tensor | None = None,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """`deleaker_attention_cuda` plus the kernels' intermediates, read from the workspace (for tests).

    The dict holds ``affinity`` and ``source`` ``(B, E, Nimg)`` float32, ``lse`` ``(B, H, Nimg)`` float32 and,
    valid only inside the intervention window, ``raw_masks`` and ``masks`` ``(B, E, Nimg)`` bool (before / after
    the morphology), ``union_count`` ``(B,)`` int32 and ``cut`` ``(B, Nimg, Nimg)`` bool (the cut image-image
    logits; all False when ``do_image_image`` is off). ``lse`` is written only when the image-image pass runs.
    """
    return _run(
        q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config,
        out=out, new_history=new_history, debug=True,
    )


def _strides(x: Tensor) -> Tuple[int, int, int]:
    """Batch, head and row strides in elements; 0 for a dimension of size 1 (whose stride is never used)."""
    return tuple(x.stride(d) if x.shape[d] > 1 else 0 for d in range(3))


def _contiguous_rows(x: Tensor) -> Tensor:
    # The kernels read rows with 16-byte loads: the last dimension contiguous, every other stride 8-aligned.
    ok = (x.stride(-1) == 1 or x.shape[-1] == 1) and all(s % 8 == 0 for s in _strides(x)) and x.data_ptr() % 16 == 0
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def _check_output(name: str, x: Tensor, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(x.shape) != shape or x.dtype != dtype or x.device != device or not x.is_contiguous():
        raise ShapeError(
            f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, got {x.dtype} "
            f"{tuple(x.shape)} on {x.device} (contiguous: {x.is_contiguous()})"
        )


def _run(q, k, v, entity_mask, *, grid, block_step, history, config, out, new_history, debug):
    check_attention_inputs(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config)
    if not _takes(q):
        raise ShapeError(
            f"the CUDA kernels take CUDA float16/bfloat16 q, k, v with head dim in {_HEAD_DIMS}, got "
            f"{q.dtype} on {q.device} with head dim {q.shape[-1]}"
        )
    _check_kernel_shapes(q, entity_mask)
    with torch.cuda.device(q.device):
        return launch_kernels(
            kernels.load_library(), q, k, v, entity_mask, grid=grid, block_step=block_step, history=history,
            config=config, out=out, new_history=new_history, stream=torch.cuda.current_stream(q.device).cuda_stream,
            debug=debug,
        )


def _check_kernel_shapes(q: Tensor, entity_mask: Tensor) -> None:
    if q.dtype not in _DTYPES or q.shape[-1] not in _HEAD_DIMS:
        raise ShapeError(
            f"the kernels take float16/bfloat16 q with head dim in {_HEAD_DIMS}, got {q.dtype} with head dim "
            f"{q.shape[-1]}"
        )
    if entity_mask.shape[0] > kernels.MAX_ENTITIES:
        raise ShapeError(
            f"the CUDA kernels take at most {kernels.MAX_ENTITIES} entity rows, got {entity_mask.shape[0]}"
        )


def launch_kernels(
    library: "kernels.KernelLibrary",
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
    out: Tensor | None,
    new_history: Tensor | None,
    stream: int,
    debug: bool,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor] | None]:
    """Tensors to `kernels.DeLeakerParams`, one launch of ``library`` on ``stream``, and the outputs.

    The one place tensors become kernel arguments. It takes whatever memory ``library`` addresses: CUDA tensors
    for the real library, CPU tensors for the CPU emulation of the tests (``tests/cuda_emulator``). A tensor
    ``block_step`` on ``q``'s device is read by the kernels; one on the CPU next to CUDA inputs is read here.
    Inputs are checked by the caller.
    """
    _check_kernel_shapes(q, entity_mask)
    num_entities, text_len = entity_mask.shape
    batch, heads, tokens, head_dim = q.shape
    image_tokens = grid[0] * grid[1]
    q, k, v = (_contiguous_rows(x) for x in (q, k, v))
    if out is None:
        out = torch.empty((batch, heads, tokens, head_dim), dtype=q.dtype, device=q.device)
    _check_output("out", out, (batch, heads, tokens, head_dim), q.dtype, q.device)
    if new_history is None:
        new_history = torch.empty((batch, num_entities, image_tokens), dtype=torch.float32, device=q.device)
    _check_output("new_history", new_history, (batch, num_entities, image_tokens), torch.float32, q.device)
    history_in = history.contiguous() if history is not None else None
    mask_bytes = entity_mask.to(torch.uint8).contiguous()

    step_tensor = None
    if isinstance(block_step, torch.Tensor) and block_step.device != q.device and block_step.device.type == "cpu":
        block_step = int(block_step.reshape(()))  # a CPU scalar costs no device sync
    if isinstance(block_step, torch.Tensor):
        step_tensor = block_step.reshape(()).to(device=q.device, dtype=torch.int64)
        block_offset, num_blocks = 0, 1
    else:
        if block_step >= 2**31:
            raise ShapeError(f"block_step must be < 2**31, got {block_step}")
        block_offset, num_blocks = int(block_step), 1

    params = kernels.DeLeakerParams(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        out=out.data_ptr(),
        entity_mask=mask_bytes.data_ptr(),
        history_in=history_in.data_ptr() if history_in is not None else None,
        history_out=new_history.data_ptr(),
        step=step_tensor.data_ptr() if step_tensor is not None else None,
        **_stride_fields(q=q, k=k, v=v, o=out),
        batch=batch,
        heads=heads,
        tokens=tokens,
        text_tokens=text_len,
        head_dim=head_dim,
        grid_h=grid[0],
        grid_w=grid[1],
        num_entities=num_entities,
        dtype=_DTYPES[q.dtype],
        block_offset=block_offset,
        num_blocks=num_blocks,
        softmax_scale=1.0 / math.sqrt(head_dim),
        **kernels.config_fields(config),
        reserved=0,
    )
    workspace_bytes = library.workspace_bytes(params)
    # The kernels want it 256-byte aligned: CUDA allocations are; host memory (the emulator's) may not be.
    raw_workspace = torch.empty(workspace_bytes + 512, dtype=torch.uint8, device=q.device)
    start = -raw_workspace.data_ptr() % 256
    workspace = raw_workspace[start : start + max(workspace_bytes, 256)]
    library.launch(params, workspace.data_ptr(), workspace_bytes, stream)
    views = _debug_views(library, params, workspace) if debug else None
    # Temporaries (workspace, copies) may be freed now: the caching allocator reuses their memory only for work
    # queued later on this stream, so after the kernels.
    return out, new_history, views


def _stride_fields(**tensors: Tensor) -> Dict[str, int]:
    """``{name}_batch_stride``, ``{name}_head_stride`` and ``{name}_row_stride`` of each tensor."""
    fields = {}
    for name, x in tensors.items():
        for dim, stride in zip(("batch", "head", "row"), _strides(x)):
            fields[f"{name}_{dim}_stride"] = stride
    return fields


def _debug_views(library: "kernels.KernelLibrary", params, workspace: Tensor) -> Dict[str, Tensor]:
    layout = library.workspace_layout(params)
    b, h, e = params.batch, params.heads, params.num_entities
    n = params.grid_h * params.grid_w

    def view(offset: int, dtype: torch.dtype, shape: Tuple[int, ...]) -> Tensor:
        count = math.prod(shape)
        size = torch.empty(0, dtype=dtype).element_size()
        return workspace[offset : offset + count * size].view(dtype).reshape(shape).clone()

    words = view(layout.cut_bits, torch.int32, (b, n, layout.cut_words)).to(torch.int64) & 0xFFFFFFFF
    if not params.do_image_image:
        words.zero_()  # the launcher memsets the cut bits only when the image-image pass runs: not written here
    bits = (words[..., None] >> torch.arange(32, device=workspace.device)) & 1
    return {
        "lse": view(layout.lse, torch.float32, (b, h, n)),
        "affinity": view(layout.affinity, torch.float32, (b, e, n)),
        "source": view(layout.source, torch.float32, (b, e, n)),
        "raw_masks": view(layout.raw_masks, torch.uint8, (b, e, n)).bool(),
        "masks": view(layout.masks, torch.uint8, (b, e, n)).bool(),
        "union_count": view(layout.union_count, torch.int32, (b,)),
        "cut": bits.reshape(b, n, layout.cut_words * 32)[..., :n].bool(),
    }
