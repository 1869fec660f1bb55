// DeLeaker attention, the fast path's correction: argument checks, init, dtype / head-dim dispatch and the
// extern "C" launcher.
//
// The caller has run a fused attention: `out` holds o = softmax(s) v and `lse` the row log-sum-exp l. Per call,
// all on one stream, without host synchronisation (the block step is read on the device), without allocation:
//   (a) entity_tokens_kernel, affinity_kernel   the entity text tokens; per-head affinities from l (text columns),
//                                                and their head mean (the last head block of each row tile)
//   (b) mask_kernel (entity x batch blocks)      history, source, threshold, morphology, |M_e|
//       union_kernel                             entity bits per image token, U grouped by bits, largest |U|
//   (c) region_stats_kernel, threshold_kernel    pbar sums per region pair in fixed slots; thresholds
//   per band of at most DELEAKER_BAND_ROWS rows of U:
//       cut_kernel                               the band's cut bits (U x U columns) from the pbar the
//                                                statistics stored (recomputed beyond DELEAKER_PBAR_TILES)
//   (d) correction_kernel                        Z and o' = (o - sum W v) / Z of the band's rows, per head
//   (e) fallback_list_kernel, fallback_kernel    rows whose Z < fallback_threshold (or not finite): exact edited
//                                                attention of those rows only
// The band kernels (cut bits, correction, fallback) and the statistics run persistent grids of a few blocks per
// SM that stride over the work the device built (the tiles of U, from union_largest), not grids sized for a union
// of every image token. On sm_90+ every launch after the first is a programmatic dependent launch: its blocks may
// be resident before the previous kernel ends and wait for it in their first statement, which hides the launch
// gaps between the small kernels (wait_for_previous_kernel in deleaker_common.cuh).
// Outside the intervention window only (a) (while the affinities are needed) and the history part of (b) run;
// `out` is then left as it is. With a host step (step == NULL) the launches that would return at once are
// skipped; with a device step every launch happens and the kernels decide on the device.
//
// Why this shape, and what it costs (FLUX.1-dev 1024x1024: B = 1, H = 24, D = 128, T = 512, Nimg = 4096):
// - Memory is O(tokens): per-head affinities B H E Nimg floats (1.5 MiB at E = 4), Z and the fallback lists
//   2 B H Nimg ints (0.75 MiB), and the cut bits of one band, band_rows x ceil(Nimg / 64) 64-bit words per
//   sample: 2 MiB at Nimg = 4096, 8 MiB at 2048x2048 (Nimg = 16384, 4 bands); and the pbar of at most
//   DELEAKER_PBAR_TILES region tiles per sample, 16 MiB, so that the cut bits need no Q K^T of their own. About
//   21 MiB per call in all at the FLUX shape, 34 MiB at 2048x2048 (the header's arithmetic); never an Nimg x Nimg
//   buffer beyond one band of rows.
// - Work (an estimate, not a measurement), for region cells R = sum over pairs of |M_e| |M_f|, counted in whole
//   64 x 64 tiles of U x U (grouping U by entity bits keeps the tiles of a mask with itself out): the statistics
//   compute pbar, 2 H D FLOPs per cell on tensor cores plus H exp, and store it (the cut bits read 4 bytes per
//   cell back, recomputing only beyond DELEAKER_PBAR_TILES tiles); the correction
//   4 H D FLOPs per cell of the tiles that hold a cut (Q K^T again, then W V) plus 4 H D |T_entities| per U row
//   on CUDA cores; the fallback 4 D N per recomputed row and head. Against 4 H D N^2 for the attention itself:
//   with two entities' masks over 25% of the image, R ~ 0.025 N^2, so about 0.05x an attention's FLOPs, plus
//   the tiles' granularity and the launches (ten per call, dependent launches on sm_90+).
// - Parallelism: the correction's work item is (64 U rows, head), so a union of 1024 rows still gives 16 x 24
//   items for its 2 blocks per SM; the statistics and the cut bits one item per tile.
// Alternatives weighed: one block per 64 U rows looping over heads, with the per-head numerator in a
// B H Nimg D float buffer (48 MiB at the FLUX shape), needs no cut bits but gives only ceil(|U| / 64) blocks
// (16 at a 25% union, an eighth of an H100); a dense Nimg x Nimg cut bitmask is 2 MiB at the FLUX shape but
// 32 MiB per sample at 2048x2048; recomputing pbar in the fallback instead of reading the band's cut bits costs
// H times the work of each recomputed row tile.
//
// Deterministic: every floating-point reduction runs in a fixed order (per-slot partial sums of the image-image
// statistics, reduced over the slots in one fixed tree; no floating-point atomics), so a CUDA-graph replay equals an eager run bit
// for bit. Errors: each launch's own return code (cudaLaunchKernelEx), never cudaGetLastError.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "deleaker_affinity.cuh"
#include "deleaker_common.cuh"
#include "deleaker_correction.cuh"
#include "deleaker_fallback.cuh"
#include "deleaker_masks.cuh"
#include "deleaker_params.h"
#include "deleaker_regions.cuh"

