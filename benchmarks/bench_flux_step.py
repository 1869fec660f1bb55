"""One FLUX.1-dev transformer step (real config, random bf16 weights) with DeLeaker off and on, on one GPU.

    python benchmarks/bench_flux_step.py --out benchmarks/flux_step.md

Off: diffusers' stock attention processor. On: `DeLeakerFluxAttnProcessor` with two entities and a step inside
the intervention window (every block edits). The same inputs and weights are used for both, in the same run; the
table records the device, the date and the ratios against the issue's target (<= 1.15x), whether each output is
finite, and how much the step edited: the masks' union per attention and the fallback rows, from one untimed step
through the kernels' debug views (with random weights the masks are whatever those weights give, so the attention
timings in ``device_check.py``, at chosen coverages, are the controlled ones). Needs CUDA and about 30 GiB of GPU
memory.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from typing import Any, Callable, List, Tuple

import torch

from cuda_graphs import capture_graph

FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def build_transformer(device: torch.device):
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # create the 12B parameters directly in bf16 on the GPU
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def step_inputs(model, height: int, width: int, text_len: int, device: torch.device) -> dict:
    from diffusers import FluxPipeline

    gh, gw = height // 16, width // 16
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.randn(1, gh * gw, 64, generator=g, **bf16),
        encoder_hidden_states=torch.randn(1, text_len, 4096, generator=g, **bf16),
        pooled_projections=torch.randn(1, 768, generator=g, **bf16),
        timestep=torch.full((1,), 0.5, **bf16),
        guidance=torch.full((1,), 3.5, **bf16),
        txt_ids=torch.zeros(text_len, 3, **bf16),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, gh, gw, device, torch.bfloat16),
        return_dict=False,
    )


def all_finite(outputs) -> bool:
    """Whether a step's output is finite: random weights can overflow bf16, and a step computing on inf/NaN (masks,
    fallback rows) would not time what a real model does."""
    return bool(torch.isfinite(outputs[0]).all())


def kernel_views(q, k, v, entity_mask, **kwargs) -> Tuple[torch.Tensor, int]:
    """The CUDA fast path's masks ``(B, E_max, Nimg)`` and fallback row count for one attention call."""
    from deleaker.plugins import torch_op

    _, _, views = torch_op.deleaker_attention_cuda_debug(q, k, v, entity_mask, **kwargs)
    return views["masks"], int(views["fallback_count"])  # a () int32 tensor (torch_op.debug_views)


def union_per_attention(step_fn: Callable[[], Any], views_fn: Callable[..., Tuple[torch.Tensor, int]]) -> List[dict]:
    """Each joint attention's share of image tokens in the masks' union, and its fallback rows, over one untimed
    DeLeaker step (``step_fn``): how much correction the timed step did. ``views_fn`` takes the op's arguments
    (``q, k, v, entity_mask, grid=, block_step=, history=, config=``) and returns the masks and fallback rows."""
    from deleaker import processor

    seen: List[dict] = []
    original = processor.call_attention

    def probing(q, k, v, entity_mask, history, step, *, block_offset, num_blocks, grid, config):
        block_step = int(step) * num_blocks + block_offset
        masks, fallback = views_fn(q, k, v, entity_mask, grid=grid, block_step=block_step, history=history,
                                   config=config)
        seen.append({"block_step": block_step, "union": float(masks.any(1).float().mean()), "fallback_rows": fallback})
        return original(q, k, v, entity_mask, history, step, block_offset=block_offset, num_blocks=num_blocks,
                        grid=grid, config=config)

    processor.call_attention = probing
    try:
        step_fn()
    finally:
        processor.call_attention = original
    return seen


def union_summary(seen: List[dict]) -> str:
    unions = sorted(r["union"] for r in seen)
    return (f"{len(seen)} attentions, union min/median/max {unions[0]:.2f}/{statistics.median(unions):.2f}/"
            f"{unions[-1]:.2f}, fallback rows {sum(r['fallback_rows'] for r in seen)}")


