"""The whole generation (encode + denoise + decode), FLUX.1-dev's architecture, stock diffusers against our runtime.

    python benchmarks/bench_pipeline.py --out benchmarks/pipeline.md          # on a GPU: 1024x1024, 20 steps, T = 512
    python benchmarks/bench_pipeline.py --dry-run --rows diffusers,ours_on    # the tiny model on the CPU (tests)

Weights are random bf16, made on the GPU (no download): FLUX.1-dev's transformer, CLIP-L and T5-XXL encoders and
its VAE; the tokenizers are the tiny model's (real tokenizers, a small vocabulary: the ids fit the encoders'
embeddings, and the cost of encoding is the encoders', not the tokenizers'). One prompt with 2 entities, batch 1,
default knobs except smoothing, which is off so that random weights form masks and DeLeaker pays for its
correction (as ``bench_flux_step.py --no-smoothing``). Rows, each the same request on the same weights, in one run:

- ``diffusers``: diffusers' ``FluxPipeline``, eager (the baseline, 1.0);
- ``diffusers_compiled``: the same with ``torch.compile`` of its transformer (fullgraph, the mode of ours);
- ``ours_off``: our runtime (torch backend), DeLeaker off (plain FLUX);
- ``ours_on``: DeLeaker on, eager;
- ``ours_on_compiled``: DeLeaker on, compiled and CUDA-graphed (``compile=True``);
- ``ours_fp8``: DeLeaker on, FP8 linears (row-wise scales), compiled (``--fp8-eager``: eager); it quantizes the
  transformer in place, so it runs last.

Each row makes one untimed first call (its seconds, compile included, are ``first_call_s``) and times ``--repeats``
more; ``peak_gib`` is the most GPU memory allocated during the row. The compiled rows also report the PSNR of their
image against the eager one of the same seed (``ours_on_compiled`` vs ``ours_on``; ``ours_fp8`` vs ``ours_on``). With
``--budget-s`` a row that no longer fits is recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROWS = ("diffusers", "diffusers_compiled", "ours_off", "ours_on", "ours_on_compiled", "ours_fp8")
PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
ENTITIES = ("cat", "cheetah")
#: Seconds a row needs at least, eager and compiled (FLUX.1-dev on an H100: a generation is about 5 s; inductor's
#: first compile of the transformer takes minutes); a row is skipped when less of the budget is left.
MIN_SECONDS = {"eager": 20.0, "compiled": 90.0}
#: Issue 19's targets, ratios to diffusers eager in the same run.
TARGETS = {"ours_on_compiled": 0.8, "ours_fp8": 0.6, "ours_on_compiled_vs_diffusers_compiled": 1.05,
           "compiled_vs_eager_psnr_db": 40.0}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows, of {', '.join(ROWS)}")
    parser.add_argument("--height", type=int, default=None, help="pixels (default 1024; --dry-run: 64)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: as --height)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --dry-run: 2)")
    parser.add_argument("--text-len", type=int, default=None, help="T5 tokens T (default 512; --dry-run: 32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed generations per row after the first call")
    parser.add_argument("--fp8-eager", action="store_true", help="the FP8 row without torch.compile")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="seconds for all rows (skip what no longer fits)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU (tests the script)")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (and .json beside it)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows takes names of {', '.join(ROWS)}; got {args.rows!r}")
    args.rows = [r for r in ROWS if r in rows]  # the order of ROWS: fp8 last, it quantizes in place
    size = 64 if args.dry_run else 1024
    args.height = size if args.height is None else args.height
    args.width = args.height if args.width is None else args.width
    args.steps = (2 if args.dry_run else 20) if args.steps is None else args.steps
    args.text_len = (32 if args.dry_run else 512) if args.text_len is None else args.text_len
    for name in ("height", "width", "steps", "text_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.height % 16 or args.width % 16:
        parser.error(f"--height and --width must be multiples of 16, got {args.height}x{args.width}")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run for the tiny model on the CPU)")
    return args


def flux_dev_components(device: torch.device) -> Dict[str, Any]:
    """``FluxPipeline(**components)`` of FLUX.1-dev's architecture with random bf16 weights made on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bench_flux_step import FLUX_DEV_CONFIG
    from deleaker.tiny import build_tiny_tokenizers

    tokenizer, tokenizer_2 = build_tiny_tokenizers()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False,
            )
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ))
            text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
                pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            ))
            transformer = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    modules = (vae, text_encoder, text_encoder_2, transformer)
    for module in modules:
        module.eval().requires_grad_(False)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "transformer": transformer,
            "image_encoder": None, "feature_extractor": None}


