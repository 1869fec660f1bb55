// Step (e): the exact fallback. The rows whose correction does not stand (fallback_list_kernel) are recomputed
// in full: a flash-style attention over all N keys with the spec's edits applied on the fly, restricted to a row
// list. The image keys are visited in union_index's order, so the cut bits of the band (cut_kernel) apply to the
// first ceil(|U| / 64) tiles as they are; the keys outside U are never cut.
//
// One block = up to 64 listed rows of one head (4 warps x 16 rows); keys and values stream through in tiles of
// 64. S = Q K^T and O += P V run on tensor cores (wmma); the edits and the online softmax run on the S tile in
// shared memory, where each element knows its (row, column). The output accumulator stays in wmma fragments. Its
// per-row rescaling needs the row of each fragment element, which wmma does not specify; it is read once from a
// fragment loaded from a matrix whose element (r, c) is r.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

template <typename Elem, int D>
struct FallbackSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kLdP = kTile + 8;  // Elem rows of P, padded (a multiple of 8 for wmma)
  static constexpr int kLdO = D + 4;      // float rows of the final O, padded
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(kTile * kLd * 2);
  static constexpr int kV = kK + smem_align(kTile * kLd * 2);
  static constexpr int kS = kV + smem_align(kTile * kLd * 2);
  static constexpr int kP = kS + smem_align(kWarps * 16 * kLdS * 4);
  static constexpr int kRowScale = kP + smem_align(kWarps * 16 * kLdP * 2);
  static constexpr int kRowToken = kRowScale + smem_align(kTile * 4);
  static constexpr int kColToken = kRowToken + smem_align(kTile * 4);
  static constexpr int kColBits = kColToken + smem_align(kTile * 4);
  static constexpr int kBytes = kColBits + smem_align(kTile * 4);
  // After the key loop, the final O (float, 64 x kLdO) reuses the K and V buffers.
  static_assert(kTile * kLdO * 4 <= kS - kK, "O must fit in the K and V buffers");
};