namespace deleaker {
namespace {

// The reason of the last DELEAKER_ERROR_* of this thread.
thread_local char g_last_error[512] = "";

int fail(int code, const char* what) {
  std::snprintf(g_last_error, sizeof(g_last_error), "%s", what);
  return code;
}

int invalid(const char* what) { return fail(DELEAKER_ERROR_INVALID_ARGUMENT, what); }

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int check(const DeLeakerParams* p, const void* workspace, size_t workspace_bytes) {
  if (p == nullptr) return invalid("params is NULL");
  if (!p->q || !p->k || !p->v || !p->out) return invalid("q, k, v and out must be device pointers, got NULL");
  if (!p->lse) return invalid("lse (the plain attention's row log-sum-exp) is NULL");
  if (!p->entity_mask) return invalid("entity_mask is NULL");
  if (!p->history_out) return invalid("history_out is NULL");
  if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->out))
    return invalid("q, k, v and out must be 16-byte aligned");
  if ((reinterpret_cast<uintptr_t>(p->lse) & 3u) != 0) return invalid("lse must be 4-byte aligned");
  if (p->dtype != DELEAKER_DTYPE_FLOAT16 && p->dtype != DELEAKER_DTYPE_BFLOAT16)
    return invalid("dtype must be DELEAKER_DTYPE_FLOAT16 (0) or DELEAKER_DTYPE_BFLOAT16 (1)");
  if (p->head_dim != 64 && p->head_dim != 128) return invalid("head_dim must be 64 or 128");
  static_assert(DELEAKER_MAX_BATCH == 65535 && DELEAKER_MAX_HEADS == 65535 && DELEAKER_MAX_IMAGE_TOKENS == 4194240,
                "the messages below name these limits");
  if (p->batch < 1 || p->batch > DELEAKER_MAX_BATCH) return invalid("batch must be in [1, 65535]");
  if (p->heads < 1 || p->heads > DELEAKER_MAX_HEADS) return invalid("heads must be in [1, 65535]");
  if (p->num_entities < 1 || p->num_entities > DELEAKER_MAX_ENTITIES) return invalid("num_entities must be in [1, 8]");
  if (p->text_tokens < 1 || p->text_tokens >= p->tokens) return invalid("text_tokens must be in [1, tokens)");
  if (p->grid_h < 1 || p->grid_w < 1 || (int64_t)p->grid_h * p->grid_w != (int64_t)p->tokens - p->text_tokens)
    return invalid("grid_h * grid_w must equal tokens - text_tokens");
  if ((int64_t)p->grid_h * p->grid_w > DELEAKER_MAX_IMAGE_TOKENS)
    return invalid("grid_h * grid_w must be at most 4194240");
  if (p->num_blocks < 1 || p->block_offset < 0) return invalid("num_blocks must be >= 1 and block_offset >= 0");
  if (!(p->fallback_threshold > 0.0f && p->fallback_threshold <= 1.0f))
    return invalid("fallback_threshold must be in (0, 1]");
  if (p->reserved != 0) return invalid("reserved must be 0");
  const int64_t strides[12] = {p->q_batch_stride, p->q_head_stride, p->q_row_stride, p->k_batch_stride,
                               p->k_head_stride,  p->k_row_stride,  p->v_batch_stride, p->v_head_stride,
                               p->v_row_stride,   p->o_batch_stride, p->o_head_stride, p->o_row_stride};
  for (int64_t s : strides)
    if (s < 0 || s % 8 != 0) return invalid("strides must be >= 0 and multiples of 8 elements (16-byte rows)");
  if (p->lse_batch_stride < 0 || p->lse_head_stride < 0) return invalid("lse strides must be >= 0");
  const DeLeakerWorkspaceLayout layout = deleaker_workspace_layout(p);
  if (workspace_bytes < layout.total_bytes)
    return invalid("workspace is smaller than deleaker_attention_workspace_bytes()");
  if (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0)
    return invalid("workspace must be a 256-byte aligned device pointer");
  return 0;
}

