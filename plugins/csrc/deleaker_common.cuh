// Shared pieces of the DeLeaker kernels: the block-step window, tile shapes, tile loads, the tensor-core products
// of one warp (mma.sync m16n8k16 with ldmatrix, deleaker_mma.cuh: S and P stay in registers, in the PTX ISA's
// documented fragment layout), the image-image head mean pbar of a tile and its cut decision (one definition, so
// every kernel sees bit-identical values), block collectives.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cmath>

#include "deleaker_mma.cuh"
#include "deleaker_params.h"

namespace deleaker {

// ---- the block-step windows (spec steps 3-4), evaluated on the device from the device step ----------------

struct Window {
  int64_t t;           // block step
  bool intervene;      // start_intervention_from <= t <= stop_intervention_at
  bool aggregate;      // the history changes this call (t == start, or start < t < stop)
  bool need_affinity;  // c_e is needed: for the history, or as the mask source
  bool source_is_history;
};

__host__ __device__ inline Window window_at(const DeLeakerParams& p, int64_t step) {
  Window w;
  w.t = step * (int64_t)p.num_blocks + (int64_t)p.block_offset;
  const int64_t start = p.start_aggregating_from, stop = p.stop_aggregating_at;
  w.intervene = p.start_intervention_from <= w.t && w.t <= p.stop_intervention_at;
  w.aggregate = p.use_history != 0 && (w.t == start || (start < w.t && w.t < stop));
  w.source_is_history = p.use_history != 0 && w.t > start;
  w.need_affinity = w.aggregate || (w.intervene && !w.source_is_history);
  return w;
}

// The window of this call, from the device step (NULL: step 0).
__device__ __forceinline__ Window window_of(const DeLeakerParams& p) {
  return window_at(p, p.step != nullptr ? *p.step : 0);
}

// ---- programmatic dependent launch (sm_90+) -------------------------------------------------------------------

// The first statement of every kernel. The launcher starts each kernel after the first with programmatic stream
// serialization on sm_90+ (deleaker_attention.cu): its blocks may then be resident while the previous kernel still
// runs, and this wait holds them until that kernel has completed and its writes are visible. Every kernel waits
// before anything else, also before an early return, so each one completes only after its predecessor did and
// the order of the whole chain is the stream's order. It then lets the next kernel's blocks launch (they wait in
// turn): the launch latency hides behind this kernel's work. Without the attribute (sm_80/sm_89, or the first
// launch) both are no-ops; the CPU emulator runs kernels one after another, so it needs neither.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// ---- tiles -------------------------------------------------------------------------------------------------

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 64;           // rows (4 warps x 16) and columns of every tile
constexpr int kLdS = kTile + 4;     // float S rows, padded against bank conflicts

static_assert(DELEAKER_BAND_ROWS % kTile == 0 && DELEAKER_BAND_ROWS > 0, "DELEAKER_BAND_ROWS: a multiple of 64");

template <int D>
struct HeadDim {
  // Q/K/V rows in shared memory, padded: 16-byte aligned rows (ldmatrix) whose 8-row groups hit distinct banks
  static constexpr int kLd = D + 8;
};

template <typename Elem>
__device__ __forceinline__ Elem from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// One tile's rows (64 rows of D elements) on their way from global to shared memory, held in registers between
// the two halves: issue() starts every 16-byte load of this thread's share before any of them is stored, so all of
// them are in flight together (one memory round trip per tile, not one per load), and the caller can issue the
// next tile's (or the next head's) loads before computing on the current one, storing them after its barrier.
// row_index[r] is the token of row r, or -1 for a zero row (past the end). The block has kThreads threads.
template <typename Elem, int D>
struct TileLoads {
  static constexpr int kVecs = D / 8;  // 8 elements of 2 bytes per uint4
  static constexpr int kPerThread = kTile * kVecs / kThreads;
  static_assert(kTile * kVecs % kThreads == 0, "a tile's 16-byte loads split evenly over the block");
  uint4 value[kPerThread];

