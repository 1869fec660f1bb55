"""The device check's gathered-tile L2 microbenchmark (``benchmarks/gather``) on the CPU CUDA emulator.

The GPU measures its speed; here the real kernel source runs through the emulator (test infrastructure, see
``tests/cuda_emulator``) and its per-block XOR of every gathered 32-bit word must equal the same XOR computed from
the tensors: each block reads exactly the Q rows of its row tile and the K rows of its column tile, every head, for
64- and 128-row tiles, with a partial last tile. The device check's Python launcher (``run_gather``) drives it.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cuda_emulator

ROOT = Path(__file__).resolve().parents[1]
GATHER = ROOT / "benchmarks" / "gather"
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402


@functools.cache
def _emulated_gather_library(tmp_root: str) -> Path:
    """gather_bench.cu (and the header it includes) compiled with g++ against the emulator, in one unit."""
    cxx = cuda_emulator.find_cxx()
    text = (GATHER / "gather_bench.cuh").read_text().replace("#pragma once", "")
    text += (GATHER / "gather_bench.cu").read_text().replace('#include "gather_bench.cuh"', "")
    unit = Path(tmp_root) / "gather_bench_emulated.cpp"
    unit.write_text(text)
    library = Path(tmp_root) / "libgather_bench_emulated.so"
    command = [cxx, *cuda_emulator.CXX_FLAGS, f"-I{cuda_emulator.HERE / 'include'}", str(unit),
               str(cuda_emulator.HERE / "emu_runtime.cpp"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return library


@pytest.fixture(scope="module")
def gather_library(tmp_path_factory):
    try:
        path = _emulated_gather_library(str(tmp_path_factory.mktemp("gather")))
    except cuda_emulator.EmulatorBuildError as exc:
        pytest.skip(str(exc))
    return device_check.load_gather_library(path)


def _expected(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, tile_rows: int) -> np.ndarray:
    """Per (row tile, column tile) pair: the XOR of every 32-bit word of its Q rows and K rows over the heads."""
    words_q = q.view(torch.int32).numpy()  # (H, N, 64) words
    words_k = k.view(torch.int32).numpy()
    rows = index.numel()
    col_tiles = -(-rows // 64)
    out = []
    for pair in range(device_check.gather_pairs(rows, tile_rows)):
        rt, ct = divmod(pair, col_tiles)
        q_rows = index[rt * tile_rows: (rt + 1) * tile_rows].numpy()
        k_rows = index[ct * 64: (ct + 1) * 64].numpy()
        acc = np.bitwise_xor.reduce(words_q[:, q_rows].reshape(-1)) ^ np.bitwise_xor.reduce(
            words_k[:, k_rows].reshape(-1))
        out.append(acc)
    return np.array(out, dtype=np.int32)


@pytest.mark.parametrize("tile_rows", [64, 128])
def test_each_block_reads_exactly_its_tiles(gather_library, tile_rows):
    g = torch.Generator().manual_seed(tile_rows)
    heads, tokens = 2, 300
    q = torch.randn(heads, tokens, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(heads, tokens, 128, generator=g).to(torch.bfloat16)
    index = torch.randperm(tokens, generator=g)[:150].to(torch.int32)  # 150 rows: the last tiles are partial
    sink = torch.full((device_check.gather_pairs(150, tile_rows),), -1, dtype=torch.int32)
    device_check.run_gather(gather_library, q, k, index, tile_rows, sink)
    assert np.array_equal(sink.numpy(), _expected(q, k, index, tile_rows))


def test_bad_arguments_are_refused_before_the_launch(gather_library):
    q = torch.zeros(1, 8, 128, dtype=torch.float16)
    index = torch.arange(8, dtype=torch.int32)
    sink = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\(H, N, 128\)"):
        device_check.run_gather(gather_library, q[..., :64].contiguous(), q[..., :64].contiguous(), index, 64, sink)
    with pytest.raises(ValueError, match="int32"):
        device_check.run_gather(gather_library, q, q, index.long(), 64, sink)
    with pytest.raises(RuntimeError, match="code -1"):
        device_check.run_gather(gather_library, q, q, index, 96, sink)  # tile rows: 64 or 128
