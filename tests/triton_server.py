"""Test infrastructure: a real Triton Inference Server (the ``tritonserver`` binary and python backend that the
``nvidia-pytriton`` wheel ships) in an environment of its own, for ``tests/test_triton.py``.

Why an environment of its own, and what it holds (made once, reused; `server_environment`):

- ``venv/``: a virtual environment WITHOUT the system's site-packages holding ``nvidia-pytriton`` with its
  dependencies (``numpy<2``, ``tritonclient[grpc,http]`` with ``protobuf<7``). It provides the server binary, the
  python backend and Triton's model-config schema (``tritonclient.grpc.model_config_pb2``), none of which this
  project's own environment (numpy 2, protobuf 7) can take.
- ``stub-site/``: ``numpy<2`` alone. The python backend runs each model in a stub process that embeds this
  interpreter's ``libpython3.X.so`` (found through ``LD_LIBRARY_PATH``) and exchanges tensors with numpy through
  pybind11 code built before numpy 2: with numpy 2 it reads ``[1, 2]`` as ``[1, 1]`` (the dtype struct changed).
  The stub's interpreter is isolated: it ignores ``PYTHONPATH``/``PYTHONHOME`` and sees its libpython's own
  site-packages (torch, onnxruntime, ... of this interpreter), so a venv, with or without
  ``--system-site-packages``, cannot be its environment. The repository's ``--python-path`` (written into
  ``runtime.json``, put first on ``sys.path`` by the generated ``model.py``) names ``stub-site`` (numpy 1 shadows
  numpy 2; torch, onnxruntime and PIL import with it) and `checkout_folder` (this checkout's ``deleaker``,
  whichever other install of it the system's site-packages hold).

The cache folder is ``$DELEAKER_TEST_CACHE/triton`` (default ``~/.cache/deleaker-trt-tests/triton``), owned by the
tests: nothing else is written there, and it is made under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

#: What the cache environment installs (the versions this was tested with).
PYTRITON = "nvidia-pytriton==0.7.0"
STUB_NUMPY = "numpy<2"
#: Bounds on every wait: installing (a 55 MB wheel), the server becoming ready.
INSTALL_TIMEOUT_S = 900
READY_TIMEOUT_S = 300


class TritonSetupError(RuntimeError):
    """The server environment could not be made or the server did not start (why, with the log's tail)."""


def cache_root() -> Path:
    base = os.environ.get("DELEAKER_TEST_CACHE") or str(Path.home() / ".cache" / "deleaker-trt-tests")
    return Path(base) / "triton"


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def server_environment() -> Path:
    """The cache folder with ``venv/`` and ``stub-site/`` (see the module docstring), made on first use."""
    root = cache_root() / f"py{_python_tag()}-{PYTRITON.replace('==', '-')}"
    if (root / "complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _run([sys.executable, "-m", "venv", str(staging / "venv")])
        # The venv's pip, pointed at the same package index as this interpreter's (pip's own configuration).
        _run([str(staging / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", PYTRITON])
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging / "stub-site"),
              STUB_NUMPY])
        server = _server_tree(staging)
        stub = server / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonSetupError(f"{PYTRITON} has no python backend stub for Python {_python_tag()}")
        # The python backend looks for its stub beside itself (pytriton copies it there at run time).
        shutil.copy2(stub, server / "backends" / "python" / "triton_python_backend_stub")
        (staging / "complete").write_text(PYTRITON + "\n")
        if root.exists():  # another process finished first: keep its folder
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _server_tree(root: Path) -> Path:
    matches = sorted((root / "venv" / "lib").glob("python3*/site-packages/pytriton/tritonserver"))
    if not matches:
        raise TritonSetupError(f"no pytriton/tritonserver folder under {root / 'venv'}")
    return matches[0]


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TritonSetupError(f"{' '.join(command)} took more than {INSTALL_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise TritonSetupError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")


def checkout_folder(tmp: Path) -> Path:
    """A folder holding the ``deleaker`` package under test as a plain package tree (symlinks to this checkout's
    folders: the project maps its subpackages to top-level folders), for the stub's ``sys.path``: a folder on
    ``sys.path`` wins over an editable install's finder, so the stub imports the checkout the tests run."""
    import importlib

    folder = tmp / "checkout"
    package = folder / "deleaker"
    package.mkdir(parents=True, exist_ok=True)
    core = Path(importlib.import_module("deleaker").__path__[0])
    for entry in core.iterdir():
        if entry.name != "__pycache__" and not (package / entry.name).exists():
            (package / entry.name).symlink_to(entry)
    for sub in ("plugins", "export", "engines", "runtime"):
        real = Path(importlib.import_module(f"deleaker.{sub}").__path__[0])
        if not (package / sub).exists():
            (package / sub).symlink_to(real)
    return folder


def parse_model_config(root: Path, config_path: Path) -> dict[str, Any]:
    """``config.pbtxt`` parsed with Triton's model-config schema (protobuf text format), as a JSON dict with
    proto field names (``data_type`` as its enum name). Runs in the server environment, which has the schema."""
    script = (
        "import json, sys\n"
        "from google.protobuf import json_format, text_format\n"
        "from tritonclient.grpc import model_config_pb2\n"
        "config = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())\n"
        "print(json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)))\n"
    )
    python = root / "venv" / "bin" / "python"
    done = subprocess.run([str(python), "-c", script, str(config_path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ValueError(f"{config_path} does not parse as a Triton model config: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver`` on 127.0.0.1 (HTTP only) serving ``repository``, its python backend stubs able to import
    this interpreter's packages (see the module docstring). Use as a context manager; the log is ``log_path``."""

    def __init__(self, root: Path, repository: Path, work_dir: Path) -> None:
        self.root, self.repository, self.work_dir = root, repository, work_dir
        self.port = free_port()
        self.log_path = work_dir / "tritonserver.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.X.so.1.0: this interpreter's, not another Python 3.X the system may have.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        return env

    def __enter__(self) -> "TritonServer":
        server = _server_tree(self.root)
        command = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server / 'backends'}",
            "--http-address=127.0.0.1", f"--http-port={self.port}",
            "--allow-grpc=false", "--allow-metrics=false",
            "--exit-timeout-secs=10",
        ]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__(None, None, None)
                raise TritonSetupError(f"tritonserver exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TritonSetupError(f"tritonserver not ready after {READY_TIMEOUT_S} s: {self.log_tail()}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # Its own process group (start_new_session): the stubs it started go with it.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # --- KServe v2 HTTP protocol, plain HTTP ---------------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as reply:
            return json.loads(reply.read())

    def infer(self, model: str, inputs: list[dict[str, Any]], outputs: list[str], timeout: float = 300) -> dict:
        """One inference request; ``outputs`` come back in binary form. Returns ``{"outputs": {name: (datatype,
        shape, raw bytes)}}`` or ``{"error": message, "status": code}``."""
        header = json.dumps({
            "inputs": inputs,
            "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
        }).encode()
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/infer", data=header, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                body = reply.read()
                json_length = int(reply.headers.get("Inference-Header-Content-Length", len(body)))
        except urllib.error.HTTPError as err:
            return {"error": json.loads(err.read()).get("error", ""), "status": err.code}
        meta = json.loads(body[:json_length])
        offset, result = json_length, {}
        for output in meta["outputs"]:
            size = output["parameters"]["binary_data_size"]
            result[output["name"]] = (output["datatype"], output["shape"], body[offset: offset + size])
            offset += size
        return {"outputs": result}


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in Triton's binary form (each a 4-byte little-endian length, then the bytes)."""
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset: offset + 4], "little")
        items.append(raw[offset + 4: offset + 4 + length])
        offset += 4 + length
    return items
