// Pass (a): statistics of the pre-intervention attention of image-query rows (spec steps 1-2).
//
// One block = 64 image-query rows of one head; the keys stream through in tiles of 64 with an online softmax.
// Per row it writes the log-sum-exp over all N keys (for the image-image pass) and, per entity e, the
// probability mass on T_e (text keys come first, so these sums ride the same online rescaling).
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

template <typename Elem, int D>
struct StatsSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(64 * kLd * 2);
  static constexpr int kS = kK + smem_align(64 * kLd * 2);
  static constexpr int kRowIndex = kS + smem_align(kWarps * 16 * kLdS * 4);
  static constexpr int kTokens = kRowIndex + smem_align(64 * 4);
  static constexpr int kBytes = kTokens + smem_align(64 * 4);
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) stats_kernel(DeLeakerParams p, Workspace ws) {
  using Smem = StatsSmem<Elem, D>;
  constexpr int kLd = Smem::kLd;
  const Window win = window_of(p);
  const bool need_lse = win.intervene && p.do_image_image != 0;
  if (!win.need_affinity && !need_lse) return;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* k_s = reinterpret_cast<Elem*>(smem + Smem::kK);
  float* s_all = reinterpret_cast<float*>(smem + Smem::kS);
  int* index_s = reinterpret_cast<int*>(smem + Smem::kRowIndex);
  uint32_t* tokens_s = reinterpret_cast<uint32_t*>(smem + Smem::kTokens);

  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * kTileRows;
  const int T = p.text_tokens, N = p.tokens, n_img = N - T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;

  if (threadIdx.x < 64) index_s[threadIdx.x] = row0 + (int)threadIdx.x < n_img ? T + row0 + (int)threadIdx.x : -1;
  __syncthreads();
  load_rows<Elem, D>(q_s, q, p.q_row_stride, index_s);

  // Lane pair (2r, 2r+1) owns row r of the warp's 16 rows; each lane takes 32 of the 64 columns.
  const int r = lane / 2, half = lane % 2;
  float* s_w = s_all + warp * 16 * kLdS;
  float m = -INFINITY, l = 0.0f;
  float acc[DELEAKER_MAX_ENTITIES];
#pragma unroll
  for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) acc[e] = 0.0f;

  for (int kt = 0; kt < N; kt += kTileCols) {
    __syncthreads();  // the previous tile's K and index are no longer read
    if (threadIdx.x < 64) {
      const int j = kt + (int)threadIdx.x;
      index_s[threadIdx.x] = j < N ? j : -1;
      tokens_s[threadIdx.x] = j < T ? token_entities(p, j) : 0u;
    }
    __syncthreads();
    load_rows<Elem, D>(k_s, k, p.k_row_stride, index_s);
    __syncthreads();
    warp_qk<Elem, D>(q_s + warp * 16 * kLd, k_s, s_w);
    __syncwarp();

    float tile_max = -INFINITY;
    for (int i = 0; i < 32; ++i) {
      const int c = half * 32 + ((i + lane) & 31);  // rotated so the 32 lanes hit 32 banks
      if (kt + c < N) tile_max = fmaxf(tile_max, s_w[r * kLdS + c] * p.softmax_scale);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);  // finite: every tile has a valid key
    const float alpha = expf(m - m_new);     // 0 on the first tile
    l *= alpha;
#pragma unroll
    for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) acc[e] *= alpha;
    for (int i = 0; i < 32; ++i) {
      const int c = half * 32 + ((i + lane) & 31);
      const int j = kt + c;
      if (j >= N) continue;
      const float pe = expf(s_w[r * kLdS + c] * p.softmax_scale - m_new);
      l += pe;
      if (j < T) {
        const uint32_t bits = tokens_s[c];
#pragma unroll
        for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e)
          if ((bits >> e) & 1u) acc[e] += pe;
      }
    }
    m = m_new;
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
#pragma unroll
  for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 1);
  const int i = row0 + warp * 16 + r;
  if (half == 0 && i < n_img) {
    const int64_t bh = (int64_t)b * p.heads + h;
    ws.lse[bh * n_img + i] = m + logf(l);
#pragma unroll
    for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e)
      if (e < p.num_entities) ws.head_affinity[(bh * p.num_entities + e) * n_img + i] = acc[e] / l;
  }
}

}  // namespace deleaker
