"""The CUDA emulator's tensor-core instructions (tests/cuda_emulator: ldmatrix and mma.sync m16n8k16, implemented
from the fragment layouts of NVIDIA's PTX ISA) against a plain matrix product on random inputs.

One warp loads A and B from shared memory with ldmatrix as the kernels do (A like Q, B once like K with
ldmatrix, once like V with ldmatrix.trans), multiplies them with mma.sync into C and writes D through the
documented accumulator layout (tests/cuda_emulator/mma_check.cpp). A wrong lane, register, half or transpose in
any of them moves elements and fails the comparison.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import pytest
import torch

import cuda_emulator

CHECK_UNIT = Path(cuda_emulator.__file__).resolve().parent / "mma_check.cpp"


@functools.cache
def _check_library() -> ctypes.CDLL:
    try:
        path = cuda_emulator.build_emulated_library(extra_units=[CHECK_UNIT])
    except cuda_emulator.EmulatorBuildError as exc:
        if "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise
    lib = ctypes.CDLL(str(path))
    lib.deleaker_emulator_mma_check.argtypes = [ctypes.c_int, *([ctypes.c_void_p] * 5)]
    lib.deleaker_emulator_mma_check.restype = ctypes.c_int
    return lib


def _mma(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    lib = _check_library()
    a_bits = a.contiguous().view(torch.int16)
    b_bits = b.contiguous().view(torch.int16)
    c = c.contiguous()
    d_col = torch.full((16, 16), float("nan"))
    d_trans = torch.full((16, 16), float("nan"))
    code = lib.deleaker_emulator_mma_check(
        0 if dtype == torch.float16 else 1, a_bits.data_ptr(), b_bits.data_ptr(), c.data_ptr(), d_col.data_ptr(),
        d_trans.data_ptr(),
    )
    assert code == 0, f"the emulated launch failed with code {code}"
    return d_col, d_trans


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulated_mma_and_ldmatrix_equal_a_plain_matmul(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 16, generator=g).to(dtype)
    c = torch.randn(16, 16, generator=g)
    want = (a.double() @ b.double() + c.double()).float()
    d_col, d_trans = _mma(dtype, a, b, c)
    torch.testing.assert_close(d_col, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_trans, want, rtol=1e-6, atol=1e-6)


def test_every_element_lands_where_the_layouts_say():
    """Distinct one-hot products: A = I and B holding each element's own index, so D = B + C cell by cell, and
    A = a permutation, so D's rows are B's rows in that order (any swapped register or half shows)."""
    index = torch.arange(256, dtype=torch.float32).reshape(16, 16)
    eye = torch.eye(16, dtype=torch.bfloat16)
    b = index.to(torch.bfloat16)  # integers up to 255: exact in bf16
    zero = torch.zeros(16, 16)
    for d in _mma(torch.bfloat16, eye, b, zero):
        assert torch.equal(d, index)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    a = torch.zeros(16, 16, dtype=torch.float16)
    a[torch.arange(16), perm] = 1.0
    b16 = index.to(torch.float16)
    for d in _mma(torch.float16, a, b16, zero + 0.5):
        assert torch.equal(d, index[perm] + 0.5)
