"""``torch.ops.deleaker.attention``: DeLeaker attention as one PyTorch custom op, and `deleaker_attention` over it.

This is the seam shared by the diffusers processor, the ONNX exporter (which translates it into one
``DeLeakerAttention`` node), ``torch.compile`` and the CUDA kernels. Its inputs mirror the ONNX node: the per-call
state is tensors (entity mask, history, denoising step), and the block's place and the knobs are constants.

Kernels, by device (chosen by PyTorch's dispatcher, not by Python code here):

- every device: the PyTorch reference (`reference_kernel`, ``deleaker.ops``), the op's default implementation;
- ``cuda``: the fused kernels, registered onto this op by ``deleaker.plugins.torch_op`` when that module is
  imported; it falls back to the reference for inputs the kernels do not take. The core never imports the plugins
  package: the first call with inputs off the CPU loads the kernel providers that installed packages name in the
  ``deleaker.kernels`` entry-point group (deleaker-trt's own names ``deleaker.plugins.torch_op``), so a
  `DeLeakerFluxPipeline` on a GPU gets the fused kernels without importing them itself;
- fake (meta) tensors: `_fake`, shapes only, so ``torch.compile`` traces the op without running it and without a
  graph break.

The step is a 0-d int64 tensor and the history a float32 tensor on the inputs' device: a compiled or CUDA-graphed
transformer advances them on the device. A CPU step is read on the host (free), so the reference skips the work
outside the intervention window.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import threading
import warnings
from typing import Tuple, Union

import torch

from .config import DeLeakerConfig
from .ops import check_attention_inputs, deleaker_attention_reference

Tensor = torch.Tensor
BlockStep = Union[int, Tensor]


#: The op's knob arguments, after ``grid_w``, in order: the fields of `DeLeakerConfig`.
KNOB_NAMES = tuple(field.name for field in dataclasses.fields(DeLeakerConfig))
_KNOB_TYPES = {field.name: type(field.default) for field in dataclasses.fields(DeLeakerConfig)}


def config_from_knobs(*knobs) -> DeLeakerConfig:
    """The `DeLeakerConfig` of the op's knob arguments, given in order (the dispatcher passes them positionally),
    each cast to its field's type (the ONNX translations get them as the exporter's scalars)."""
    return DeLeakerConfig(**{name: _KNOB_TYPES[name](value) for name, value in zip(KNOB_NAMES, knobs, strict=True)})


def block_step_of(step: Tensor, block_offset: int, num_blocks: int) -> BlockStep:
    """``t = step * num_blocks + block_offset``: an int for a CPU step (read without any device synchronisation),
    else a 0-d int64 tensor on the step's device (read by the kernels)."""
    step = step.reshape(())
    if step.device.type == "cpu":
        return int(step) * num_blocks + block_offset
    return step.to(torch.int64) * num_blocks + block_offset