def time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, repeats: int):
    """Capture ``fn`` in a CUDA graph and time its replays: ``(median ms, None)``, or ``(None, why it failed)``."""
    try:
        graph, _ = capture_graph(fn)
        return time_ms(graph.replay, repeats), None
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a finding to report
        return None, f"{type(exc).__name__}: {exc}"[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x512:256,1024x1024:256,1024x1024:512", help="HxW:T,...")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    parser.add_argument("--graph", action="store_true", help="also capture each step in a CUDA graph and time replays")
    parser.add_argument(
        "--no-smoothing",
        action="store_true",
        help="DeLeaker without the 3x3 morphology: random weights give scattered entity maps that the opening "
        "removes (no mask, nothing to correct); without it each entity keeps about a sixth of the image",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_flux_step.py needs a CUDA device")

    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from deleaker import DeLeakerConfig
    from deleaker.plugins import torch_op  # registers the CUDA kernel of torch.ops.deleaker.attention
    from deleaker.processor import DeLeakerState, install_deleaker_processors

    device = torch.device("cuda")
    model = build_transformer(device)
    # set_attn_processor pops the entries of the dict it is given: each use gets a copy.
    stock = {name: FluxAttnProcessor() for name in model.attn_processors}
    config = DeLeakerConfig(do_smoothing=not args.no_smoothing)
    kernels = "CUDA kernels" if torch_op.is_available() else "PyTorch reference (kernels unavailable)"
    rows, graphs, unions = [], [], []
    for spec in args.sizes.split(","):
        size, text_len = spec.split(":")
        height, width = (int(x) for x in size.split("x"))
        text_len = int(text_len)
        inputs = step_inputs(model, height, width, text_len, device)
        mask = torch.zeros(4, text_len, dtype=torch.bool, device=device)
        mask[0, 2], mask[1, 5:7] = True, True

        model.set_attn_processor(dict(stock))
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            off_ms = time_ms(lambda: model(**inputs), args.repeats)
            off_finite = all_finite(model(**inputs))
        off_mem = torch.cuda.max_memory_allocated() / 2**30

        install_deleaker_processors(model)

        def on_step():
            # Step 1: block steps 57..113, inside the default intervention and aggregation windows.
            state = DeLeakerState(
                entity_mask=mask,
                grid=(height // 16, width // 16),
                config=config,
                step=torch.ones((), dtype=torch.int64, device=device),
            )
            return model(**inputs, joint_attention_kwargs={"deleaker_state": state})

        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            on_ms = time_ms(on_step, args.repeats)
            on_finite = all_finite(on_step())
        on_mem = torch.cuda.max_memory_allocated() / 2**30  # before the probe's debug views
        case = f"{height}x{width}, T={text_len}"
        try:  # a probe that fails must not cost the timings above
            with torch.no_grad():
                unions.append((case, union_summary(union_per_attention(on_step, kernel_views))))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            unions.append((case, f"probe failed: {type(exc).__name__}: {exc}"[:300]))
        rows.append((case, off_ms, on_ms, on_ms / off_ms, off_mem, on_mem, f"{off_finite}/{on_finite}"))
        if args.graph:
            with torch.no_grad():
                on_graph, on_error = graph_ms(on_step, args.repeats)
                model.set_attn_processor(dict(stock))
                off_graph, off_error = graph_ms(lambda: model(**inputs), args.repeats)
            graphs.append((rows[-1][0], off_graph, off_error, on_graph, on_error))

    lines = [
        f"FLUX.1-dev transformer step, random bf16 weights, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}, DeLeaker via {kernels}{' without smoothing' if args.no_smoothing else ''}; "
        f"median of {args.repeats}",
        "",
        "| case | DeLeaker off (ms) | DeLeaker on (ms) | ratio (target <= 1.15) | peak GiB off | peak GiB on "
        "| output finite (off/on) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {c} | {a:.1f} | {b:.1f} | {r:.2f}x | {m0:.1f} | {m1:.1f} | {f} |" for c, a, b, r, m0, m1, f in rows]
    lines += ["", "What the DeLeaker step edited (one untimed step through the kernels' debug views):", ""]
    lines += [f"- {case}: {summary}" for case, summary in unions]
    if graphs:
        lines += ["", "CUDA graphs (capture of one whole step, median replay):", "",
                  "| case | off, graph (ms) | on, graph (ms) | ratio |", "| --- | --- | --- | --- |"]
        for case, off_graph, off_error, on_graph, on_error in graphs:
            ratio = f"{on_graph / off_graph:.2f}x" if off_graph and on_graph else "-"
            lines.append(f"| {case} | {off_graph if off_graph else off_error} | {on_graph if on_graph else on_error} "
                         f"| {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
