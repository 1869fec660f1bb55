// Step (d): the correction of the rows in U, per head, written over the plain output o in place:
//
//     W_ij = p_ij              for j in C_i (cut keys: other entities' text tokens; image keys whose cut bit is set)
//     W_it = -(p_a,it - p_it)  for t in S_i (own entities' text tokens, unless cut), p_a = exp(a s - l)
//     Z_i  = 1 - sum_j W_ij,   o'_i = (o_i - sum_j W_ij v_j) / Z_i
//
// which is softmax(s') v for the spec's edited logits s'. One block = 64 U rows of one band and one head. The
// image part runs on tensor cores over the U column tiles that have a cut (cut_kernel's bits): S = Q K^T and W
// stay in registers (mma.sync), and W, rounded to the input dtype like P in a flash attention (scaled by 2^10 in
// fp16 to keep small p normal), is the A operand of W V as it stands (FlashAttention-2); the text part, over
// the entity tokens only, runs in float32 on CUDA cores, since p_a may exceed any fp16 range. Every sum runs in a
// fixed order. A row whose Z is below the fallback threshold, or not finite, or whose corrected values are not
// finite keeps o here; fallback_list_kernel lists it for the exact recomputation.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

// W of the image part is stored as Elem times this (fp16: small p stay normal; p <= 1 keeps W far below 65504).
template <typename Elem>
struct WeightScale {
  static constexpr float kValue = 1.0f;
};
template <>
struct WeightScale<__half> {
  static constexpr float kValue = 1024.0f;
};

// The one rule both the correction and the fallback list apply: the corrected row stands iff Z is finite and at
// least the threshold (the correction stores NaN for Z where its corrected values are not finite).
__device__ __forceinline__ bool correction_stands(float z, float fallback_threshold) {
  return isfinite(z) && z >= fallback_threshold;
}

template <typename Elem, int D>
struct CorrectionSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kLdO = D + 4;  // float rows of the numerator, padded
  static constexpr int kQ = 0;
  static constexpr int kKV = kQ + smem_align(kTile * kLd * 2);  // K of a tile, then its V
  static constexpr int kS = kKV + smem_align(kTile * kLd * 2);          // S of the text part, float
  static constexpr int kNum = kS + smem_align(kWarps * 16 * kLdS * 4);  // numerator sum_j W_ij v_j, float
  static constexpr int kImageWeight = kNum + smem_align(kTile * kLdO * 4);  // per row: sum of the image part's W
  static constexpr int kLse = kImageWeight + smem_align(kTile * 4);
  static constexpr int kRowToken = kLse + smem_align(kTile * 4);
  static constexpr int kRowBits = kRowToken + smem_align(kTile * 4);
  static constexpr int kColToken = kRowBits + smem_align(kTile * 4);
  static constexpr int kColBits = kColToken + smem_align(kTile * 4);
  static constexpr int kBytes = kColBits + smem_align(kTile * 4);
};