Workspace workspace_views(void* base, const DeLeakerWorkspaceLayout& w) {
  unsigned char* at = static_cast<unsigned char*>(base);
  Workspace ws;
  ws.entity_tokens = reinterpret_cast<int32_t*>(at + w.entity_tokens);
  ws.entity_token_bits = at + w.entity_token_bits;
  ws.entity_token_count = reinterpret_cast<int32_t*>(at + w.entity_token_count);
  ws.head_affinity = reinterpret_cast<float*>(at + w.head_affinity);
  ws.affinity = reinterpret_cast<float*>(at + w.affinity);
  ws.source = reinterpret_cast<float*>(at + w.source);
  ws.raw_masks = at + w.raw_masks;
  ws.masks = at + w.masks;
  ws.scratch = at + w.scratch;
  ws.mask_counts = reinterpret_cast<int32_t*>(at + w.mask_counts);
  ws.row_entities = at + w.row_entities;
  ws.union_count = reinterpret_cast<int32_t*>(at + w.union_count);
  ws.union_index = reinterpret_cast<int32_t*>(at + w.union_index);
  ws.pair_partials = reinterpret_cast<double*>(at + w.pair_partials);
  ws.thresholds = reinterpret_cast<float*>(at + w.thresholds);
  ws.cut_bits = reinterpret_cast<uint64_t*>(at + w.cut_bits);
  ws.cut_tiles = reinterpret_cast<int32_t*>(at + w.cut_tiles);
  ws.pbar_tiles = reinterpret_cast<float*>(at + w.pbar_tiles);
  ws.z = reinterpret_cast<float*>(at + w.z);
  ws.fallback_rows = reinterpret_cast<int32_t*>(at + w.fallback_rows);
  ws.fallback_counts = reinterpret_cast<int32_t*>(at + w.fallback_counts);
  ws.fallback_count = reinterpret_cast<int32_t*>(at + w.fallback_count);
  ws.affinity_arrivals = reinterpret_cast<int32_t*>(at + w.affinity_arrivals);
  ws.union_largest = reinterpret_cast<int32_t*>(at + w.union_largest);
  ws.band_rows = (int)w.band_rows;
  ws.bands = (int)w.bands;
  ws.tiles = (int)w.tiles;
  ws.stored_tiles = (int)w.stored_tiles;
  return ws;
}

// ---- init: shared-memory limits and the SM count, per device, once ----------------------------------------

constexpr int kMaxDevices = 64;
std::mutex g_init_mutex;
std::atomic<int> g_sm_count[kMaxDevices];  // 0 until deleaker_init() ran on that device
std::atomic<bool> g_dependent_launch[kMaxDevices];  // sm_90+: programmatic dependent launch (set before g_sm_count)

// What the launcher needs of the current device, read once by deleaker_init().
struct DeviceInfo {
  int sms;
  bool dependent_launch;
};

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename Elem, int D>
constexpr int max_smem() {
  constexpr int sizes[] = {AffinitySmem<Elem, D>::kBytes, RegionSmem<Elem, D>::kBytes,
                           CorrectionSmem<Elem, D>::kBytes, FallbackSmem<Elem, D>::kBytes};
  int most = 0;
  for (int s : sizes) most = s > most ? s : most;
  return most;
}

template <typename Elem, int D>
cudaError_t allow_smem_all() {
  cudaError_t err = cudaSuccess;
  if (err == cudaSuccess) err = allow_smem(affinity_kernel<Elem, D>, AffinitySmem<Elem, D>::kBytes);
  if (err == cudaSuccess) err = allow_smem(region_stats_kernel<Elem, D>, RegionSmem<Elem, D>::kBytes);
  if (err == cudaSuccess) err = allow_smem(cut_kernel<Elem, D>, CutSmem<Elem, D>::kBytes);
  if (err == cudaSuccess) err = allow_smem(correction_kernel<Elem, D>, CorrectionSmem<Elem, D>::kBytes);
  if (err == cudaSuccess) err = allow_smem(fallback_kernel<Elem, D>, FallbackSmem<Elem, D>::kBytes);
  return err;
}

