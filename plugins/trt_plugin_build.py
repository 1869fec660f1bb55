"""Build and inspect ``libdeleaker_trt_plugin.so``, the DeLeakerAttention TensorRT plugin library (``plugins/trt``).

One file holds the plugin, its creator, TensorRT's entry points (``getCreators``, ``setLoggerFinder``) and the
DeLeaker CUDA kernels with the static CUDA runtime: the artifact to hand to ``trtexec --dynamicPlugins``, Triton or
``IPluginRegistry::loadLibrary``. CMake (``plugins/trt/CMakeLists.txt``) finds the toolchain and the headers; this
module runs it, turns what CMake reports missing into one `PluginToolMissingError`, and installs the library into
the output folder atomically (a failed build leaves no library behind). ``deleaker-trt plugin`` calls `build_plugin`.

Nothing here imports torch or TensorRT or needs a GPU; no plugin library is loaded into this process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

from deleaker.errors import DeLeakerError
from deleaker.locks import exclusive_lock
from deleaker.folders import check_output_folder, make_output_folder
from deleaker.staging import write_atomically

from . import kernels_build as kernel_build

LIBRARY_NAME = "libdeleaker_trt_plugin.so"
SOURCE_DIR = Path(__file__).resolve().parent / "trt"
#: Test infrastructure of the source checkout (not installed with the package): TensorRT interface declarations
#: for machines without TensorRT's headers.
STAND_IN_HEADERS_DIR = Path(__file__).resolve().parent.parent / "tests" / "tensorrt_stand_in"
#: What CMake prints, one line per missing piece (plugins/trt/CMakeLists.txt).
_MISSING = re.compile(r"DELEAKER_MISSING: (.*?)\s*$", re.MULTILINE)


class PluginBuildError(DeLeakerError, RuntimeError):
    """The plugin library could not be built, found or read."""


class PluginToolMissingError(PluginBuildError):
    """What the build needs and does not find: ``missing`` lists each piece, with how to provide it."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__("cannot build the TensorRT plugin library; missing:\n" + "\n".join(f"  - {m}" for m in missing))


@dataclass(frozen=True)
class PluginBuildConfig:
    """One build of the plugin library.

    ``out_dir`` receives ``libdeleaker_trt_plugin.so`` (and keeps CMake's build folder in ``out_dir/build-<hash>`` for
    incremental rebuilds). ``stand_in_headers`` builds against the test stand-in TensorRT headers, for checks:
    with cuDNN's fused attention where its headers are found (a GPU check), otherwise without, when the library
    loads, registers and takes part in engine builds but cannot run (CI). cuDNN's, cudnn-frontend's and NVRTC's
    headers are searched under ``$CUDNN_ROOT``, ``$CUDNN_FRONTEND_ROOT``, ``$CMAKE_INCLUDE_PATH``, this Python's
    site-packages (the pip wheels) and the system.
    ``tensorrt_root`` is a TensorRT install holding ``include/NvInferRuntime.h`` (default: ``$TensorRT_ROOT``, then
    the usual system locations). ``archs`` are the CUDA compute capabilities of the kernels.
    """

    out_dir: Path
    stand_in_headers: bool = False
    tensorrt_root: Optional[Path] = None
    archs: tuple[str, ...] = field(default=kernel_build.ARCHS)


def cuda_architectures(archs: Sequence[str]) -> str:
    """CMake's ``CMAKE_CUDA_ARCHITECTURES`` for ``archs``: machine code for each, PTX of the newest portable one
    (as the kernel library's own build, `deleaker.plugins.kernels_build.gencode_flags`)."""
    return ";".join([f"{a}-real" for a in archs] + [f"{kernel_build.ptx_arch(archs)}-virtual"])


def _package_version() -> str:
    try:
        return metadata.version("deleaker-trt")
    except metadata.PackageNotFoundError:
        return "unknown"


