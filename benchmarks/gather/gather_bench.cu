// The gathered-tile L2 microbenchmark as a shared library for the device check (prepare_device_check.sh builds it
// with nvcc; device_check.py's `gather` stage loads it). The kernel and its launcher: gather_bench.cuh.
#include "gather_bench.cuh"

extern "C" int gather_bench_run(const void* q, const void* k, const int* index, int rows, int tile_rows, int heads,
                                int64_t head_stride, uint32_t* sink, cudaStream_t stream) {
  return gather_bench_launch(q, k, index, rows, tile_rows, heads, head_stride, sink, stream);
}
