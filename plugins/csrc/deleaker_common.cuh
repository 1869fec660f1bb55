// Shared pieces of the DeLeaker kernels: the block-step window logic, tile shapes, tile loads and the
// tensor-core product S = Q K^T of one warp (nvcuda::wmma, portable on sm_80+ for fp16 and bf16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include <cmath>

#include "deleaker_params.h"

namespace deleaker {

namespace wmma = nvcuda::wmma;

// ---- the block-step windows (spec steps 3-4), evaluated on the device from the device step ----------------

struct Window {
  int64_t t;           // block step
  bool intervene;      // start_intervention_from <= t <= stop_intervention_at
  bool aggregate;      // the history changes this call (t == start, or start < t < stop)
  bool need_affinity;  // c_e is needed: for the history, or as the mask source
  bool source_is_history;
};

__host__ __device__ inline Window window_at(const DeLeakerParams& p, int64_t step) {
  Window w;
  w.t = step * (int64_t)p.num_blocks + (int64_t)p.block_offset;
  const int64_t start = p.start_aggregating_from, stop = p.stop_aggregating_at;
  w.intervene = p.start_intervention_from <= w.t && w.t <= p.stop_intervention_at;
  w.aggregate = p.use_history != 0 && (w.t == start || (start < w.t && w.t < stop));
  w.source_is_history = p.use_history != 0 && w.t > start;
  w.need_affinity = w.aggregate || (w.intervene && !w.source_is_history);
  return w;
}

// The window of this call, from the device step (NULL: step 0).
__device__ __forceinline__ Window window_of(const DeLeakerParams& p) {
  return window_at(p, p.step != nullptr ? *p.step : 0);
}

// ---- tiles -------------------------------------------------------------------------------------------------

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = kWarps * 16;  // query rows of one block: each warp owns 16
constexpr int kTileCols = 64;           // keys per step
constexpr int kLdS = kTileCols + 4;     // float S rows, padded against bank conflicts

template <int D>
struct HeadDim {
  static constexpr int kLd = D + 8;  // Q/K/V rows in shared memory, padded (a multiple of 8 elements for wmma)
};

template <typename Elem>
__device__ __forceinline__ Elem from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Loads kTileRows (or kTileCols, both 64) rows of D elements into shared memory with 16-byte accesses.
// row_index[r] is the token of row r, or -1 for a zero row (past the end).
template <typename Elem, int D>
__device__ __forceinline__ void load_rows(Elem* smem, const Elem* base, int64_t row_stride, const int* row_index) {
  constexpr int kVecs = D / 8;  // 8 elements of 2 bytes per uint4
  constexpr int kLd = HeadDim<D>::kLd;
  for (int idx = threadIdx.x; idx < 64 * kVecs; idx += kThreads) {
    const int r = idx / kVecs, c = (idx % kVecs) * 8;
    const int token = row_index[r];
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (token >= 0) value = *reinterpret_cast<const uint4*>(base + (int64_t)token * row_stride + c);
    *reinterpret_cast<uint4*>(smem + r * kLd + c) = value;
  }
}

// One warp: S[16 x 64] = Q[16 x D] K[64 x D]^T, stored row-major (ld kLdS) as float at s_out.
template <typename Elem, int D>
__device__ __forceinline__ void warp_qk(const Elem* q_rows, const Elem* k_rows, float* s_out) {
  constexpr int kLd = HeadDim<D>::kLd;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileCols / 16];
#pragma unroll
  for (int n = 0; n < kTileCols / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, Elem, wmma::row_major> a;
    wmma::load_matrix_sync(a, q_rows + kk * 16, kLd);
#pragma unroll
    for (int n = 0; n < kTileCols / 16; ++n) {
      // K^T as a column-major matrix: element (d, j) sits at k_rows[j * kLd + d].
      wmma::fragment<wmma::matrix_b, 16, 16, 16, Elem, wmma::col_major> b;
      wmma::load_matrix_sync(b, k_rows + n * 16 * kLd + kk * 16, kLd);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kTileCols / 16; ++n) wmma::store_matrix_sync(s_out + n * 16, acc[n], kLdS, wmma::mem_row_major);
}

// Bits e of the entities that own text token t (entity_mask is (E_max, T) bytes).
__device__ __forceinline__ uint32_t token_entities(const DeLeakerParams& p, int t) {
  uint32_t bits = 0;
  for (int e = 0; e < p.num_entities; ++e) bits |= (p.entity_mask[(int64_t)e * p.text_tokens + t] != 0 ? 1u : 0u) << e;
  return bits;
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Device pointers into the workspace (see DeLeakerWorkspaceLayout for shapes).
struct Workspace {
  float* lse;
  float* head_affinity;
  float* affinity;
  float* source;
  uint8_t* raw_masks;
  uint8_t* masks;
  uint8_t* scratch;
  uint8_t* row_entities;
  int32_t* mask_counts;
  int32_t* union_count;
  int32_t* union_index;
  double* pair_stats;
  uint32_t* cut_bits;
  int64_t cut_words;
};

// Byte offset of a shared-memory part, rounded up so wmma pointers stay 256-bit aligned.
__host__ __device__ constexpr int smem_align(int bytes) { return (bytes + 127) / 128 * 128; }

// Block-wide sum (blockDim.x a multiple of 32, at most 1024). Every thread gets the total.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch32) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch32 may still be read by a previous call
  if (lane == 0) scratch32[warp] = x;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < warps; ++w) total += scratch32[w];
  return total;
}

}  // namespace deleaker