def _search_prefixes() -> list[str]:
    """This Python's site-packages: where the pip wheels of cuDNN, cudnn-frontend and NVRTC put their headers."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(str(Path(paths[key])) for key in ("purelib", "platlib")))


def configure_command(config: PluginBuildConfig, cmake: str, build_dir: Path) -> list[str]:
    """The CMake configure command line of ``config``."""
    command = [
        cmake,
        "-S", str(SOURCE_DIR),
        "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DDELEAKER_TENSORRT_STAND_IN={'ON' if config.stand_in_headers else 'OFF'}",
        f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures(config.archs)}",
        f"-DDELEAKER_PLUGIN_VERSION={_package_version()}",
        f"-DDELEAKER_SEARCH_PREFIXES={';'.join(_search_prefixes())}",
    ]
    if config.tensorrt_root is not None:
        command.append(f"-DTensorRT_ROOT={Path(config.tensorrt_root).resolve()}")
    return command


def _environment() -> dict:
    """The environment for CMake: nvcc from `deleaker.plugins.kernels_build.find_nvcc` (PATH, then $CUDA_HOME) if set."""
    env = dict(os.environ)
    try:
        env.setdefault("CUDACXX", str(kernel_build.find_nvcc()))
    except kernel_build.NvccNotFoundError:
        pass  # CMake reports it, with the other missing pieces
    return env


def _run(command: list[str], env: dict, what: str) -> subprocess.CompletedProcess:
    """Run ``command`` to its end in a process group of its own, which is killed whole when this process is
    interrupted (Ctrl-C, SIGTERM, any exception): CMake's ``make`` and ``nvcc`` would otherwise outlive it, and a
    terminal's Ctrl-C no longer reaches them directly."""
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
    except OSError as exc:
        raise PluginBuildError(f"cannot run {what} ({command[0]}): {exc}") from exc
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()  # reap it and close the pipes
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _tensorrt_root_problem(config: PluginBuildConfig) -> Optional[str]:
    """Why an explicit ``tensorrt_root`` cannot provide TensorRT's headers, or None (none given, or it can)."""
    if config.tensorrt_root is None or config.stand_in_headers:
        return None
    root = Path(config.tensorrt_root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        return f"TensorRT's headers: the TensorRT root {root} {state}"
    if not any((folder / "NvInferRuntime.h").is_file() for folder in (root / "include", root)):
        return (f"TensorRT's headers (NvInferRuntime.h): the TensorRT root {root} has no include/NvInferRuntime.h; "
                "give the folder of a TensorRT install")
    return None


def build_plugin(config: PluginBuildConfig, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Build ``libdeleaker_trt_plugin.so`` into ``config.out_dir`` and return its path.

    Raises:
        PluginToolMissingError: cmake, nvcc, TensorRT's headers, cuDNN's, cudnn-frontend's or NVRTC's are missing
            (every missing piece is named, with how to provide it).
        PluginBuildError: the compilation failed (the compiler's output is in the message).
        ConfigError: ``out_dir`` is a file or cannot be created (checked first).
    """
    say = progress or (lambda line: None)
    out_dir = check_output_folder(config.out_dir, "the output folder (--out)")  # before any tool is looked for
    cmake = shutil.which("cmake")
    missing = [] if cmake else ["cmake (3.18 or newer): pip install cmake, or your system's package"]
    if config.stand_in_headers and not (STAND_IN_HEADERS_DIR / "NvInferRuntime.h").is_file():
        missing.append(
            f"the test stand-in TensorRT headers ({STAND_IN_HEADERS_DIR}): they live in the source checkout's "
            "tests/ folder, not in an installed package"
        )
    root_problem = _tensorrt_root_problem(config)
    if missing:
        raise PluginToolMissingError(missing + ([root_problem] if root_problem else []))
    make_output_folder(out_dir, "the output folder (--out)")
    # One CMake build tree per source checkout: CMake refuses a tree configured from another source folder.
    build_dir = out_dir / f"build-{hashlib.sha256(str(SOURCE_DIR).encode()).hexdigest()[:12]}"
    env = _environment()
    with exclusive_lock(out_dir / ".lock"):  # one build per output folder at a time
        say("configuring (cmake)")
        configured = _run(configure_command(config, cmake, build_dir), env, "cmake")
        reported = _MISSING.findall(configured.stdout + configured.stderr)
        if root_problem:  # CMake would fall back to the system's headers, or blame $TensorRT_ROOT: name the option
            reported = [root_problem] + [r for r in reported if not r.startswith("TensorRT's headers")]
        if reported:
            raise PluginToolMissingError(list(dict.fromkeys(reported)))
        if configured.returncode != 0:
            raise PluginBuildError(f"cmake configure failed:\n{(configured.stdout + configured.stderr)[-6000:]}")
        say("compiling the plugin and the kernels (a minute or two)")
        jobs = str(max(1, min(os.cpu_count() or 1, 8)))
        built = _run([cmake, "--build", str(build_dir), "--parallel", jobs], env, "cmake --build")
        if built.returncode != 0:
            raise PluginBuildError(f"building the plugin library failed:\n{(built.stdout + built.stderr)[-6000:]}")
        with open(build_dir / LIBRARY_NAME, "rb") as built_library:  # an interrupted copy leaves no partial library
            write_atomically({out_dir / LIBRARY_NAME: functools.partial(shutil.copyfileobj, built_library)})
    return out_dir / LIBRARY_NAME


#: Run by `library_build_info` in a child process: a library whose load crashes takes only the child down.
_BUILD_INFO_SCRIPT = """
import ctypes, sys
try:
    info = ctypes.CDLL(sys.argv[1]).deleaker_trt_plugin_build_info
except (OSError, AttributeError) as exc:
    sys.exit(str(exc))
info.restype, info.argtypes = ctypes.c_char_p, []
sys.stdout.write(info().decode())
"""


def library_build_info(path: Path) -> str:
    """``deleaker_trt_plugin_build_info()`` of the library at ``path``: its version, the TensorRT headers it was built
    against ("stand-in" for the test stand-in), its attention provider and kernel ABI. The library is loaded with
    ctypes in a child process (it needs neither TensorRT nor a GPU to load), never into this one."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", _BUILD_INFO_SCRIPT, str(path)], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginBuildError(f"cannot read the build info of {path}: {exc}") from exc
    if child.returncode != 0:
        why = (child.stderr.strip() or f"the loading process exited with {child.returncode}").splitlines()[-1]
        raise PluginBuildError(f"{path} is not a DeLeaker TensorRT plugin library: {why}")
    return child.stdout
