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


_INTERRUPTED_COMMAND = r"""
import atexit, signal, sys
import click
from deleaker.runtime.cli.errors import reported_errors

def state():
    ignored = [s.name for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.SIG_IGN]
    print("ignored at exit:", ignored, file=sys.stderr)

atexit.register(state)
try:
    with reported_errors("the test's output"):
        raise KeyboardInterrupt
except click.exceptions.Exit as exc:
    sys.exit(exc.exit_code)
"""


def test_an_interrupted_command_ignores_further_signals_on_its_way_out():
    """A second Ctrl-C while the interpreter shuts down (torch's atexit handlers) printed a traceback."""
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_COMMAND], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert "error: interrupted; no output was written for the test's output" in done.stderr
    assert "ignored at exit: ['SIGINT', 'SIGTERM']" in done.stderr


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
    assert first.startswith("exporting the ONNX for 64x64, T=32, E_max=4 into the cache (once per weights, size")
    assert "exported transformer.onnx (4 joint attentions, DeLeaker decomposed into standard ONNX operators)" in \
        result.stderr
    assert "torchvision" not in result.stderr and "Warning" not in result.stderr, result.stderr


def _read_stderr_until(process: subprocess.Popen, marker: str, timeout_s: float = 240) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        chunk = process.stderr.read(1)
        assert chunk, f"the command ended early: {seen}"
        seen += chunk
    return seen


def test_ctrl_c_during_a_build_exits_130_and_leaves_no_artifact(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while exporting: exit 130 with an error line,
    not click's "Aborted!" and exit 1; no ONNX without its manifest."""
    out = tmp_path / "engines"
    args = ["build", "--model", "tiny", "--onnx-only", "--text-len", "32", "--height", "64", "--width", "64",
            "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(
        [*CLI, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        seen = _read_stderr_until(process, "exporting ONNX")
        time.sleep(1)  # inside the export
        os.killpg(process.pid, signal.SIGINT)
        stdout, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = seen + rest
    assert process.returncode == 130, stderr
    assert "error: interrupted; no output was written" in stderr and "Aborted!" not in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert _files(out) == [".build.lock"]


#: A stand-in for cmake: configuring succeeds at once; building starts a compiler-like child (a long sleep, as make
#: starts nvcc) and waits for it, writing the child's pid where the test reads it.
FAKE_CMAKE = """#!/bin/sh
case " $* " in
  *" --build "*) sleep 300 & echo $! > "$COMPILER_PID_FILE"; wait ;;
esac
exit 0
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has stopped; its reaper is not ours
    except FileNotFoundError:
        return True


@pytest.mark.parametrize(
    "signum,whole_group,code,word",
    [(signal.SIGINT, True, 130, "interrupted"), (signal.SIGINT, False, 130, "interrupted"),
     (signal.SIGTERM, False, 143, "terminated")],  # fmt: skip
    ids=["ctrl-c", "INT-to-the-process", "TERM-to-the-process"],
)
def test_a_signal_during_a_plugin_build_stops_its_compilers(tmp_path, signum, whole_group, code, word):
    """Ctrl-C, or SIGINT/SIGTERM sent to the `plugin` process alone while it compiles: exit 128 + the signal's
    number with an error line, and the compilers it started stop too (no orphaned make/nvcc)."""
    bin_dir, pid_file, out = tmp_path / "bin", tmp_path / "compiler.pid", tmp_path / "plugin"
    bin_dir.mkdir()
    (bin_dir / "cmake").write_text(FAKE_CMAKE)
    (bin_dir / "cmake").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "COMPILER_PID_FILE": str(pid_file)}
    process = subprocess.Popen(
        [*CLI, "plugin", "--out", str(out), "--stand-in-headers"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    compiler = None
    try:
        seen = _read_stderr_until(process, "compiling the plugin", timeout_s=60)
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        compiler = int(pid_file.read_text())
        if whole_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        stdout, rest = process.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while not _gone(compiler) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(compiler), "the compiler outlived the plugin command"
    finally:
        if process.poll() is None:
            process.kill()
        if compiler is not None and not _gone(compiler):
            os.kill(compiler, signal.SIGKILL)
    stderr = seen + rest
    assert process.returncode == code, stderr
    assert f"error: {word}; no output was written for the library" in stderr and "Aborted!" not in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not (out / "libdeleaker_trt_plugin.so").exists()
