// Step (c): image-image statistics over the entity regions (spec step 6, last item), on the compacted union U.
//
// The U x U tiles (64 x 64, in union_index's grouped order) are split into DELEAKER_REGION_SLOTS fixed slots of
// consecutive tiles; a block takes slots (striding when the grid is smaller) and, per tile with any cell in a
// region pair, recomputes pbar = head mean of exp(s - lse) from q, k and the caller's LSE (tile_pbar), keeps it
// for the cut bits (the first DELEAKER_PBAR_TILES tiles of U x U), then adds
// each pair's sum and sum of squares (double) into per-warp accumulators and keeps its least and largest value. Each slot's partial is written once, and
// threshold_kernel reduces the slots in one fixed tree (a block per pair, a thread per slot): a fixed-order
// reduction, no floating-point atomics, so a CUDA-graph
// replay equals an eager run bit for bit and the grid size does not change the result. Then, per pair,
// threshold = mean + std_mul_image_image * std (unbiased; exactly 0 when the least and largest values are equal,
// where the one-pass sums may leave a rounding residue that a negative std_mul would turn into cuts: a constant
// region cuts nothing), NaN where the pair cuts nothing; and per band of U
// rows, cut_kernel reads the stored pbar tile by tile (recomputing a tile beyond the stored ones) and writes the
// cut bits the correction reads: the cut decisions see exactly the values the statistics summed.
#pragma once

#include "deleaker_common.cuh"

