// The gathered-tile L2 microbenchmark of the device check (issue 21): how fast can a block read the rows of a
// region tile, gathered through an index list as the region kernels read Q and K, for 64- and 128-row tiles?
// The answer pins the L2 rate the region statistics and the correction can reach, and so the tile size.
//
// One block per (row tile, column tile) pair of a union of `rows` image rows: per head, it gathers ROWS rows of Q
// (the row tile) and 64 rows of K (the column tile), every 16-byte load of the head issued before the first is
// used (as deleaker_common.cuh's TileLoads), and folds them into an XOR so that no load can be dropped. The XOR of
// each block is written to sink[block]: exact, so a test can check which rows were read. Benchmark code, not part
// of the kernel library.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace gather_bench {

constexpr int kThreads = 128;
constexpr int kColumns = 64;  // rows of K per tile (the column tile)
constexpr int kHeadDim = 128;
constexpr int kVecs = kHeadDim / 8;  // 16-byte vectors per row

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// Grid (row tiles x column tiles): block (rt, ct) reads rows index[rt * ROWS ...] of q and index[ct * 64 ...] of
// k (-1: none) for each head.
template <int ROWS>
__global__ void __launch_bounds__(kThreads) gather_kernel(const uint16_t* q, const uint16_t* k, const int* index,
                                                          int rows, int col_tiles, int heads, int64_t head_stride,
                                                          uint32_t* sink) {
  __shared__ uint32_t warp_fold[kThreads / 32];
  constexpr int kQLoads = ROWS * kVecs / kThreads, kKLoads = kColumns * kVecs / kThreads;
  const int row_tile = (int)blockIdx.x / col_tiles, col_tile = (int)blockIdx.x % col_tiles;
  uint32_t acc = 0;
  for (int h = 0; h < heads; ++h) {
    const uint16_t* qh = q + (int64_t)h * head_stride;
    const uint16_t* kh = k + (int64_t)h * head_stride;
    uint4 qv[kQLoads], kv[kKLoads];
#pragma unroll
    for (int i = 0; i < kQLoads; ++i) {
      const int idx = (int)threadIdx.x + i * kThreads, r = row_tile * ROWS + idx / kVecs;
      const int token = r < rows ? index[r] : -1;
      qv[i] = token >= 0 ? *reinterpret_cast<const uint4*>(qh + (int64_t)token * kHeadDim + (idx % kVecs) * 8)
                         : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < kKLoads; ++i) {
      const int idx = (int)threadIdx.x + i * kThreads, r = col_tile * kColumns + idx / kVecs;
      const int token = r < rows ? index[r] : -1;
      kv[i] = token >= 0 ? *reinterpret_cast<const uint4*>(kh + (int64_t)token * kHeadDim + (idx % kVecs) * 8)
                         : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < kQLoads; ++i) acc ^= fold(qv[i]);
#pragma unroll
    for (int i = 0; i < kKLoads; ++i) acc ^= fold(kv[i]);
  }
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) warp_fold[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total ^= warp_fold[w];
    sink[blockIdx.x] = total;
  }
}

}  // namespace gather_bench

extern "C" {

//! Enqueues one pass over every (row tile, column tile) pair of the `rows` image rows in `index` (tokens of q and
//! k, (heads, tokens, 128) 2-byte elements, rows contiguous, heads head_stride elements apart). tile_rows: 64 or
//! 128. sink: one uint32 per pair. Returns 0, -1 for a bad argument, or the launch's CUDA error.
inline int gather_bench_launch(const void* q, const void* k, const int* index, int rows, int tile_rows, int heads,
                               int64_t head_stride, uint32_t* sink, cudaStream_t stream) {
  if (q == nullptr || k == nullptr || index == nullptr || sink == nullptr || rows < 1 || heads < 1 ||
      (tile_rows != 64 && tile_rows != 128))
    return -1;
  const int row_tiles = (rows + tile_rows - 1) / tile_rows;
  const int col_tiles = (rows + gather_bench::kColumns - 1) / gather_bench::kColumns;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((unsigned)(row_tiles * col_tiles));
  config.blockDim = dim3((unsigned)gather_bench::kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  const uint16_t* qh = static_cast<const uint16_t*>(q);
  const uint16_t* kh = static_cast<const uint16_t*>(k);
  cudaError_t err;
  if (tile_rows == 64)
    err = cudaLaunchKernelEx(&config, gather_bench::gather_kernel<64>, qh, kh, index, rows, col_tiles, heads,
                             head_stride, sink);
  else
    err = cudaLaunchKernelEx(&config, gather_bench::gather_kernel<128>, qh, kh, index, rows, col_tiles, heads,
                             head_stride, sink);
  return (int)err;
}

}  // extern "C"
