// Step (b): history and entity masks (spec steps 2, 3 and 5), one block per (entity, batch) row in parallel,
// then the union U of the masks and each image token's entity bits, one block per batch sample. Small work
// (E_max x Nimg values), so it favours plain, exact code: fp32 like the reference for the affinities and the
// history, double for the mean and std, morphology on 0/1 bytes.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

constexpr int kMaskThreads = 512;
constexpr int kUnionThreads = 1024;
//! Grids of at most this many image tokens (128 x 128) run their morphology in shared memory, two byte grids of
//! this size; larger grids ping-pong through the workspace's scratch.
constexpr int kMorphSmemTokens = 128 * 128;

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

// Block (e, b): c_e (the affinity kernel's head mean), the history, the source map, and inside the intervention window the
// threshold, the morphology and |M_e|.
__global__ void __launch_bounds__(kMaskThreads) mask_kernel(DeLeakerParams p, Workspace ws) {
  __shared__ double red_d[32];
  __shared__ int red_i[32];
  __shared__ uint8_t morph[2][kMorphSmemTokens];
  wait_for_previous_kernel();
  const Window win = window_of(p);
  const int e = blockIdx.x, b = blockIdx.y;
  const int T = p.text_tokens, n_img = p.grid_h * p.grid_w, E = p.num_entities;
  // union_kernel takes the batch's largest |U| with integer atomicMax from zero, every call.
  if (e == 0 && b == 0 && threadIdx.x == 0) *ws.union_largest = 0;
  const int64_t start = p.start_aggregating_from, stop = p.stop_aggregating_at;
  const int64_t row = (int64_t)b * E + e;

  int tokens = 0;
  for (int t = threadIdx.x; t < T; t += blockDim.x) tokens += p.entity_mask[(int64_t)e * T + t] != 0;
  tokens = block_sum<int>(tokens, red_i);
  const bool present = tokens > 0;

  // Steps 2-3: affinity of this block, the running mean, the source map.
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) {
    // The affinity kernel took the head mean (its last block per row tile).
    const float c = win.need_affinity && present ? ws.affinity[row * n_img + i] : 0.0f;
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
  // The morphology's grids: in shared memory where they fit (no global round trip per pass), else the scratch.
  const bool in_smem = n_img <= kMorphSmemTokens;
  uint8_t* s0 = in_smem ? morph[0] : ws.scratch + row * n_img;
  uint8_t* s1 = in_smem ? morph[1] : ws.scratch + ((int64_t)p.batch * E + row) * n_img;
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) {
    const uint8_t v = present && src[i] > threshold ? 1 : 0;
    raw[i] = v;
    if (in_smem) s1[i] = v;  // the opening reads it from shared memory
    if (p.do_smoothing == 0) out[i] = v;
  }
  __syncthreads();
  if (p.do_smoothing != 0) {
    const int gh = p.grid_h, gw = p.grid_w;
    morph_step(in_smem ? s1 : raw, s0, gh, gw, false);  // opening: erode,
    morph_step(s0, s1, gh, gw, true);                   //          dilate
    morph_step(s1, s0, gh, gw, true);                   // closing, two iterations: dilate, dilate,
    morph_step(s0, s1, gh, gw, true);
    morph_step(s1, s0, gh, gw, false);                  //                           erode, erode
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
//
// A stable counting sort: one pass counts each group (integer atomics in shared memory: exact, in any order),
// one thread turns the counts into group starts (groups 1 .. 2^E - 1, then group 0), and one more pass places
// each chunk of blockDim.x tokens: a token's place is its group's start, plus the tokens of its group in earlier
// chunks, earlier warps of its chunk, and lower lanes of its warp (a match over the E bits by ballots). Two passes
// over the tokens at any E (the group-by-group ranking this replaces took 2^E of them: about 1,024 at E_max = 8).
__global__ void __launch_bounds__(kUnionThreads) union_kernel(DeLeakerParams p, Workspace ws) {
  constexpr int kGroups = 1 << DELEAKER_MAX_ENTITIES, kWarpsPerBlock = kUnionThreads / 32;
  __shared__ int group_start[kGroups];                  // next free place of each group
  __shared__ int warp_offset[kWarpsPerBlock][kGroups];  // per chunk: a warp's count, then its first place
  wait_for_previous_kernel();
  const int b = blockIdx.x;
  if (!window_of(p).intervene) return;
  const int n_img = p.grid_h * p.grid_w, E = p.num_entities, groups = 1 << E;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (b == 0 && threadIdx.x == 0) *ws.fallback_count = 0;  // the fallback lists add to it later in this call
  uint8_t* row_entities = ws.row_entities + (int64_t)b * n_img;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) group_start[g] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n_img; i += blockDim.x) {
    uint32_t bits = 0;
    for (int e = 0; e < E; ++e) bits |= (uint32_t)ws.masks[((int64_t)b * E + e) * n_img + i] << e;
    row_entities[i] = (uint8_t)bits;
    atomicAdd(&group_start[bits], 1);  // integer counts: the same in any order
  }
  __syncthreads();  // row_entities and the counts are complete
  if (threadIdx.x == 0) {
    int at = 0;
    for (int step = 1; step <= groups; ++step) {  // groups 1 .. 2^E - 1 (U), then group 0 (the rest)
      const int group = step & (groups - 1);
      if (group == 0) {
        ws.union_count[b] = at;
        atomicMax(ws.union_largest, at);  // an integer maximum: the same in any order
      }
      const int count = group_start[group];
      group_start[group] = at;
      at += count;
    }
  }
  for (int chunk = 0; chunk < n_img; chunk += blockDim.x) {
    const int i = chunk + (int)threadIdx.x;
    const bool valid = i < n_img;
    const uint32_t group = valid ? row_entities[i] : 0u;
    // Lanes of this warp holding the same group: AND over the E bits of the lanes that agree on each bit.
    uint32_t peers = __ballot_sync(0xffffffffu, valid);
    for (int e = 0; e < E; ++e) {
      const uint32_t set = __ballot_sync(0xffffffffu, (group >> e) & 1u);
      peers &= ((group >> e) & 1u) ? set : ~set;
    }
    const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
    __syncthreads();  // the previous chunk's offsets are read; the group starts are published
    for (int idx = threadIdx.x; idx < kWarpsPerBlock * groups; idx += blockDim.x) warp_offset[idx / groups][idx % groups] = 0;
    __syncthreads();
    if (valid && (peers >> lane) >> 1 == 0u) warp_offset[warp][group] = __popc(peers);  // the highest peer
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {  // warps in order: exclusive prefix per group
      int at = group_start[g];
      for (int w = 0; w < kWarpsPerBlock; ++w) {
        const int count = warp_offset[w][g];
        warp_offset[w][g] = at;
        at += count;
      }
      group_start[g] = at;
    }
    __syncthreads();
    if (valid) ws.union_index[(int64_t)b * n_img + warp_offset[warp][group] + rank_in_warp] = i;
  }
}

}  // namespace deleaker
