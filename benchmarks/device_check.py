"""The one prepared check for a lent GPU: correctness, speed, memory, graphs, profiler and sanitizer, one JSON.

Run on the device machine through ``benchmarks/device_check.sh`` (which installs the carried wheels, the project
and the prebuilt kernel library first); ``benchmarks/prepare_device_check.sh`` prepares those here. Stages, each
with its own time budget, each recorded (ok / failed / skipped / timeout) even when another fails:

  environment    device, versions, measured ceilings (bf16 matrix TFLOP/s, device-to-device copy GB/s)
  lse            each fused attention's log-sum-exp against ``torch.logsumexp`` (natural log, shape, scale)
  correctness    the fast path at the FLUX.1-dev shape (bf16, fp16), outputs poisoned first, against the
                 decomposed op: masks, relative error vs fp32, vs the reference in the input dtype
  timing         the op against default SDPA and the FlashAttention-2 backend, same run, same inputs, inside and
                 outside the intervention window, masks' union ~10/25/50% (two entities), 25/50% (four),
                 25% (eight); per-kernel times for each of those; fallback rows; extra peak memory per call;
                 1024x1024 and 2048x2048
  cuda_graph     capture and replay of the op with a device step: bit-equal to eager, replay time
  gather         the L2 rate of gathered 64- and 128-row Q/K tiles (benchmarks/gather, prebuilt): the tile size
  gpu_tests      ``pytest -m gpu tests/test_cuda_kernels.py`` (FLUX.1-dev shape and 2048x2048 included)
  flux_step      ``bench_flux_step.py`` at 1024x1024, DeLeaker on and off
  plugin         the C++ TensorRT plugin's enqueue vs the PyTorch fast path, where its check script exists
  ncu            Nsight Compute on the two slowest custom kernels (L2 throughput, tensor pipe, occupancy)
  sanitizer      compute-sanitizer memcheck and racecheck on one small launch

The order puts first what a short lease needs most. With ``--budget-s`` a stage that no longer fits is skipped, and a
child process stopped, instead of running into the caller's time limit; after a kernel fault in this process, the
stages that need its CUDA context are skipped, while those in child processes still run.

Writes ``device_check.json`` (after every stage, so a timeout keeps what was done) and ``device_check.md`` under
``--out`` (default ``$OUT``). ``--smoke-cpu`` runs the same code at tiny shapes on the CPU with the decomposed op
standing in for the kernels (CI runs it so that this script does not rot between GPU sessions); its numbers mean
nothing.

Over 400 lines, one job: a lease is one call of a few minutes, so the whole check is one script the device machine
runs as it is, with every stage beside the others (each a short function) rather than spread over modules that
must all travel and import there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from attention_inputs import stripe_inputs  # noqa: E402
from cuda_graphs import capture_graph  # noqa: E402

from deleaker import DeLeakerConfig, deleaker_attention  # noqa: E402
from deleaker.decomposed import decomposed_intermediates  # noqa: E402

CONFIG = DeLeakerConfig()  # FLUX.1-dev defaults
INSIDE, OUTSIDE = 100, 5  # block steps inside and before the intervention window (history aggregating at 12+)
FLUX_SHAPE = dict(batch=1, heads=24, text_len=512, grid=(64, 64), head_dim=128)
COVERAGES = (0.10, 0.25, 0.50)  # two entities; 0.10 asked gives 9% at 64x64 (two stripes of 3 columns)
#: Unions of the timing rows with more entities (issue 21: no cliff at E_max = 8).
ENTITY_COVERAGES = {4: (0.25, 0.50), 8: (0.25,)}
#: (union asked, entities) of the per-kernel profiles inside the window.
KERNEL_TIME_CASES = ((0.10, 2), (0.25, 2), (0.50, 2), (0.25, 4), (0.50, 4), (0.25, 8))
#: Smoke mode (CPU, the decomposed op): the code path of two of them, eight stripes on the smallest grid they fit.
SMOKE_KERNEL_TIME_CASES = ((0.25, 2), (0.25, 8))
SMOKE_GRID_E8 = (24, 24)
TARGETS = {"op_vs_sdpa_25pct": 1.5, "op_vs_sdpa_stretch": 1.25, "outside_vs_sdpa": 1.05, "extra_mib_b1": 64.0,
           "flux_step_ratio": 1.15, "flux_step_stretch": 1.05}


@dataclass
class Context:
    out: Path
    device: torch.device
    smoke: bool
    results: Dict[str, Any]
    timing_repeats: int = 30
    deadline: float = math.inf  # time.monotonic() by which every stage must be done (--budget-s)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def time_limit(self, cap: float) -> float:
        """A child process's time limit: ``cap``, or what is left of the budget less a few seconds to record it."""
        return max(1.0, min(cap, self.seconds_left() - 5))

    def shape(self, **overrides) -> dict:
        """The FLUX.1-dev shape, or a tiny one in smoke mode."""
        base = dict(batch=1, heads=2, text_len=77, grid=(16, 16), head_dim=64) if self.smoke else dict(FLUX_SHAPE)
        return {**base, **overrides}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        strict = json.dumps(strict_json(self.results), indent=2, default=str, allow_nan=False)
        (self.out / "device_check.json").write_text(strict)
        (self.out / "device_check.md").write_text(markdown(self.results))


