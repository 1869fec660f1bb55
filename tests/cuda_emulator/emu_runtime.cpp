// The CUDA emulator's scheduler and runtime calls (see include/emu_cuda.h for the model).
#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "emu_cuda.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
namespace {

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  ThreadContext id;
  int lane = 0;
  State state = State::kRunnable;
  const char* waiting_at = "";
  alignas(16) unsigned char slots[2][96];  // warp collectives, double-buffered by `collectives` parity
  uint64_t collectives = 0;                 // warp collectives this thread has entered
  int predicates[2] = {0, 0};               // block collectives, double-buffered by `block_collectives` parity
  uint64_t block_collectives = 0;
  jmp_buf resume;                            // where this fiber continues
  bool started = false;
};

struct Block {
  std::vector<Fiber> fibers;
  const std::function<void()>* body = nullptr;
  ucontext_t start;  // the scheduler's context when it starts a fiber
  jmp_buf scheduler;  // where the scheduler continues when a fiber yields
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kDefaultSmemLimit = 48 * 1024;
constexpr int kOptinSmemLimit = 227 * 1024;  // an H100's per-block opt-in limit

thread_local Fiber* g_current = nullptr;
thread_local Block* g_block = nullptr;
std::mutex g_launch_mutex;  // one emulated launch at a time (the globals below are per launch)
std::string g_failure;      // the first failure of the block in flight
cudaError_t g_message_code = cudaSuccess;  // the code of the last failed call, which g_last_message explains
std::string g_last_message;
unsigned char* g_smem = nullptr;
size_t g_smem_size = 0;  // bytes of g_smem the launch asked for
std::map<const void*, int> g_max_smem;
uint64_t g_schedule_seed = 0;
// Emulated devices: 0 has an H100 SXM's 132 SMs; 1 has a single SM, so that grids sized from the SM count
// (the image-image pass) are smaller than the work and their blocks stride over it.
constexpr int kSmCounts[] = {132, 1};
// ... and their compute capability (major): 0 is an sm_90 (programmatic dependent launch), 1 an sm_80.
constexpr int kCapabilityMajor[] = {9, 8};
constexpr int kDevices = sizeof(kSmCounts) / sizeof(kSmCounts[0]);
int g_device = 0;
uint64_t g_launches = 0;
uint64_t g_dependent_launches = 0;
std::vector<void*> g_stacks;


// A failed call: its code, and the message cudaGetErrorString gives for that code.
cudaError_t fail_call(cudaError_t code, const std::string& message) {
  g_message_code = code;
  g_last_message = message;
  return code;
}

void ensure_stacks(size_t count) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  while (g_stacks.size() < count) {
    void* stack =
        mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) {
      std::fprintf(stderr, "cuda emulator: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(stack, page, PROT_NONE);  // a guard page: a stack overflow faults instead of corrupting memory
    g_stacks.push_back(stack);
  }
}

// Fibers start with makecontext/swapcontext and then switch with _setjmp/_longjmp, which (unlike swapcontext)
// make no system call: a warp collective switches 32 times.
void yield(State state, const char* what) {
  Fiber* f = g_current;
  f->state = state;
  f->waiting_at = what;
  if (_setjmp(f->resume) == 0) _longjmp(g_block->scheduler, 1);
}

void fiber_entry() {
  (*g_block->body)();
  g_current->state = State::kDone;
  _longjmp(g_block->scheduler, 1);
}

void resume(Fiber& f) {
  g_current = &f;
  threadIdx = f.id.thread_idx;
  blockIdx = f.id.block_idx;
  blockDim = f.id.block_dim;
  gridDim = f.id.grid_dim;
  if (_setjmp(g_block->scheduler) == 0) {
    if (f.started) {
      _longjmp(f.resume, 1);
    } else {
      f.started = true;
      swapcontext(&g_block->start, &f.ctx);
    }
  }
  g_current = nullptr;
}

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case State::kRunnable: return "running";
    case State::kBlockBarrier:
    case State::kWarpBarrier: return f.waiting_at;
    case State::kDone: return "exited";
  }
  return "?";
}

