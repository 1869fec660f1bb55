// Pass (d): flash-style attention with the DeLeaker edits applied on the fly (spec steps 6-7).
//
// One block = 64 query rows of one head (4 warps x 16 rows); keys and values stream through in tiles of 64.
// S = Q K^T and O += P V run on tensor cores (wmma); the edits and the online softmax run on the S tile in
// shared memory, where each element knows its (row, column). Outside the intervention window, and for
// text-query rows always, this is plain attention.
//
// The output accumulator stays in wmma fragments. Its per-row rescaling needs the row of each fragment element,
// which wmma does not specify; it is read once from a fragment loaded from a matrix whose element (r, c) is r.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

template <typename Elem, int D>
struct FlashSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kLdP = kTileCols + 8;  // Elem rows of P, padded (a multiple of 8 for wmma)
  static constexpr int kLdO = D + 4;          // float rows of the final O, padded
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(64 * kLd * 2);
  static constexpr int kV = kK + smem_align(64 * kLd * 2);
  static constexpr int kS = kV + smem_align(64 * kLd * 2);
  static constexpr int kP = kS + smem_align(kWarps * 16 * kLdS * 4);
  static constexpr int kRowScale = kP + smem_align(kWarps * 16 * kLdP * 2);
  static constexpr int kIndex = kRowScale + smem_align(64 * 4);
  static constexpr int kTokens = kIndex + smem_align(64 * 4);
  static constexpr int kBytes = kTokens + smem_align(64 * 4);
  // After the key loop, the final O (float, 64 x kLdO) reuses the K and V buffers.
  static_assert(64 * kLdO * 4 <= kS - kK, "O must fit in the K and V buffers");
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) flash_kernel(DeLeakerParams p, Workspace ws) {
  using Smem = FlashSmem<Elem, D>;
  constexpr int kLd = Smem::kLd, kLdP = Smem::kLdP, kLdO = Smem::kLdO;
  using FragO = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* k_s = reinterpret_cast<Elem*>(smem + Smem::kK);
  Elem* v_s = reinterpret_cast<Elem*>(smem + Smem::kV);
  float* s_all = reinterpret_cast<float*>(smem + Smem::kS);
  Elem* p_all = reinterpret_cast<Elem*>(smem + Smem::kP);
  float* row_scale = reinterpret_cast<float*>(smem + Smem::kRowScale);
  int* index_s = reinterpret_cast<int*>(smem + Smem::kIndex);
  uint32_t* tokens_s = reinterpret_cast<uint32_t*>(smem + Smem::kTokens);
  float* o_s = reinterpret_cast<float*>(smem + Smem::kK);

  const Window win = window_of(p);
  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * kTileRows;
  const int T = p.text_tokens, N = p.tokens, n_img = N - T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 2, half = lane % 2;
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  float* s_w = s_all + warp * 16 * kLdS;
  Elem* p_w = p_all + warp * 16 * kLdP;

  if (threadIdx.x < 64) index_s[threadIdx.x] = row0 + (int)threadIdx.x < N ? row0 + (int)threadIdx.x : -1;
  __syncthreads();
  load_rows<Elem, D>(q_s, q, p.q_row_stride, index_s);

  // This lane's row and its edits: text-query rows and rows outside every mask are never edited.
  const int row = row0 + warp * 16 + r;
  const bool image_row = row >= T && row < N;
  const uint32_t row_bits =
      win.intervene && image_row ? (uint32_t)ws.row_entities[(int64_t)b * n_img + (row - T)] : 0u;
  const bool weaken = row_bits != 0u && p.do_image_text_weakening != 0;
  const bool strengthen = row_bits != 0u && p.do_image_text_strengthening != 0;
  const bool single_entity = __popc(row_bits) == 1;
  const uint32_t* cut_row = row_bits != 0u && p.do_image_image != 0
                                ? ws.cut_bits + ((int64_t)b * n_img + (row - T)) * ws.cut_words
                                : nullptr;

  // The row of each accumulator element (see the header comment).
  FragO row_of;
  for (int i = lane; i < 16 * 16; i += 32) s_w[(i / 16) * kLdS + i % 16] = (float)(i / 16);
  __syncwarp();
  wmma::load_matrix_sync(row_of, s_w, kLdS, wmma::mem_row_major);

  FragO o[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(o[n], 0.0f);
  float m = -INFINITY, l = 0.0f;

  for (int kt = 0; kt < N; kt += kTileCols) {
    __syncthreads();  // the previous tile's K, V, index and tokens are no longer read
    if (threadIdx.x < 64) {
      const int j = kt + (int)threadIdx.x;
      index_s[threadIdx.x] = j < N ? j : -1;
      tokens_s[threadIdx.x] = j < T && win.intervene ? token_entities(p, j) : 0u;
    }
    __syncthreads();
    load_rows<Elem, D>(k_s, k, p.k_row_stride, index_s);
    load_rows<Elem, D>(v_s, v, p.v_row_stride, index_s);
    __syncthreads();
    warp_qk<Elem, D>(q_s + warp * 16 * kLd, k_s, s_w);
    __syncwarp();

    // Edited logits, in place, and the tile's row max.
    float tile_max = -INFINITY;
    for (int i = 0; i < 32; ++i) {
      const int c = half * 32 + ((i + lane) & 31);  // rotated so the 32 lanes hit 32 banks
      const int j = kt + c;
      float s = s_w[r * kLdS + c] * p.softmax_scale;
      if (j >= N) {
        s = -INFINITY;
      } else if (j < T) {
        const uint32_t tok = tokens_s[c];
        // Weaken iff i is in some M_e and t in some T_f with f != e; strengthen iff i in M_e and t in T_e.
        if (weaken && tok != 0u && !(single_entity && tok == row_bits)) {
          s = -INFINITY;
        } else if (strengthen && (tok & row_bits) != 0u) {
          s *= p.k_strength;
        }
      } else if (cut_row != nullptr) {
        const int jj = j - T;
        if ((cut_row[jj / 32] >> (jj % 32)) & 1u) s = -INFINITY;
      }
      s_w[r * kLdS + c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    // A row with nothing but -inf so far keeps m = -inf; use 0 as its reference so that no NaN appears.
    const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = expf(m - m_ref);
    float tile_sum = 0.0f;
    for (int i = 0; i < 32; ++i) {
      const int c = half * 32 + ((i + lane) & 31);
      const float pe = expf(s_w[r * kLdS + c] - m_ref);
      tile_sum += pe;
      p_w[r * kLdP + c] = from_float<Elem>(pe);
    }
    l = l * alpha + tile_sum;
    m = m_new;
    if (half == 0) row_scale[warp * 16 + r] = alpha;
    __syncwarp();

#pragma unroll
    for (int n = 0; n < D / 16; ++n)
#pragma unroll
      for (int x = 0; x < FragO::num_elements; ++x) o[n].x[x] *= row_scale[warp * 16 + (int)row_of.x[x]];
#pragma unroll
    for (int kk = 0; kk < kTileCols / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, Elem, wmma::row_major> a;
      wmma::load_matrix_sync(a, p_w + kk * 16, kLdP);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Elem, wmma::row_major> bv;
        wmma::load_matrix_sync(bv, v_s + kk * 16 * kLd + n * 16, kLd);
        wmma::mma_sync(o[n], a, bv, o[n]);
      }
    }
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  __syncthreads();  // every warp is done with K and V: O reuses them
  if (half == 0) row_scale[warp * 16 + r] = 1.0f / l;
  float* o_w = o_s + warp * 16 * kLdO;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(o_w + n * 16, o[n], kLdO, wmma::mem_row_major);
  __syncwarp();
  if (row < N) {
    const float inv_l = row_scale[warp * 16 + r];
    Elem* out = static_cast<Elem*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + (int64_t)row * p.o_row_stride;
    for (int c = half * (D / 2); c < (half + 1) * (D / 2); c += 8) {
      alignas(16) Elem pack[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) pack[x] = from_float<Elem>(o_w[r * kLdO + c + x] * inv_l);
      *reinterpret_cast<uint4*>(out + c) = *reinterpret_cast<const uint4*>(pack);
    }
  }
}

}  // namespace deleaker
