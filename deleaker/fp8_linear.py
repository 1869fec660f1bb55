"""FP8 (E4M3) linear layers for the PyTorch path: ``torch._scaled_mm`` with per-tensor or row-wise scales.

Recipe (NVIDIA's FLUX FP8 recipe, as ``deleaker.engines.fp8`` applies it to TensorRT engines): the transformer
blocks' linear layers run in FP8; the embedders (``x_embedder``, ``context_embedder``, ``time_text_embed``), the
final norm and output projection (``norm_out``, ``proj_out``) and the norms' modulation linears (``norm*.linear``:
one row per image, nothing for FP8 to speed up, and their output scales every activation) stay in the model's
dtype; DeLeaker's attention is not a linear layer and stays in it too.

Scales, E4M3's largest value being 448:

- weights once, when a layer is converted: ``amax / 448`` over the whole weight (``"tensor"``) or over each output
  channel (``"row"``);
- activations on every call (dynamic, no calibration): ``amax / 448`` over the whole input (``"tensor"``) or over
  each token row (``"row"``).

A value is quantized as ``saturate(x / scale)`` rounded to the nearest E4M3 value, and ``_scaled_mm`` computes
``(qa * scale_a) @ (qw * scale_w)^T + bias`` with float32 accumulation, output in the layer's dtype. An all-zero
tensor or row gets the scale of amax 1 (zeros are exact at any scale). Layers whose sizes ``_scaled_mm`` cannot
take on CUDA (in or out features not a multiple of 16) stay unquantized.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .errors import ConfigError

Tensor = torch.Tensor

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: How scales are shared: one per tensor, or one per row (output channel of a weight, token of an activation).
GRANULARITIES = ("tensor", "row")
#: Module paths (relative to the transformer) kept in the model's dtype, with everything under them.
HIGH_PRECISION_MODULES = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
#: ``_scaled_mm`` on CUDA takes matrices whose inner and output sizes are multiples of this.
SCALED_MM_MULTIPLE = 16


def check_granularity(granularity: object) -> str:
    """``granularity`` if it is one of `GRANULARITIES`; `ConfigError` otherwise."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"FP8 scales must be one of {GRANULARITIES} (per tensor or per row), got {granularity!r:.40}")
    return granularity


def e4m3_scale(x: Tensor, granularity: str) -> Tensor:
    """float32 scales of 2-D ``x``: ``()`` for ``"tensor"``, ``(rows, 1)`` for ``"row"``; ``amax / 448``, and
    ``1 / 448`` where the amax is 0 or not finite."""
    magnitude = x.detach().abs().to(torch.float32)
    amax = magnitude.amax() if granularity == "tensor" else magnitude.amax(dim=-1, keepdim=True)
    amax = torch.where((amax > 0) & torch.isfinite(amax), amax, torch.ones_like(amax))
    return amax / E4M3_MAX


def quantize_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """``x / scale`` saturated to [-448, 448] and rounded to float8_e4m3fn (round to nearest even)."""
    return (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class Fp8Linear(nn.Module):
    """An ``nn.Linear`` with an E4M3 weight, run by ``torch._scaled_mm`` with E4M3 activations (module docstring).

    ``weight_fp8`` ``(out, in)`` float8_e4m3fn and ``weight_scale`` (``()`` or ``(1, out)`` float32) are buffers;
    the bias stays in the layer's dtype, which is also the output's.
    """

    def __init__(self, linear: nn.Linear, granularity: str = "row") -> None:
        super().__init__()
        self.granularity = check_granularity(granularity)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.out_dtype = weight.dtype
        scale = e4m3_scale(weight, granularity)
        self.register_buffer("weight_fp8", quantize_e4m3(weight, scale))
        # _scaled_mm's scale_b is () per tensor or (1, out) per output column of weight^T.
        self.register_buffer("weight_scale", scale if granularity == "tensor" else scale.reshape(1, -1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = e4m3_scale(rows, self.granularity)
        out = torch._scaled_mm(
            quantize_e4m3(rows, scale),
            self.weight_fp8.t(),  # column-major, as _scaled_mm wants its second operand
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=None if self.bias is None else self.bias.to(self.out_dtype),
            out_dtype=self.out_dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scales={self.granularity}"


def in_high_precision_module(name: str) -> bool:
    """Whether module path ``name`` (relative to the transformer) is, or is under, one of `HIGH_PRECISION_MODULES`
    (the recipe's part shared with the FP8 engines, ``deleaker.engines.fp8``)."""
    return any(name == root or name.startswith(root + ".") for root in HIGH_PRECISION_MODULES)


def keeps_precision(name: str) -> bool:
    """Whether the linear at module path ``name`` (relative to the transformer) stays in the model's dtype."""
    if in_high_precision_module(name):
        return True
    # The norms' modulation linears: ``norm1.linear``, ``norm1_context.linear``, ``norm.linear``.
    return any(part.startswith("norm") for part in name.split(".")[:-1])


def fp8_linears(transformer: nn.Module) -> Dict[str, nn.Linear]:
    """``{module path: layer}`` of the linears the recipe runs in FP8, in module order."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear)
        and not keeps_precision(name)
        and module.in_features % SCALED_MM_MULTIPLE == 0
        and module.out_features % SCALED_MM_MULTIPLE == 0
    }


def quantize_transformer_fp8(transformer: nn.Module, granularity: str = "row") -> int:
    """Replace the recipe's linears of ``transformer`` by `Fp8Linear` in place; returns how many were replaced."""
    check_granularity(granularity)
    layers = fp8_linears(transformer)
    for name, linear in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, Fp8Linear(linear, granularity))
    return len(layers)
