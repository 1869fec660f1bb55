"""``benchmarks/bench_pipeline.py`` (the whole-generation benchmark of the device check): its argument handling, and a
dry run of its eager rows on the tiny model on the CPU (the GPU run times FLUX.1-dev's architecture)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_pipeline.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pipeline

    return bench_pipeline


def test_defaults_are_the_issues_settings(bench):
    if not bench.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args([])  # no GPU: refused, pointing at --dry-run
    args = bench.parse_args(["--dry-run"])
    assert (args.height, args.width, args.steps, args.text_len) == (64, 64, 2, 32)
    assert args.rows == list(bench.ROWS)
    # The rows run in ROWS' order whatever the order asked: the FP8 row quantizes the transformer in place.
    assert bench.parse_args(["--dry-run", "--rows", "ours_fp8,diffusers"]).rows == ["diffusers", "ours_fp8"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rows", "ours,diffusers"], "--rows takes names of"),
        (["--rows", ","], "--rows takes names of"),
        (["--height", "100"], "multiples of 16"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--budget-s", "0"], "--budget-s must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(argv, message):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_dry_run_times_the_eager_rows_and_writes_the_table(bench, tmp_path):
    out = tmp_path / "pipeline.md"
    report = bench.main(["--dry-run", "--steps", "1", "--rows", "diffusers,ours_on,ours_fp8", "--fp8-eager",
                         "--out", str(out)])
    rows = report["rows"]
    assert list(rows) == ["diffusers", "ours_on", "ours_fp8"]
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["first_call_s"] > 0 and row["finite_image"] and not row["compiled"]
    assert rows["diffusers"]["vs_diffusers"] == 1.0
    assert rows["ours_fp8"]["psnr_vs_ours_on_db"] > 30  # FP8 close to bf16/fp32, not the same image
    table = out.read_text()
    assert "| diffusers | ok |" in table and "| ours_fp8 | ok |" in table
    assert json.loads(out.with_suffix(".json").read_text())["rows"]["ours_on"]["status"] == "ok"


def test_a_row_that_no_longer_fits_the_budget_is_skipped(bench):
    args = bench.parse_args(["--dry-run", "--rows", "ours_on_compiled"])
    instance = bench.Bench(args)
    instance.deadline = bench.time.monotonic() + 10  # less than a compiled row needs
    row = instance.run("ours_on_compiled")
    assert row["status"] == "skipped" and "out of the time budget" in row["reason"]
