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
    assert list(stages) == ["environment", "lse", "correctness", "timing", "cuda_graph", "gpu_tests", "flux_step",
                            "plugin", "ncu", "sanitizer"]
    for name in ("environment", "correctness", "timing"):
        assert stages[name]["status"] == "ok", stages[name]
    for name in ("gpu_tests", "lse", "cuda_graph", "ncu", "sanitizer", "flux_step"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"], stages[name]
    for dtype in ("bf16", "fp16"):
        assert stages["correctness"]["data"][dtype]["passed"] is True
    rows = stages["timing"]["data"]["rows"]
    assert [r["coverage_asked"] for r in rows] == [0.10, 0.25, 0.50]
    assert all(r["sdpa_default_ms"] > 0 and r["op_inside_window_ms"] > 0 and 0 < r["union"] < 1 for r in rows)
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