class StageSkipped(Exception):
    """The stage cannot run here (no CUDA, a tool missing); its reason is recorded."""


# ---- timing helpers ------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[int], Any], ctx: Context, *, sets: int, warmup: int = 5) -> float:
    """Median time of ``fn(i)`` (``i`` rotates among ``sets`` input sets): CUDA events on a GPU."""
    for i in range(warmup):
        fn(i % sets)
    synchronize(ctx.device)
    times: List[float] = []
    for i in range(ctx.timing_repeats):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % sets)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i % sets)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extra_peak_mib(fn: Callable[[], Any], ctx: Context) -> Optional[float]:
    """Peak memory allocated during one call above what was allocated before it (outputs included)."""
    if not ctx.cuda:
        return None
    synchronize(ctx.device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    synchronize(ctx.device)
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON parsers refuse NaN and Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


# ---- the op and its views -----------------------------------------------------------------------------------


def fast_path_available() -> Tuple[bool, str]:
    try:
        from deleaker.plugins import torch_op
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return False, f"deleaker.plugins.torch_op does not import: {exc}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return (True, "ok") if torch_op.is_available() else (False, "the kernel library does not load")


def op_call(ctx: Context, inputs, step, **kwargs):
    """One DeLeaker attention: the fast path on a GPU, the decomposed op in smoke mode."""
    (q, k, v), mask, grid = inputs
    if ctx.cuda:
        return deleaker_attention(q, k, v, mask, grid=grid, block_step=step, history=None, config=CONFIG, **kwargs)
    return decomposed_intermediates(q, k, v, mask, grid=grid, block_step=step, history=None, config=CONFIG).out


def op_views(ctx: Context, inputs, step) -> Dict[str, Any]:
    """Masks' union and fallback rows of one call, from the kernels' debug views (decomposed op in smoke mode)."""
    (q, k, v), mask, grid = inputs
    if ctx.cuda:
        from deleaker.plugins import torch_op

        _, _, views = torch_op.deleaker_attention_cuda_debug(
            q, k, v, mask, grid=grid, block_step=step, history=None, config=CONFIG
        )
        synchronize(ctx.device)
        masks, provider = views["masks"], views["provider"]
        fallback = int(views["fallback_count"])  # a () int32 tensor (torch_op.debug_views)
    else:
        got = decomposed_intermediates(q, k, v, mask, grid=grid, block_step=step, history=None, config=CONFIG)
        masks, fallback, provider = got.masks, got.fallback_count, "decomposed op (smoke)"
    return {"union": float(masks.any(1).float().mean()), "fallback_rows": fallback, "provider": provider}


# ---- stages --------------------------------------------------------------------------------------------------


def stage_environment(ctx: Context) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not ctx.cuda:
        info["device"] = "cpu (smoke run: no number here means anything)"
        return info
    props = torch.cuda.get_device_properties(ctx.device)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version())
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
        result = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20)
        info["nvidia_smi"] = dict(zip(query.split(","), (x.strip() for x in result.stdout.split(","))))
    # Ceilings, measured once: a large bf16 product (random data) and a large device-to-device copy.
    a, b = (torch.randn(8192, 8192, device=ctx.device, dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda i: a @ b, dataclasses.replace(ctx, timing_repeats=10), sets=1, warmup=3)
    info["bf16_matmul_tflops"] = round(2 * 8192**3 / ms / 1e9, 1)
    src = torch.empty(2**30, dtype=torch.uint8, device=ctx.device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), dataclasses.replace(ctx, timing_repeats=10), sets=1, warmup=3)
    info["d2d_copy_gbps"] = round(2 * src.numel() / ms / 1e6, 1)
    return info


def stage_gpu_tests(ctx: Context) -> Dict[str, Any]:
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    junit = ctx.out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra", "-p", "no:cacheprovider",
               "tests/test_cuda_kernels.py", f"--junitxml={junit}"]
    result = run_logged(command, ctx.out / "gpu_tests.log", timeout=ctx.time_limit(170))
    summary = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", result["tail"])
    return {**result, "counts": {kind: int(n) for n, kind in summary}}


