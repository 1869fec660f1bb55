// Step (a): the entity text tokens, and the affinities of image rows from the caller's LSE and those columns only:
// head_affinity[b, h, e, i] = sum_{t in T_e} exp(s[h, T+i, t] - l[h, T+i]) (the mask kernel takes the mean over
// heads and tokens). An (image rows x entity tokens) product per head: a few percent of an attention.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

constexpr int kTokenThreads = 1024;

// One block: the text tokens of any entity, compacted in ascending order, and their entity bits. Also run inside
// the intervention window (the correction reads the list) when the affinities are not needed.
__global__ void __launch_bounds__(kTokenThreads) entity_tokens_kernel(DeLeakerParams p, Workspace ws) {
  __shared__ int warp_totals[32];
  const Window win = window_of(p);
  if (!win.need_affinity && !win.intervene) return;
  int base = 0;
  for (int chunk = 0; chunk < p.text_tokens; chunk += blockDim.x) {
    const int t = chunk + (int)threadIdx.x;
    const uint32_t bits = t < p.text_tokens ? token_entities(p, t) : 0u;
    const Ranked rank = block_rank(bits != 0u, warp_totals);
    if (rank.position >= 0) {
      ws.entity_tokens[base + rank.position] = t;
      ws.entity_token_bits[base + rank.position] = (uint8_t)bits;
    }
    base += rank.total;
  }
  if (threadIdx.x == 0) *ws.entity_token_count = base;
}

template <typename Elem, int D>
struct AffinitySmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(kTile * kLd * 2);
  static constexpr int kS = kK + smem_align(kTile * kLd * 2);
  static constexpr int kRowToken = kS + smem_align(kWarps * 16 * kLdS * 4);
  static constexpr int kColToken = kRowToken + smem_align(kTile * 4);
  static constexpr int kColBits = kColToken + smem_align(kTile * 4);
  static constexpr int kBytes = kColBits + smem_align(kTile * 4);
};

// One block = 64 image rows of one head; the entity tokens stream through in tiles of 64.
template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) affinity_kernel(DeLeakerParams p, Workspace ws) {
  using Smem = AffinitySmem<Elem, D>;
  if (!window_of(p).need_affinity) return;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* k_s = reinterpret_cast<Elem*>(smem + Smem::kK);
  float* s_all = reinterpret_cast<float*>(smem + Smem::kS);
  int* row_token = reinterpret_cast<int*>(smem + Smem::kRowToken);
  int* col_token = reinterpret_cast<int*>(smem + Smem::kColToken);
  uint32_t* col_bits = reinterpret_cast<uint32_t*>(smem + Smem::kColBits);

  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * kTile;
  const int T = p.text_tokens, n_img = p.grid_h * p.grid_w, E = p.num_entities;
  const int warp = threadIdx.x / 32;
  const CellOwner me = cell_owner();
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  float* s_w = s_all + warp * 16 * kLdS;

  if (threadIdx.x < kTile) row_token[threadIdx.x] = row0 + (int)threadIdx.x < n_img ? T + row0 + (int)threadIdx.x : -1;
  __syncthreads();
  load_rows<Elem, D>(q_s, q, p.q_row_stride, row_token);
  const int i = row0 + me.row;
  const float row_lse = i < n_img ? lse_of(p, b, h)[T + i] : 0.0f;

  float acc[DELEAKER_MAX_ENTITIES];
#pragma unroll
  for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) acc[e] = 0.0f;
  const int count = *ws.entity_token_count;
  for (int t0 = 0; t0 < count; t0 += kTile) {
    entity_token_tile_qk<Elem, D>(p, ws, k, t0, count, q_s, k_s, s_w, col_token, col_bits);
    for (int n = 0; n < 32; ++n) {
      const int c = me.col(n);
      const uint32_t bits = col_bits[c];  // 0 past the end of the list
      if (bits == 0u) continue;
      const float prob = expf(s_w[(me.row % 16) * kLdS + c] * p.softmax_scale - row_lse);
#pragma unroll
      for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e)
        if ((bits >> e) & 1u) acc[e] += prob;
    }
  }
#pragma unroll
  for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 1);
  if (me.half == 0 && i < n_img) {
    const int64_t bh = (int64_t)b * p.heads + h;
#pragma unroll
    for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e)
      if (e < E) ws.head_affinity[(bh * E + e) * n_img + i] = acc[e];
  }
}

}  // namespace deleaker