// One work item of fallback_kernel: entries [64 x, 64 x + 64) of the (b, h, band) list, x = `list_tile`.
// Returns at once (the whole block) past the end of the list.
template <typename Elem, int D>
__device__ void fallback_tile(const DeLeakerParams& p, const Workspace& ws, int band, int b, int h, int list_tile) {
  using Smem = FallbackSmem<Elem, D>;
  constexpr int kLd = Smem::kLd, kLdP = Smem::kLdP, kLdO = Smem::kLdO;
  using FragO = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  const int T = p.text_tokens, N = p.tokens, n_img = N - T;
  const int64_t bh = (int64_t)b * p.heads + h;
  const int count = ws.fallback_counts[bh * ws.bands + band];
  const int entry0 = list_tile * kTile;
  if (entry0 >= count) return;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* k_s = reinterpret_cast<Elem*>(smem + Smem::kK);
  Elem* v_s = reinterpret_cast<Elem*>(smem + Smem::kV);
  float* s_all = reinterpret_cast<float*>(smem + Smem::kS);
  Elem* p_all = reinterpret_cast<Elem*>(smem + Smem::kP);
  float* row_scale = reinterpret_cast<float*>(smem + Smem::kRowScale);
  int* row_token = reinterpret_cast<int*>(smem + Smem::kRowToken);
  int* col_token = reinterpret_cast<int*>(smem + Smem::kColToken);
  uint32_t* col_bits = reinterpret_cast<uint32_t*>(smem + Smem::kColBits);
  float* o_s = reinterpret_cast<float*>(smem + Smem::kK);

  const int warp = threadIdx.x / 32;
  const CellOwner me = cell_owner();
  const int r = me.row % 16;
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  float* s_w = s_all + warp * 16 * kLdS;
  Elem* p_w = p_all + warp * 16 * kLdP;
  const int32_t* union_index = ws.union_index + (int64_t)b * n_img;

  // This thread's row: its U position, token, masks and cut-bit row of the band.
  const int entry = entry0 + me.row;
  const int u = entry < count ? ws.fallback_rows[bh * n_img + band * ws.band_rows + entry] : -1;
  const int img = u >= 0 ? union_index[u] : -1;
  if (me.half == 0) row_token[me.row] = img >= 0 ? T + img : -1;
  const uint32_t row_bits = img >= 0 ? (uint32_t)ws.row_entities[(int64_t)b * n_img + img] : 0u;
  const uint64_t* cut_row = u >= 0 && p.do_image_image != 0 ? cut_words_of(ws, b, u - band * ws.band_rows) : nullptr;
  const int cut_tiles = ceil_div(ws.union_count[b], kTile);
  const bool weaken = p.do_image_text_weakening != 0, strengthen = p.do_image_text_strengthening != 0;
  __syncthreads();
  load_rows<Elem, D>(q_s, q, p.q_row_stride, row_token);

  // The row of each accumulator element (see the header comment).
  FragO row_of;
  for (int i = me.lane; i < 16 * 16; i += 32) s_w[(i / 16) * kLdS + i % 16] = (float)(i / 16);
  __syncwarp();
  wmma::load_matrix_sync(row_of, s_w, kLdS, wmma::mem_row_major);

  FragO o[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(o[n], 0.0f);
  float m = -INFINITY, l = 0.0f;

  const int text_tiles = ceil_div(T, kTile), image_tiles = ceil_div(n_img, kTile);
  for (int tile = 0; tile < text_tiles + image_tiles; ++tile) {
    const bool text = tile < text_tiles;
    const int ct = tile - text_tiles;  // image tile in union_index order
    __syncthreads();  // the previous tile's K, V and column lists are no longer read
    if (threadIdx.x < kTile) {
      const int c = threadIdx.x;
      if (text) {
        const int j = tile * kTile + c;
        col_token[c] = j < T ? j : -1;
        col_bits[c] = j < T ? token_entities(p, j) : 0u;
      } else {
        const int at = ct * kTile + c;
        col_token[c] = at < n_img ? T + union_index[at] : -1;
        col_bits[c] = 0u;
      }
    }
    __syncthreads();
    load_rows2<Elem, D>(k_s, k, p.k_row_stride, col_token, v_s, v, p.v_row_stride, col_token);  // K, V together
    __syncthreads();
    warp_qk<Elem, D>(q_s + warp * 16 * kLd, k_s, s_w);
    __syncwarp();
    const uint64_t cut_word = !text && cut_row != nullptr && ct < cut_tiles ? cut_row[ct] : 0u;

    // Edited logits, in place, and the tile's row max.
    float tile_max = -INFINITY;
    for (int i = 0; i < 32; ++i) {
      const int c = me.col(i);
      float s = s_w[r * kLdS + c] * p.softmax_scale;
      if (col_token[c] < 0 || ((cut_word >> c) & 1u)) {
        s = -INFINITY;
      } else if (text) {
        const uint32_t tb = col_bits[c];
        if (weaken && text_cut(row_bits, tb)) {
          s = -INFINITY;
        } else if (strengthen && (row_bits & tb) != 0u) {
          s *= p.k_strength;
        }
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
      const int c = me.col(i);
      const float pe = expf(s_w[r * kLdS + c] - m_ref);
      tile_sum += pe;
      p_w[r * kLdP + c] = from_float<Elem>(pe);
    }
    l = l * alpha + tile_sum;
    m = m_new;
    if (me.half == 0) row_scale[me.row] = alpha;
    __syncwarp();

#pragma unroll
    for (int n = 0; n < D / 16; ++n)
#pragma unroll
      for (int x = 0; x < FragO::num_elements; ++x) o[n].x[x] *= row_scale[warp * 16 + (int)row_of.x[x]];
    warp_pv<Elem, D, kLdP>(o, p_w, v_s);
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  __syncthreads();  // every warp is done with K and V: O reuses them
  if (me.half == 0) row_scale[me.row] = 1.0f / l;
  float* o_w = o_s + warp * 16 * kLdO;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(o_w + n * 16, o[n], kLdO, wmma::mem_row_major);
  __syncwarp();
  if (img >= 0) {
    const float inv_l = row_scale[me.row];
    Elem* out = static_cast<Elem*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
                (int64_t)(T + img) * p.o_row_stride;
    for (int c = me.half * (D / 2); c < (me.half + 1) * (D / 2); c += 8) {
      alignas(16) Elem pack[8];
#pragma unroll
      for (int x = 0; x < 8; ++x) pack[x] = from_float<Elem>(o_w[r * kLdO + c + x] * inv_l);
      *reinterpret_cast<uint4*>(out + c) = *reinterpret_cast<const uint4*>(pack);
    }
  }
}

// Persistent grid (a few blocks per SM): the blocks stride over the band's (list tile, head, sample) items, heads
// fastest; a list holds at most the band's U rows (band_tiles_of), and items past a list's end return at once.
//! Blocks per SM of fallback_kernel's persistent grid, the occupancy its registers are held to.
constexpr int kFallbackBlocksPerSm = 2;

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads, kFallbackBlocksPerSm) fallback_kernel(DeLeakerParams p, Workspace ws,
                                                                                 int band) {
  wait_for_previous_kernel();
  if (!window_of(p).intervene) return;
  if (*ws.fallback_count == 0) return;  // no list of this call holds a row so far: nothing to recompute
  // Nothing but the iteration count lives across an item (the work is read again after the barrier).
#pragma unroll 1
  for (int round = 0;; ++round) {
    __syncthreads();  // the previous item's shared memory is no longer read
    const int64_t per_tile = (int64_t)p.heads * p.batch;
    const int64_t item = blockIdx.x + (int64_t)round * gridDim.x;
    if (item >= band_tiles_of(ws, band).rows * per_tile) break;
    const int64_t bh = item % per_tile;
    fallback_tile<Elem, D>(p, ws, band, (int)(bh / p.heads), (int)(bh % p.heads), (int)(item / per_tile));
  }
}

}  // namespace deleaker