def stage_lse(ctx: Context) -> Dict[str, Any]:
    """Each provider's (output, LSE) on one case, against fp32 math: the convention the fast path relies on."""
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    shape = ctx.shape(grid=(32, 32), text_len=256)
    inputs = stripe_inputs(**shape, coverage=0.25, dtype=torch.bfloat16, device=ctx.device)
    q, k, v = inputs[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    want_lse, want_out = torch.logsumexp(s, -1), torch.softmax(s, -1) @ v.float()
    providers = {
        "cudnn": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)[:2],
        "flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                             scale=scale)[:2],
        "efficient": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)[:2],
    }
    report: Dict[str, Any] = {}
    for name, fn in providers.items():
        try:
            out, lse = fn()
            lse_f = lse.float()
            entry: Dict[str, Any] = {"lse_shape": list(lse.shape), "lse_dtype": str(lse.dtype),
                                     "out_rel_err": rel_l2(out, want_out)}
            trimmed = lse_f.reshape(*lse_f.shape[:2], -1)[..., : want_lse.shape[-1]]
            entry["lse_max_abs_err_natural"] = float((trimmed - want_lse).abs().max())
            entry["lse_max_abs_err_log2"] = float((trimmed * math.log(2) - want_lse).abs().max())
            report[name] = entry
        except Exception as exc:  # noqa: BLE001 - one provider missing is a finding, not a failure
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    try:
        from deleaker.plugins import torch_op

        chosen = torch_op.checked_provider(ctx.device.index or 0, q.dtype, q.shape[-1])
        report["fast_path_uses"] = {"provider": chosen.name, "lse_factor": chosen.lse_factor}
    except Exception as exc:  # noqa: BLE001 - recorded
        report["fast_path_uses"] = f"error: {type(exc).__name__}: {exc}"
    return report


def stage_correctness(ctx: Context) -> Dict[str, Any]:
    """The fast path at the FLUX.1-dev shape into poisoned outputs, against the decomposed op (fp32 math)."""
    available, why = fast_path_available()
    if ctx.cuda and not available:
        raise RuntimeError(f"the fast path is not available: {why}")
    report: Dict[str, Any] = {}
    shape = ctx.shape()
    for dtype in (torch.bfloat16, torch.float16):
        inputs = stripe_inputs(**shape, coverage=0.25, dtype=dtype, device=ctx.device, seed=1)
        (q, k, v), mask, _ = inputs
        if ctx.cuda:
            from deleaker.plugins import torch_op

            # Debug mode poisons the workspace and the history output (NaN) before the kernels run.
            got, got_history, _ = torch_op.deleaker_attention_cuda_debug(
                q, k, v, mask, grid=shape["grid"], block_step=INSIDE, history=None, config=CONFIG)
        else:
            got, got_history = op_call(ctx, (inputs[0], mask, shape["grid"]), INSIDE), None
        synchronize(ctx.device)
        exact = decomposed_intermediates(q.float(), k.float(), v.float(), mask, grid=shape["grid"],
                                         block_step=INSIDE, history=None, config=CONFIG)
        in_dtype = decomposed_intermediates(q, k, v, mask, grid=shape["grid"], block_step=INSIDE, history=None,
                                            config=CONFIG)
        views = op_views(ctx, (inputs[0], mask, shape["grid"]), INSIDE)
        err, ref_err = rel_l2(got, exact.out), rel_l2(in_dtype.out, exact.out)
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        report[name] = {
            "all_written": bool(torch.isfinite(got).all()),
            "history_written": None if got_history is None else bool(torch.isfinite(got_history).all()),
            "rel_err_vs_fp32": err, "decomposed_in_dtype_rel_err": ref_err,  # non-finite: null (strict_json)
            "ratio": err / ref_err if ref_err > 0 else None, "union": views["union"],
            "fallback_rows": views["fallback_rows"], "decomposed_fallback_rows": in_dtype.fallback_count,
            "passed": bool(torch.isfinite(got).all()) and err < 1e-2 and err <= 2 * ref_err,
        }
    return report


def timing_cases(ctx: Context) -> List[Tuple[Tuple[int, int], float, int]]:
    """(grid, masks' union asked, entities) of the timing rows: 9-10/25/50% with two entities, 25/50% with four,
    25% with eight (E_max = 8: the union's and thresholds' cost must not jump), then 2048x2048 at 25%. Smoke mode:
    tiny grids (eight stripes of 3 columns need 24)."""
    if ctx.smoke:  # one row per entity count beyond two: the code path, at the least CPU time
        return [*(((16, 16), c, 2) for c in COVERAGES), ((16, 16), 0.25, 4), (SMOKE_GRID_E8, 0.25, 8)]
    return [*(((64, 64), c, 2) for c in COVERAGES), *(((64, 64), c, 4) for c in ENTITY_COVERAGES[4]),
            *(((64, 64), c, 8) for c in ENTITY_COVERAGES[8]), ((128, 128), 0.25, 2)]