namespace deleaker {

template <typename Elem, int D>
struct RegionSmem {
  static constexpr int kLd = HeadDim<D>::kLd;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + smem_align(kTile * kLd * 2);
  static constexpr int kLse = kK + smem_align(kTile * kLd * 2);  // S and pbar stay in registers
  static constexpr int kRowToken = kLse + smem_align(kTile * 4);      // token of each row (or -1)
  static constexpr int kColToken = kRowToken + smem_align(kTile * 4);
  static constexpr int kRowBits = kColToken + smem_align(kTile * 4);  // entities whose mask holds the row
  static constexpr int kColBits = kRowBits + smem_align(kTile * 4);
  static constexpr int kPartners = kColBits + smem_align(kTile * 4);  // per entity: bits of its pair partners
  static constexpr int kThresholds = kPartners + smem_align(DELEAKER_MAX_ENTITIES * 4);
  static constexpr int kWarpSums = kThresholds + smem_align(DELEAKER_MAX_ENTITIES * DELEAKER_MAX_ENTITIES * 4);
  // per warp and pair: sum, sum of squares, least and largest value of pbar (double)
  static constexpr int kBytes =
      kWarpSums + smem_align(kWarps * DELEAKER_MAX_ENTITIES * DELEAKER_MAX_ENTITIES * DELEAKER_PAIR_STATS * 8);
};

// The parts of RegionSmem, as pointers.
template <typename Elem, int D>
struct RegionBuffers {
  using Smem = RegionSmem<Elem, D>;
  Elem *q, *k;
  float *lse, *thresholds;
  int *row_token, *col_token;
  uint32_t *row_bits, *col_bits, *partners;
  double* warp_sums;
  __device__ explicit RegionBuffers(unsigned char* smem)
      : q(reinterpret_cast<Elem*>(smem + Smem::kQ)),
        k(reinterpret_cast<Elem*>(smem + Smem::kK)),
        lse(reinterpret_cast<float*>(smem + Smem::kLse)),
        thresholds(reinterpret_cast<float*>(smem + Smem::kThresholds)),
        row_token(reinterpret_cast<int*>(smem + Smem::kRowToken)),
        col_token(reinterpret_cast<int*>(smem + Smem::kColToken)),
        row_bits(reinterpret_cast<uint32_t*>(smem + Smem::kRowBits)),
        col_bits(reinterpret_cast<uint32_t*>(smem + Smem::kColBits)),
        partners(reinterpret_cast<uint32_t*>(smem + Smem::kPartners)),
        warp_sums(reinterpret_cast<double*>(smem + Smem::kWarpSums)) {}
};

// Rows (and columns) of U tile `tile`: their tokens and entity bits. Threads 0..63 fill the rows, 64..127 the
// columns; a caller-side __syncthreads() publishes them.
__device__ __forceinline__ void load_union_tile(const DeLeakerParams& p, const Workspace& ws, int b, int U, int row_tile,
                                                int col_tile, int* row_token, uint32_t* row_bits, int* col_token,
                                                uint32_t* col_bits) {
  const int n_img = p.grid_h * p.grid_w;
  const bool is_row = threadIdx.x < kTile;
  const int slot = is_row ? (int)threadIdx.x : (int)threadIdx.x - kTile;
  const int u = (is_row ? row_tile : col_tile) * kTile + slot;
  const int img = u < U ? ws.union_index[(int64_t)b * n_img + u] : -1;
  (is_row ? row_token : col_token)[slot] = img >= 0 ? p.text_tokens + img : -1;
  (is_row ? row_bits : col_bits)[slot] = img >= 0 ? ws.row_entities[(int64_t)b * n_img + img] : 0u;
}

// Whether (e, f) of sample b is a region pair: e != f and a region M_e x M_f of at least 2 cells (an unbiased
// std needs 2); *cells gets the region's size. The one rule of the statistics and of the thresholds.
__device__ __forceinline__ bool is_region_pair(const Workspace& ws, int b, int E, int e, int f, double* cells) {
  *cells = (double)ws.mask_counts[b * E + e] * (double)ws.mask_counts[b * E + f];
  return e != f && *cells >= 2.0;
}

// The pairs of batch sample b: partners[e] and, for the statistics, the same from the mask sizes.
__device__ __forceinline__ void pair_partners_from_counts(const Workspace& ws, int b, int E, uint32_t* partners) {
  if (threadIdx.x < (unsigned)E) {
    const int e = threadIdx.x;
    uint32_t bits = 0;
    for (int f = 0; f < E; ++f) {
      double cells;
      if (is_region_pair(ws, b, E, e, f, &cells)) bits |= 1u << f;
    }
    partners[e] = bits;
  }
}

__device__ __forceinline__ void pair_partners_from_thresholds(const float* thresholds, int E, uint32_t* partners) {
  if (threadIdx.x < (unsigned)E) {
    uint32_t bits = 0;
    for (int f = 0; f < E; ++f)
      if (!isnan(thresholds[threadIdx.x * E + f])) bits |= 1u << f;
    partners[threadIdx.x] = bits;
  }
}

// Grid (blocks, B): block x takes slots x, x + gridDim.x, ...; slot s covers U tiles [s * per_slot, ...).
template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads) region_stats_kernel(DeLeakerParams p, Workspace ws) {
  wait_for_previous_kernel();
  if (!window_of(p).intervene) return;
  extern __shared__ __align__(128) unsigned char smem[];
  const RegionBuffers<Elem, D> s(smem);
  Elem *q_s = s.q, *k_s = s.k;
  float* lse_s = s.lse;
  int *row_token = s.row_token, *col_token = s.col_token;
  uint32_t *row_bits = s.row_bits, *col_bits = s.col_bits, *partners = s.partners;
  double* warp_sums = s.warp_sums;

  const int b = blockIdx.y, E = p.num_entities, pairs = E * E;
  const int U = ws.union_count[b];
  const int u_tiles = ceil_div(U, kTile);
  // int64: a union of more than 46340 tiles (2,965,760 image tokens; the kernels take 4,194,240) overflows int32.
  const int64_t tiles = (int64_t)u_tiles * u_tiles;
  const int64_t per_slot = (tiles + DELEAKER_REGION_SLOTS - 1) / DELEAKER_REGION_SLOTS;
  const FragCells me = frag_cells();
  pair_partners_from_counts(ws, b, E, partners);

  for (int slot = blockIdx.x; slot < DELEAKER_REGION_SLOTS; slot += gridDim.x) {
    __syncthreads();  // partners are published; the previous slot's sums are written out
    for (int idx = threadIdx.x; idx < kWarps * pairs * DELEAKER_PAIR_STATS; idx += kThreads) {
      const int stat = idx % DELEAKER_PAIR_STATS;
      warp_sums[idx] = stat == 2 ? INFINITY : stat == 3 ? -INFINITY : 0.0;
    }
    const int64_t first = slot * per_slot, last = first + per_slot < tiles ? first + per_slot : tiles;
    for (int64_t tile = first; tile < last; ++tile) {
      __syncthreads();  // the previous tile's lists are no longer read
      load_union_tile(p, ws, b, U, (int)(tile / u_tiles), (int)(tile % u_tiles), row_token, row_bits, col_token,
                      col_bits);
      __syncthreads();
      const uint32_t my_row_bits[2] = {row_bits[me.row(0)], row_bits[me.row(2)]};
      const uint32_t my_partners[2] = {row_partners(my_row_bits[0], partners, E),
                                       row_partners(my_row_bits[1], partners, E)};
      if (!__syncthreads_or(owns_region_cell(me, my_partners, col_bits))) continue;  // no region cell in the tile
      float pbar[32];
      tile_pbar<Elem, D>(p, b, row_token, col_token, q_s, k_s, lse_s, me, pbar);
      // Kept for the cut bits, which then read the very values summed here instead of a third Q K^T.
      if (float* stored = stored_pbar_of(ws, b, tile)) {
#pragma unroll
        for (int i = 0; i < 32; ++i) stored[i * kThreads + threadIdx.x] = pbar[i];
      }
      for (int pair = 0; pair < pairs; ++pair) {
        const int e = pair / E, f = pair % E;
        if (!((partners[e] >> f) & 1u)) continue;  // the same for the whole block
        const bool row_in[2] = {((my_row_bits[0] >> e) & 1u) != 0u, ((my_row_bits[1] >> e) & 1u) != 0u};
        double sum = 0.0, sq = 0.0;
        float least = INFINITY, largest = -INFINITY;
        if (row_in[0] || row_in[1]) {
#pragma unroll
          for (int i = 0; i < 32; ++i) {
            if (row_in[(i >> 1) & 1] && ((col_bits[me.col(i)] >> f) & 1u)) {
              const double x = pbar[i];
              sum += x;
              sq += x * x;
              least = fminf(least, pbar[i]);
              largest = fmaxf(largest, pbar[i]);
            }
          }
        }
        if (__ballot_sync(0xffffffffu, row_in[0] || row_in[1]) == 0u) continue;  // the same for the whole warp
        for (int o = 16; o > 0; o >>= 1) {
          sum += __shfl_xor_sync(0xffffffffu, sum, o);
          sq += __shfl_xor_sync(0xffffffffu, sq, o);
          least = fminf(least, __shfl_xor_sync(0xffffffffu, least, o));
          largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, o));
        }
        if (me.lane == 0) {
          double* stats = warp_sums + (me.warp * pairs + pair) * DELEAKER_PAIR_STATS;
          stats[0] += sum;
          stats[1] += sq;
          stats[2] = fmin(stats[2], (double)least);
          stats[3] = fmax(stats[3], (double)largest);
        }
      }
    }
    __syncthreads();  // every warp's sums are in
    for (int idx = threadIdx.x; idx < pairs * DELEAKER_PAIR_STATS; idx += kThreads) {
      const int stat = idx % DELEAKER_PAIR_STATS;
      double total = warp_sums[idx];
      for (int w = 1; w < kWarps; ++w) {
        const double x = warp_sums[w * pairs * DELEAKER_PAIR_STATS + idx];
        total = stat == 2 ? fmin(total, x) : stat == 3 ? fmax(total, x) : total + x;
      }
      ws.pair_partials[((int64_t)b * DELEAKER_REGION_SLOTS + slot) * pairs * DELEAKER_PAIR_STATS + idx] = total;
    }
  }
}