// One work item of correction_kernel: the 64 U rows of row tile `band_tile` of band `band`, head h, sample b.
// Returns at once (the whole block) for a tile beyond this sample's U.
template <typename Elem, int D>
__device__ void correction_tile(const DeLeakerParams& p, const Workspace& ws, int band, int b, int h, int band_tile) {
  using Smem = CorrectionSmem<Elem, D>;
  constexpr int kLd = Smem::kLd, kLdO = Smem::kLdO;
  constexpr float kScale = WeightScale<Elem>::kValue;
  const int U = ws.union_count[b];
  const int row_tile = band * (ws.band_rows / kTile) + band_tile;
  if (row_tile * kTile >= U) return;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* kv_s = reinterpret_cast<Elem*>(smem + Smem::kKV);
  float* s_all = reinterpret_cast<float*>(smem + Smem::kS);
  float* num_s = reinterpret_cast<float*>(smem + Smem::kNum);
  float* image_weight = reinterpret_cast<float*>(smem + Smem::kImageWeight);
  float* lse_s = reinterpret_cast<float*>(smem + Smem::kLse);
  int* row_token = reinterpret_cast<int*>(smem + Smem::kRowToken);
  uint32_t* row_bits = reinterpret_cast<uint32_t*>(smem + Smem::kRowBits);
  int* col_token = reinterpret_cast<int*>(smem + Smem::kColToken);
  uint32_t* col_bits = reinterpret_cast<uint32_t*>(smem + Smem::kColBits);

  const int T = p.text_tokens, n_img = p.grid_h * p.grid_w;
  const int warp = threadIdx.x / 32;
  const CellOwner me = cell_owner();
  const int r = me.row % 16;
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  float* s_w = s_all + warp * 16 * kLdS;
  const FragCells cells = frag_cells();  // the image part's cells, in registers

  if (threadIdx.x < kTile) {
    const int u = row_tile * kTile + (int)threadIdx.x;
    const int img = u < U ? ws.union_index[(int64_t)b * n_img + u] : -1;
    row_token[threadIdx.x] = img >= 0 ? T + img : -1;
    row_bits[threadIdx.x] = img >= 0 ? ws.row_entities[(int64_t)b * n_img + img] : 0u;
    lse_s[threadIdx.x] = img >= 0 ? lse_of(p, b, h)[T + img] : 0.0f;
  }
  __syncthreads();
  load_rows<Elem, D>(q_s, q, p.q_row_stride, row_token);
  const uint32_t my_bits = row_bits[me.row];
  const float row_lse = lse_s[me.row];

  // Image part: the numerator of the cut image keys on tensor cores, W in registers (rows cells.row(0), (2)).
  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  float image_sum[2] = {0.0f, 0.0f};  // this lane's part of the sum of W of its two rows
  if (p.do_image_image != 0) {
    const float cell_lse[2] = {lse_s[cells.row(0)], lse_s[cells.row(2)]};
    const uint64_t* cut_rows[2] = {cut_words_of(ws, b, (int64_t)band_tile * kTile + cells.row(0)),
                                   cut_words_of(ws, b, (int64_t)band_tile * kTile + cells.row(2))};
    const int u_tiles = ceil_div(U, kTile);
    const int32_t* tile_has_cut = cut_tiles_of(ws, b, band_tile);
    for (int ct = 0; ct < u_tiles; ++ct) {
      if (tile_has_cut[ct] == 0) continue;  // the same for the whole block
      __syncthreads();  // the previous tile's V and column list are no longer read
      if (threadIdx.x < kTile) {
        const int u = ct * kTile + (int)threadIdx.x;
        col_token[threadIdx.x] = u < U ? T + ws.union_index[(int64_t)b * n_img + u] : -1;
      }
      __syncthreads();
      load_rows<Elem, D>(kv_s, k, p.k_row_stride, col_token);
      __syncthreads();
      // V's loads go out now, in flight during the product and the exps; stored once no warp reads K.
      TileLoads<Elem, D> v_rows;
      v_rows.issue(v, p.v_row_stride, col_token);
      WarpTile w;
      warp_qk_mma<Elem, D>(q_s + warp * 16 * kLd, kv_s, w);
      const uint64_t words[2] = {cut_rows[0][ct], cut_rows[1][ct]};
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int fr = (i >> 1) & 1;
        float x = 0.0f;
        if ((words[fr] >> cells.col(i)) & 1u) x = expf(w[i >> 2][i & 3] * p.softmax_scale - cell_lse[fr]);
        image_sum[fr] += x;
        w[i >> 2][i & 3] = x * kScale;
      }
      uint32_t w_frag[kTile / 16][4];
      pack_p<Elem>(w, w_frag);
      __syncthreads();  // every warp is done with K
      v_rows.store(kv_s);
      __syncthreads();  // V is written
      warp_pv_mma<Elem, D>(acc, w_frag, kv_s);
    }
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) num_s[cells.row(e) * kLdO + 8 * n + cells.col(e)] = acc[n][e] * (1.0f / kScale);
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {  // the 4 lanes of a row, in a fixed order
    image_sum[0] += __shfl_xor_sync(0xffffffffu, image_sum[0], o);
    image_sum[1] += __shfl_xor_sync(0xffffffffu, image_sum[1], o);
  }
  if (cells.t == 0) {
    image_weight[cells.row(0)] = image_sum[0];
    image_weight[cells.row(2)] = image_sum[1];
  }
  float weight_sum = 0.0f;  // sum of this thread's W of the text part

  // Text part: the entity tokens only, float32.
  const bool weaken = p.do_image_text_weakening != 0, strengthen = p.do_image_text_strengthening != 0;
  const int token_count = weaken || strengthen ? *ws.entity_token_count : 0;
  for (int t0 = 0; t0 < token_count; t0 += kTile) {
    entity_token_tile_qk<Elem, D>(p, ws, k, t0, token_count, q_s, kv_s, s_w, col_token, col_bits);
    TileLoads<Elem, D> v_rows;  // in flight during the weights; stored once no warp reads K
    v_rows.issue(v, p.v_row_stride, col_token);
    for (int i = 0; i < 32; ++i) {
      const int c = me.col(i);
      const uint32_t tb = col_bits[c];  // 0 past the end of the list
      const float s = s_w[r * kLdS + c] * p.softmax_scale;
      float w = 0.0f;
      if (weaken && text_cut(my_bits, tb)) {
        w = expf(s - row_lse);
      } else if (strengthen && (my_bits & tb) != 0u) {
        w = -(expf(p.k_strength * s - row_lse) - expf(s - row_lse));
      }
      weight_sum += w;
      s_w[r * kLdS + c] = w;  // this thread's cells only
    }
    __syncthreads();  // every warp is done with K; W rows are complete
    v_rows.store(kv_s);
    __syncthreads();
    float* num_row = num_s + me.row * kLdO + me.half * (D / 2);
    for (int c = 0; c < kTile; ++c) {
      const float w = s_w[r * kLdS + c];
      if (w == 0.0f) continue;
      const Elem* v_row = kv_s + c * kLd + me.half * (D / 2);
#pragma unroll
      for (int d = 0; d < D / 2; ++d) num_row[d] += w * to_float(v_row[d]);
    }
  }
  __syncthreads();  // the numerator rows are complete (the image part's were stored by other lanes)

  // Z, o' = (o - numerator) / Z, written over o where it stands.
  weight_sum += __shfl_xor_sync(0xffffffffu, weight_sum, 1);
  const float z = 1.0f - (image_weight[me.row] + weight_sum);
  const int token = row_token[me.row];
  Elem* out_row = static_cast<Elem*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
                  (int64_t)(token >= 0 ? token : 0) * p.o_row_stride + me.half * (D / 2);
  const float* num_row = num_s + me.row * kLdO + me.half * (D / 2);
  // Two passes over this thread's half row (o is re-read from cache): are the corrected values finite, then
  // write them if the correction stands. Finite as the input dtype, what is written: a value finite in float32
  // that overflows fp16 (a small Z under a small fallback threshold) must fall back, not be written as inf.
  bool finite = true;
  if (token >= 0) {
    for (int d0 = 0; d0 < D / 2; d0 += 8) {
      alignas(16) Elem plain[8];
      *reinterpret_cast<uint4*>(plain) = *reinterpret_cast<const uint4*>(out_row + d0);
#pragma unroll
      for (int x = 0; x < 8; ++x)
        finite = finite && isfinite(to_float(from_float<Elem>((to_float(plain[x]) - num_row[d0 + x]) / z)));
    }
  }
  // Every lane takes part in the shuffle (a lane skipping it, as `finite && __shfl...` did, is undefined).
  const int partner_finite = __shfl_xor_sync(0xffffffffu, (int)finite, 1);
  finite = finite && partner_finite != 0;
  const float z_stored = finite || !isfinite(z) ? z : nanf("");
  if (token >= 0) {
    if (correction_stands(z_stored, p.fallback_threshold)) {
      for (int d0 = 0; d0 < D / 2; d0 += 8) {
        alignas(16) Elem values[8];
        *reinterpret_cast<uint4*>(values) = *reinterpret_cast<const uint4*>(out_row + d0);
#pragma unroll
        for (int x = 0; x < 8; ++x) values[x] = from_float<Elem>((to_float(values[x]) - num_row[d0 + x]) / z);
        *reinterpret_cast<uint4*>(out_row + d0) = *reinterpret_cast<const uint4*>(values);
      }
    }
    if (me.half == 0) ws.z[((int64_t)b * p.heads + h) * n_img + (token - T)] = z_stored;
  }
}

