// Tensor-core instructions as flash kernels use them: `mma.sync.aligned.m16n8k16` (fp16 or bf16 inputs, float
// accumulators) and `ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16`, through inline PTX (sm_80 and later: both
// sm_89 and sm_90a have them). Unlike nvcuda::wmma, whose fragment layouts CUDA leaves unspecified, the PTX ISA
// documents where every element of these fragments lives, so a kernel may keep S and P in registers, know the row
// and column of each of its values, and reuse an accumulator as the next product's A operand:
//
//   PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (lane l, g = l / 4, t = l % 4):
//     A (16 x 16, .row): 4 registers of 2 elements; element i (0..7) at row g + 8 * ((i / 2) % 2),
//                        column 2 t + (i % 2) + 8 * (i / 4)
//     B (16 x 8, .col):  2 registers of 2 elements; element i (0..3) at row (k) 2 t + (i % 2) + 8 * (i / 2),
//                        column (n) g
//     C, D (16 x 8):     4 floats; element i (0..3) at row g + 8 * (i / 2), column 2 t + (i % 2)
//   PTX ISA, "Warp-level matrix load instruction: ldmatrix": .x4 loads four 8 x 8 matrices of 16-bit elements;
//     lanes 8 m .. 8 m + 7 give the addresses of matrix m's rows 0..7 (16 bytes each, 16-byte aligned, shared
//     memory), and register m of lane l gets matrix m's row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (the lower
//     column in the low half); with .trans, its column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
//
// The CPU emulator (tests/cuda_emulator, test infrastructure) defines DELEAKER_CUDA_EMULATOR and provides these
// instructions itself, implemented from the same two sections; everything around them runs as written here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

namespace deleaker {

// Two values rounded to the input dtype and packed into one register: `lo` (the lower column) in the low half.
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(Elem lo, Elem hi) {
  uint16_t a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return (uint32_t)a | ((uint32_t)b << 16);
}

#ifdef DELEAKER_CUDA_EMULATOR
using ::emu::ptx::ldmatrix_x4;
using ::emu::ptx::ldmatrix_x4_trans;
using ::emu::ptx::mma_m16n8k16;
#else
// Four 8 x 8 matrices; `row` is this lane's row address (lanes 8 m .. 8 m + 7: rows of matrix m into r[m]).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t address = (uint32_t)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// The same, each matrix transposed on the way (a row-major K x N operand into B fragments).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const uint32_t address = (uint32_t)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d = a b + d for one 16 x 8 x 16 product of the warp.
template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                             const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

}  // namespace deleaker
