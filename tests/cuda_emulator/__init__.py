"""The DeLeaker kernels' real CUDA source, run on the CPU by a small CUDA emulator (test infrastructure).

``include/`` stands in for ``<cuda_runtime.h>``, ``<cuda_fp16.h>`` and ``<cuda_bf16.h>`` and provides the PTX
tensor-core instructions of ``plugins/csrc/deleaker_mma.cuh`` (ldmatrix, mma.sync); ``emu_runtime.cpp`` schedules each block's threads as cooperative fibers (see ``include/emu_cuda.h``). The
kernel sources of ``plugins/csrc`` are compiled by g++ unchanged except for one mechanical rewrite that C++
cannot express: ``extern __shared__ ... smem[]`` becomes a pointer to the block's buffer. The rewrite must match
the expected number of sites, so a source change the rewriter does not understand fails loudly. (Launches go
through ``cudaLaunchKernelEx``, which the emulator provides; a ``<<<...>>>`` launch is refused.)

The result is a shared library with the same C ABI as the real one (`deleaker.plugins.kernels.KernelLibrary`
loads it), taking host pointers, plus two knobs (`EmulatedLibrary.configure`). What it proves and what it
cannot: see the header of ``include/emu_cuda.h``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence, Tuple

from deleaker.errors import DeLeakerError
from deleaker.locks import exclusive_lock
from deleaker.plugins import kernels, kernels_build as build

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "libdeleaker_emulated.so"
CXX_FLAGS = (
    "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-fno-strict-aliasing", "-pthread",
    "-Wall", "-Werror", "-Wno-unknown-pragmas",  # nvcc's `#pragma unroll` means nothing to g++
    "-Wl,-z,defs",  # an emulator function the kernels need but nobody defined fails the build, not the load
)

_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned\s+char\s+(\w+)\[\];")
#: Sites of the rewrite in plugins/csrc: the kernels with dynamic shared memory (affinity, region statistics,
#: cut bits, correction, fallback).
EXPECTED_EXTERN_SMEM = 5
#: (kernel source file name, text, replacement)
Mutation = Tuple[str, str, str]


class EmulatorBuildError(DeLeakerError, RuntimeError):
    """The emulated kernel library cannot be built (no C++ compiler, or a compile error)."""


def rewrite(text: str) -> tuple[str, int]:
    """The mechanical rewrite of a kernel source; returns the text and the count of sites."""
    return _EXTERN_SMEM.subn(r"unsigned char* \1 = ::emu::dynamic_smem();", text)


def _sources() -> list[Path]:
    return [*build.kernel_sources(), *sorted((HERE / "include").iterdir()), HERE / "emu_runtime.cpp"]


def _key(
    cxx: str, mutations: Sequence[Mutation], defines: Sequence[str], extra_units: Sequence[Path],
    include_dirs: Sequence[Path],
) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    flags = (version, CXX_FLAGS, tuple(mutations), tuple(defines), [str(d) for d in include_dirs])
    digest = hashlib.sha256(repr(flags).encode())
    extra_headers = [p for d in include_dirs for p in sorted(Path(d).iterdir()) if p.suffix == ".h"]
    for path in [*_sources(), *extra_units, *extra_headers]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def find_cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise EmulatorBuildError("no C++ compiler (g++ or $CXX) to build the CUDA emulator")
    return cxx


def build_emulated_library(
    mutations: Sequence[Mutation] = (),
    defines: Sequence[str] = (),
    extra_units: Sequence[Path] = (),
    include_dirs: Sequence[Path] = (),
) -> Path:
    """The emulated kernel library for the current sources, built once into the kernel cache.

    ``mutations``: ``(file name, old, new)`` text replacements applied to the kernel sources first (each ``old``
    must occur exactly once): the tests build deliberately broken kernels with them. ``defines``: ``NAME=VALUE``
    preprocessor definitions (the kernels' compile-time knobs, e.g. ``DELEAKER_BAND_ROWS=128``). ``extra_units``:
    more C++ files compiled into the same library (host code that calls the kernels, e.g. the TensorRT plugin's),
    with ``include_dirs`` on the include path.
    """
    cxx = find_cxx()
    pending = {name: [(old, new) for file, old, new in mutations if file == name] for name, _, _ in mutations}
    directory = build.cache_root() / "emulated" / _key(cxx, mutations, defines, extra_units, include_dirs)
    library = directory / LIBRARY_NAME
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock"):
        if library.is_file():
            return library
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            staged = Path(tmp)
            smem = 0
            for path in build.kernel_sources():
                text = path.read_text()
                for old, new in pending.pop(path.name, []):
                    if text.count(old) != 1:
                        raise EmulatorBuildError(f"mutation target not found exactly once in {path.name}: {old!r}")
                    text = text.replace(old, new)
                if "<<<" in text:
                    raise EmulatorBuildError(f"{path.name} launches with <<<...>>>: launch with cudaLaunchKernelEx")
                text, n_smem = rewrite(text)
                smem += n_smem
                (staged / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)).write_text(text)
            if pending:
                raise EmulatorBuildError(f"mutations name files that are not kernel sources: {sorted(pending)}")
            if smem != EXPECTED_EXTERN_SMEM:
                raise EmulatorBuildError(
                    f"the emulator's source rewrite found {smem} dynamic shared memory declarations, expected "
                    f"{EXPECTED_EXTERN_SMEM}: update tests/cuda_emulator for the new kernel sources"
                )
            units = [str(p) for p in [*staged.glob("*.cpp"), HERE / "emu_runtime.cpp", *extra_units]]
            includes = [f"-I{HERE / 'include'}", f"-I{staged}", *(f"-I{d}" for d in include_dirs)]
            command = [cxx, *CXX_FLAGS, *(f"-D{d}" for d in defines), *includes, *units, "-o", str(staged / "lib.so")]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise EmulatorBuildError(f"building the CUDA emulator failed:\n{result.stderr[-6000:]}")
            os.replace(staged / "lib.so", library)
    return library


class EmulatedLibrary(kernels.KernelLibrary):
    """The kernel library's C ABI on host memory, with the emulator's knobs."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        emulator = ctypes.CDLL(str(path))
        emulator.deleaker_emulator_configure.argtypes = [ctypes.c_uint64, ctypes.c_int]
        emulator.deleaker_emulator_configure.restype = ctypes.c_int
        emulator.deleaker_emulator_launches.argtypes = []
        emulator.deleaker_emulator_launches.restype = ctypes.c_uint64
        emulator.deleaker_emulator_dependent_launches.argtypes = []
        emulator.deleaker_emulator_dependent_launches.restype = ctypes.c_uint64
        self._emulator = emulator

    def configure(self, *, schedule_seed: int = 0, device: int = 0) -> None:
        """Thread and block order (0 ascending, 1 descending, >= 2 shuffled) and the current device (0: 132 SMs
        and sm_90 like an H100; 1: a single sm_80 SM, so the persistent grids' blocks stride over their work and
        no launch is a dependent one). The kernel library's own ``init`` is the caller's, per device."""
        if self._emulator.deleaker_emulator_configure(schedule_seed, device) != 0:
            raise ValueError(f"the emulator has devices 0 and 1, got {device}")

    def launches(self) -> int:
        """Kernel launches so far."""
        return int(self._emulator.deleaker_emulator_launches())

    def dependent_launches(self) -> int:
        """Of those, launches with programmatic stream serialization (sm_90's programmatic dependent launch)."""
        return int(self._emulator.deleaker_emulator_dependent_launches())
