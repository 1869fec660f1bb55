"""Time one joint attention: plain SDPA, the DeLeaker CUDA kernels and the PyTorch reference.

FLUX.1 shapes (24 heads x 128, bf16 by default) at 512x512 and 1024x1024 (32x32 and 64x64 image tokens) with
T = 256 and 512 text tokens. Inputs carry entity blobs so that the masks and the image-image pass have realistic
work. CUDA-event timing, warm-up first, median of repeats, inputs rotated among several sets; "extra peak" is the
peak memory allocated during one call above what was allocated before it (outputs included).

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.md

The whole FLUX.1-dev transformer step is timed by ``benchmarks/bench_flux_step.py``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

from deleaker import DeLeakerConfig, deleaker_attention_reference
from deleaker.plugins import torch_op

CONFIG = DeLeakerConfig()  # FLUX.1-dev defaults: intervention from block step 18
INSIDE, OUTSIDE = 100, 5  # block steps inside and before the intervention window


def make_inputs(batch, heads, text_len, side, head_dim, entities, dtype, seed):
    """q, k, v ``(B, H, T + side^2, D)`` with ``entities`` entity blobs, and the ``(4, T)`` entity mask."""
    g = torch.Generator().manual_seed(seed)
    n_img = side * side
    shape = (batch, heads, text_len + n_img, head_dim)
    q, k, v = (torch.randn(shape, generator=g) * s for s in (0.5, 0.5, 1.0))
    amp = (3.0 * math.sqrt(head_dim)) ** 0.5
    dirs = F.normalize(torch.randn(entities, heads, head_dim, generator=g), dim=-1)
    mask = torch.zeros(4, text_len, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for e in range(entities):
        mask[e, 3 * e + 1 : 3 * e + 3] = True
        k[:, :, 3 * e + 1 : 3 * e + 3] += amp * dirs[e][None, :, None]
        cy, cx = (float(x) * side for x in torch.rand(2, generator=g))
        weight = (1.0 - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt() / (0.25 * side)).clamp(min=0).reshape(-1)
        q[:, :, text_len:] += amp * weight[None, None, :, None] * dirs[e][None, :, None]
        k[:, :, text_len:] += 0.5 * amp * weight[None, None, :, None] * dirs[e][None, :, None]
    return [x.to(dtype).cuda() for x in (q, k, v)], mask.cuda()


def time_ms(fn: Callable[[int], object], repeats: int, warmup: int, sets: int) -> float:
    """Median CUDA-event time of ``fn(i)`` (i picks the input set), after warm-up."""
    for i in range(warmup):
        fn(i % sets)
    times: List[float] = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def extra_peak_mib(fn: Callable[[int], object]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write the table to")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sets", type=int, default=2, help="input sets rotated between calls")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, memory-hungry) reference")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not torch_op.is_available():
        raise SystemExit("needs a CUDA device and the DeLeaker kernel library")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    heads, head_dim = 24, 128

    rows = []
    for resolution, text_len in ((512, 256), (1024, 256), (1024, 512)):
        side = resolution // 16
        grid = (side, side)
        sets = [make_inputs(1, heads, text_len, side, head_dim, 2, dtype, seed) for seed in range(args.sets)]
        tokens = text_len + side * side
        flops = 4 * heads * tokens * tokens * head_dim

        def sdpa(i):
            q, k, v = sets[i][0]
            return F.scaled_dot_product_attention(q, k, v)

        def kernel(step):
            def run(i):
                (q, k, v), mask = sets[i]
                return torch_op.deleaker_attention_cuda(
                    q, k, v, mask, grid=grid, block_step=step, history=None, config=CONFIG
                )

            return run

        def reference(i):
            (q, k, v), mask = sets[i]
            return deleaker_attention_reference(
                q, k, v, mask, grid=grid, block_step=INSIDE, history=None, config=CONFIG
            )

        cases = [
            ("plain SDPA", sdpa),
            ("CUDA op, outside window", kernel(OUTSIDE)),
            ("CUDA op, intervening", kernel(INSIDE)),
        ]
        if not args.no_reference:
            cases.append(("PyTorch reference, intervening", reference))
        base = None
        for name, fn in cases:
            ms = time_ms(fn, args.repeats, args.warmup, args.sets)
            base = ms if base is None else base
            rows.append(
                f"| {resolution}x{resolution} ({side}x{side}), T={text_len} | {name} | {ms:.3f} | "
                f"{ms / base:.2f}x | {flops / ms / 1e9:.0f} | {extra_peak_mib(fn):.1f} |"
            )
            print(rows[-1], flush=True)

    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = "\n".join(
        [
            f"# DeLeaker attention, one call ({device}, {args.dtype}, {heads} heads x {head_dim}, torch "
            f"{torch.__version__}, {date})",
            "",
            f"Median of {args.repeats} CUDA-event timings after {args.warmup} warm-up calls; TFLOP/s counts plain "
            "attention's 4 N^2 D H flops.",
            "",
            "| shape | implementation | ms | vs SDPA | TFLOP/s | extra peak MiB |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