constexpr int kThresholdThreads = DELEAKER_REGION_SLOTS;  // one thread per slot

// Block (pair, b): the threshold of one ordered pair from the slots' partial sums, reduced over the slots as one
// fixed binary tree (slot s takes slot s + stride, strides 128, 64, ..., 1): a parallel reduction whose order is
// the same on every run, for every grid, so a CUDA-graph replay still equals an eager run bit for bit.
__global__ void __launch_bounds__(kThresholdThreads) threshold_kernel(DeLeakerParams p, Workspace ws) {
  __shared__ double reduced[DELEAKER_PAIR_STATS][kThresholdThreads];
  wait_for_previous_kernel();
  if (!window_of(p).intervene) return;
  const int b = blockIdx.y, E = p.num_entities, pairs = E * E;
  const int pair = blockIdx.x, e = pair / E, f = pair % E;
  double cells;
  if (!is_region_pair(ws, b, E, e, f, &cells)) {  // the same for the whole block
    if (threadIdx.x == 0) ws.thresholds[(int64_t)b * pairs + pair] = nanf("");
    return;
  }
  const int slot = threadIdx.x;
  const double* partial =
      ws.pair_partials + (((int64_t)b * DELEAKER_REGION_SLOTS + slot) * pairs + pair) * DELEAKER_PAIR_STATS;
#pragma unroll
  for (int stat = 0; stat < DELEAKER_PAIR_STATS; ++stat) reduced[stat][slot] = partial[stat];
  for (int stride = kThresholdThreads / 2; stride > 0; stride >>= 1) {
    __syncthreads();  // the previous level is complete
    if (slot < stride) {
      reduced[0][slot] += reduced[0][slot + stride];
      reduced[1][slot] += reduced[1][slot + stride];
      reduced[2][slot] = fmin(reduced[2][slot], reduced[2][slot + stride]);
      reduced[3][slot] = fmax(reduced[3][slot], reduced[3][slot + stride]);
    }
  }
  if (slot != 0) return;  // slot 0 wrote the last level itself
  const double sum = reduced[0][0], sq = reduced[1][0], least = reduced[2][0], largest = reduced[3][0];
  const double mean = sum / cells;  // exact for a constant region: its sums of float values are exact in double
  const double var = least == largest ? 0.0 : fmax(sq - cells * mean * mean, 0.0) / (cells - 1.0);
  ws.thresholds[(int64_t)b * pairs + pair] = (float)(mean + (double)p.std_mul_image_image * sqrt(var));
}