  __device__ __forceinline__ void issue(const Elem* base, int64_t row_stride, const int* row_index) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = (int)threadIdx.x + i * kThreads;
      const int r = idx / kVecs, c = (idx % kVecs) * 8;
      const int token = row_index[r];
      value[i] = make_uint4(0u, 0u, 0u, 0u);
      if (token >= 0) value[i] = *reinterpret_cast<const uint4*>(base + (int64_t)token * row_stride + c);
    }
  }

  __device__ __forceinline__ void store(Elem* smem) const {
    constexpr int kLd = HeadDim<D>::kLd;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = (int)threadIdx.x + i * kThreads;
      const int r = idx / kVecs, c = (idx % kVecs) * 8;
      *reinterpret_cast<uint4*>(smem + r * kLd + c) = value[i];
    }
  }
};

// Loads 64 rows of D elements into shared memory, every load issued before the first store (TileLoads).
template <typename Elem, int D>
__device__ __forceinline__ void load_rows(Elem* smem, const Elem* base, int64_t row_stride, const int* row_index) {
  TileLoads<Elem, D> rows;
  rows.issue(base, row_stride, row_index);
  rows.store(smem);
}

// Two tiles (Q and K, or K and V) loaded together: both tiles' loads are in flight before either is stored.
template <typename Elem, int D>
__device__ __forceinline__ void load_rows2(Elem* smem_a, const Elem* base_a, int64_t stride_a, const int* index_a,
                                           Elem* smem_b, const Elem* base_b, int64_t stride_b, const int* index_b) {
  TileLoads<Elem, D> a, b;
  a.issue(base_a, stride_a, index_a);
  b.issue(base_b, stride_b, index_b);
  a.store(smem_a);
  b.store(smem_b);
}

// ---- tensor cores: one warp's 16 rows against 64 keys --------------------------------------------------------

// A warp's S (or P) tile of 16 rows x 64 columns as eight m16n8 accumulator tiles (deleaker_mma.cuh): lane
// 4 g + t holds s[j][i] = element (row g + 8 (i / 2), column 8 j + 2 t + (i % 2)).
using WarpTile = float[kTile / 8][4];

// The cells of a warp's S tile a lane holds in registers, numbered i = 4 j + e for s[j][e] (WarpTile): two rows
// (row(0) for e < 2, row(2) for e >= 2) and 16 columns of each.
struct FragCells {
  int warp, lane, g, t;
  __device__ __forceinline__ int row(int i) const { return warp * 16 + g + 8 * ((i >> 1) & 1); }  // in the tile
  __device__ __forceinline__ int col(int i) const { return 8 * (i >> 2) + 2 * t + (i & 1); }
};

__device__ __forceinline__ FragCells frag_cells() {
  const int lane = threadIdx.x % 32;
  return FragCells{(int)threadIdx.x / 32, lane, lane / 4, lane % 4};
}

// One warp: s = Q[16 x D] K[64 x D]^T, in registers. q_rows: the warp's 16 rows, k_rows: 64 rows (row stride
// kLd, shared memory). A from Q by ldmatrix (matrices: rows 0-7 / 8-15 x columns 0-7 / 8-15 of a k-step); B from
// K by ldmatrix without .trans (K's rows are B's columns: two n-tiles of 8 keys x 16 d per x4).
template <typename Elem, int D>
__device__ __forceinline__ void warp_qk_mma(const Elem* q_rows, const Elem* k_rows, WarpTile& s) {
  constexpr int kLd = HeadDim<D>::kLd;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kTile / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, q_rows + (lane % 16) * kLd + kk * 16 + 8 * (lane / 16));
#pragma unroll
    for (int j = 0; j < kTile / 8; j += 2) {
      uint32_t b[4];  // keys 8 j.. (d 0-7, d 8-15), then keys 8 j + 8.. (d 0-7, d 8-15)
      ldmatrix_x4(b, k_rows + (8 * j + 8 * (lane / 16) + lane % 8) * kLd + kk * 16 + 8 * ((lane / 8) % 2));
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_m16n8k16<Elem>(s[j], a, b0);
      mma_m16n8k16<Elem>(s[j + 1], a, b1);
    }
  }
}