// Persistent grid (a few blocks per SM): the blocks stride over the band's (row tile, head, sample) items, heads
// fastest, for the row tiles the device's union holds (band_tiles_of); each item is independent, so the result
// does not depend on the grid.
//! Blocks per SM of correction_kernel's persistent grid (two blocks of 87 KiB of shared memory at D = 128 fit an
//! SM), the occupancy its registers are held to.
constexpr int kCorrectionBlocksPerSm = 2;

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads, kCorrectionBlocksPerSm) correction_kernel(DeLeakerParams p, Workspace ws,
                                                                                     int band) {
  wait_for_previous_kernel();
  if (!window_of(p).intervene) return;
  for_each_band_row_tile(p, ws, band, [&](int b, int h, int row_tile) {
    correction_tile<Elem, D>(p, ws, band, b, h, row_tile);
  });
}

constexpr int kFallbackListThreads = 256;

// Block (h, b): the U positions of band `band` whose correction does not stand, ascending, and their count.
__global__ void __launch_bounds__(kFallbackListThreads) fallback_list_kernel(DeLeakerParams p, Workspace ws, int band) {
  __shared__ int warp_totals[32];
  wait_for_previous_kernel();
  if (!window_of(p).intervene) return;
  const int h = blockIdx.x, b = blockIdx.y;
  const int n_img = p.grid_h * p.grid_w;
  const int U = ws.union_count[b];
  const int first = band * ws.band_rows;
  const int last = first + ws.band_rows < U ? first + ws.band_rows : U;
  const int64_t bh = (int64_t)b * p.heads + h;
  int base = 0;
  for (int chunk = first; chunk < last; chunk += blockDim.x) {
    const int u = chunk + (int)threadIdx.x;
    const bool redo = u < last && !correction_stands(ws.z[bh * n_img + ws.union_index[(int64_t)b * n_img + u]],
                                                      p.fallback_threshold);
    const Ranked rank = block_rank(redo, warp_totals);
    if (rank.position >= 0) ws.fallback_rows[bh * n_img + first + base + rank.position] = u;
    base += rank.total;
  }
  if (threadIdx.x == 0) {
    ws.fallback_counts[bh * ws.bands + band] = base;
    if (base > 0) atomicAdd(ws.fallback_count, base);  // integer: the total does not depend on the order
  }
}

}  // namespace deleaker