def reference_kernel(
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
    """The op in PyTorch on any device (its default kernel; the CUDA kernel's fallback). Arguments as `attention`;
    the outputs are contiguous, as `_fake` says."""
    out, new_history = deleaker_attention_reference(
        q,
        k,
        v,
        entity_mask.to(torch.bool),
        grid=(grid_h, grid_w),
        block_step=block_step_of(step, block_offset, num_blocks),
        history=history,
        config=config_from_knobs(*knobs),
    )
    return out.contiguous(), new_history.contiguous()


#: The entry-point group whose entries are modules that register device kernels on this op when imported.
KERNEL_PROVIDERS_GROUP = "deleaker.kernels"

_providers_lock = threading.Lock()
_providers_loaded = False


def load_kernel_providers() -> bool:
    """Imports the modules named in the ``deleaker.kernels`` entry-point group, once per process.

    Returns True for the call that loaded them (a kernel it registered serves from the next dispatch on), False
    once they are loaded. A provider that fails to import is reported as a warning and leaves the reference.
    """
    global _providers_loaded
    with _providers_lock:
        if _providers_loaded:
            return False
        _providers_loaded = True
        for entry in importlib.metadata.entry_points(group=KERNEL_PROVIDERS_GROUP):
            try:
                entry.load()
            except Exception as error:  # noqa: BLE001  (any failure of an optional provider keeps the reference)
                warnings.warn(f"deleaker: kernel provider {entry.value!r} did not load ({error}); using the reference")
        return True


@torch.library.custom_op("deleaker::attention", mutates_args=())
def attention(
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
    std_mul_text: float,
    std_mul_image_image: float,
    k_strength: float,
    start_aggregating_from: int,
    stop_aggregating_at: int,
    start_intervention_from: int,
    stop_intervention_at: int,
    use_history: bool,
    do_smoothing: bool,
    do_image_image: bool,
    do_image_text_strengthening: bool,
    do_image_text_weakening: bool,
) -> Tuple[Tensor, Tensor]:
    args = (
        q,
        k,
        v,
        entity_mask,
        history,
        step,
        block_offset,
        num_blocks,
        grid_h,
        grid_w,
        std_mul_text,
        std_mul_image_image,
        k_strength,
        start_aggregating_from,
        stop_aggregating_at,
        start_intervention_from,
        stop_intervention_at,
        use_history,
        do_smoothing,
        do_image_image,
        do_image_text_strengthening,
        do_image_text_weakening,
    )
    if q.device.type != "cpu" and load_kernel_providers():
        # A provider registered its kernel just now: this call goes through the dispatcher as the next ones do.
        return torch.ops.deleaker.attention(*args)
    return reference_kernel(*args)


@attention.register_fake
def _fake(q, k, v, entity_mask, history, step, block_offset, num_blocks, grid_h, grid_w, *knobs):
    # Shapes only (no data is read): the output is q's shape and dtype, the history (B, E_max, gh * gw) float32,
    # both contiguous on q's device whatever q's strides (the compiler relies on the strides said here).
    batch = q.shape[0]
    return q.new_empty(q.shape), q.new_empty((batch, entity_mask.shape[0], grid_h * grid_w), dtype=torch.float32)


def config_kwargs(config: DeLeakerConfig) -> dict:
    """The knobs of ``config`` as keyword arguments of `attention` (and attributes of the ONNX node)."""
    return dataclasses.asdict(config)


def call_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    history: Tensor,
    step: Tensor,
    *,
    block_offset: int,
    num_blocks: int,
    grid: Tuple[int, int],
    config: DeLeakerConfig,
) -> Tuple[Tensor, Tensor]:
    """`attention` with the knobs given as one config. ``q, k, v``: ``(B, H, N, D)``; ``step``: int64 scalar."""
    return torch.ops.deleaker.attention(
        q,
        k,
        v,
        entity_mask,
        history,
        step,
        block_offset=block_offset,
        num_blocks=num_blocks,
        grid_h=grid[0],
        grid_w=grid[1],
        **config_kwargs(config),
    )


def deleaker_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    entity_mask: Tensor,
    *,
    grid: Tuple[int, int],
    block_step: BlockStep,
    history: Tensor | None,
    config: DeLeakerConfig,
) -> Tuple[Tensor, Tensor]:
    """One joint attention call with DeLeaker, through ``torch.ops.deleaker.attention`` (so on the kernel that
    PyTorch's dispatcher picks for the inputs' device).

    Args:
        q, k, v: ``(B, H, N, D)``, the ``T`` text tokens first, then ``gh * gw`` image tokens row-major.
        entity_mask: ``(E_max, T)`` bool; row ``e`` marks entity ``e``'s text tokens, an all-zero row is absent.
        grid: ``(gh, gw)``, the image token grid, ``gh * gw == N - T``.
        block_step: ``t = step * num_blocks + block_offset``, an int or a one-element integer tensor.
        history: ``None`` (zeros) or ``(B, E_max, gh * gw)`` float32, the running mean of entity affinities.
        config: the knobs; used as given (never rescaled here).

    Returns:
        ``out`` like ``q`` (same dtype) and the updated history ``(B, E_max, gh * gw)`` float32.

    CUDA tensors run the fused kernels where they are built (their provider loads on the first call off the CPU);
    everything else runs the PyTorch reference (`deleaker.deleaker_attention_reference`).
    """
    check_attention_inputs(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history, config=config)
    if history is None:
        history = torch.zeros(
            q.shape[0], entity_mask.shape[0], grid[0] * grid[1], dtype=torch.float32, device=q.device
        )
    if isinstance(block_step, torch.Tensor):
        step = block_step.reshape(()).to(torch.int64)
    else:
        step = torch.tensor(block_step, dtype=torch.int64)  # on the host: read there, no device synchronisation
    return call_attention(q, k, v, entity_mask, history, step, block_offset=0, num_blocks=1, grid=grid, config=config)