def stage_timing(ctx: Context) -> Dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    available, why = fast_path_available()
    if ctx.cuda and not available:
        raise RuntimeError(f"the fast path is not available: {why}")
    rows: List[Dict[str, Any]] = []
    for grid, coverage, entities in timing_cases(ctx):
        shape = ctx.shape(grid=grid)
        tokens = shape["text_len"] + grid[0] * grid[1]
        flops = 4 * shape["batch"] * shape["heads"] * tokens * tokens * shape["head_dim"]
        sets = [stripe_inputs(**shape, coverage=coverage, entities=entities, dtype=torch.bfloat16,
                              device=ctx.device, seed=s)
                for s in range(2)]
        calls = {
            "sdpa_default": lambda i: F.scaled_dot_product_attention(*sets[i][0]),
            "op_outside_window": lambda i: op_call(ctx, (sets[i][0], sets[i][1], grid), OUTSIDE),
            "op_inside_window": lambda i: op_call(ctx, (sets[i][0], sets[i][1], grid), INSIDE),
        }
        if ctx.cuda:
            def flash2(i):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(*sets[i][0])

            calls["sdpa_flash2"] = flash2
        row: Dict[str, Any] = {"grid": list(grid), "text_len": shape["text_len"], "coverage_asked": coverage,
                               "entities": entities}
        row.update(op_views(ctx, (sets[0][0], sets[0][1], grid), INSIDE))
        for name, fn in calls.items():
            ms = time_ms(fn, ctx, sets=2)
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
        base = row["sdpa_default_ms"]
        for name in calls:
            row[f"{name}_vs_sdpa"] = round(row[f"{name}_ms"] / base, 3)
        row["extra_peak_mib_inside"] = extra_peak_mib(lambda: calls["op_inside_window"](0), ctx)
        row["extra_peak_mib_sdpa"] = extra_peak_mib(lambda: calls["sdpa_default"](0), ctx)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report: Dict[str, Any] = {"rows": rows}
    by_case = {(r["coverage_asked"], r["entities"]): r for r in rows}
    e8, e4 = by_case.get((0.25, 8)), by_case.get((0.25, 4))
    if e8 and e4:  # the "no cliff at E_max = 8": E = 8 within 1.2x of E = 4 at the same union
        report["e8_vs_e4_inside_25pct"] = round(e8["op_inside_window_ms"] / e4["op_inside_window_ms"], 3)
    grid = ctx.shape()["grid"]
    cases = []
    for coverage, entities in KERNEL_TIME_CASES if ctx.cuda else SMOKE_KERNEL_TIME_CASES:
        case_grid = SMOKE_GRID_E8 if ctx.smoke and entities == 8 else grid
        cases.append({"coverage_asked": coverage, "entities": entities, "grid": list(case_grid),
                      **kernel_times(ctx, grid=case_grid, coverage=coverage, entities=entities, step=INSIDE)})
    report["kernels_inside"] = cases
    report["kernels_inside_25pct"] = next(c["kernels"] for c in cases
                                          if c["coverage_asked"] == 0.25 and c["entities"] == 2)
    report["kernels_outside"] = kernel_times(ctx, grid=grid, coverage=0.25, entities=2, step=OUTSIDE)["kernels"]
    return report


