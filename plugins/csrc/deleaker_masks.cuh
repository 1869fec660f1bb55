// Step (b): history and entity masks (spec steps 2, 3 and 5), one block per (entity, batch) row in parallel,
// then the union U of the masks and each image token's entity bits, one block per batch sample. Small work
// (E_max x Nimg values), so it favours plain, exact code: fp32 like the reference for the affinities and the
// history, double for the mean and std, morphology on 0/1 bytes.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

constexpr int kMaskThreads = 512;
constexpr int kUnionThreads = 1024;

// One 3x3 erosion (AND) or dilation (OR) on the (gh, gw) grid; out-of-grid neighbours are ignored.
__device__ __forceinline__ void morph_step(const uint8_t* in, uint8_t* out, int gh, int gw, bool dilate) {
  for (int idx = threadIdx.x; idx < gh * gw; idx += blockDim.x) {
    const int y = idx / gw, x = idx % gw;
    uint8_t v = dilate ? 0 : 1;
    for (int dy = -1; dy <= 1; ++dy) {
      const int yy = y + dy;
      if (yy < 0 || yy >= gh) continue;
      for (int dx = -1; dx <= 1; ++dx) {
        const int xx = x + dx;
        if (xx < 0 || xx >= gw) continue;
        const uint8_t n = in[yy * gw + xx];
        v = dilate ? (uint8_t)(v | n) : (uint8_t)(v & n);
      }
    }
    out[idx] = v;
  }
  __syncthreads();  // also makes the global writes visible to the whole block
}

// Block (e, b): c_e from the per-head sums, the history, the source map, and inside the intervention window the
// threshold, the morphology and |M_e|.
__global__ void __launch_bounds__(kMaskThreads) mask_kernel(DeLeakerParams p, Workspace ws) {
  __shared__ double red_d[32];
  __shared__ int red_i[32];
  const Window win = window_of(p);
  const int e = blockIdx.x, b = blockIdx.y;
  const int T = p.text_tokens, n_img = p.grid_h * p.grid_w, E = p.num_entities, H = p.heads;
  const int64_t start = p.start_aggregating_from, stop = p.stop_aggregating_at;
  const int64_t row = (int64_t)b * E + e;

  int tokens = 0;
  for (int t = threadIdx.x; t < T; t += blockDim.x) tokens += p.entity_mask[(int64_t)e * T + t] != 0;
  tokens = block_sum<int>(tokens, red_i);
  const bool present = tokens > 0;

  // Steps 2-3: affinity of this block, the running mean, the source map.
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) {
    float c = 0.0f;
    if (win.need_affinity && present) {
      float sum = 0.0f;
      for (int h = 0; h < H; ++h) sum += ws.head_affinity[(((int64_t)b * H + h) * E + e) * n_img + i];
      c = sum / (float)H / (float)tokens;
    }
    const float old = p.history_in != nullptr ? p.history_in[row * n_img + i] : 0.0f;
    float updated = old;
    if (p.use_history != 0) {
      if (win.t == start) {
        updated = c;
      } else if (start < win.t && win.t < stop) {
        const float m = (float)(win.t - start);
        updated = old * (m / (m + 1.0f)) + c / (m + 1.0f);
      }
      if (!present) updated = 0.0f;  // rows of absent entities stay zero
    }
    p.history_out[row * n_img + i] = updated;
    ws.affinity[row * n_img + i] = c;
    ws.source[row * n_img + i] = win.source_is_history ? updated : c;
  }
  if (!win.intervene) return;
  __syncthreads();  // source entries were written by other threads

  // Step 5: threshold at mean + k * std (unbiased), then the morphology.
  const float* src = ws.source + row * n_img;
  double sum = 0.0;
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) sum += src[i];
  const double mean = block_sum<double>(sum, red_d) / n_img;
  double sq = 0.0;
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) sq += ((double)src[i] - mean) * ((double)src[i] - mean);
  // n_img == 1 gives 0 / 0 = NaN, and no token passes a NaN threshold (as torch's std of one element).
  const double var = block_sum<double>(sq, red_d) / (double)(n_img - 1);
  const float threshold = (float)mean + p.std_mul_text * (float)sqrt(var);
  uint8_t* raw = ws.raw_masks + row * n_img;
  uint8_t* out = ws.masks + row * n_img;
  uint8_t* s0 = ws.scratch + row * n_img;
  uint8_t* s1 = ws.scratch + ((int64_t)p.batch * E + row) * n_img;
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) {
    const uint8_t v = present && src[i] > threshold ? 1 : 0;
    raw[i] = v;
    if (p.do_smoothing == 0) out[i] = v;
  }
  __syncthreads();
  if (p.do_smoothing != 0) {
    const int gh = p.grid_h, gw = p.grid_w;
    morph_step(raw, s0, gh, gw, false);  // opening: erode,
    morph_step(s0, s1, gh, gw, true);    //          dilate
    morph_step(s1, s0, gh, gw, true);    // closing, two iterations: dilate, dilate,
    morph_step(s0, s1, gh, gw, true);
    morph_step(s1, s0, gh, gw, false);   //                           erode, erode
    morph_step(s0, out, gh, gw, false);
  }
  int count = 0;
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) count += out[i];
  count = block_sum<int>(count, red_i);
  if (threadIdx.x == 0) ws.mask_counts[row] = count;
}

// Block b: the entity bits of every image token and every image token in the order the correction works in: U
// first, grouped by entity bits (rows of one group share their edits, so tiles of one group pair skip whole
// tiles that no region pair touches), ascending within a group; then the tokens outside U, ascending.
__global__ void __launch_bounds__(kUnionThreads) union_kernel(DeLeakerParams p, Workspace ws) {
  __shared__ int warp_totals[32];
  __shared__ int group_present[1 << DELEAKER_MAX_ENTITIES];
  const int b = blockIdx.x;
  if (!window_of(p).intervene) return;
  const int n_img = p.grid_h * p.grid_w, E = p.num_entities;
  if (b == 0 && threadIdx.x == 0) *ws.fallback_count = 0;  // the fallback lists add to it later in this call
  for (int g = threadIdx.x; g < (1 << DELEAKER_MAX_ENTITIES); g += blockDim.x) group_present[g] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) {
    uint32_t bits = 0;
    for (int e = 0; e < E; ++e) bits |= (uint32_t)ws.masks[((int64_t)b * E + e) * n_img + i] << e;
    ws.row_entities[(int64_t)b * n_img + i] = (uint8_t)bits;
    group_present[bits] = 1;  // every writer writes the same value
  }
  __syncthreads();  // row_entities and group_present are complete
  int base = 0, in_union = 0;
  // Groups 1 .. 2^E - 1 (U), then group 0 (the rest).
  for (int step = 1; step <= (1 << E); ++step) {
    const int group = step & ((1 << E) - 1);
    if (group == 0) in_union = base;
    if (!group_present[group]) continue;  // the same for the whole block
    for (int chunk = 0; chunk < n_img; chunk += blockDim.x) {
      const int i = chunk + (int)threadIdx.x;
      const bool keep = i < n_img && ws.row_entities[(int64_t)b * n_img + i] == group;
      const Ranked rank = block_rank(keep, warp_totals);
      if (rank.position >= 0) ws.union_index[(int64_t)b * n_img + base + rank.position] = i;
      base += rank.total;
    }
  }
  if (threadIdx.x == 0) ws.union_count[b] = in_union;
}

}  // namespace deleaker
