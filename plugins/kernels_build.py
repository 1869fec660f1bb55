"""Ahead-of-time build of the DeLeaker CUDA kernels into a cached shared library.

The library is built once with ``nvcc`` for every architecture in `ARCHS` into
``<cache>/<key>/libdeleaker_kernels.so`` (``<cache>`` is ``$DELEAKER_KERNEL_CACHE`` or
``~/.cache/deleaker-trt/kernels``), where ``key`` hashes the sources, the architectures and the nvcc version. A
manifest (``manifest.json``) beside the library records them and is checked before the library is used; a file
lock keeps concurrent builds from clobbering each other. ``DELEAKER_NO_JIT=1`` forbids compiling: only a library
already in the cache (built from these very sources) is accepted.

Nothing here imports torch or needs a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deleaker.errors import DeLeakerError
from deleaker.jsonio import loads_strict
from deleaker.staging import make_staging_dir, publish_staged, staged_name, write_atomically
from deleaker.locks import exclusive_lock

#: Targets compiled into the library: Ampere (A100, consumer Ampere), Ada, Hopper, and Hopper's arch-specific
#: sm_90a (wgmma / TMA code needs it; its machine code runs on sm_90 devices only, so sm_90 stays beside it).
ARCHS: tuple[str, ...] = ("80", "86", "89", "90", "90a")

LIBRARY_NAME = "libdeleaker_kernels.so"
MANIFEST_NAME = "manifest.json"
CSRC_DIR = Path(__file__).resolve().parent / "csrc"
#: ``--threads 0``: one nvcc process compiles the targets in parallel on every core.
NVCC_FLAGS: tuple[str, ...] = ("-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-lineinfo", "--threads", "0")


class KernelBuildError(DeLeakerError, RuntimeError):
    """The CUDA kernel library cannot be built or found."""


class NvccNotFoundError(KernelBuildError):
    """``nvcc`` is not installed (or not on PATH / under $CUDA_HOME)."""


@dataclass(frozen=True)
class BuildSpec:
    """What one library build depends on."""

    sources: tuple[Path, ...]  # every file of csrc/ (the .cu files are compiled, the headers hashed)
    archs: tuple[str, ...]
    nvcc: Path
    nvcc_version: str

    @property
    def source_hash(self) -> str:
        return source_hash(self.sources)

    @property
    def key(self) -> str:
        text = json.dumps([self.source_hash, self.nvcc_version, compile_flags(self.archs)])
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def kernel_sources() -> tuple[Path, ...]:
    """Every source and header of the kernels, sorted (the build's hashed inputs)."""
    files = [p for p in CSRC_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    if not any(p.suffix == ".cu" for p in files):
        raise KernelBuildError(f"no .cu sources in {CSRC_DIR}")
    return tuple(sorted(files))


def source_hash(sources: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def find_nvcc() -> Path:
    """``nvcc`` from PATH, else ``$CUDA_HOME/bin/nvcc``; raises `NvccNotFoundError`."""
    found = shutil.which("nvcc")
    if found is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(cuda_home) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        raise NvccNotFoundError(
            "nvcc was not found on PATH nor under $CUDA_HOME/bin; install the CUDA toolkit (12.4 or newer) to "
            "build the DeLeaker kernels, or provide a prebuilt library in the kernel cache"
        )
    return Path(found)


def nvcc_version(nvcc: Path) -> str:
    """The release of ``nvcc``, e.g. ``"13.0.88"``."""
    try:
        text = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NvccNotFoundError(f"{nvcc} --version failed: {exc}") from exc
    match = re.search(r"V(\d+\.\d+\.\d+)", text) or re.search(r"release (\d+\.\d+)", text)
    if match is None:
        raise KernelBuildError(f"cannot read the version of {nvcc} from: {text!r}")
    return match.group(1)


def build_spec(archs: Sequence[str] = ARCHS) -> BuildSpec:
    nvcc = find_nvcc()
    return BuildSpec(sources=kernel_sources(), archs=tuple(archs), nvcc=nvcc, nvcc_version=nvcc_version(nvcc))


def cache_root() -> Path:
    return Path(os.environ.get("DELEAKER_KERNEL_CACHE") or Path.home() / ".cache" / "deleaker-trt" / "kernels")


def jit_forbidden() -> bool:
    return os.environ.get("DELEAKER_NO_JIT", "") not in ("", "0")


def arch_number(arch: str) -> int:
    """``"90a"`` -> 90: the compute capability of a target, without its arch-specific suffix."""
    match = re.fullmatch(r"(\d+)a?", arch)
    if match is None:
        raise KernelBuildError(f"not a CUDA target: {arch!r} (expected digits, optionally with an 'a' suffix)")
    return int(match.group(1))


def ptx_arch(archs: Sequence[str]) -> str:
    """The newest portable target (no 'a' suffix: arch-specific PTX does not run on later GPUs)."""
    portable = [a for a in archs if not a.endswith("a")] or [str(arch_number(a)) for a in archs]
    return max(portable, key=arch_number)


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """Machine code for each target, plus PTX of the newest portable one so that later GPUs JIT-compile it
    instead of failing."""
    newest = ptx_arch(archs)
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + [
        f"-gencode=arch=compute_{newest},code=compute_{newest}"
    ]


def compile_flags(archs: Sequence[str]) -> list[str]:
    """Every nvcc flag that shapes the binary (what the cache key and the manifest record)."""
    return [*NVCC_FLAGS, *gencode_flags(archs)]


def compile_command(spec: BuildSpec, output: Path, *, object_only: bool = False) -> list[str]:
    """The nvcc command line: the shared library ``output``, or with ``object_only`` one object file per .cu
    source in the directory ``output`` (one nvcc call either way)."""
    units = [str(p) for p in spec.sources if p.suffix == ".cu"]
    target = ["-c", "-odir", str(output)] if object_only else ["-shared", "-o", str(output)]
    return [str(spec.nvcc), *compile_flags(spec.archs), *target, *units]


def run_nvcc(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise NvccNotFoundError(f"cannot run {command[0]}: {exc}") from exc
    if result.returncode != 0:
        raise KernelBuildError(
            f"nvcc failed (exit {result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}"
        )


def _manifest_ok(directory: Path, expected: dict) -> bool:
    manifest, library = directory / MANIFEST_NAME, directory / LIBRARY_NAME
    if not manifest.is_file() or not library.is_file():
        return False
    try:
        recorded = loads_strict(manifest.read_text())
    except (OSError, ValueError):
        return False
    if any(recorded.get(name) != value for name, value in expected.items()):
        return False
    return recorded.get("library_sha256") == hashlib.sha256(library.read_bytes()).hexdigest()


def find_prebuilt(archs: Sequence[str] = ARCHS) -> Path | None:
    """A cached library built from the current sources for ``archs`` by any nvcc, or None. Needs no nvcc."""
    root = cache_root()
    if not root.is_dir():
        return None
    expected = {
        "source_hash": source_hash(kernel_sources()),
        "archs": list(archs),
        "nvcc_flags": compile_flags(archs),
    }
    for directory in sorted(root.iterdir()):
        if directory.is_dir() and _manifest_ok(directory, expected):
            return directory / LIBRARY_NAME
    return None


def build_library(archs: Sequence[str] = ARCHS, *, force: bool = False) -> Path:
    """The path of the kernel library for the current sources, building it (once, under a lock) if needed.

    Raises:
        KernelBuildError: ``DELEAKER_NO_JIT=1`` and no prebuilt library matches, or nvcc failed.
        NvccNotFoundError: a build is needed and nvcc is missing.
    """
    archs = tuple(archs)
    if not force:
        prebuilt = find_prebuilt(archs)  # any nvcc's build of these sources will do
        if prebuilt is not None:
            return prebuilt
    if jit_forbidden():
        raise KernelBuildError(
            f"DELEAKER_NO_JIT is set and no prebuilt kernel library for archs {list(archs)} and the current "
            f"sources is in {cache_root()}; build one with `python -m deleaker.plugins.kernels_build` first"
        )
    spec = build_spec(archs)
    directory = cache_root() / spec.key
    directory.mkdir(parents=True, exist_ok=True)
    expected = {"source_hash": spec.source_hash, "archs": list(archs), "nvcc_version": spec.nvcc_version}
    with exclusive_lock(directory / ".lock"):  # one builder per key; the others wait, then find its result
        if not force and _manifest_ok(directory, expected):
            return directory / LIBRARY_NAME
        # Staging folders of a build that was killed (tens of MB each): stale, since we hold the key's lock. Only
        # names of ours (`deleaker.staging`) are removed.
        for stale in directory.iterdir():
            if staged_name(stale.name) == LIBRARY_NAME and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = make_staging_dir(directory / LIBRARY_NAME)
        try:
            staged = tmp / LIBRARY_NAME
            run_nvcc(compile_command(spec, staged))
            publish_staged(tmp, directory / LIBRARY_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = {
            **expected,
            "nvcc_flags": compile_flags(spec.archs),
            "library_sha256": hashlib.sha256((directory / LIBRARY_NAME).read_bytes()).hexdigest(),
        }
        write_atomically({directory / MANIFEST_NAME: json.dumps(manifest, indent=2, sort_keys=True).encode()})
    return directory / LIBRARY_NAME


def main() -> None:
    """``python -m deleaker.plugins.kernels_build``: build (or find) the library and print its path."""
    print(build_library())


if __name__ == "__main__":
    main()