def tiny_components() -> Dict[str, Any]:
    from deleaker.tiny import build_tiny_flux_components

    return build_tiny_flux_components(seed=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psnr(a, b) -> float:
    x, y = (np.asarray(image.convert("RGB"), dtype=np.float64) for image in (a, b))
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class Bench:
    """The rows of one run: shared components, timings, images for the PSNR comparisons."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.deadline = time.monotonic() + args.budget_s  # the build counts: a device stage has one limit
        start = time.perf_counter()
        self.components = tiny_components() if args.dry_run else flux_dev_components(self.device)
        self.build_s = time.perf_counter() - start
        self.images: Dict[str, Any] = {}

    def measure(self, name: str, generate: Callable[[], Any]) -> Dict[str, Any]:
        """One untimed first call, then ``--repeats`` timed ones; the image of the last is kept."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        tick = time.perf_counter()
        generate()
        synchronize(self.device)
        first = time.perf_counter() - tick
        times = []
        image = None
        for _ in range(self.args.repeats):
            tick = time.perf_counter()
            image = generate()
            synchronize(self.device)
            times.append(time.perf_counter() - tick)
        self.images[name] = image
        row = {"seconds": min(times), "first_call_s": first,
               "finite_image": bool(np.ptp(np.asarray(image.convert("RGB"))) > 0)}
        if self.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row

    # ---- the rows ----

    def diffusers_pipe(self):
        from diffusers import FluxPipeline

        return FluxPipeline(**self.components)

    def run_diffusers(self, compiled: bool) -> Dict[str, Any]:
        pipe = self.diffusers_pipe()
        transformer = pipe.transformer
        if compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            pipe.transformer = torch.compile(transformer, fullgraph=True, dynamic=False, mode=mode)
        try:
            def generate():
                with torch.no_grad():
                    return pipe(
                        PROMPT, height=self.args.height, width=self.args.width, num_inference_steps=self.args.steps,
                        guidance_scale=3.5, max_sequence_length=self.args.text_len,
                        generator=torch.Generator(self.device).manual_seed(0),
                    ).images[0]

            return self.measure("diffusers_compiled" if compiled else "diffusers", generate)
        finally:
            pipe.transformer = transformer

    def runtime(self, *, compile: bool, fp8: Optional[str]):
        from deleaker.runtime.runtime import DeLeakerRuntime

        return DeLeakerRuntime.from_components(
            self.components, model_id="flux-dev-random", backend="torch", device=self.device, dtype=self.dtype,
            text_len=self.args.text_len, deleaker_config={"do_smoothing": False},
            default_size=(self.args.height, self.args.width), compile=compile, fp8=fp8,
        )

    def run_ours(self, name: str, *, deleaker: bool, compile: bool, fp8: Optional[str]) -> Dict[str, Any]:
        rt = self.runtime(compile=compile, fp8=fp8)

        def generate():
            return rt(PROMPT, list(ENTITIES), seed=0, steps=self.args.steps, height=self.args.height,
                      width=self.args.width, deleaker=deleaker).image

        row = self.measure(name, generate)
        reference = self.images.get("ours_on")
        if name in ("ours_on_compiled", "ours_fp8") and reference is not None:
            row["psnr_vs_ours_on_db"] = psnr(self.images[name], reference)
        return row

    def run(self, name: str) -> Dict[str, Any]:
        compiled = name in ("diffusers_compiled", "ours_on_compiled") or (name == "ours_fp8" and not self.args.fp8_eager)
        need = MIN_SECONDS["compiled" if compiled else "eager"]
        left = self.deadline - time.monotonic()
        if left < need:
            return {"status": "skipped", "reason": f"out of the time budget ({max(left, 0):.0f} s left, {need:.0f} s "
                                                   "needed at least)"}
        try:
            if name.startswith("diffusers"):
                data = self.run_diffusers(compiled)
            else:
                data = self.run_ours(name, deleaker=name != "ours_off", compile=compiled,
                                     fp8="row" if name == "ours_fp8" else None)
        except Exception as exc:  # noqa: BLE001 - one row failing must not lose the others
            return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:1500],
                    "traceback": traceback.format_exc()[-3000:]}
        finally:
            if compiled:
                # The compiled code, its CUDA graphs and their memory pools go before the next row measures its peak.
                torch._dynamo.reset()
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return {"status": "ok", "compiled": compiled, **data}