int init_current_device() {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return (int)err;
  if (device < 0 || device >= kMaxDevices) return fail(DELEAKER_ERROR_UNSUPPORTED_DEVICE, "device index above 63");
  std::lock_guard<std::mutex> lock(g_init_mutex);
  if (g_sm_count[device].load(std::memory_order_acquire) > 0) return 0;
  int smem_limit = 0, sms = 0, major = 0;
  err = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return (int)err;
  const int needed = max_smem<__half, 128>();  // the largest instantiation (bf16 is the same size)
  if (smem_limit < needed || sms < 1)
    return fail(DELEAKER_ERROR_UNSUPPORTED_DEVICE, "the device has too little shared memory per block (needs sm_80+)");
  if (err == cudaSuccess) err = allow_smem_all<__half, 64>();
  if (err == cudaSuccess) err = allow_smem_all<__half, 128>();
  if (err == cudaSuccess) err = allow_smem_all<__nv_bfloat16, 64>();
  if (err == cudaSuccess) err = allow_smem_all<__nv_bfloat16, 128>();
  if (err != cudaSuccess) return (int)err;
  // DELEAKER_DEPENDENT_LAUNCH=0 turns dependent launches off (read here, once per device): a per-kernel profile
  // then times each kernel alone, without the span its blocks wait for the previous one.
  const char* dependent = std::getenv("DELEAKER_DEPENDENT_LAUNCH");
  const bool allowed = dependent == nullptr || std::strcmp(dependent, "0") != 0;
  g_dependent_launch[device].store(major >= 9 && allowed, std::memory_order_relaxed);
  g_sm_count[device].store(sms, std::memory_order_release);
  return 0;
}

// ---- launches ------------------------------------------------------------------------------------------------

// One kernel launch; its own return code is the launch's error (nothing is read from the sticky error state).
// `after_previous`: the launch may begin while the previous kernel of the stream still runs (programmatic stream
// serialization, sm_90+); every kernel's first statement waits for that kernel (wait_for_previous_kernel), so only
// the launch latency and the block prologue overlap. Never on the call's first launch: the caller's attention,
// which wrote out and lse, keeps an ordinary boundary.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                   bool after_previous, Args&&... args) {
  cudaLaunchAttribute attribute[1] = {};
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3((unsigned)threads);
  config.dynamicSmemBytes = (size_t)smem_bytes;
  config.stream = stream;
  config.attrs = after_previous ? attribute : nullptr;
  config.numAttrs = after_previous ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

#define DELEAKER_TRY(...)                   \
  do {                                      \
    const cudaError_t err_ = (__VA_ARGS__); \
    if (err_ != cudaSuccess) return err_;   \
  } while (0)

// Blocks of a persistent grid over `items` at most: `per_sm` blocks on each SM (what their shared memory and
// registers let reside together), never more blocks than items.
unsigned persistent_blocks(int sms, int per_sm, uint64_t items) {
  const uint64_t blocks = (uint64_t)sms * (uint64_t)per_sm;
  return (unsigned)(items < blocks ? (items > 0 ? items : 1) : blocks);
}

