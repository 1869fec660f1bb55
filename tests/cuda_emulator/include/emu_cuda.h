// A CPU emulation of the parts of CUDA the DeLeaker kernels use, so that their real source (plugins/csrc) runs
// and is checked on machines without a GPU. Test infrastructure only: it proves the kernels' logic (indexing,
// barriers, warp collectives, the tensor-core fragment layouts as NVIDIA's PTX ISA documents them, masks,
// windows), never their speed, and never the behaviour of real hardware (memory model, tensor-core rounding).
//
// Model: a launch runs its blocks one after another (in launch order, or reversed or shuffled by the schedule knob,
// so that a result that depends on the order blocks run or finish in shows); the threads of a block are
// cooperative fibers (ucontext) that run until they reach a synchronisation point (__syncthreads, __syncwarp,
// shuffles, ballots, ldmatrix, mma.sync).
// The scheduler then releases a barrier once every thread it concerns has arrived, and fails the launch, naming
// the barrier, when threads diverge (a warp collective not reached by all 32 lanes, __syncthreads reached by
// some threads after others exited, a deadlock). The order in which runnable threads resume is a knob
// (`deleaker_emulator_configure`): a missing barrier shows up as results that change with it.
//
// Shared memory: the dynamic part is a fresh buffer per block, filled with 0xFF bytes (NaN as floats) so that a
// read before a write is visible; `__shared__` arrays become function-local statics, which is sound because
// blocks never run concurrently. Atomics are plain read-modify-writes for the same reason.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---- vector and index types ------------------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- half and bfloat16 (storage types with round-to-nearest-even conversions) ------------------------------

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

#ifndef __FLT16_MAX__
#error "the CUDA emulator needs a compiler with _Float16 (GCC >= 12 or Clang >= 15 on x86-64)"
#endif

inline __half __float2half_rn(float f) {
  const _Float16 h = (_Float16)f;  // IEEE conversion, round to nearest even
  __half out;
  memcpy(&out.bits, &h, 2);
  return out;
}
inline float __half2float(__half h) {
  _Float16 v;
  memcpy(&v, &h.bits, 2);
  return (float)v;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = (uint16_t)((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  } else {
    out.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- runtime types -----------------------------------------------------------------------------------------

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};

// Launch attributes: the emulator takes programmatic stream serialization only (its grids run one after another,
// so a dependent launch is an ordinary one; it counts them, and refuses one on a device below sm_90).
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 5 };
union cudaLaunchAttributeValue {
  unsigned char pad[64];
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
const char* cudaGetErrorString(cudaError_t code);

namespace emu {

//! What each emulated thread sees of itself.
struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};

const ThreadContext& context();
int lane();

//! Block barrier (__syncthreads) and warp barrier (any warp collective); `what` names it in errors.
void block_barrier(const char* what);
void warp_barrier(const char* what);
//! A warp collective: every lane publishes `bytes` (<= 96) into its slot, then waits at a warp barrier; after
//! it, `peer_slot(l)` is lane l's slot until lane l's next-but-one collective (slots are double-buffered, and no
//! lane can get two collectives ahead of another), so each collective costs one barrier.
void warp_collective(const void* value, size_t bytes, const char* what);
const void* peer_slot(int lane);
//! All 32 lanes' slots of the warp's last collective (peer_slot for every lane at once).
void peer_slots(const void* slots[32]);
int block_or(int predicate);
unsigned warp_ballot(int predicate);
//! Fails the launch in flight with `message`; the calling thread stops there.
[[noreturn]] void fail_now(const char* message);

unsigned char* dynamic_smem();
//! Whether [address, address + bytes) lies in the running block's dynamic shared memory.
bool in_dynamic_smem(const void* address, size_t bytes);
//! Checks a launch's attributes (programmatic stream serialization only, sm_90+ only) and counts the dependent
//! launches; cudaSuccess or the error the launch returns.
cudaError_t check_launch_attributes(const cudaLaunchAttribute* attrs, unsigned count);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
//! Runs a whole grid, block after block; the launch's own error code (and cudaGetErrorString's message).
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  // Arguments are converted to the kernel's parameter types once, as a real launch copies them.
  const std::tuple<std::decay_t<Params>...> values(std::forward<Args>(args)...);
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, [&]() {
    std::tuple<std::decay_t<Params>...> copy = values;  // each thread its own copy of the parameters
    std::apply(kernel, copy);
  });
}

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace emu

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return emu::set_max_dynamic_smem((const void*)kernel, value);
}

// The runtime's type-safe launch (cuda_runtime.h): the emulated grid runs to completion before it returns.
template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  const cudaError_t bad = emu::check_launch_attributes(config->attrs, config->numAttrs);
  if (bad != cudaSuccess) return bad;
  return emu::launch(kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes,
                     std::forward<ActTypes>(args)...);
}

// The built-in index variables: globals that the scheduler sets to the resumed thread's own values each time it
// resumes one (threads are fibers of one OS thread, and only the running one reads them). Plain variables, not
// macros, so that cudaLaunchConfig_t's gridDim / blockDim fields keep their names.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- intrinsics --------------------------------------------------------------------------------------------