// One warp: S[16 x 64] = Q[16 x D] K[64 x D]^T, stored row-major (ld kLdS) as float at s_out (the kernels whose
// per-cell work is organised by CellOwner: the affinities and the correction's text part).
template <typename Elem, int D>
__device__ __forceinline__ void warp_qk(const Elem* q_rows, const Elem* k_rows, float* s_out) {
  WarpTile s;
  warp_qk_mma<Elem, D>(q_rows, k_rows, s);
  const FragCells me = frag_cells();
#pragma unroll
  for (int i = 0; i < 32; ++i) s_out[(me.row(i) - me.warp * 16) * kLdS + me.col(i)] = s[i >> 2][i & 3];
}

// The A operands of P V from a WarpTile of P (FlashAttention-2): the accumulator tiles 2 kk and 2 kk + 1 (columns
// 16 kk .. 16 kk + 15) are, element for element, the m16n8k16 A fragment of k-step kk, rounded to Elem.
template <typename Elem>
__device__ __forceinline__ void pack_p(const WarpTile& p, uint32_t (&a)[kTile / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    a[kk][0] = pack2(from_float<Elem>(p[2 * kk][0]), from_float<Elem>(p[2 * kk][1]));
    a[kk][1] = pack2(from_float<Elem>(p[2 * kk][2]), from_float<Elem>(p[2 * kk][3]));
    a[kk][2] = pack2(from_float<Elem>(p[2 * kk + 1][0]), from_float<Elem>(p[2 * kk + 1][1]));
    a[kk][3] = pack2(from_float<Elem>(p[2 * kk + 1][2]), from_float<Elem>(p[2 * kk + 1][3]));
  }
}

// One warp: o[16 x D] += P[16 x 64] V[64 x D], P as A fragments (pack_p), V's 64 rows in shared memory (stride
// kLd) read by ldmatrix.trans (matrices: keys 0-7 / 8-15 of a k-step x two n-tiles of 8 d). o[n] is the m16n8
// accumulator tile of columns 8 n .. 8 n + 7, in WarpTile's layout.
template <typename Elem, int D>
__device__ __forceinline__ void warp_pv_mma(float (&o)[D / 8][4], const uint32_t (&p)[kTile / 16][4],
                                            const Elem* v_rows) {
  constexpr int kLd = HeadDim<D>::kLd;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_rows + (kk * 16 + lane % 16) * kLd + 8 * n + 8 * (lane / 16));
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_m16n8k16<Elem>(o[n], p[kk], b0);
      mma_m16n8k16<Elem>(o[n + 1], p[kk], b1);
    }
  }
}

// The cells of a warp's S tile each thread owns: lanes 2r and 2r+1 share row r (of the warp's 16), each takes 32
// columns, visited in a rotated order so that the 32 lanes hit 32 different banks.
struct CellOwner {
  int row;   // 0..63 within the block's tile
  int half;  // 0: columns 0..31, 1: columns 32..63
  int lane;
  __device__ __forceinline__ int col(int i) const { return half * 32 + ((i + lane) & 31); }
};

__device__ __forceinline__ CellOwner cell_owner() {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  return CellOwner{warp * 16 + lane / 2, lane % 2, lane};
}

// Bits e of the entities that own text token t (entity_mask is (E_max, T) bytes).
__device__ __forceinline__ uint32_t token_entities(const DeLeakerParams& p, int t) {
  uint32_t bits = 0;
  for (int e = 0; e < p.num_entities; ++e) bits |= (p.entity_mask[(int64_t)e * p.text_tokens + t] != 0 ? 1u : 0u) << e;
  return bits;
}