template <typename Elem, int D>
using CutSmem = RegionSmem<Elem, D>;

// One work item of cut_kernel: the cut bits of one 64 x 64 tile of U rows (row tile `band_tile` of band `band`)
// against U columns (column tile `col_tile`) of sample b, and whether the tile has any cut. Tiles outside U write
// nothing (nothing reads them); it then returns at once, for the whole block.
template <typename Elem, int D>
__device__ void cut_tile(const DeLeakerParams& p, const Workspace& ws, int band, int b, int band_tile, int col_tile) {
  const int E = p.num_entities;
  const int U = ws.union_count[b];
  const int row_tile = band * (ws.band_rows / kTile) + band_tile;
  if (row_tile * kTile >= U || col_tile * kTile >= U) return;
  extern __shared__ __align__(128) unsigned char smem[];
  const RegionBuffers<Elem, D> s(smem);
  Elem *q_s = s.q, *k_s = s.k;
  float *lse_s = s.lse, *thresholds = s.thresholds;
  int *row_token = s.row_token, *col_token = s.col_token;
  uint32_t *row_bits = s.row_bits, *col_bits = s.col_bits, *partners = s.partners;

  const FragCells me = frag_cells();
  if (threadIdx.x < (unsigned)(E * E)) thresholds[threadIdx.x] = ws.thresholds[(int64_t)b * E * E + threadIdx.x];
  load_union_tile(p, ws, b, U, row_tile, col_tile, row_token, row_bits, col_token, col_bits);
  __syncthreads();
  pair_partners_from_thresholds(thresholds, E, partners);
  __syncthreads();
  const uint32_t my_row_bits[2] = {row_bits[me.row(0)], row_bits[me.row(2)]};
  const uint32_t my_partners[2] = {row_partners(my_row_bits[0], partners, E),
                                   row_partners(my_row_bits[1], partners, E)};
  const bool any_region = __syncthreads_or(owns_region_cell(me, my_partners, col_bits));
  uint64_t words[2] = {0u, 0u};  // rows me.row(0) and me.row(2)
  if (any_region) {
    // Every tile with a cut candidate had a region cell for the statistics too (a pair with a threshold is a
    // region pair), so region_stats_kernel stored its pbar if it is among the stored tiles.
    float pbar[32];
    const float* stored = stored_pbar_of(ws, b, (int64_t)row_tile * ceil_div(U, kTile) + col_tile);
    if (stored != nullptr) {
#pragma unroll
      for (int i = 0; i < 32; ++i) pbar[i] = stored[i * kThreads + threadIdx.x];
    } else {
      tile_pbar<Elem, D>(p, b, row_token, col_token, q_s, k_s, lse_s, me, pbar);
    }
    tile_cut_words(me, pbar, my_row_bits, col_bits, thresholds, E, words);
  }
  if (me.t == 0) {
    for (int fr = 0; fr < 2; ++fr)
      cut_words_of(ws, b, (int64_t)band_tile * kTile + me.row(2 * fr))[col_tile] = words[fr];
  }
  const int any_cut = __syncthreads_or((words[0] | words[1]) != 0u);
  if (threadIdx.x == 0) cut_tiles_of(ws, b, band_tile)[col_tile] = any_cut;
}

