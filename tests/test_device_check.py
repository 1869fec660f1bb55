"""The GPU device check (``benchmarks/device_check.py``) runs end to end on the CPU in its smoke mode.

A GPU session has 15 minutes of device time in all: the check must not fail for a Python mistake. The smoke mode
runs every stage's own code at tiny shapes with the decomposed op standing in for the kernels, skips the stages
that need CUDA with a reason, and writes the same strict JSON and markdown table.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke_run_writes_strict_json_and_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke-cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (tmp_path / "device_check.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text)
    stages = report["stages"]
    assert list(stages) == ["environment", "lse", "correctness", "timing", "cuda_graph", "gather", "gpu_tests",
                            "flux_step", "plugin", "ncu", "sanitizer", "pipeline"]
    for name in ("environment", "correctness", "timing"):
        assert stages[name]["status"] == "ok", stages[name]
    for name in ("gpu_tests", "lse", "cuda_graph", "gather", "ncu", "sanitizer", "flux_step", "pipeline"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"], stages[name]
    for dtype in ("bf16", "fp16"):
        assert stages["correctness"]["data"][dtype]["passed"] is True
    rows = stages["timing"]["data"]["rows"]
    # Two entities at three unions, then four and eight entities (E_max 8: the "no cliff" case).
    assert [(r["coverage_asked"], r["entities"]) for r in rows] == [(0.10, 2), (0.25, 2), (0.50, 2), (0.25, 4),
                                                                    (0.25, 8)]
    assert all(r["sdpa_default_ms"] > 0 and r["op_inside_window_ms"] > 0 and 0 < r["union"] < 1 for r in rows)
    assert all(abs(r["union"] - 0.25) < 0.1 for r in rows[3:]), [r["union"] for r in rows]
    timing = stages["timing"]["data"]
    assert timing["e8_vs_e4_inside_25pct"] > 0
    profiled = timing["kernels_inside"]
    assert [(c["coverage_asked"], c["entities"]) for c in profiled] == [(0.25, 2), (0.25, 8)]
    assert all(c["kernels"] and 0 < c["union"] < 1 for c in profiled)
    assert all(c["dependent_launch"] is False for c in profiled)  # on the CPU: no dependent launches to label
    assert timing["kernels_inside_25pct"] == profiled[0]["kernels"] and timing["kernels_outside"]
    table = (tmp_path / "device_check.md").read_text()
    assert "| correctness | ok |" in table and "inside/SDPA" in table


def test_device_check_refuses_unknown_stage(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke-cpu", "--only", "nonsense",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "unknown stage" in result.stderr


def test_device_check_budget_skips_what_no_longer_fits(tmp_path):
    """With 12 s, the stages that need 10 s at least start; those that need 20 or more are recorded as skipped for
    the budget, not left out, and the run still succeeds."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke-cpu", "--budget-s", "12",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = json.loads((tmp_path / "device_check.json").read_text())["stages"]
    assert stages["environment"]["status"] == "ok"
    assert stages["lse"]["reason"] == stages["cuda_graph"]["reason"] == "no CUDA device"
    for name in ("correctness", "timing", "gpu_tests", "flux_step", "plugin", "ncu", "sanitizer"):
        assert stages[name]["status"] == "skipped" and "out of the time budget" in stages[name]["reason"], name


@pytest.mark.parametrize("budget", ["0", "-5", "nan"])
def test_device_check_refuses_a_budget_that_is_not_positive(tmp_path, budget):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke-cpu", f"--budget-s={budget}",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--budget-s must be a positive" in result.stderr
    assert not (tmp_path / "device_check.json").exists()


def test_child_process_limits_end_inside_the_budget():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_check

    ctx = device_check.Context(out=Path("unused"), device=device_check.torch.device("cpu"), smoke=True, results={},
                               deadline=time.monotonic() + 100)
    assert 90 < ctx.time_limit(170) <= 95  # clipped to what is left, less the margin to record the result
    assert ctx.time_limit(30) == 30
    assert device_check.Context(out=Path("unused"), device=ctx.device, smoke=True, results={}).time_limit(170) == 170
    late = device_check.Context(out=Path("unused"), device=ctx.device, smoke=True, results={},
                                deadline=time.monotonic() - 1)
    assert late.time_limit(170) == 1.0 and late.seconds_left() < 0


def test_after_a_cuda_fault_only_child_process_stages_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_check

    ctx = device_check.Context(out=Path("unused"), device=device_check.torch.device("cpu"), smoke=True, results={})
    broken = "the correctness stage (AcceleratorError: an illegal memory access was encountered)"
    here = device_check.Stage("here", lambda c: {"ran": True}, 0, in_process=True)
    child = device_check.Stage("child", lambda c: {"ran": True}, 0, in_process=False)
    assert device_check.run_stage(here, ctx, broken=None) == {"status": "ok", "data": {"ran": True}}
    skipped = device_check.run_stage(here, ctx, broken=broken)
    assert skipped["status"] == "skipped" and broken in skipped["reason"]
    assert device_check.run_stage(child, ctx, broken=broken) == {"status": "ok", "data": {"ran": True}}
    failing = device_check.Stage("failing", lambda c: 1 / 0, 0, in_process=True)
    record = device_check.run_stage(failing, ctx, broken=None)
    assert record["status"] == "failed" and record["error"].startswith("ZeroDivisionError")
    assert device_check.cuda_context_error(ctx) is None  # no CUDA context to lose on the CPU


#: ncu's text output for two kernels (the layout of Nsight Compute 2025's "--section" pages), trimmed.
NCU_TEXT = """==PROF== Connected to process 123
  void deleaker::(anonymous namespace)::correction_kernel<__nv_bfloat16, 128>(DeLeakerParams, deleaker::Workspace, int) (16, 24, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    Duration                         us       275.01
    L2 Cache Throughput               %        31.20
    Compute (SM) Throughput           %        15.02
    Section: Occupancy
    Achieved Occupancy                %        11.05
    lts__throughput.avg.pct_of_peak_sustained_elapsed  %  31.2
    sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active  %  4.1
  void deleaker::region_stats_kernel<__nv_bfloat16, 128>(DeLeakerParams, deleaker::Workspace) (256, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Duration                         us       165.40
    Registers Per Thread    register/thread          255
"""


def test_ncu_output_is_read_per_kernel():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_check

    metrics = device_check.ncu_metrics(NCU_TEXT)
    assert list(metrics) == ["correction_kernel", "region_stats_kernel"]
    assert metrics["correction_kernel"]["Duration"] == "275.01 us"
    assert metrics["correction_kernel"]["L2 Cache Throughput"] == "31.20 %"
    assert metrics["correction_kernel"]["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"] \
        == "4.1 %"
    assert metrics["region_stats_kernel"] == {"Duration": "165.40 us", "Registers Per Thread": "255 register/thread"}
    assert device_check.ncu_base_name("void deleaker::cut_kernel<__half, 64>(DeLeakerParams)") == "cut_kernel"