// Image-text edits of one logit (spec step 6) for a row in the masks `row_bits` and a text token of the entities
// `token_bits`: cut iff i in M_e and t in T_f with f != e; strengthened iff i in M_e and t in T_e, unless cut.
__device__ __forceinline__ bool text_cut(uint32_t row_bits, uint32_t token_bits) {
  return row_bits != 0u && token_bits != 0u && !(row_bits == token_bits && __popc(row_bits) == 1);
}

__device__ __forceinline__ const float* lse_of(const DeLeakerParams& p, int b, int h) {
  return p.lse + (int64_t)b * p.lse_batch_stride + (int64_t)h * p.lse_head_stride;
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Device pointers into the workspace (see DeLeakerWorkspaceLayout for shapes).
struct Workspace {
  int32_t* entity_tokens;
  uint8_t* entity_token_bits;
  int32_t* entity_token_count;
  float* head_affinity;
  float* affinity;
  float* source;
  uint8_t* raw_masks;
  uint8_t* masks;
  uint8_t* scratch;
  int32_t* mask_counts;
  uint8_t* row_entities;
  int32_t* union_count;
  int32_t* union_index;
  double* pair_partials;
  float* thresholds;
  uint64_t* cut_bits;
  int32_t* cut_tiles;
  float* pbar_tiles;
  float* z;
  int32_t* fallback_rows;
  int32_t* fallback_counts;
  int32_t* fallback_count;
  int32_t* affinity_arrivals;
  int32_t* union_largest;
  int band_rows, bands, tiles, stored_tiles;
};

// The stored pbar of U x U tile `tile` of sample b (see DeLeakerWorkspaceLayout::pbar_tiles), or NULL when the
// tile is beyond the stored ones. Cell i (FragCells) of thread x at [i * kThreads + x]: coalesced writes and reads.
__device__ __forceinline__ float* stored_pbar_of(const Workspace& ws, int b, int64_t tile) {
  return tile < ws.stored_tiles ? ws.pbar_tiles + ((int64_t)b * ws.stored_tiles + tile) * (kTile * kTile) : nullptr;
}

// The cut-bit words of band row `band_row` of sample b (one per 64-column tile of U), and the any-cut flags of
// the band's row tile `row_tile`: the one layout cut_kernel writes and the correction and the fallback read.
__device__ __forceinline__ uint64_t* cut_words_of(const Workspace& ws, int b, int64_t band_row) {
  return ws.cut_bits + ((int64_t)b * ws.band_rows + band_row) * ws.tiles;
}
__device__ __forceinline__ int32_t* cut_tiles_of(const Workspace& ws, int b, int row_tile) {
  return ws.cut_tiles + ((int64_t)b * (ws.band_rows / kTile) + row_tile) * ws.tiles;
}

// The work of band `band` as the device knows it after union_kernel: the U row tiles of the band and the U column
// tiles, for the batch's largest |U|. The band kernels run a persistent grid (a few blocks per SM, sized on the
// host from the SM count) whose blocks stride over these items; a sample with a smaller U skips the items beyond
// its own. No grid sized for the worst case (every image token in U), no work that depends on the grid size.
struct BandTiles {
  int rows, cols;
};
__device__ __forceinline__ BandTiles band_tiles_of(const Workspace& ws, int band) {
  const int largest = *ws.union_largest;
  const int in_band = largest - band * ws.band_rows;
  const int rows = in_band <= 0 ? 0 : in_band < ws.band_rows ? in_band : ws.band_rows;
  return BandTiles{(rows + kTile - 1) / kTile, (largest + kTile - 1) / kTile};
}

// The persistent-grid loop of the kernels whose items are band `band`'s (row tile, head, sample), heads fastest:
// block blockIdx.x runs items blockIdx.x, blockIdx.x + gridDim.x, ... below the band's U row tiles (band_tiles_of)
// times heads times batch, each as run_tile(b, h, row_tile). Nothing but the iteration count lives across an item
// (the work is read again after the barrier), so the tile's registers stay what they are with one block per tile.
template <typename RunTile>
__device__ __forceinline__ void for_each_band_row_tile(const DeLeakerParams& p, const Workspace& ws, int band,
                                                       RunTile run_tile) {
#pragma unroll 1
  for (int round = 0;; ++round) {
    __syncthreads();  // the previous item's shared memory is no longer read
    const int64_t per_tile = (int64_t)p.heads * p.batch;
    const int64_t item = blockIdx.x + (int64_t)round * gridDim.x;
    if (item >= band_tiles_of(ws, band).rows * per_tile) break;
    const int64_t bh = item % per_tile;
    run_tile((int)(bh / p.heads), (int)(bh % p.heads), (int)(item / per_tile));
  }
}

// Byte offset of a shared-memory part, rounded up to 128 bytes (ldmatrix rows need 16).
__host__ __device__ constexpr int smem_align(int bytes) { return (bytes + 127) / 128 * 128; }

// ---- block collectives (fixed order: the same inputs give the same bits on every run) -----------------------

// Block-wide sum (blockDim.x a multiple of 32, at most 1024). Every thread gets the total.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch32) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch32 may still be read by a previous call
  if (lane == 0) scratch32[warp] = x;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < warps; ++w) total += scratch32[w];
  return total;
}

