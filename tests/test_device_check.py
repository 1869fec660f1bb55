"""The GPU device check (``benchmarks/device_check.py``) runs end to end on the CPU in its smoke mode.

A GPU session has 15 minutes of device time in all: the check must not fail for a Python mistake. The smoke mode
runs every stage's own code at tiny shapes with the decomposed op standing in for the kernels, skips the stages
that need CUDA with a reason, and writes the same strict JSON and markdown table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert list(stages) == ["environment", "gpu_tests", "lse", "correctness", "timing", "cuda_graph", "ncu",
                            "sanitizer", "flux_step", "plugin"]
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
