// Step (e): the exact fallback. The rows whose correction does not stand (fallback_list_kernel) are recomputed
// in full: a flash-style attention over all N keys with the spec's edits applied on the fly, restricted to a row
// list. The image keys are visited in union_index's order, so the cut bits of the band (cut_kernel) apply to the
// first ceil(|U| / 64) tiles as they are; the keys outside U are never cut.
//
// One block = up to 64 listed rows of one head (4 warps x 16 rows); keys and values stream through in tiles of
// 64. S = Q K^T and O += P V run on tensor cores (mma.sync, FlashAttention-2 style): S, P and the output
// accumulator stay in registers, in the PTX ISA's fragment layout, so each value knows its (row, column) for the
// edits, the online softmax and the per-row rescaling, and P is the A operand of P V as it stands.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

template <typename Elem, int D>
struct FallbackSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kLdO = D + 4;  // float rows of the final O, padded
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(kTile * kLd * 2);
  static constexpr int kV = kK + smem_align(kTile * kLd * 2);
  static constexpr int kRowScale = kV + smem_align(kTile * kLd * 2);
  static constexpr int kRowToken = kRowScale + smem_align(kTile * 4);
  static constexpr int kColToken = kRowToken + smem_align(kTile * 4);
  static constexpr int kColBits = kColToken + smem_align(kTile * 4);
  static constexpr int kBytes = kColBits + smem_align(kTile * 4);
  // After the key loop, the final O (float, 64 x kLdO) reuses the K and V buffers.
  static_assert(kTile * kLdO * 4 <= kRowScale - kK, "O must fit in the K and V buffers");
};

