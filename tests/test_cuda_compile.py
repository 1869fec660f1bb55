"""CPU checks of the CUDA kernels: every .cu compiles with nvcc, and the ctypes structs match the header.

Runs on CPU CI (nvcc and g++ are installed there; without them the tests skip, saying why).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deleaker.errors import DeLeakerError
from deleaker.plugins import kernels, kernels_build as build
from deleaker.staging import staged_name, staging_name

HEADER = build.CSRC_DIR / "deleaker_params.h"
MIB = 1 << 20


def _nvcc_or_skip():
    try:
        return build.find_nvcc()
    except build.NvccNotFoundError as exc:
        pytest.skip(f"nvcc is not installed: {exc}")


def _compile_objects(arch: str, out_dir) -> float:
    """nvcc -c of every .cu for one arch into ``out_dir/sm<arch>/``; returns the seconds it took."""
    spec = build.build_spec(archs=(arch,))
    (out_dir / f"sm{arch}").mkdir()
    started = time.perf_counter()
    build.run_nvcc(build.compile_command(spec, out_dir / f"sm{arch}", object_only=True))
    return time.perf_counter() - started


def test_kernels_compile_for_sm90a_and_sm89(tmp_path, record_property):
    """One nvcc -c per target (Hopper's arch-specific sm_90a, and Ada), both at once; a compile error fails with
    nvcc's message."""
    _nvcc_or_skip()
    archs = ("90a", "89")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        times = dict(zip(archs, pool.map(lambda a: _compile_objects(a, tmp_path), archs)))
    wall = time.perf_counter() - started
    record_property("nvcc_wall_s", round(wall, 1))
    print(f"nvcc -c: sm_90a {times['90a']:.1f} s, sm_89 {times['89']:.1f} s, wall {wall:.1f} s")
    units = [p.stem for p in build.kernel_sources() if p.suffix == ".cu"]
    for arch in archs:
        for unit in units:
            obj = tmp_path / f"sm{arch}" / f"{unit}.o"
            assert obj.stat().st_size > 10_000, f"{obj.name} for sm_{arch} is missing or suspiciously small"

    # Link the sm_90a object and drive the ctypes binding on the CPU: sizes and argument checks need no GPU.
    nvcc = build.find_nvcc()
    library_path = tmp_path / "libdeleaker_sm90a.so"
    objects = [str(tmp_path / "sm90a" / f"{unit}.o") for unit in units]
    build.run_nvcc([str(nvcc), "-shared", *objects, "-o", str(library_path)])
    library = kernels.KernelLibrary(library_path)
    params = _flux_params(num_entities=4)
    layout = library.workspace_layout(params)
    assert library.workspace_bytes(params) == layout.total_bytes > layout.fallback_count
    assert (layout.tiles, layout.band_rows, layout.bands) == (4096 // 64, 4096, 1)
    with pytest.raises(kernels.KernelLaunchError, match="q, k, v and out") as info:
        library.launch(params, 0, 0, 0)  # NULL tensors: rejected at the one boundary, before any CUDA call
    assert info.value.code == kernels.ERROR_INVALID_ARGUMENT


def _flux_params(num_entities: int) -> kernels.DeLeakerParams:
    """FLUX.1-dev at 1024x1024 (B=1, H=24, D=128, T=512, 64x64 grid), bf16, no tensors attached."""
    return kernels.DeLeakerParams(
        batch=1, heads=24, tokens=512 + 4096, text_tokens=512, head_dim=128, grid_h=64, grid_w=64,
        num_entities=num_entities, dtype=kernels.DTYPE_BFLOAT16, num_blocks=57,
    )


def _struct_probe(tmp_path, body: str) -> dict:
    """Compiles and runs a C++ program that includes the header; its ``name int...`` lines, in order."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to check the params header against")
    source = tmp_path / "probe.cc"
    source.write_text(
        "#include <cstddef>\n#include <cstdio>\n"
        f'#include "{HEADER}"\n'
        "int main() {\n" + body + "  return 0;\n}\n"
    )
    exe = tmp_path / "probe"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", str(source), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    return {parts[0]: tuple(int(x) for x in parts[1:]) for parts in (line.split() for line in lines)}


@pytest.mark.parametrize(
    "struct, c_name, fields",
    [
        (kernels.DeLeakerParams, "DeLeakerParams", kernels.PARAMS_FIELDS),
        (kernels.WorkspaceLayout, "DeLeakerWorkspaceLayout", kernels.LAYOUT_FIELDS),
    ],
)
def test_ctypes_structs_match_header(tmp_path, struct, c_name, fields):
    body = f'  std::printf("sizeof %zu\\n", sizeof({c_name}));\n'
    body += "".join(
        f'  std::printf("{name} %zu %zu\\n", offsetof({c_name}, {name}), sizeof((({c_name}*)0)->{name}));\n'
        for name, _ in fields
    )
    header = _struct_probe(tmp_path, body)
    assert header.pop("sizeof") == (ctypes.sizeof(struct),)
    assert list(header) == [name for name, _ in fields]  # same fields, same order
    for name, ctype in fields:
        assert header[name] == (getattr(struct, name).offset, ctypes.sizeof(ctype)), name


def test_size_limits_match_header(tmp_path):
    """The host layer's limits (`supports`, `launch_kernels`) are the header's, which the library enforces."""
    names = {"DELEAKER_MAX_ENTITIES": kernels.MAX_ENTITIES, "DELEAKER_MAX_BATCH": kernels.MAX_KERNEL_BATCH,
             "DELEAKER_MAX_HEADS": kernels.MAX_HEADS, "DELEAKER_MAX_IMAGE_TOKENS": kernels.MAX_IMAGE_TOKENS,
             "DELEAKER_ABI_VERSION": kernels.ABI_VERSION}
    body = "".join(f'  std::printf("{name} %lld\\n", (long long){name});\n' for name in names)
    header = _struct_probe(tmp_path, body)
    assert {name: values[0] for name, values in header.items()} == names


def test_workspace_fits_budget_and_grows_linearly(tmp_path):
    """Extra memory at FLUX.1-dev 1024x1024 (B=1, H=24, D=128, T=512, 64x64 grid): under 64 MiB up to E_max=8 (the
    header's own arithmetic, as the library and any C++ host use it). Beyond one band of the union it grows
    linearly with the tokens: 4x the image tokens (2048x2048 -> 4096x4096) at most 4.5x the bytes."""
    body = ""
    for name, side, entities in (("e4", 64, 4), ("e8", 64, 8), ("s128", 128, 4), ("s256", 256, 4)):
        body += (
            "  { DeLeakerParams p = {}; p.batch = 1; p.heads = 24; p.head_dim = 128; p.text_tokens = 512;"
            f" p.grid_h = {side}; p.grid_w = {side}; p.tokens = 512 + {side * side}; p.num_entities = {entities};"
            f' std::printf("{name} %llu\\n", (unsigned long long)deleaker_workspace_layout(&p).total_bytes); }}\n'
        )
    sizes = {name: value[0] for name, value in _struct_probe(tmp_path, body).items()}
    print({name: f"{value / MIB:.1f} MiB" for name, value in sizes.items()})
    assert 2 * MIB < sizes["e4"] < sizes["e8"] <= 64 * MIB, sizes
    assert sizes["s256"] < 4.5 * sizes["s128"], sizes


def test_no_jit_without_prebuilt_library_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DELEAKER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("DELEAKER_NO_JIT", "1")
    with pytest.raises(build.KernelBuildError, match="DELEAKER_NO_JIT"):
        build.build_library()


def test_missing_nvcc_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DELEAKER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DELEAKER_NO_JIT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(build.NvccNotFoundError, match="nvcc was not found") as info:
        build.build_library()
    assert isinstance(info.value, DeLeakerError)


def test_prebuilt_library_is_checked_against_its_manifest(tmp_path, monkeypatch):
    """Under DELEAKER_NO_JIT a cached library is used only if its manifest matches the sources and its bytes."""
    monkeypatch.setenv("DELEAKER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("DELEAKER_NO_JIT", "1")
    entry = tmp_path / "some-key"
    entry.mkdir()
    library = entry / build.LIBRARY_NAME
    library.write_bytes(b"not really a library, but the manifest check only hashes bytes")
    manifest = {
        "source_hash": build.source_hash(build.kernel_sources()),
        "archs": list(build.ARCHS),
        "nvcc_version": "13.0.88",
        "nvcc_flags": build.compile_flags(build.ARCHS),
        "library_sha256": hashlib.sha256(library.read_bytes()).hexdigest(),
    }
    (entry / build.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert build.build_library() == library
    library.write_bytes(b"tampered")
    with pytest.raises(build.KernelBuildError, match="DELEAKER_NO_JIT"):
        build.build_library()
    library.write_bytes(b"not really a library, but the manifest check only hashes bytes")
    (entry / build.MANIFEST_NAME).write_text(json.dumps({**manifest, "source_hash": "stale"}))
    with pytest.raises(build.KernelBuildError, match="DELEAKER_NO_JIT"):
        build.build_library()
    # A library built with other flags (here: without the PTX of the newest arch) is not this build.
    (entry / build.MANIFEST_NAME).write_text(json.dumps({**manifest, "nvcc_flags": list(build.NVCC_FLAGS)}))
    with pytest.raises(build.KernelBuildError, match="DELEAKER_NO_JIT"):
        build.build_library()


def test_library_targets_sm90a_and_carries_portable_ptx_for_later_gpus():
    flags = build.compile_flags(build.ARCHS)
    assert {"80", "86", "89", "90", "90a"} <= set(build.ARCHS)
    assert all(f"-gencode=arch=compute_{a},code=sm_{a}" in flags for a in build.ARCHS)
    # PTX of the newest portable target: arch-specific (sm_90a) PTX would not run on later GPUs.
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert not any("code=compute_90a" in f for f in flags)
    assert build.build_spec(("80",)).key != build.build_spec(("90",)).key
    with pytest.raises(build.KernelBuildError, match="not a CUDA target"):
        build.gencode_flags(("90x",))


FAKE_NVCC = """#!/bin/sh
# Test stand-in for nvcc (the cache logic is under test, not the compiler): prints a version, writes -o's file.
case "$1" in --version) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;; esac
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && { printf 'library built by the stand-in' > "$2"; exit 0; }; shift; done
exit 1
"""


def test_a_killed_builds_staging_folder_is_cleared_by_the_next_build(tmp_path, monkeypatch):
    """A build killed mid-way leaves its staging folder (tens of MB of machine code) in the cache entry; the next
    build of that entry, holding its lock, removes it."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{nvcc.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("DELEAKER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DELEAKER_NO_JIT", raising=False)
    entry = build.cache_root() / build.build_spec().key
    stale = entry / staging_name(build.LIBRARY_NAME)
    stale.mkdir(parents=True)
    (stale / build.LIBRARY_NAME).write_bytes(b"half a library")
    library = build.build_library()
    assert library.read_bytes() == b"library built by the stand-in"
    assert not [p for p in entry.iterdir() if staged_name(p.name) is not None]
