// Test infrastructure: one warp runs the kernels' tensor-core instructions (plugins/csrc/deleaker_mma.cuh, the
// emulator's ldmatrix and mma.sync) on given matrices, addressing shared memory exactly as the kernels do, so
// that tests/test_cuda_emulator.py can compare D = A B + C with a plain matrix product.
#include <stdint.h>
#include <string.h>

#include "deleaker_mma.cuh"

namespace {

constexpr int kLd = 24;  // 16-bit elements per shared row: 48 bytes, 16-byte aligned like the kernels' padded rows

// A (16 x 16) and B (16 x 16, two n-tiles of 8) as 16-bit patterns, row-major; C and D (16 x 16) float. D gets
// the product twice: `d_col` with B read as the kernels read K (stored n-major, ldmatrix), `d_trans` with B read
// as they read V (stored k-major, ldmatrix.trans).
template <typename Elem>
__global__ void mma_check_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d_col, float* d_trans) {
  uint16_t* a_s = reinterpret_cast<uint16_t*>(::emu::dynamic_smem());
  uint16_t* bt_s = a_s + 16 * kLd;  // B transposed: row n holds B[., n]
  uint16_t* b_s = bt_s + 16 * kLd;  // B as it is: row k holds B[k, .]
  const int lane = (int)threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) {
    const int r = i / 16, col = i % 16;
    a_s[r * kLd + col] = a[i];
    b_s[r * kLd + col] = b[i];
    bt_s[col * kLd + r] = b[i];
  }
  __syncwarp();
  uint32_t fa[4], fb_col[4], fb_trans[4];
  deleaker::ldmatrix_x4(fa, a_s + (lane % 16) * kLd + 8 * (lane / 16));
  // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  deleaker::ldmatrix_x4(fb_col, bt_s + (8 * (lane / 16) + lane % 8) * kLd + 8 * ((lane / 8) % 2));
  // Matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), each transposed.
  deleaker::ldmatrix_x4_trans(fb_trans, b_s + (lane % 16) * kLd + 8 * (lane / 16));
  for (int j = 0; j < 2; ++j) {
    float acc_col[4], acc_trans[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 8 * j + 2 * t + (i % 2);
      acc_col[i] = acc_trans[i] = c[row * 16 + col];
    }
    const uint32_t b_col[2] = {fb_col[2 * j], fb_col[2 * j + 1]};
    const uint32_t b_trans[2] = {fb_trans[2 * j], fb_trans[2 * j + 1]};
    deleaker::mma_m16n8k16<Elem>(acc_col, fa, b_col);
    deleaker::mma_m16n8k16<Elem>(acc_trans, fa, b_trans);
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 8 * j + 2 * t + (i % 2);
      d_col[row * 16 + col] = acc_col[i];
      d_trans[row * 16 + col] = acc_trans[i];
    }
  }
}

}  // namespace

//! dtype 0: fp16, 1: bf16. Returns the launch's cudaError_t (0: success).
extern "C" int deleaker_emulator_mma_check(int dtype, const uint16_t* a, const uint16_t* b, const float* c,
                                           float* d_col, float* d_trans) {
  const size_t smem = 3 * 16 * kLd * sizeof(uint16_t);
  if (dtype == 0) return (int)emu::launch(mma_check_kernel<__half>, dim3(1), dim3(32), smem, a, b, c, d_col, d_trans);
  return (int)emu::launch(mma_check_kernel<__nv_bfloat16>, dim3(1), dim3(32), smem, a, b, c, d_col, d_trans);
}