// The launches of one call, in stream order. Grids: the per-head affinity one block per (row tile, head, sample);
// the small kernels a block per entity row, sample or region pair; the image-image statistics and the band kernels
// (cut bits, correction, fallback) persistent grids of a few blocks per SM whose blocks stride over the work the
// device built (U's tiles, from union_largest): no grid sized for a union of every image token.
template <typename Elem, int D>
cudaError_t run(const DeLeakerParams& p, const Workspace& ws, const DeviceInfo& device, cudaStream_t stream) {
  const unsigned B = (unsigned)p.batch, H = (unsigned)p.heads, E = (unsigned)p.num_entities;
  const uint64_t tiles = (uint64_t)ws.tiles, band_tiles = (uint64_t)(ws.band_rows / kTile);
  const int sms = device.sms;
  const bool device_step = p.step != nullptr;
  const Window host = window_at(p, 0);
  const bool affinity = device_step || host.need_affinity;
  const bool intervene = device_step || host.intervene;
  const bool image_image = p.do_image_image != 0;
  bool after = false;  // the call's first launch waits for the caller's work in the ordinary way
  const auto next = [&]() {
    const bool dependent = after && device.dependent_launch;
    after = true;
    return dependent;
  };

  if (affinity || intervene)
    DELEAKER_TRY(launch(entity_tokens_kernel, dim3(1), kTokenThreads, 0, stream, next(), p, ws));
  if (affinity)
    DELEAKER_TRY(launch(affinity_kernel<Elem, D>, dim3((unsigned)tiles, H, B), kThreads, AffinitySmem<Elem, D>::kBytes,
                        stream, next(), p, ws));
  DELEAKER_TRY(launch(mask_kernel, dim3(E, B), kMaskThreads, 0, stream, next(), p, ws));
  if (!intervene) return cudaSuccess;
  DELEAKER_TRY(launch(union_kernel, dim3(B), kUnionThreads, 0, stream, next(), p, ws));
  if (image_image) {
    // |U| is only known on the device: blocks stride over the fixed slots.
    const unsigned slot_blocks = (unsigned)(2 * sms < DELEAKER_REGION_SLOTS ? 2 * sms : DELEAKER_REGION_SLOTS);
    DELEAKER_TRY(launch(region_stats_kernel<Elem, D>, dim3(slot_blocks, B), kThreads, RegionSmem<Elem, D>::kBytes,
                        stream, next(), p, ws));
    DELEAKER_TRY(launch(threshold_kernel, dim3(E * E, B), kThresholdThreads, 0, stream, next(), p, ws));
  }
  // The most items a band can have (every image token in U): a bound for the persistent grids only.
  const uint64_t band_items = band_tiles * (uint64_t)H * B;
  const unsigned cut_blocks = persistent_blocks(sms, kCutBlocksPerSm, band_tiles * tiles * B);
  const unsigned correction_blocks = persistent_blocks(sms, kCorrectionBlocksPerSm, band_items);
  const unsigned fallback_blocks = persistent_blocks(sms, kFallbackBlocksPerSm, band_items);
  for (int band = 0; band < ws.bands; ++band) {
    if (image_image)
      DELEAKER_TRY(launch(cut_kernel<Elem, D>, dim3(cut_blocks), kThreads, CutSmem<Elem, D>::kBytes, stream, next(), p,
                          ws, band));
    DELEAKER_TRY(launch(correction_kernel<Elem, D>, dim3(correction_blocks), kThreads,
                        CorrectionSmem<Elem, D>::kBytes, stream, next(), p, ws, band));
    DELEAKER_TRY(
        launch(fallback_list_kernel, dim3(H, B), kFallbackListThreads, 0, stream, next(), p, ws, band));
    DELEAKER_TRY(launch(fallback_kernel<Elem, D>, dim3(fallback_blocks), kThreads, FallbackSmem<Elem, D>::kBytes,
                        stream, next(), p, ws, band));
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace deleaker

extern "C" {

int deleaker_abi_version(void) { return DELEAKER_ABI_VERSION; }

int deleaker_init(void) {
  deleaker::g_last_error[0] = '\0';
  return deleaker::init_current_device();
}

size_t deleaker_attention_workspace_bytes(const DeLeakerParams* p) {
  return p == nullptr ? 0 : (size_t)deleaker_workspace_layout(p).total_bytes;
}

int deleaker_attention_workspace_layout(const DeLeakerParams* p, DeLeakerWorkspaceLayout* layout) {
  if (p == nullptr || layout == nullptr) return deleaker::invalid("params and layout must not be NULL");
  *layout = deleaker_workspace_layout(p);
  return 0;
}

const char* deleaker_error_string(int code) {
  if (code < 0) {
    if (deleaker::g_last_error[0] != '\0') return deleaker::g_last_error;
    switch (code) {
      case DELEAKER_ERROR_INVALID_ARGUMENT: return "invalid argument";
      case DELEAKER_ERROR_NOT_INITIALIZED: return "deleaker_init() was not called on this device";
      case DELEAKER_ERROR_UNSUPPORTED_DEVICE: return "unsupported device";
      default: return "unknown DeLeaker error";
    }
  }
  return cudaGetErrorString((cudaError_t)code);
}

int deleaker_attention_launch(const DeLeakerParams* params, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  deleaker::g_last_error[0] = '\0';
  const int bad = deleaker::check(params, workspace, workspace_bytes);
  if (bad != 0) return bad;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return (int)err;
  const int sms = device >= 0 && device < deleaker::kMaxDevices
                      ? deleaker::g_sm_count[device].load(std::memory_order_acquire)
                      : 0;
  const deleaker::DeviceInfo info{sms, sms > 0 && deleaker::g_dependent_launch[device].load(std::memory_order_relaxed)};
  if (sms == 0)
    return deleaker::fail(DELEAKER_ERROR_NOT_INITIALIZED,
                          "deleaker_init() was not called for the current device (call it once, outside stream "
                          "capture, before the first launch)");
  const DeLeakerWorkspaceLayout layout = deleaker_workspace_layout(params);
  const deleaker::Workspace ws = deleaker::workspace_views(workspace, layout);
  const bool bf16 = params->dtype == DELEAKER_DTYPE_BFLOAT16;
  cudaError_t result;
  if (params->head_dim == 64) {
    result = bf16 ? deleaker::run<__nv_bfloat16, 64>(*params, ws, info, stream)
                  : deleaker::run<__half, 64>(*params, ws, info, stream);
  } else {
    result = bf16 ? deleaker::run<__nv_bfloat16, 128>(*params, ws, info, stream)
                  : deleaker::run<__half, 128>(*params, ws, info, stream);
  }
  return (int)result;
}

}  // extern "C"
