// Pass (c): image-image suppression over the entity regions only (spec step 6, last item).
//
// Tiles of 64 x 64 image tokens over U x U (U = union of the masks, compacted); each block recomputes
// pbar[i, j] = mean_h exp(s[h, T+i, T+j] - lse[h, i]) for its tile, head after head, in the same order in both
// passes, so the two passes see bit-identical values:
//   pass 0: per ordered pair (e, f), e != f, the sum and sum of squares of pbar over M_e x M_f (double);
//   pass 1: the threshold of each pair, then the bits of the cut logits.
// No N x N matrix is ever stored: the only output is the (B, Nimg, Nimg) bitmask.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

template <typename Elem, int D>
struct RegionSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(64 * kLd * 2);
  static constexpr int kS = kK + smem_align(64 * kLd * 2);
  static constexpr int kPbar = kS + smem_align(kWarps * 16 * kLdS * 4);
  static constexpr int kRowIndex = kPbar + smem_align(64 * kLdS * 4);  // token of each row (or -1)
  static constexpr int kColIndex = kRowIndex + smem_align(64 * 4);
  static constexpr int kRowImage = kColIndex + smem_align(64 * 4);      // image index of each row (or -1)
  static constexpr int kColImage = kRowImage + smem_align(64 * 4);
  static constexpr int kRowBits = kColImage + smem_align(64 * 4);       // entities whose mask holds the row
  static constexpr int kColBits = kRowBits + smem_align(64 * 4);
  static constexpr int kLse = kColBits + smem_align(64 * 4);
  static constexpr int kThreshold = kLse + smem_align(64 * 4);          // per pair e * E + f
  static constexpr int kPairOn = kThreshold + smem_align(64 * 4);
  static constexpr int kBytes = kPairOn + smem_align(64 * 4);
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) region_kernel(DeLeakerParams p, Workspace ws, int pass) {
  using Smem = RegionSmem<Elem, D>;
  constexpr int kLd = Smem::kLd;
  const Window win = window_of(p);
  if (!win.intervene || p.do_image_image == 0) return;
  const int b = blockIdx.y;
  const int U = ws.union_count[b];
  const int tiles = (U + 63) / 64;
  if ((int)blockIdx.x >= tiles * tiles) return;

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem + Smem::kQ);
  Elem* k_s = reinterpret_cast<Elem*>(smem + Smem::kK);
  float* s_all = reinterpret_cast<float*>(smem + Smem::kS);
  float* pbar = reinterpret_cast<float*>(smem + Smem::kPbar);
  int* row_index = reinterpret_cast<int*>(smem + Smem::kRowIndex);
  int* col_index = reinterpret_cast<int*>(smem + Smem::kColIndex);
  int* row_image = reinterpret_cast<int*>(smem + Smem::kRowImage);
  int* col_image = reinterpret_cast<int*>(smem + Smem::kColImage);
  uint32_t* row_bits = reinterpret_cast<uint32_t*>(smem + Smem::kRowBits);
  uint32_t* col_bits = reinterpret_cast<uint32_t*>(smem + Smem::kColBits);
  float* lse_s = reinterpret_cast<float*>(smem + Smem::kLse);
  float* threshold = reinterpret_cast<float*>(smem + Smem::kThreshold);
  int* pair_on = reinterpret_cast<int*>(smem + Smem::kPairOn);
  __shared__ double red[32];

  const int T = p.text_tokens, n_img = p.grid_h * p.grid_w, E = p.num_entities, H = p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 2, half = lane % 2;
  float* s_w = s_all + warp * 16 * kLdS;
  double* stats = ws.pair_stats + (int64_t)b * E * E * 2;

  // Pairs (e, f), e != f, with both masks non-empty; pass 1 also needs 2 cells for an unbiased std.
  if (threadIdx.x < E * E) {
    const int e = threadIdx.x / E, f = threadIdx.x % E;
    const double cells = (double)ws.mask_counts[b * E + e] * (double)ws.mask_counts[b * E + f];
    int on = e != f && cells > 0.0;
    if (pass == 1) {
      on = on && cells >= 2.0;
      const double mean = stats[threadIdx.x * 2] / cells;
      const double var = fmax((stats[threadIdx.x * 2 + 1] - stats[threadIdx.x * 2] * mean) / (cells - 1.0), 0.0);
      threshold[threadIdx.x] = (float)(mean + (double)p.std_mul_image_image * sqrt(var));
    }
    pair_on[threadIdx.x] = on;
  }
  // Fewer than two non-empty masks: no region, nothing to cut.
  if (!__syncthreads_or(threadIdx.x < E * E && pair_on[threadIdx.x])) return;

  for (int tile = blockIdx.x; tile < tiles * tiles; tile += gridDim.x) {
    const int tr = tile / tiles, tc = tile % tiles;
    __syncthreads();  // the previous tile is done with every shared buffer
    if (threadIdx.x < 64) {
      const int u = tr * 64 + (int)threadIdx.x;
      const int img = u < U ? ws.union_index[(int64_t)b * n_img + u] : -1;
      row_image[threadIdx.x] = img;
      row_index[threadIdx.x] = img >= 0 ? T + img : -1;
      row_bits[threadIdx.x] = img >= 0 ? ws.row_entities[(int64_t)b * n_img + img] : 0u;
    } else {
      const int c = (int)threadIdx.x - 64;
      const int u = tc * 64 + c;
      const int img = u < U ? ws.union_index[(int64_t)b * n_img + u] : -1;
      col_image[c] = img;
      col_index[c] = img >= 0 ? T + img : -1;
      col_bits[c] = img >= 0 ? ws.row_entities[(int64_t)b * n_img + img] : 0u;
    }
    for (int i = 0; i < 32; ++i) pbar[(warp * 16 + r) * kLdS + half * 32 + i] = 0.0f;

    for (int h = 0; h < H; ++h) {
      __syncthreads();  // indices ready; the previous head's Q and K are no longer read
      const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
      load_rows<Elem, D>(q_s, q, p.q_row_stride, row_index);
      load_rows<Elem, D>(k_s, k, p.k_row_stride, col_index);
      if (threadIdx.x < 64) {
        const int img = row_image[threadIdx.x];
        lse_s[threadIdx.x] = img >= 0 ? ws.lse[((int64_t)b * H + h) * n_img + img] : 0.0f;
      }
      __syncthreads();
      warp_qk<Elem, D>(q_s + warp * 16 * kLd, k_s, s_w);
      __syncwarp();
      const float row_lse = lse_s[warp * 16 + r];
      for (int i = 0; i < 32; ++i) {
        const int c = half * 32 + ((i + lane) & 31);
        pbar[(warp * 16 + r) * kLdS + c] += expf(s_w[r * kLdS + c] * p.softmax_scale - row_lse);
      }
    }
    __syncthreads();  // the whole pbar tile is summed

    if (pass == 0) {
      for (int pair = 0; pair < E * E; ++pair) {
        if (!pair_on[pair]) continue;  // the same for the whole block
        const int e = pair / E, f = pair % E;
        double sum = 0.0, sq = 0.0;
        for (int cell = threadIdx.x; cell < 64 * 64; cell += kThreads) {
          const int rr = cell / 64, cc = cell % 64;
          if (((row_bits[rr] >> e) & 1u) && ((col_bits[cc] >> f) & 1u)) {
            const double x = pbar[rr * kLdS + cc] / (float)H;
            sum += x;
            sq += x * x;
          }
        }
        sum = block_sum<double>(sum, red);
        sq = block_sum<double>(sq, red);
        if (threadIdx.x == 0) {
          atomicAdd(&stats[pair * 2], sum);
          atomicAdd(&stats[pair * 2 + 1], sq);
        }
      }
    } else {
      for (int cell = threadIdx.x; cell < 64 * 64; cell += kThreads) {
        const int rr = cell / 64, cc = cell % 64;
        const uint32_t rb = row_bits[rr], cb = col_bits[cc];
        if (rb == 0u || cb == 0u) continue;
        const float x = pbar[rr * kLdS + cc] / (float)H;
        bool cut = false;
        for (int e = 0; e < E; ++e) {
          if (!((rb >> e) & 1u)) continue;
          for (int f = 0; f < E; ++f)
            if (((cb >> f) & 1u) && pair_on[e * E + f] && x > threshold[e * E + f]) cut = true;
        }
        if (cut) {
          const int j = col_image[cc];
          atomicOr(&ws.cut_bits[((int64_t)b * n_img + row_image[rr]) * ws.cut_words + j / 32], 1u << (j % 32));
        }
      }
    }
  }
}

}  // namespace deleaker
