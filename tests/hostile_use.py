"""Shared by the tests of hostile use (signals, caches, engine folders from someone else): the tiny model's
prompt and knobs, child processes whose abort fails one test instead of killing pytest, and Ctrl-C at a chosen
moment. Test infrastructure, not a test module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
from click.testing import CliRunner

from deleaker.config import DeLeakerConfig
from deleaker.engines import build as build_lib
from deleaker.export.exporter import export_attention_onnx
from deleaker.export.onnx_node import OP_TYPE
from deleaker.runtime.cli import main as cli_main

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
ENTITIES = ("cat", "cheetah")
TEXT_LEN = 16
# Windows at the start of the 4-block tiny model's schedule and thresholds low enough to find large masks on random
# weights, so DeLeaker changes the result (~1e-3 relative on the latents) and comparisons are not the trivial ones.
KNOBS = dict(
    start_aggregating_from=1,
    stop_aggregating_at=9,
    start_intervention_from=2,
    stop_intervention_at=40,
    std_mul_text=-0.5,
    std_mul_image_image=0.5,
)
CONFIG = DeLeakerConfig(**KNOBS)
CLI = [sys.executable, "-m", "deleaker.runtime.cli"]


def child(args: list[str], *, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def python_child(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return child([sys.executable, "-c", code, *map(str, args)], timeout=timeout)


def assert_no_abort(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> None:
    """The child ended by itself (no signal such as SIGABRT) and C++ never terminated it."""
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {stderr[-2000:]}"
    assert "terminate called" not in stderr, stderr[-2000:]


def invoke_cli(*args) -> "CliRunner.Result":
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


INTERRUPTED_RUN = r"""
import sys
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest
backend, cache_dir = sys.argv[1], sys.argv[2]
rt = DeLeakerRuntime.from_model("tiny", backend=backend, text_len=16, cache_dir=cache_dir)
request = GenerationRequest("A cat and a cheetah", ("cat", "cheetah"), steps=1000, height=128, width=128)
rt.prepare(request)
print("READY", flush=True)
try:
    rt.generate(request)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
print("FINISHED", flush=True)
"""


def interrupt_when_ready(args: list[str], ready: str, delay: float = 1.0) -> tuple[subprocess.Popen, str, float]:
    """Start ``args``, wait for ``ready`` on stdout or stderr, send SIGINT ``delay`` s later; returns the finished
    process, its output (stdout and stderr) and the seconds it took to end after the signal."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []

    def watch(stream) -> None:
        for line in iter(stream.readline, ""):
            seen.append(line)

    watchers = [threading.Thread(target=watch, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for w in watchers:
        w.start()
    deadline = time.monotonic() + 240
    while not any(ready in line for line in seen) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"the child ended before {ready!r}: {''.join(seen)[-2000:]}"
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    took = time.monotonic() - sent
    for w in watchers:
        w.join(timeout=10)
    return proc, "".join(seen), took


def set_attributes(node: onnx.NodeProto, changes: dict) -> None:
    """Set ``node``'s int or float attributes named in ``changes`` (a hand edit of an exported graph)."""
    for attr in node.attribute:
        if attr.name in changes:
            if attr.type == onnx.AttributeProto.FLOAT:
                attr.f = changes[attr.name]
            else:
                attr.i = changes[attr.name]


def node_graph(tmp_path: Path, **changes) -> Path:
    """A one-node DeLeakerAttention graph with some attributes replaced (as a hostile file would have them)."""
    path = export_attention_onnx(
        tmp_path / "node.onnx", batch=1, heads=2, text_len=8, grid=(4, 4), head_dim=16, max_entities=3, config=CONFIG
    )
    model = onnx.load(str(path))
    (node,) = [n for n in model.graph.node if n.op_type == OP_TYPE]
    set_attributes(node, changes)
    onnx.save(model, str(path))
    return path


ONNX_NAME = "transformer.64x64.fp16.onnx"
MANIFEST_NAME = ONNX_NAME + ".manifest.json"


def copy_built(built: Path, tmp_path: Path) -> Path:
    engines = tmp_path / "engines"
    shutil.copytree(built, engines, ignore=shutil.ignore_patterns(".*"))
    return engines


def edit_manifest(engines: Path, edit) -> None:
    path = engines / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def run_engines(engines: Path, tmp_path: Path, *extra):
    return invoke_cli(
        "run", "--engines", engines, "--cache-dir", tmp_path / "cache", "--prompt", PROMPT, "--entities", "cat,cheetah",
        "--steps", "2", "--no-progress", "--out", tmp_path / "x.png", *extra,
    )


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "onnx").iterdir() if p.is_dir())


def build_tiny_onnx(out: Path) -> Path:
    """What `deleaker-trt build --onnx-only` writes for the tiny model (fp16, 64x64, T = 16, knobs that act)."""
    request = build_lib.BuildRequest(
        model="tiny", precision="fp16", out_dir=out, height=64, width=64, text_len=TEXT_LEN, onnx_only=True,
        deleaker_config=KNOBS,
    )
    build_lib.build_engines(request)
    return out
