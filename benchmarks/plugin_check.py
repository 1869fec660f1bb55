"""GPU check of the C++ TensorRT plugin library: ``enqueue`` on device buffers vs the PyTorch fast path.

No TensorRT is needed: a small driver (``tests/trt_plugin_host/plugin_driver.cpp``) plays TensorRT's part through
the library's C++ entry points (build phase, serialized fields, runtime phase with onShapeChange and enqueue), on
CUDA tensors. Each case runs the plugin and ``deleaker.deleaker_attention`` (the PyTorch fast path on CUDA) on the
same inputs, both compared with the float64 reference where it fits, over block steps crossing the windows with the
history threaded from call to call. ``plugin_check.json`` and ``plugin_check.md`` go to ``--out``.

Two steps, because the GPU machine has neither the headers nor nvcc (the device check, benchmarks/device_check.sh,
runs the second and sets DELEAKER_TRT_PLUGIN_DIR when .device/plugin was carried):

    python benchmarks/plugin_check.py --prepare              # here: .device/plugin (library + driver)
    python benchmarks/plugin_check.py --out "$OUT"           # on the GPU machine

``--prepare`` builds the plugin against the test stand-in TensorRT headers (interface-identical, checked against
TensorRT-RTX by tests/test_trt_plugin_library.py) with cuDNN's attention, and the driver with g++. The cuDNN,
cudnn-frontend and NVRTC headers come from $CUDNN_ROOT / $CUDNN_FRONTEND_ROOT / $CMAKE_INCLUDE_PATH or this Python's
site-packages; where they are missing, the three pip wheels are downloaded (pip, no install) and only their headers
kept under .device/headers.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the driver's Python side and the structured inputs live there
DEFAULT_DIR = Path(os.environ.get("DELEAKER_TRT_PLUGIN_DIR") or ROOT / ".device" / "plugin")
#: pip wheels (requirements) that hold the headers the plugin's cuDNN attention compiles against, and where in them.
#: cuDNN's are those of the oldest cuDNN 9 we expect at run time, 9.19 (torch 2.11's, the GPU machines'): a library
#: built against older cuDNN 9 headers runs on newer cuDNN 9, not the other way round.
HEADER_WHEELS = {
    "nvidia-cudnn-cu13==9.19.0.56": ("nvidia/cudnn/include/", "CUDNN_ROOT"),
    "nvidia-cudnn-frontend": ("include/", "CUDNN_FRONTEND_ROOT"),
    "nvidia-cuda-nvrtc": ("nvidia/cu13/include/", "CMAKE_INCLUDE_PATH"),
}

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


def _fetch_headers(headers: Path) -> dict:
    """Environment variables pointing the plugin build at the cuDNN / cudnn-frontend / NVRTC headers, fetched from
    their pip wheels (downloaded, not installed; only the headers are kept) unless already given."""
    env = {}
    for requirement, (prefix, variable) in HEADER_WHEELS.items():
        if os.environ.get(variable):
            continue
        target = headers / requirement.split("==")[0]
        complete = target / ".complete"
        if not complete.is_file() or complete.read_text() != requirement:  # interrupted, or another version: redone
            shutil.rmtree(target, ignore_errors=True)
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, requirement],
                               check=True)
                staged = Path(tmp) / "headers"
                with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as archive:
                    for name in archive.namelist():
                        # Every file of the include folder: cudnn-frontend also ships .hpp (its JSON library).
                        if name.startswith(prefix) and not name.endswith("/") and not name.endswith(".so"):
                            archive.extract(name, staged)
                (staged / ".complete").write_text(requirement)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staged), target)
        include = target / prefix
        env[variable] = str(include if variable == "CMAKE_INCLUDE_PATH" else include.parent)
    return env


def prepare(directory: Path) -> None:
    """The library and the driver into ``directory`` (what is carried: a few MB); CMake's build folder and the
    headers stay in the kernel cache."""
    from trt_plugin_host import build_gpu_driver, cuda_include_dir

    from deleaker.plugins import kernels_build as kernel_build
    from deleaker.plugins import trt_plugin_build as trt_build

    work = kernel_build.cache_root() / "plugin_check"
    os.environ.update(_fetch_headers(work / "headers"))
    built = trt_build.build_plugin(
        trt_build.PluginBuildConfig(out_dir=work / "plugin", stand_in_headers=True), progress=print
    )
    info = trt_build.library_build_info(built)
    if "cuDNN SDPA" not in info:
        raise SystemExit(f"the plugin was built without cuDNN's attention: {info}")
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / trt_build.LIBRARY_NAME
    shutil.copyfile(built, library)
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
    plugin_path = directory / "libdeleaker_trt_plugin.so"
    drivers = sorted((directory / "driver").glob("libdeleaker_plugin_driver-*.so"))
    if not plugin_path.is_file() or not drivers:
        raise SystemExit(f"no prepared plugin and driver in {directory}: run plugin_check.py --prepare there first")
    driver_path = drivers[-1]
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
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="the prepared library and driver (default: $DELEAKER_TRT_PLUGIN_DIR or .device/plugin)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--prepare", action="store_true", help="build the plugin (with cuDNN) and the driver here")
    action.add_argument("--out", type=Path, help="run the cases on the GPU; results go here")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.dir)
        return 0
    return run(args.dir, args.out)


if __name__ == "__main__":
    sys.exit(main())