// Stream compaction, one chunk of blockDim.x candidates: `position` is this thread's index among the threads
// that keep theirs (in thread order, -1 if not kept), `total` how many kept. warp_totals: 32 shared ints.
struct Ranked {
  int position, total;
};

__device__ __forceinline__ Ranked block_rank(bool keep, int* warp_totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const uint32_t ballot = __ballot_sync(0xffffffffu, keep);
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == 0) warp_totals[warp] = __popc(ballot);
  __syncthreads();
  int offset = 0, total = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) offset += warp_totals[w];
    total += warp_totals[w];
  }
  return Ranked{keep ? offset + __popc(ballot & ((1u << lane) - 1u)) : -1, total};
}

// ---- the entity text tokens (the list entity_tokens_kernel compacts) -----------------------------------------

// S of each warp's 16 rows (Q in q_s) against entries [t0, t0 + 64) of the entity token list: col_token and
// col_bits get the tile's tokens and entity bits (-1 and 0 past the end), k_s their K rows, s_w the warp's S.
// Starts with a __syncthreads (the previous tile's K and column lists are no longer read).
template <typename Elem, int D>
__device__ void entity_token_tile_qk(const DeLeakerParams& p, const Workspace& ws, const Elem* k, int t0, int count,
                                     const Elem* q_s, Elem* k_s, float* s_w, int* col_token, uint32_t* col_bits) {
  constexpr int kLd = HeadDim<D>::kLd;
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int at = t0 + (int)threadIdx.x;
    col_token[threadIdx.x] = at < count ? ws.entity_tokens[at] : -1;
    col_bits[threadIdx.x] = at < count ? ws.entity_token_bits[at] : 0u;
  }
  __syncthreads();
  load_rows<Elem, D>(k_s, k, p.k_row_stride, col_token);
  __syncthreads();
  warp_qk<Elem, D>(q_s + (threadIdx.x / 32) * 16 * kLd, k_s, s_w);
  __syncwarp();
}

// ---- image-image: pbar of a tile and its cuts (spec step 6, last item) ---------------------------------------

// Partner masks: bit f of partners[e] is set iff the pair (e, f) cuts (its threshold is not NaN).
__device__ __forceinline__ uint32_t row_partners(uint32_t row_bits, const uint32_t* partners, int num_entities) {
  uint32_t out = 0;
  for (int e = 0; e < num_entities; ++e)
    if ((row_bits >> e) & 1u) out |= partners[e];
  return out;
}

// True iff a cell of this lane's 32 (FragCells) has a pair: some e in its row's masks and f in its column's with
// (e, f) on. partner_bits[h]: the row partners (row_partners) of row me.row(2 h).
__device__ __forceinline__ bool owns_region_cell(const FragCells& me, const uint32_t (&partner_bits)[2],
                                                 const uint32_t* col_bits) {
  if ((partner_bits[0] | partner_bits[1]) == 0u) return false;
  for (int i = 0; i < 32; ++i)
    if (col_bits[me.col(i)] & partner_bits[(i >> 1) & 1]) return true;
  return false;
}