def kernel_times(ctx: Context, *, grid, coverage: float, entities: int, step: int) -> Dict[str, Any]:
    """Per-kernel device time of one op call (torch.profiler, median of 10 calls per kernel name), and the masks'
    union of the call. Smoke mode: the decomposed op's CPU operators (the code path only; the numbers mean
    nothing)."""
    from torch.profiler import ProfilerActivity, profile

    shape = ctx.shape(grid=grid)
    inputs = stripe_inputs(**shape, coverage=coverage, entities=entities, dtype=torch.bfloat16, device=ctx.device)
    call = (inputs[0], inputs[1], grid)
    union = op_views(ctx, call, step)["union"] if step == INSIDE else None
    for _ in range(3 if ctx.cuda else 1):
        op_call(ctx, call, step)
    synchronize(ctx.device)
    calls = 10 if ctx.cuda else 1
    with profile(activities=[ProfilerActivity.CUDA if ctx.cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            op_call(ctx, call, step)
        synchronize(ctx.device)
    per_name: Dict[str, List[float]] = {}
    for event in prof.events():
        if ctx.cuda and event.device_type.name == "CUDA" and event.device_time > 0:
            per_name.setdefault(event.name, []).append(event.device_time / 1e3)
        elif not ctx.cuda and event.device_type.name == "CPU" and event.cpu_time > 0:
            per_name.setdefault(event.name, []).append(event.cpu_time / 1e3)
    kernels = [{"kernel": name[:160], "calls_per_op": len(times) / calls,
                "median_ms": round(statistics.median(times), 4)}
               for name, times in per_name.items()]
    kernels.sort(key=lambda k: -k["median_ms"] * k["calls_per_op"])
    # On sm_90+ each kernel after a call's first is a programmatic dependent launch (unless
    # DELEAKER_DEPENDENT_LAUNCH=0): its profiled time may include the wait for the one before, so say which.
    dependent = (ctx.cuda and torch.cuda.get_device_capability(ctx.device)[0] >= 9
                 and os.environ.get("DELEAKER_DEPENDENT_LAUNCH", "1") != "0")
    return {"union": union, "dependent_launch": dependent, "kernels": kernels if ctx.cuda else kernels[:10]}


def stage_cuda_graph(ctx: Context) -> Dict[str, Any]:
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    from deleaker.plugins import torch_op

    shape = ctx.shape()
    (q, k, v), mask, _ = stripe_inputs(**shape, coverage=0.25, device=ctx.device)
    step = torch.tensor(INSIDE, device=ctx.device)
    history = torch.rand(shape["batch"], mask.shape[0], shape["grid"][0] * shape["grid"][1], device=ctx.device)

    def call():
        return torch_op.deleaker_attention_cuda(q, k, v, mask, grid=shape["grid"], block_step=step,
                                                history=history, config=CONFIG)

    graph, (out, new_history) = capture_graph(call, warmup=3)  # the graph's static outputs
    report: Dict[str, Any] = {"captured": True}
    for name, value in (("inside", INSIDE), ("outside", OUTSIDE)):
        step.fill_(value)
        eager_out, eager_history = call()
        synchronize(ctx.device)
        out.fill_(math.nan)
        new_history.fill_(math.nan)
        graph.replay()
        synchronize(ctx.device)
        report[f"{name}_bit_equal"] = bool(torch.equal(out, eager_out) and torch.equal(new_history, eager_history))
    step.fill_(INSIDE)
    report["replay_ms"] = round(time_ms(lambda i: graph.replay(), ctx, sets=1), 4)
    report["eager_ms"] = round(time_ms(lambda i: call(), ctx, sets=1), 4)
    report["eager_vs_replay"] = round(report["eager_ms"] / report["replay_ms"], 3)
    report["passed"] = report["inside_bit_equal"] and report["outside_bit_equal"]
    return report


def require_tool(ctx: Context, name: str) -> str:
    """The path of the profiling tool ``name``; the stage is skipped without CUDA or without the tool."""
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    path = shutil.which(name)
    if path is None:
        raise StageSkipped(f"{name} is not on PATH")
    return path


#: Nsight Compute metrics beyond its sections: L2 throughput, the tensor pipe's share of active cycles, achieved
#: occupancy (what decides between more loads in flight, mma.sync, or 128-row tiles).
NCU_METRICS = ("lts__t_bytes.sum.per_second", "lts__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
               "sm__warps_active.avg.pct_of_peak_sustained_active")
NCU_KEYS = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "L2 Cache Throughput", "DRAM Throughput",
            "Achieved Occupancy", "Theoretical Occupancy", "Registers Per Thread", "Dynamic Shared Memory Per Block",
            *NCU_METRICS)
#: A kernel's header line in ncu's text output: "  name<...>(...) (16, 24, 1)x(128, 1, 1), Context 1, ...".
NCU_KERNEL_HEADER = re.compile(r"^\s\s(\S.*?) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context", re.MULTILINE)


def ncu_base_name(kernel: str) -> str:
    """The function's base name ("correction_kernel"), which ncu's -k matches: no namespace, template, arguments."""
    kernel = kernel.replace("(anonymous namespace)::", "")
    return re.sub(r"\W", ".", kernel.split("(")[0].split("<")[0].split()[-1].split("::")[-1])


def ncu_metrics(text: str) -> Dict[str, Dict[str, str]]:
    """Per profiled kernel (by base name), the NCU_KEYS values found in ncu's text output."""
    headers = list(NCU_KERNEL_HEADER.finditer(text))
    found: Dict[str, Dict[str, str]] = {}
    for i, header in enumerate(headers):
        body = text[header.end(): headers[i + 1].start() if i + 1 < len(headers) else len(text)]
        metrics = {}
        for key in NCU_KEYS:
            match = re.search(rf"{re.escape(key)}\s+(\S+)\s+([\d.,]+)", body)
            if match:
                metrics[key] = f"{match.group(2)} {match.group(1)}"
        found.setdefault(ncu_base_name(header.group(1)), metrics)
    return found


def stage_ncu(ctx: Context) -> Dict[str, Any]:
    """Nsight Compute on the two custom kernels that take the most time per call at 25% union (one launch each)."""
    ncu = require_tool(ctx, "ncu")
    kernels = ctx.results.get("stages", {}).get("timing", {}).get("data", {}).get("kernels_inside_25pct", [])
    custom = [k["kernel"] for k in kernels if "deleaker" in k["kernel"].lower()]
    if not custom:
        raise StageSkipped("no custom kernel timed by the timing stage")
    names = list(dict.fromkeys(ncu_base_name(k) for k in custom))[:2]
    base = [ncu, "--clock-control", "none", "-k", f"regex:{'|'.join(names)}", "-c", str(len(names)),
            "--section", "SpeedOfLight", "--section", "LaunchStats", "--section", "Occupancy",
            "--section", "MemoryWorkloadAnalysis"]
    target = [sys.executable, __file__, "--one-call"]
    result = run_logged([*base, "--metrics", ",".join(NCU_METRICS), *target], ctx.out / "ncu.txt",
                        timeout=ctx.time_limit(150))
    metrics = ncu_metrics(result["tail_full"])
    if result["returncode"] != 0 and not metrics:  # a metric this ncu does not know: the sections alone
        result = run_logged([*base, *target], ctx.out / "ncu_sections.txt", timeout=ctx.time_limit(120))
        metrics = ncu_metrics(result["tail_full"])
    return {"kernels": names, **{k: v for k, v in result.items() if k != "tail_full"}, "metrics": metrics}


# ---- the gathered-tile L2 microbenchmark (benchmarks/gather) ------------------------------------------------

GATHER_LIBRARY = ROOT / ".device" / "gather" / "libgather_bench.so"


def load_gather_library(path: Path) -> "ctypes.CDLL":
    """The microbenchmark's shared library (built with nvcc by prepare_device_check.sh, or for the emulator)."""
    import ctypes

    lib = ctypes.CDLL(str(path))
    lib.gather_bench_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.gather_bench_run.restype = ctypes.c_int
    return lib


def gather_pairs(rows: int, tile_rows: int) -> int:
    """(row tile, column tile) pairs, one block each, of a union of ``rows`` rows."""
    return -(-rows // tile_rows) * -(-rows // 64)


def run_gather(lib, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, tile_rows: int, sink: torch.Tensor,
               stream: int = 0) -> None:
    """One pass of the microbenchmark: q, k (H, N, 128), 2-byte elements, contiguous, on one device; index int32
    tokens; sink int32, one per pair. Raises RuntimeError with the library's code on failure."""
    if q.shape != k.shape or q.dim() != 3 or q.shape[-1] != 128 or q.element_size() != 2:
        raise ValueError(f"q and k must be (H, N, 128) with 2-byte elements, got {tuple(q.shape)}, {tuple(k.shape)}")
    if not (q.is_contiguous() and k.is_contiguous() and index.dtype == torch.int32 and index.is_contiguous()):
        raise ValueError("q, k and index must be contiguous and index int32")
    if sink.numel() < gather_pairs(index.numel(), tile_rows) or sink.dtype != torch.int32:
        raise ValueError(f"sink must be int32 with {gather_pairs(index.numel(), tile_rows)} entries at least")
    code = lib.gather_bench_run(q.data_ptr(), k.data_ptr(), index.data_ptr(), index.numel(), tile_rows, q.shape[0],
                                q.stride(0), sink.data_ptr(), stream)
    if code != 0:
        raise RuntimeError(f"gather_bench_run failed with code {code}")


def stage_gather(ctx: Context) -> Dict[str, Any]:
    """The L2 rate of gathered Q/K tiles of 64 and 128 rows at the FLUX.1-dev shape (Q and K fit the L2, as in the
    region kernels), over the region tiles of a 25% and a 50% union: bytes gathered per second and tile cells
    (row x column pairs) covered per second, per tile size."""
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    if not GATHER_LIBRARY.is_file():
        raise StageSkipped(f"{GATHER_LIBRARY.relative_to(ROOT)} is not built (benchmarks/prepare_device_check.sh)")
    lib = load_gather_library(GATHER_LIBRARY)
    shape = ctx.shape()
    report: Dict[str, Any] = {"rows": []}
    for coverage in (0.25, 0.50):
        (q, k, _), _, intended = stripe_inputs(**shape, coverage=coverage, dtype=torch.bfloat16, device=ctx.device)
        q, k = q[0].contiguous(), k[0].contiguous()
        # The union in the kernels' order (grouped by entity), as image tokens.
        union = torch.cat([intended[0, e].nonzero().flatten() for e in range(intended.shape[1])])
        index = (union + shape["text_len"]).to(torch.int32).contiguous()
        for tile_rows in (64, 128):
            pairs = gather_pairs(index.numel(), tile_rows)
            sink = torch.zeros(pairs, dtype=torch.int32, device=ctx.device)
            stream = torch.cuda.current_stream(ctx.device).cuda_stream
            ms = time_ms(lambda i: run_gather(lib, q, k, index, tile_rows, sink, stream), ctx, sets=1)
            gathered = pairs * q.shape[0] * (tile_rows + 64) * q.shape[-1] * q.element_size()
            cells = pairs * q.shape[0] * tile_rows * 64
            row = {"coverage_asked": coverage, "union_rows": index.numel(), "tile_rows": tile_rows, "blocks": pairs,
                   "ms": round(ms, 4), "gathered_gb_per_s": round(gathered / ms / 1e6, 1),
                   "tile_cells_per_us": round(cells / ms / 1e3, 1)}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    return report


def stage_sanitizer(ctx: Context) -> Dict[str, Any]:
    tool = require_tool(ctx, "compute-sanitizer")
    report = {}
    for check in ("memcheck", "racecheck"):
        command = [tool, "--tool", check, "--error-exitcode", "3", "--target-processes", "all",
                   sys.executable, __file__, "--one-call", "--small"]
        result = run_logged(command, ctx.out / f"sanitizer_{check}.txt", timeout=ctx.time_limit(150))
        errors = re.search(r"ERROR SUMMARY: (\d+) error", result["tail_full"])
        # Hazards are reported per kernel: cuDNN's fused attention (its wgmma/TMA code) is not ours to fix.
        reported = re.findall(r"Error: .*? at (\S+?)\+", result["tail_full"])
        ours = sorted({k for k in reported if not k.startswith("cudnn")})
        report[check] = {"returncode": result["returncode"], "errors": int(errors.group(1)) if errors else None,
                         "kernels_reported": sorted(set(reported)), "ours_reported": ours,
                         "tail": result["tail"][-1500:]}
    report["passed"] = all(r["returncode"] == 0 and r["errors"] == 0 for r in report.values())
    report["passed_ours"] = all(not r["ours_reported"] and (r["returncode"] == 0 or r["kernels_reported"])
                                for name, r in report.items() if name in ("memcheck", "racecheck"))
    return report


def stage_flux_step(ctx: Context) -> Dict[str, Any]:
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    table = ctx.out / "flux_step.md"
    command = [sys.executable, str(HERE / "bench_flux_step.py"), "--sizes", "1024x1024:512", "--repeats", "5",
               "--graph", "--out", str(table)]
    result = run_logged(command, ctx.out / "flux_step.log", timeout=ctx.time_limit(240))
    result.pop("tail_full", None)
    if table.is_file():
        result["table"] = table.read_text()
    # Random weights form no entity region through the 3x3 opening: a second pass without smoothing keeps the
    # scattered masks, so the step also pays for the correction.
    masked = ctx.out / "flux_step_masks.md"
    command = [sys.executable, str(HERE / "bench_flux_step.py"), "--sizes", "1024x1024:512", "--repeats", "5",
               "--no-smoothing", "--out", str(masked)]
    second = run_logged(command, ctx.out / "flux_step_masks.log", timeout=ctx.time_limit(150))
    result["masks"] = {"returncode": second["returncode"],
                       "table": masked.read_text() if masked.is_file() else second["tail"][-1500:]}
    return result


def stage_pipeline(ctx: Context) -> Dict[str, Any]:
    """The whole generation, diffusers against our runtime (``bench_pipeline.py``), in one child process; it needs
    most of five minutes (two compiles of the FLUX.1-dev transformer), so run it alone:
    ``DEVICE_CHECK_TIMEOUT=330 bash benchmarks/device_check.sh --only pipeline``."""
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    table = ctx.out / "pipeline.md"
    limit = ctx.time_limit(300)
    # The script skips the rows that no longer fit its budget, which ends before this stage's limit.
    command = [sys.executable, str(HERE / "bench_pipeline.py"), "--out", str(table), "--budget-s",
               str(max(limit - 20, 1))]
    result = run_logged(command, ctx.out / "pipeline.log", timeout=limit)
    result.pop("tail_full", None)
    if table.is_file():
        result["table"] = table.read_text()
    return result


def stage_plugin(ctx: Context) -> Dict[str, Any]:
    script = HERE / "plugin_check.py"
    if not script.is_file():
        raise StageSkipped("benchmarks/plugin_check.py does not exist yet (the C++ plugin's device check)")
    if not ctx.cuda:
        raise StageSkipped("no CUDA device")
    result = run_logged([sys.executable, str(script), "--out", str(ctx.out)], ctx.out / "plugin_check.log",
                        timeout=ctx.time_limit(120))
    result.pop("tail_full", None)
    return result


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], Dict[str, Any]]
    min_seconds: float  # not started with less of the budget left: recorded as skipped instead
    in_process: bool  # runs in this process's CUDA context, which a kernel fault leaves unusable