// Persistent grid (a few blocks per SM): the blocks stride over the band's (row tile, column tile, sample) items,
// samples fastest, for the tiles the device's union holds (band_tiles_of); each item is independent, so the result
// does not depend on the grid.
//! Blocks per SM of cut_kernel's persistent grid, and the occupancy its registers are held to. Shared memory would
//! fit four (53 KiB each at D = 128), but at three (170 registers a thread) ptxas 13.0 spills 50 to 90 bytes on
//! sm_90a (the item indices, no longer free special registers, push the tile past 168), and a 25% union of the
//! FLUX shape has 256 tiles, one wave of 2 x 132 blocks.
constexpr int kCutBlocksPerSm = 2;

template <typename Elem, int D>
__global__ void __launch_bounds__(kThreads, kCutBlocksPerSm) cut_kernel(DeLeakerParams p, Workspace ws, int band) {
  wait_for_previous_kernel();
  if (!window_of(p).intervene) return;
  // Nothing but the iteration count lives across an item (the work is read again after the barrier, from L1/L2):
  // the tile's registers stay what they were with one block per tile.
#pragma unroll 1
  for (int round = 0;; ++round) {
    __syncthreads();  // the previous item's shared memory is no longer read
    const BandTiles work = band_tiles_of(ws, band);
    const int64_t per_row = (int64_t)work.cols * p.batch;
    const int64_t item = blockIdx.x + (int64_t)round * gridDim.x;
    if (item >= work.rows * per_row) break;
    const int64_t rest = item % per_row;
    cut_tile<Elem, D>(p, ws, band, (int)(rest % p.batch), (int)(item / per_row), (int)(rest / p.batch));
  }
}

}  // namespace deleaker