// Releases the barriers whose threads have all arrived; false if none could be released.
bool release(Block& block) {
  const int n = (int)block.fibers.size();
  bool released = false;
  for (int w = 0; w < n / 32; ++w) {
    Fiber* lanes = &block.fibers[w * 32];
    if (!std::all_of(lanes, lanes + 32, [](const Fiber& f) { return f.state == State::kWarpBarrier; })) continue;
    for (int l = 1; l < 32; ++l)
      if (std::string(lanes[l].waiting_at) != lanes[0].waiting_at)
        g_failure = "warp " + std::to_string(w) + " diverged: lane 0 waits at " + lanes[0].waiting_at + ", lane " +
                    std::to_string(l) + " at " + lanes[l].waiting_at;
    for (int l = 0; l < 32; ++l) lanes[l].state = State::kRunnable;
    released = true;
  }
  if (released) return true;
  int done = 0, at_block = 0;
  for (const Fiber& f : block.fibers) {
    done += f.state == State::kDone;
    at_block += f.state == State::kBlockBarrier;
  }
  if (at_block > 0 && at_block + done == n) {
    if (done > 0) {
      g_failure = std::to_string(at_block) + " threads wait at __syncthreads after " + std::to_string(done) +
                  " threads of their block exited";
      return false;
    }
    for (Fiber& f : block.fibers) f.state = State::kRunnable;
    return true;
  }
  return false;
}

// Runs one block to completion (or to its first failure, left in g_failure).
void run_block(Block& block, dim3 block_idx, dim3 block_dim, dim3 grid_dim) {
  const int n = (int)(block_dim.x * block_dim.y * block_dim.z);
  block.fibers.assign(n, Fiber{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = block.fibers[t];
    f.id.thread_idx = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
    f.id.block_idx = block_idx;
    f.id.block_dim = block_dim;
    f.id.grid_dim = grid_dim;
    f.lane = t % 32;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks[t];
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule_seed == 1) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(g_schedule_seed + 0x9e3779b97f4a7c15ull * (block_idx.x + 7u * block_idx.y + 131u * block_idx.z));
  for (;;) {
    if (g_schedule_seed >= 2) std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      Fiber& f = block.fibers[t];
      if (f.state != State::kRunnable) continue;
      resume(f);
      if (!g_failure.empty()) return;
    }
    if (std::all_of(block.fibers.begin(), block.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; }))
      return;
    if (!release(block)) {
      if (g_failure.empty()) {
        g_failure = "deadlock:";
        for (int w = 0; w < n / 32; ++w)
          g_failure += " warp " + std::to_string(w) + " lane 0 " + state_name(block.fibers[w * 32]) + ", lane 31 " +
                       state_name(block.fibers[w * 32 + 31]) + ";";
      }
      return;
    }
    if (!g_failure.empty()) return;
  }
}

Fiber& peer(int lane) { return g_block->fibers[(g_current - g_block->fibers.data()) / 32 * 32 + lane]; }

}  // namespace

const ThreadContext& context() { return g_current->id; }
int lane() { return g_current->lane; }

void block_barrier(const char* what) { yield(State::kBlockBarrier, what); }
void warp_barrier(const char* what) { yield(State::kWarpBarrier, what); }

void warp_collective(const void* value, size_t bytes, const char* what) {
  Fiber* f = g_current;
  memcpy(f->slots[f->collectives & 1], value, bytes);
  warp_barrier(what);
  ++f->collectives;
}

const void* peer_slot(int lane) {
  const Fiber& p = peer(lane);
  return p.slots[(g_current->collectives - 1) & 1];
}

void peer_slots(const void* slots[32]) {
  const int parity = (g_current->collectives - 1) & 1;
  const Fiber* lanes = &peer(0);
  for (int l = 0; l < 32; ++l) slots[l] = lanes[l].slots[parity];
}

unsigned warp_ballot(int predicate) {
  const int mine = predicate != 0;
  warp_collective(&mine, sizeof(mine), "__ballot_sync");
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (unsigned)*static_cast<const int*>(peer_slot(l)) << l;
  return bits;
}

int block_or(int predicate) {
  Fiber* f = g_current;
  const int parity = f->block_collectives & 1;
  f->predicates[parity] = predicate != 0;
  block_barrier("__syncthreads_or");
  ++f->block_collectives;
  int any = 0;
  for (const Fiber& other : g_block->fibers) any |= other.predicates[parity];
  return any;
}

void fail_now(const char* message) {
  if (g_failure.empty()) g_failure = message;
  g_current->state = State::kDone;
  _longjmp(g_block->scheduler, 1);
}

unsigned char* dynamic_smem() { return g_smem; }
bool in_dynamic_smem(const void* address, size_t bytes) {
  const unsigned char* at = static_cast<const unsigned char*>(address);
  return g_smem != nullptr && at >= g_smem && at + bytes <= g_smem + g_smem_size;
}