inline void __syncthreads() { emu::block_barrier("__syncthreads"); }
inline int __syncthreads_or(int predicate) { return emu::block_or(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail_now("the emulator takes only full-warp masks in __syncwarp");
  emu::warp_barrier("__syncwarp");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "shuffle of a small trivial type");
  if (mask != 0xffffffffu) emu::fail_now("the emulator takes only full-warp masks in __shfl_xor_sync");
  emu::warp_collective(&value, sizeof(T), "__shfl_xor_sync");
  T result;
  memcpy(&result, emu::peer_slot((emu::lane() ^ lane_mask) & 31), sizeof(T));
  return result;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  if (mask != 0xffffffffu) emu::fail_now("the emulator takes only full-warp masks in __ballot_sync");
  return emu::warp_ballot(predicate);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Blocks never run concurrently: atomics are plain read-modify-writes. Only integer ones: the kernels use no
// floating-point atomics (their order would vary on a GPU).
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline int atomicMax(int* address, int value) {
  const int old = *address;
  *address = old > value ? old : value;
  return old;
}
// Blocks run one after another, and each sees every write of the blocks before it: a fence has nothing to order,
// and an L2 load (__ldcg) is a plain load.
inline void __threadfence() {}
template <typename T>
inline T __ldcg(const T* address) {
  return *address;
}

// ---- PTX tensor-core instructions (plugins/csrc/deleaker_mma.cuh) ------------------------------------------
//
// Implemented from NVIDIA's PTX ISA, sections "Warp-level matrix load instruction: ldmatrix" and "Matrix
// Fragments for mma.m16n8k16 with floating point type" (the layouts are quoted in deleaker_mma.cuh). Each is a
// warp collective: all 32 lanes must reach it (as .sync.aligned requires), or the launch fails naming it.

#define DELEAKER_CUDA_EMULATOR 1

namespace emu {
namespace ptx {

template <typename Elem>
inline float element_value(uint16_t bits) {
  Elem e;
  memcpy(&e, &bits, 2);
  return emu::to_float(e);
}

//! One ldmatrix: each lane reads the 16 bytes of the row its address names when it reaches the instruction
//! (checked: 16-byte aligned, in the block's dynamic shared memory), before the warp's collective. Reading at
//! arrival, not after the whole warp arrived, keeps a write by another warp that no barrier orders before the
//! read visible as a result that depends on the thread order.
struct MatrixRows {
  uint16_t row[32][8];  // row[l]: the 8 elements at lane l's address
};

inline void ldmatrix_rows(const void* row, MatrixRows& rows, const char* what) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail_now("ldmatrix: a row address is not 16-byte aligned");
  if (!in_dynamic_smem(row, 16)) fail_now("ldmatrix: a row address is not in the block's dynamic shared memory");
  uint16_t mine[8];
  memcpy(mine, row, sizeof(mine));
  warp_collective(mine, sizeof(mine), what);
  const void* slots[32];
  peer_slots(slots);
  for (int l = 0; l < 32; ++l) memcpy(rows.row[l], slots[l], sizeof(rows.row[l]));
}

//! ldmatrix.sync.aligned.m8n8.x4.shared.b16: register m of lane l = matrix m's row l / 4, columns 2 (l % 4) and
//! 2 (l % 4) + 1, the lower column in the low half; matrix m's row j is at the address lane 8 m + j gave.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  MatrixRows rows;
  ldmatrix_rows(row, rows, "ldmatrix.x4");
  const int l = lane(), g = l / 4, t = l % 4;
  for (int m = 0; m < 4; ++m) {
    const uint16_t* source = rows.row[8 * m + g];
    r[m] = (uint32_t)source[2 * t] | ((uint32_t)source[2 * t + 1] << 16);
  }
}

//! The same with .trans: register m of lane l = matrix m's column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  MatrixRows rows;
  ldmatrix_rows(row, rows, "ldmatrix.x4.trans");
  const int l = lane(), g = l / 4, t = l % 4;
  for (int m = 0; m < 4; ++m)
    r[m] = (uint32_t)rows.row[8 * m + 2 * t][g] | ((uint32_t)rows.row[8 * m + 2 * t + 1][g] << 16);
}

//! mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d = a b + d over the warp's fragments. Each product is
//! exact in double and the 16 of an element are summed with C in double, rounded to float once (real tensor
//! cores round differently: the tests compare against the specification within its tolerances).
template <typename Elem>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
    float c[4];
  } mine;
  memcpy(mine.a, a, sizeof(mine.a));
  memcpy(mine.b, b, sizeof(mine.b));
  memcpy(mine.c, d, sizeof(mine.c));
  warp_collective(&mine, sizeof(mine), "mma.sync.m16n8k16");
  const void* slots[32];
  peer_slots(slots);
  Operands all[32];
  for (int l = 0; l < 32; ++l) memcpy(&all[l], slots[l], sizeof(Operands));
  // Element (row, k) of A: lane 4 (row % 8) + (k % 8) / 2, element i = (k % 2) + 2 (row / 8) + 4 (k / 8), which
  // is half i % 2 of register i / 2. Element (k, n) of B: lane 4 n + (k % 8) / 2, half k % 2 of register k / 8.
  const auto a_at = [&](int row, int k) {
    const int i = (k % 2) + 2 * (row / 8) + 4 * (k / 8);
    return element_value<Elem>((uint16_t)(all[4 * (row % 8) + (k % 8) / 2].a[i / 2] >> (16 * (i % 2))));
  };
  const auto b_at = [&](int k, int n) {
    return element_value<Elem>((uint16_t)(all[4 * n + (k % 8) / 2].b[k / 8] >> (16 * (k % 2))));
  };
  const int l = lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    double sum = (double)mine.c[i];
    for (int k = 0; k < 16; ++k) sum += (double)a_at(row, k) * (double)b_at(k, col);
    d[i] = (float)sum;
  }
}

}  // namespace ptx
}  // namespace emu