#: In order of what a short lease most needs: the timings and the fast path's correctness first (in this process),
#: then the stages in child processes (a fault there harms nothing else), the profilers last.
STAGES: List[Stage] = [
    Stage("environment", stage_environment, 10, True),
    Stage("lse", stage_lse, 10, True),
    Stage("correctness", stage_correctness, 20, True),
    Stage("timing", stage_timing, 40, True),
    Stage("cuda_graph", stage_cuda_graph, 10, True),
    Stage("gather", stage_gather, 10, True),
    Stage("gpu_tests", stage_gpu_tests, 30, False),
    Stage("flux_step", stage_flux_step, 60, False),
    Stage("plugin", stage_plugin, 30, False),
    Stage("ncu", stage_ncu, 30, False),
    Stage("sanitizer", stage_sanitizer, 30, False),
    Stage("pipeline", stage_pipeline, 120, False),
]


def cuda_context_error(ctx: Context) -> Optional[str]:
    """Why this process's CUDA context can no longer run work (an illegal address, a trap), or None."""
    if not ctx.cuda:
        return None
    try:
        torch.cuda.synchronize(ctx.device)
        torch.ones(1, device=ctx.device).add_(1).item()
    except Exception as exc:  # noqa: BLE001 - the answer, not a failure
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def run_stage(stage: Stage, ctx: Context, broken: Optional[str]) -> Dict[str, Any]:
    """One stage's record: ok with its data, skipped with a reason, or failed with the error."""
    if stage.in_process and broken:
        return {"status": "skipped", "reason": f"this process's CUDA context is unusable since {broken}"}
    left = ctx.seconds_left()
    if left < stage.min_seconds:
        return {"status": "skipped", "reason": f"out of the time budget ({max(left, 0):.0f} s left, "
                                               f"{stage.min_seconds:.0f} s needed at least)"}
    try:
        return {"status": "ok", "data": stage.run(ctx)}
    except StageSkipped as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one stage failing must not lose the others
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}


