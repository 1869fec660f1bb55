"""``deleaker-trt run`` as a process meets the world: a filesystem that refuses writes, Ctrl-C, a first run that
exports. Each test runs the real command in a subprocess with the tiny model.

A full disk is made real with RLIMIT_FSIZE (no root needed for a tmpfs): the kernel refuses every write past the
limit with EFBIG, as a full filesystem refuses with ENOSPC; SIGXFSZ is ignored so the write fails instead of
killing the process. Both reach the same code path (an ``OSError`` from the PNG write).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from deleaker.runtime.cli import main

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
# The torch backend: no ONNX export, so each process only loads the tiny model.
BASE = ["run", "--model", "tiny", "--backend", "torch", "--text-len", "32", "--prompt", PROMPT,
        "--entities", "cat,cheetah", "--seed", "3"]  # fmt: skip
CLI = [sys.executable, "-m", "deleaker.runtime.cli"]


def _limited_writes(max_bytes: int):
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the ignored disposition survives exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return setup


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_full_disk_is_one_error_line_and_compare_writes_both_or_neither(tmp_path):
    # The sizes of this seed's two PNGs, from an unlimited run in this process.
    sizes_dir = tmp_path / "sizes"
    done = CliRunner().invoke(main, [*BASE, "--steps", "1", "--no-progress", "--compare", "--out", sizes_dir / "x.png"])
    assert done.exit_code == 0, done.output
    image, pair = (sizes_dir / "x.png").stat().st_size, (sizes_dir / "x_compare.png").stat().st_size
    assert image < pair, "the test relies on the pair being the larger file"

    for limit, folder in ((1000, "tiny_limit"), ((image + pair) // 2, "between")):
        out = tmp_path / folder / "x.png"
        out.parent.mkdir()
        result = subprocess.run(
            [*CLI, *BASE, "--steps", "1", "--no-progress", "--compare", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_limited_writes(limit),
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out.parent}/x"), result.stderr
        assert "File too large; nothing was written" in lines[0] and "Traceback" not in result.stderr
        # Below the limit the image alone would have fitted: it is not left without its pair.
        assert _files(out.parent) == [], f"limit {limit}: {_files(out.parent)}"


@pytest.mark.parametrize(
    "signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")], ids=["INT", "TERM"]
)
def test_a_signal_during_a_run_exits_cleanly_and_leaves_no_file(tmp_path, signum, code, word):
    """Ctrl-C (SIGINT) or SIGTERM while denoising: one error line, 128 + the signal's number, no file."""
    out = tmp_path / "x.png"
    process = subprocess.Popen(
        [*CLI, *BASE, "--steps", "400", "--compare", "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        seen = ""
        deadline = time.monotonic() + 240
        while "DeLeaker:" not in seen and time.monotonic() < deadline:  # the progress bar: denoising has begun
            chunk = process.stderr.read(1)
            assert chunk, f"the run ended early: {seen}"
            seen += chunk
        process.send_signal(signum)
        stdout, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = seen + rest
    assert process.returncode == code, stderr
    assert f"error: {word}; no output was written" in stderr and "Traceback" not in stderr
    assert _files(tmp_path) == []


def test_first_run_says_it_exports_and_prints_no_library_noise(tmp_path):
    """A cold cache exports the ONNX for ~10 s: one line on stderr says so and why; no torchvision notices."""
    cache, out = tmp_path / "cache", tmp_path / "x.png"
    args = ["run", "--model", "tiny", "--text-len", "32", "--steps", "1", "--no-progress", "--prompt", PROMPT,
            "--entities", "cat,cheetah", "--cache-dir", str(cache), "--set", "std_mul_text=0.25",
            "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TRANSFORMERS_VERBOSITY")}
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("exporting the ONNX for 64x64 (no export in the cache yet for these weights, T=32")
    assert "torchvision" not in result.stderr and "Warning" not in result.stderr, result.stderr