def ratios(rows: Dict[str, Dict[str, Any]]) -> None:
    base = rows.get("diffusers", {}).get("seconds")
    compiled_base = rows.get("diffusers_compiled", {}).get("seconds")
    for name, row in rows.items():
        if row.get("status") == "ok" and base:
            row["vs_diffusers"] = row["seconds"] / base
    ours = rows.get("ours_on_compiled", {})
    if ours.get("status") == "ok" and compiled_base:
        ours["vs_diffusers_compiled"] = ours["seconds"] / compiled_base


def markdown(report: Dict[str, Any]) -> str:
    a = report["settings"]
    lines = [
        f"# Whole generation, {report['device']}, torch {report['torch']}, {report['date']}",
        "",
        f"{a['height']}x{a['width']}, {a['steps']} steps, T = {a['text_len']}, batch 1, 2 entities, masks formed (no "
        f"smoothing); random weights ({report['model']}, built in {report['build_s']:.1f} s). Seconds: the best of "
        f"{a['repeats']} after one untimed first call.",
        "",
        "| row | status | seconds | vs diffusers eager | first call s | peak GiB | PSNR vs ours_on eager | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, row in report["rows"].items():
        note = row.get("reason") or row.get("error", "")
        if row.get("vs_diffusers_compiled") is not None:
            note = f"vs diffusers compiled {row['vs_diffusers_compiled']:.3f}"
        if row.get("status") == "ok" and not row.get("finite_image"):
            note = (note + "; uniform image").strip("; ")
        lines.append(
            f"| {name} | {row['status']} | {fmt(row.get('seconds'))} | {fmt(row.get('vs_diffusers'), 3)} | "
            f"{fmt(row.get('first_call_s'), 1)} | {fmt(row.get('peak_gib'), 1)} | "
            f"{fmt(row.get('psnr_vs_ours_on_db'), 1)} | {str(note)[:200]} |"
        )
    lines += ["", f"Targets: {json.dumps(TARGETS)}", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))  # bench_flux_step (FLUX.1-dev's config)
    bench = Bench(args)
    device_name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "CPU"
    report: Dict[str, Any] = {
        "device": device_name, "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": "tiny" if args.dry_run else "FLUX.1-dev architecture", "build_s": bench.build_s,
        "settings": {k: getattr(args, k) for k in ("height", "width", "steps", "text_len", "repeats", "fp8_eager")},
        "rows": {},
    }
    for name in args.rows:
        report["rows"][name] = bench.run(name)
        print(f"{name}: {json.dumps({k: v for k, v in report['rows'][name].items() if k != 'traceback'})}", flush=True)
    ratios(report["rows"])
    table = markdown(report)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(row["status"] != "failed" for row in result["rows"].values()) else 1)