// pbar of this lane's 32 cells (FragCells) of one 64 x 64 tile: the head mean of exp(s[h] - lse[h]), heads in
// order, for the rows / columns whose tokens are row_token / col_token (-1: none). Every kernel that needs pbar
// calls this, so they all see the same bits. S stays in registers; uses q_s, k_s (64 x kLd each) and lse_s (64
// floats); the caller synchronises before it writes any of them again.
template <typename Elem, int D>
__device__ void tile_pbar(const DeLeakerParams& p, int b, const int* row_token, const int* col_token, Elem* q_s,
                          Elem* k_s, float* lse_s, const FragCells& me, float (&pbar)[32]) {
  constexpr int kLd = HeadDim<D>::kLd;
#pragma unroll
  for (int i = 0; i < 32; ++i) pbar[i] = 0.0f;
  // Head h + 1's Q, K and LSE are loaded into registers while head h's product and exps run (TileLoads): the
  // loads of a head are all in flight together, and behind the previous head's work.
  TileLoads<Elem, D> q_next, k_next;
  float lse_next = 0.0f;
  const auto issue_head = [&](int h) {
    const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
    q_next.issue(q, p.q_row_stride, row_token);
    k_next.issue(k, p.k_row_stride, col_token);
    if (threadIdx.x < kTile) lse_next = row_token[threadIdx.x] >= 0 ? lse_of(p, b, h)[row_token[threadIdx.x]] : 0.0f;
  };
  issue_head(0);
  for (int h = 0; h < p.heads; ++h) {
    __syncthreads();  // the previous head's (or the caller's) Q, K and LSE are no longer read
    q_next.store(q_s);
    k_next.store(k_s);
    if (threadIdx.x < kTile) lse_s[threadIdx.x] = lse_next;
    __syncthreads();
    if (h + 1 < p.heads) issue_head(h + 1);
    WarpTile s;
    warp_qk_mma<Elem, D>(q_s + me.warp * 16 * kLd, k_s, s);
    const float row_lse[2] = {lse_s[me.row(0)], lse_s[me.row(2)]};
#pragma unroll
    for (int i = 0; i < 32; ++i) pbar[i] += expf(s[i >> 2][i & 3] * p.softmax_scale - row_lse[(i >> 1) & 1]);
  }
  const float heads = (float)p.heads;
#pragma unroll
  for (int i = 0; i < 32; ++i) pbar[i] /= heads;
}

// The 64-bit cut words of this lane's two rows in the tile (words[h]: row me.row(2 h); the 4 lanes of a row get
// the same): bit c set iff pbar[c] > threshold(e, f) for some e in the row's masks and f in column c's (a NaN
// threshold cuts nothing). row_bits[h]: the masks of row me.row(2 h).
__device__ __forceinline__ void tile_cut_words(const FragCells& me, const float (&pbar)[32],
                                               const uint32_t (&row_bits)[2], const uint32_t* col_bits,
                                               const float* thresholds, int num_entities, uint64_t (&words)[2]) {
  words[0] = words[1] = 0u;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int h = (i >> 1) & 1, c = me.col(i);
    const uint32_t rb = row_bits[h], cb = col_bits[c];
    bool cut = false;
    for (int e = 0; e < num_entities; ++e) {
      if (!((rb >> e) & 1u)) continue;
      for (int f = 0; f < num_entities; ++f)
        if (((cb >> f) & 1u) && pbar[i] > thresholds[e * num_entities + f]) cut = true;
    }
    if (cut) words[h] |= 1ull << c;
  }
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {  // the 4 lanes of a row (t = 0..3), each 16 of its columns
    words[0] |= __shfl_xor_sync(0xffffffffu, words[0], o);
    words[1] |= __shfl_xor_sync(0xffffffffu, words[1], o);
  }
}

}  // namespace deleaker
