"""GPU check of the C++ TensorRT plugin library: ``enqueue`` on device buffers vs the PyTorch fast path.

No TensorRT is needed: a small driver (``tests/trt_plugin_host/plugin_driver.cpp``) plays TensorRT's part through
the library's C++ entry points (build phase, serialized fields, runtime phase with onShapeChange and enqueue), on
CUDA tensors. Each case runs the plugin and ``deleaker.deleaker_attention`` (the PyTorch fast path on CUDA) on the
same inputs, both compared with the float64 reference where it fits in memory, over block steps crossing the
windows with the history threaded from call to call. One JSON and a markdown table go to ``--out``.

Two steps, because the GPU machine has neither the headers nor nvcc:

    # here (CPU machine with nvcc, cuDNN 9 / cudnn-frontend / NVRTC headers: see README "TensorRT plugin"):
    python benchmarks/plugin_check.py prepare --dir build/plugin_check
    # on the GPU machine (torch with CUDA; build/plugin_check carried):
    python benchmarks/plugin_check.py run --dir build/plugin_check --out "$OUT"

``prepare`` builds the plugin against the test stand-in TensorRT headers (interface-identical, checked against
TensorRT-RTX by tests/test_trt_plugin_library.py) with cuDNN's attention, and the driver with g++.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the driver's Python side and the structured inputs live there

CASES = [
    # name, batch, heads, T, grid, head_dim, entities, E_max, dtype, compare with the float64 reference
    ("small-fp16", 2, 2, 77, (16, 16), 64, 3, 4, "float16", True),
    ("small-bf16", 2, 2, 77, (16, 16), 128, 3, 4, "bfloat16", True),
    ("odd-grid-bf16", 1, 4, 256, (33, 31), 128, 4, 8, "bfloat16", True),
    ("flux-dev-1024-bf16", 1, 24, 512, (64, 64), 128, 2, 4, "bfloat16", False),
]
NUM_BLOCKS, BLOCK_OFFSET = 2, 1
STEPS = 5  # block steps 1, 3, 5, 7, 9 with the config below: before, aggregating, inside both, intervening, after
REL_L2_LIMIT = 1e-2


def prepare(directory: Path) -> None:
    from trt_plugin_host import build_gpu_driver, cuda_include_dir

    from deleaker.plugins import trt_build

    library = trt_build.build_plugin(
        trt_build.PluginBuildConfig(out_dir=directory / "plugin", stand_in_headers=True), progress=print
    )
    info = trt_build.library_build_info(library)
    if "cuDNN SDPA" not in info:
        raise SystemExit(f"the plugin was built without cuDNN's attention ({info}); see the README for the headers")
    driver = build_gpu_driver(directory / "driver", cuda_include_dir())
    print(json.dumps({"plugin": str(library), "driver": str(driver), "build_info": info}))


def _config():
    from deleaker import DeLeakerConfig

    return DeLeakerConfig(start_aggregating_from=2, stop_aggregating_at=6, start_intervention_from=4,
                          stop_intervention_at=8)


def run_case(case, plugin, driver) -> dict:
    import torch
    from kernel_checks import rel_l2, structured_inputs
    from trt_plugin_host import drive

    from deleaker import deleaker_attention, deleaker_attention_reference
    from deleaker.export import onnx_node

    name, batch, heads, text_len, grid, head_dim, entities, e_max, dtype_name, with_reference = case
    dtype = getattr(torch, dtype_name)
    config = _config()
    attrs = onnx_node.node_attributes(block_offset=BLOCK_OFFSET, num_blocks=NUM_BLOCKS, grid=grid, config=config)
    history = torch.zeros(batch, e_max, grid[0] * grid[1], device="cuda")
    fast_history = ref_history = None
    rows = []
    for step in range(STEPS):
        block_step = step * NUM_BLOCKS + BLOCK_OFFSET
        (q, k, v), mask = structured_inputs(batch, heads, text_len, grid, head_dim, entities, e_max, dtype, 7 + step)
        inputs = [q, k, v, mask, history, torch.tensor(step, dtype=torch.int64, device="cuda")]
        outputs = [torch.full_like(q, float("nan")), torch.full_like(history, float("nan"))]
        size = drive(plugin, driver, attrs, inputs, outputs)
        workspace = torch.empty(size + 256, dtype=torch.uint8, device="cuda")
        aligned = workspace.data_ptr() + (-workspace.data_ptr() % 256)
        stream = torch.cuda.current_stream().cuda_stream
        start = time.perf_counter()
        drive(plugin, driver, attrs, inputs, outputs, aligned, size, stream)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start  # build + runtime phase + one enqueue: not a kernel time
        out, history = outputs
        fast_out, fast_history = deleaker_attention(q, k, v, mask, grid=grid, block_step=block_step,
                                                    history=fast_history, config=config)
        row = {
            "step": step, "block_step": block_step, "workspace_bytes": size, "drive_seconds": round(seconds, 4),
            "nan": bool(out.isnan().any()), "rel_l2_vs_fast_path": rel_l2(out, fast_out),
            "history_max_abs_vs_fast_path": float((history - fast_history).abs().max()),
        }
        if with_reference:
            ref_out, ref_history = deleaker_attention_reference(
                q.double(), k.double(), v.double(), mask, grid=grid, block_step=block_step, history=ref_history,
                config=config)
            row["rel_l2_vs_reference"] = rel_l2(out, ref_out)
            row["fast_path_rel_l2_vs_reference"] = rel_l2(fast_out, ref_out)
        rows.append(row)
    worst = max(r.get("rel_l2_vs_reference", r["rel_l2_vs_fast_path"]) for r in rows)
    passed = not any(r["nan"] for r in rows) and worst < REL_L2_LIMIT
    return {"case": name, "passed": passed, "worst_rel_l2": worst, "steps": rows}


def run(directory: Path, out_dir: Path) -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("plugin_check run needs a CUDA GPU")
    plugin_path = directory / "plugin" / "libdeleaker_trt_plugin.so"
    driver_path = next((directory / "driver").glob("libdeleaker_plugin_driver-*.so"))
    plugin, driver = ctypes.CDLL(str(plugin_path)), ctypes.CDLL(str(driver_path))
    info = plugin.deleaker_trt_plugin_build_info
    info.restype = ctypes.c_char_p
    results = []
    for case in CASES:
        try:
            results.append(run_case(case, plugin, driver))
        except Exception as exc:  # one failing case must not hide the others' results
            results.append({"case": case[0], "passed": False, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results[-1])[:400], flush=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "build_info": info().decode(),
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plugin_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"# plugin_check ({report['device']}, {report['date']})", "", "| case | passed | worst rel. L2 |",
             "| --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['passed']} | {r.get('worst_rel_l2', r.get('error'))} |" for r in results]
    (out_dir / "plugin_check.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the plugin (with cuDNN) and the driver here")
    p.add_argument("--dir", type=Path, required=True)
    r = sub.add_parser("run", help="run the cases on the GPU")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir)
        return 0
    return run(args.dir, args.out)


if __name__ == "__main__":
    sys.exit(main())