cudaError_t check_launch_attributes(const cudaLaunchAttribute* attrs, unsigned count) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (count > 0 && attrs == nullptr) return fail_call(cudaErrorInvalidValue, "launch attributes: NULL with a count");
  bool dependent = false;
  for (unsigned i = 0; i < count; ++i) {
    if (attrs[i].id != cudaLaunchAttributeProgrammaticStreamSerialization)
      return fail_call(cudaErrorInvalidValue, "the emulator takes only programmatic stream serialization");
    dependent = dependent || attrs[i].val.programmaticStreamSerializationAllowed != 0;
  }
  if (dependent && kCapabilityMajor[g_device] < 9)
    return fail_call(cudaErrorInvalidValue, "programmatic dependent launch on a device below sm_90");
  g_dependent_launches += dependent;
  return cudaSuccess;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (bytes < 0 || bytes > kOptinSmemLimit)
    return fail_call(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(bytes) +
                                                " bytes of dynamic shared memory exceed the device's opt-in limit");
  g_max_smem[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block_dim, size_t smem_bytes,
                     const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  ++g_launches;
  const size_t threads = (size_t)block_dim.x * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || threads % 32 != 0)
    return fail_call(cudaErrorInvalidValue, "launch with " + std::to_string(threads) +
                                                " threads per block (the emulator takes whole warps, at most 1024)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    return fail_call(cudaErrorInvalidValue, "launch with an invalid grid");
  const auto found = g_max_smem.find(kernel);
  const int limit = found != g_max_smem.end() ? std::max(found->second, kDefaultSmemLimit) : kDefaultSmemLimit;
  if (smem_bytes > (size_t)limit)
    return fail_call(cudaErrorInvalidValue, "launch with " + std::to_string(smem_bytes) +
                                                " bytes of dynamic shared memory, above the kernel's limit of " +
                                                std::to_string(limit) + " (cudaFuncSetAttribute not called?)");
  ensure_stacks(threads);
  Block block;
  block.body = &body;
  Block* saved_block = g_block;
  g_block = &block;
  const size_t smem_alloc = (smem_bytes + 127) / 128 * 128 + 128;
  // Blocks in launch order, reversed (schedule seed 1) or shuffled (>= 2): a result that depends on which block
  // runs first (or finishes last) changes with the seed.
  std::vector<dim3> blocks;
  blocks.reserve((size_t)grid.x * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(dim3(x, y, z));
  if (g_schedule_seed == 1) std::reverse(blocks.begin(), blocks.end());
  if (g_schedule_seed >= 2) std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(g_schedule_seed));
  for (const dim3& at : blocks) {
    const unsigned x = at.x, y = at.y, z = at.z;
    g_smem = static_cast<unsigned char*>(std::aligned_alloc(128, smem_alloc));
    g_smem_size = smem_bytes;
    memset(g_smem, 0xFF, smem_alloc);  // NaN as floats: a read before any write shows
    g_failure.clear();
    run_block(block, dim3(x, y, z), block_dim, grid);
    std::free(g_smem);
    g_smem = nullptr;
    if (!g_failure.empty()) {
      g_block = saved_block;
      return fail_call(cudaErrorLaunchFailure, "emulated kernel failed in block (" + std::to_string(x) + ", " +
                                                   std::to_string(y) + ", " + std::to_string(z) + "): " +
                                                   g_failure);
    }
  }
  g_block = saved_block;
  return cudaSuccess;
}

}  // namespace emu

cudaError_t cudaGetDevice(int* device) {
  *device = emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::kDevices) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::kSmCounts[device]; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kOptinSmemLimit; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::kCapabilityMajor[device]; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

const char* cudaGetErrorString(cudaError_t code) {
  if (code == cudaSuccess) return "no error";
  if (code == emu::g_message_code) return emu::g_last_message.c_str();
  return code == cudaErrorInvalidValue ? "invalid argument" : "unspecified launch failure";
}

extern "C" {

//! Resume order of runnable threads (0: ascending, 1: descending, >= 2: shuffled with that seed) and the current
//! device (0: 132 SMs, 1: one SM); returns 0, or 1 for an unknown device.
int deleaker_emulator_configure(uint64_t schedule_seed, int device) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  if (device < 0 || device >= emu::kDevices) return 1;
  emu::g_schedule_seed = schedule_seed;
  emu::g_device = device;
  return 0;
}

//! Kernel launches so far.
uint64_t deleaker_emulator_launches(void) { return emu::g_launches; }

//! Of those, the launches with programmatic stream serialization (dependent launches).
uint64_t deleaker_emulator_dependent_launches(void) { return emu::g_dependent_launches; }

}  // extern "C"