// One work item of fallback_kernel: entries [64 x, 64 x + 64) of the (b, h, band) list, x = `list_tile`.
// Returns at once (the whole block) past the end of the list.
template <typename Elem, int D>
__device__ void fallback_tile(const DeLeakerParams& p, const Workspace& ws, int band, int b, int h, int list_tile) {
  using Smem = FallbackSmem<Elem, D>;
  constexpr int kLd = Smem::kLd, kLdO = Smem::kLdO;
  const int T = p.text_tokens, N = p.tokens, n_img = N - T;
  const int64_t bh = (int64_t)b * p.heads + h;
  const int count = ws.fallback_counts[bh * ws.bands + band];
  const int entry0 = list_tile * kTile;
  if (entry0 >= count) return;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* k_s = reinterpret_cast<Elem*>(smem + Smem::kK);
  Elem* v_s = reinterpret_cast<Elem*>(smem + Smem::kV);
  float* row_scale = reinterpret_cast<float*>(smem + Smem::kRowScale);
  int* row_token = reinterpret_cast<int*>(smem + Smem::kRowToken);
  int* col_token = reinterpret_cast<int*>(smem + Smem::kColToken);
  uint32_t* col_bits = reinterpret_cast<uint32_t*>(smem + Smem::kColBits);
  float* o_s = reinterpret_cast<float*>(smem + Smem::kK);

  const int warp = threadIdx.x / 32;
  const CellOwner me = cell_owner();  // the output's writer of half a row
  const FragCells cells = frag_cells();  // the values of S, P and O in this lane's registers
  const int r = me.row % 16;
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const int32_t* union_index = ws.union_index + (int64_t)b * n_img;

  // The U position of a row of the block: entry entry0 + row of the list (-1: past its end).
  const auto u_of = [&](int row) {
    const int entry = entry0 + row;
    return entry < count ? ws.fallback_rows[bh * n_img + band * ws.band_rows + entry] : -1;
  };
  const int my_u = u_of(me.row);
  const int img = my_u >= 0 ? union_index[my_u] : -1;  // the image token of the row this thread writes
  if (me.half == 0) row_token[me.row] = img >= 0 ? T + img : -1;
  // The masks and cut-bit rows of the band of this lane's two fragment rows (cells.row(0), cells.row(2)).
  uint32_t row_bits[2];
  const uint64_t* cut_row[2];
#pragma unroll
  for (int fr = 0; fr < 2; ++fr) {
    const int u = u_of(cells.row(2 * fr));
    const int row_img = u >= 0 ? union_index[u] : -1;
    row_bits[fr] = row_img >= 0 ? (uint32_t)ws.row_entities[(int64_t)b * n_img + row_img] : 0u;
    cut_row[fr] = u >= 0 && p.do_image_image != 0 ? cut_words_of(ws, b, u - band * ws.band_rows) : nullptr;
  }
  const int cut_tiles = ceil_div(ws.union_count[b], kTile);
  const bool weaken = p.do_image_text_weakening != 0, strengthen = p.do_image_text_strengthening != 0;
  __syncthreads();
  load_rows<Elem, D>(q_s, q, p.q_row_stride, row_token);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // per fragment row; l: this lane's part

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
    WarpTile s;
    warp_qk_mma<Elem, D>(q_s + warp * 16 * kLd, k_s, s);
    uint64_t cut_word[2];
#pragma unroll
    for (int fr = 0; fr < 2; ++fr)
      cut_word[fr] = !text && cut_row[fr] != nullptr && ct < cut_tiles ? cut_row[fr][ct] : 0u;

    // Edited logits, in registers, and the tile's row maxima.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int fr = (i >> 1) & 1, c = cells.col(i);
      float x = s[i >> 2][i & 3] * p.softmax_scale;
      if (col_token[c] < 0 || ((cut_word[fr] >> c) & 1u)) {
        x = -INFINITY;
      } else if (text) {
        const uint32_t tb = col_bits[c];
        if (weaken && text_cut(row_bits[fr], tb)) {
          x = -INFINITY;
        } else if (strengthen && (row_bits[fr] & tb) != 0u) {
          x *= p.k_strength;
        }
      }
      s[i >> 2][i & 3] = x;
      tile_max[fr] = fmaxf(tile_max[fr], x);
    }
    float alpha[2], m_ref[2], tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int fr = 0; fr < 2; ++fr) {
      tile_max[fr] = fmaxf(tile_max[fr], __shfl_xor_sync(0xffffffffu, tile_max[fr], 1));  // the 4 lanes of the row
      tile_max[fr] = fmaxf(tile_max[fr], __shfl_xor_sync(0xffffffffu, tile_max[fr], 2));
      const float m_new = fmaxf(m[fr], tile_max[fr]);
      // A row with nothing but -inf so far keeps m = -inf; use 0 as its reference so that no NaN appears.
      m_ref[fr] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[fr] = expf(m[fr] - m_ref[fr]);
      m[fr] = m_new;
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int fr = (i >> 1) & 1;
      const float pe = expf(s[i >> 2][i & 3] - m_ref[fr]);
      tile_sum[fr] += pe;
      s[i >> 2][i & 3] = pe;
    }
#pragma unroll
    for (int fr = 0; fr < 2; ++fr) l[fr] = l[fr] * alpha[fr] + tile_sum[fr];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];
    uint32_t p_frag[kTile / 16][4];
    pack_p<Elem>(s, p_frag);
    warp_pv_mma<Elem, D>(o, p_frag, v_s);
  }

#pragma unroll

#pragma unroll
  for (int fr = 0; fr < 2; ++fr) {  // l of the whole row: the 4 lanes' parts, in a fixed order
    l[fr] += __shfl_xor_sync(0xffffffffu, l[fr], 1);
    l[fr] += __shfl_xor_sync(0xffffffffu, l[fr], 2);
  }
  __syncthreads();  // every warp is done with K and V: O reuses them
  if (cells.t == 0) {
    row_scale[cells.row(0)] = 1.0f / l[0];
    row_scale[cells.row(2)] = 1.0f / l[1];
  }
  float* o_w = o_s + warp * 16 * kLdO;
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_s[cells.row(e) * kLdO + 8 * n + cells.col(e)] = o[n][e];
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
  for_each_band_row_tile(p, ws, band, [&](int b, int h, int list_tile) {
    fallback_tile<Elem, D>(p, ws, band, b, h, list_tile);
  });
}

}  // namespace deleaker