def run_logged(command: List[str], log: Path, *, timeout: float) -> Dict[str, Any]:
    """Run ``command`` from the repository root, output to ``log``; a timeout is a result, not an exception."""
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output, code = output + f"\n[timed out after {timeout} s]", None
    log.write_text(output)
    return {"returncode": code, "seconds": round(time.monotonic() - start, 1), "tail": output[-3000:],
            "tail_full": output[-200_000:], "log": log.name}


# ---- the report ----------------------------------------------------------------------------------------------


def markdown(results: Dict[str, Any]) -> str:
    env = results.get("stages", {}).get("environment", {}).get("data", {})
    lines = [f"# Device check: {env.get('device', '?')}, torch {env.get('torch', '?')}, {results.get('started')}", ""]
    lines += ["| stage | status | seconds | summary |", "| --- | --- | --- | --- |"]
    for name, stage in results.get("stages", {}).items():
        summary = stage.get("reason") or stage.get("error", "")
        data = stage.get("data") or {}
        if stage["status"] != "ok":
            pass
        elif name == "gpu_tests":
            summary = json.dumps(data.get("counts"))
        elif name in ("correctness", "cuda_graph", "sanitizer"):
            summary = json.dumps({k: v.get("passed") if isinstance(v, dict) else v for k, v in data.items()
                                  if k in ("bf16", "fp16", "passed", "memcheck", "racecheck", "replay_ms")})
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', '')} | {str(summary)[:300]} |")
    timing = results.get("stages", {}).get("timing", {}).get("data", {}).get("rows", [])
    if timing:
        lines += ["", "## One attention call, bf16 (ms; ratio to default SDPA in the same run)", "",
                  "| grid | T | E | union | SDPA | FA2 | op outside | op inside | inside/SDPA | outside/SDPA "
                  "| fallback rows | extra MiB (op) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in timing:
            lines.append(
                f"| {r['grid'][0]}x{r['grid'][1]} | {r['text_len']} | {r.get('entities', 2)} | {r['union']:.2f} | "
                f"{r['sdpa_default_ms']} | "
                f"{r.get('sdpa_flash2_ms', '-')} | {r['op_outside_window_ms']} | {r['op_inside_window_ms']} | "
                f"{r['op_inside_window_vs_sdpa']} | {r['op_outside_window_vs_sdpa']} | {r['fallback_rows']} | "
                f"{r['extra_peak_mib_inside']} |")
    lines += ["", f"Targets: {json.dumps(TARGETS)}", ""]
    return "\n".join(lines)


def one_call(small: bool) -> None:
    """One op call (the target of ncu and compute-sanitizer)."""
    shape = dict(batch=1, heads=2, text_len=77, grid=(16, 16), head_dim=128) if small else dict(FLUX_SHAPE)
    inputs = stripe_inputs(**shape, coverage=0.25, device="cuda")
    out, _ = deleaker_attention(*inputs[0], inputs[1], grid=shape["grid"], block_step=INSIDE, history=None,
                                config=CONFIG)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_check_out")))
    parser.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on the CPU (tests the script only)")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="seconds for all stages: a stage is skipped, and a child process stopped, rather than "
                             "run past it (device_check.sh sets it a little under its own time limit)")
    parser.add_argument("--one-call", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_call:
        one_call(args.small)
        return 0
    names = [stage.name for stage in STAGES]
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {names}")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be a positive number of seconds, not {args.budget_s}")
    if not args.smoke_cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke-cpu to test the script")
    if args.smoke_cpu:
        # One intra-op thread: on a shared CPU, torch's thread pool contending with other processes made each
        # decomposed call 30x slower (seconds instead of 0.2 s at the smoke shapes).
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke_cpu else "cuda")
    ctx = Context(out=args.out, device=device, smoke=args.smoke_cpu,
                  results={"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "smoke_cpu": args.smoke_cpu, "stages": {}},
                  timing_repeats=3 if args.smoke_cpu else 30, deadline=time.monotonic() + args.budget_s)
    broken: Optional[str] = None  # the in-process stage after which CUDA stopped working, and why
    for stage in STAGES:
        if (only and stage.name not in only) or stage.name in skip:
            continue
        start = time.monotonic()
        record = run_stage(stage, ctx, broken)
        record["seconds"] = round(time.monotonic() - start, 1)
        if stage.in_process and record["status"] == "failed" and not broken:
            error = cuda_context_error(ctx)
            if error:
                broken = record["cuda_context"] = f"the {stage.name} stage ({error})"
        ctx.results["stages"][stage.name] = record
        ctx.save()
        print(f"[device_check] {stage.name}: {record['status']} ({record['seconds']} s)", flush=True)
        if ctx.cuda and not broken:
            torch.cuda.empty_cache()
    print(markdown(ctx.results))
    failed = [n for n, r in ctx.results["stages"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
