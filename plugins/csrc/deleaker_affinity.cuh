// Step (a): the entity text tokens, and the affinities of image rows from the caller's LSE and those columns only:
// head_affinity[b, h, e, i] = sum_{t in T_e} exp(s[h, T+i, t] - l[h, T+i]), and then, by the last of a row tile's
// H blocks to finish, the mean over heads and tokens c_e[i] (affinity[b, e, i]) with no pass or launch of its own.
// An (image rows x entity tokens) product per head: a few percent of an attention.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

constexpr int kTokenThreads = 1024;

// One block: the text tokens of any entity, compacted in ascending order, and their entity bits. Also run inside
// the intervention window (the correction reads the list) when the affinities are not needed.
__global__ void __launch_bounds__(kTokenThreads) entity_tokens_kernel(DeLeakerParams p, Workspace ws) {
  __shared__ int warp_totals[32];
  wait_for_previous_kernel();
  const Window win = window_of(p);
  if (!win.need_affinity && !win.intervene) return;
  // The affinity kernel's arrival counters start from zero in every call (never from a previous call's state, so
  // a CUDA-graph replay, or a call after an aborted one, counts the same).
  if (win.need_affinity)
    for (int idx = threadIdx.x; idx < p.batch * ws.tiles; idx += blockDim.x) ws.affinity_arrivals[idx] = 0;
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

// The last block of row tile `tile` (all H heads' head_affinity rows are written): c_e[i] = (sum over heads 0..H-1
// in order) / H / |T_e|, the same expression and order as the decomposed op, so the block that happens to finish
// last does not change a bit; 0 for an entity without tokens (its history row stays zero).
__device__ __forceinline__ void affinity_head_mean(const DeLeakerParams& p, const Workspace& ws, int b, int tile) {
  __shared__ int warp_token_counts[kWarps][DELEAKER_MAX_ENTITIES];  // per warp: tokens of each entity
  const int n_img = p.grid_h * p.grid_w, E = p.num_entities, H = p.heads;
  const int count = *ws.entity_token_count;
  int mine[DELEAKER_MAX_ENTITIES];  // integer counts: exact in any order
#pragma unroll
  for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) mine[e] = 0;
  for (int at = threadIdx.x; at < count; at += blockDim.x) {
    const uint32_t bits = ws.entity_token_bits[at];
#pragma unroll
    for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) mine[e] += (bits >> e) & 1u;
  }
#pragma unroll
  for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e)
    for (int o = 16; o > 0; o >>= 1) mine[e] += __shfl_xor_sync(0xffffffffu, mine[e], o);
  if (threadIdx.x % 32 == 0)
    for (int e = 0; e < DELEAKER_MAX_ENTITIES; ++e) warp_token_counts[threadIdx.x / 32][e] = mine[e];
  __syncthreads();
  for (int idx = threadIdx.x; idx < E * kTile; idx += blockDim.x) {
    const int e = idx / kTile, i = tile * kTile + idx % kTile;
    if (i >= n_img) continue;
    int tokens = 0;
    for (int w = 0; w < kWarps; ++w) tokens += warp_token_counts[w][e];
    float sum = 0.0f;
    for (int h = 0; h < H; ++h) sum += __ldcg(ws.head_affinity + (((int64_t)b * H + h) * E + e) * n_img + i);
    ws.affinity[((int64_t)b * E + e) * n_img + i] = tokens > 0 ? sum / (float)H / (float)tokens : 0.0f;
  }
}

// One block = 64 image rows of one head; the entity tokens stream through in tiles of 64. The last of a row
// tile's H blocks to finish also takes the head mean (affinity_head_mean).
template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) affinity_kernel(DeLeakerParams p, Workspace ws) {
  using Smem = AffinitySmem<Elem, D>;
  __shared__ int last_of_tile;
  wait_for_previous_kernel();
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
  // Count this head in (an integer atomic: exact whatever the order the heads finish in); the fence makes this
  // block's rows visible device-wide before the count that the last block acts on.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    last_of_tile = atomicAdd(ws.affinity_arrivals + (int64_t)b * ws.tiles + blockIdx.x, 1) == p.heads - 1;
  __syncthreads();
  if (!last_of_tile) return;
  __threadfence();  // the other heads' rows are read after their counts
  affinity_head_mean(p, ws, b, (int)blockIdx.x);
}

}  // namespace deleaker
