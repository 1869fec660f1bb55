// DeLeaker attention: argument checks, dtype / head-dim dispatch and the extern "C" launcher.
//
// Per call, all on one stream and without any host synchronisation (the block step is read on the device):
//   memset of the cut bitmask (when do_image_image)
//   (a) stats_kernel   row log-sum-exp and per-head entity affinities of image-query rows
//   (b) mask_kernel    history update, thresholded and smoothed entity masks, their union U
//   (c) region_kernel  x2: image-image statistics over M_e x M_f, then the cut bitmask
//   (d) flash_kernel   attention with the edits applied on the fly
// Outside the windows the first kernels return at once and (d) is plain attention.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>

#include "deleaker_common.cuh"
#include "deleaker_flash.cuh"
#include "deleaker_masks.cuh"
#include "deleaker_params.h"
#include "deleaker_regions.cuh"
#include "deleaker_stats.cuh"

namespace deleaker {
namespace {

// The reason of the last argument error of this thread (errors are otherwise plain cudaError_t codes).
thread_local char g_last_error[512] = "";

cudaError_t invalid(const char* what) {
  std::snprintf(g_last_error, sizeof(g_last_error), "%s", what);
  return cudaErrorInvalidValue;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

cudaError_t check(const DeLeakerParams* p, const void* workspace, size_t workspace_bytes) {
  if (p == nullptr) return invalid("params is NULL");
  if (!p->q || !p->k || !p->v || !p->out) return invalid("q, k, v and out must be device pointers, got NULL");
  if (!p->entity_mask) return invalid("entity_mask is NULL");
  if (!p->history_out) return invalid("history_out is NULL");
  if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->out))
    return invalid("q, k, v and out must be 16-byte aligned");
  if (p->dtype != DELEAKER_DTYPE_FLOAT16 && p->dtype != DELEAKER_DTYPE_BFLOAT16)
    return invalid("dtype must be DELEAKER_DTYPE_FLOAT16 (0) or DELEAKER_DTYPE_BFLOAT16 (1)");
  if (p->head_dim != 64 && p->head_dim != 128) return invalid("head_dim must be 64 or 128");
  if (p->batch < 1 || p->batch > 65535) return invalid("batch must be in [1, 65535]");
  if (p->heads < 1 || p->heads > 65535) return invalid("heads must be in [1, 65535]");
  if (p->num_entities < 1 || p->num_entities > DELEAKER_MAX_ENTITIES) return invalid("num_entities must be in [1, 8]");
  if (p->text_tokens < 1 || p->text_tokens >= p->tokens) return invalid("text_tokens must be in [1, tokens)");
  if (p->grid_h < 1 || p->grid_w < 1 || (int64_t)p->grid_h * p->grid_w != (int64_t)p->tokens - p->text_tokens)
    return invalid("grid_h * grid_w must equal tokens - text_tokens");
  if (p->num_blocks < 1 || p->block_offset < 0) return invalid("num_blocks must be >= 1 and block_offset >= 0");
  if (p->reserved != 0) return invalid("reserved must be 0");
  const int64_t strides[12] = {p->q_batch_stride, p->q_head_stride, p->q_row_stride, p->k_batch_stride,
                               p->k_head_stride,  p->k_row_stride,  p->v_batch_stride, p->v_head_stride,
                               p->v_row_stride,   p->o_batch_stride, p->o_head_stride, p->o_row_stride};
  for (int64_t s : strides)
    if (s < 0 || s % 8 != 0) return invalid("strides must be >= 0 and multiples of 8 elements (16-byte rows)");
  const DeLeakerWorkspaceLayout layout = deleaker_workspace_layout(p);
  if (workspace_bytes < layout.total_bytes)
    return invalid("workspace is smaller than deleaker_attention_workspace_bytes()");
  if (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0)
    return invalid("workspace must be a 256-byte aligned device pointer");
  return cudaSuccess;
}

Workspace workspace_views(void* base, const DeLeakerWorkspaceLayout& w) {
  unsigned char* at = static_cast<unsigned char*>(base);
  Workspace ws;
  ws.lse = reinterpret_cast<float*>(at + w.lse);
  ws.head_affinity = reinterpret_cast<float*>(at + w.head_affinity);
  ws.affinity = reinterpret_cast<float*>(at + w.affinity);
  ws.source = reinterpret_cast<float*>(at + w.source);
  ws.raw_masks = at + w.raw_masks;
  ws.masks = at + w.masks;
  ws.scratch = at + w.scratch;
  ws.row_entities = at + w.row_entities;
  ws.mask_counts = reinterpret_cast<int32_t*>(at + w.mask_counts);
  ws.union_count = reinterpret_cast<int32_t*>(at + w.union_count);
  ws.union_index = reinterpret_cast<int32_t*>(at + w.union_index);
  ws.pair_stats = reinterpret_cast<double*>(at + w.pair_stats);
  ws.cut_bits = reinterpret_cast<uint32_t*>(at + w.cut_bits);
  ws.cut_words = (int64_t)w.cut_words;
  return ws;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes, int device_limit) {
  if (bytes > device_limit) return invalid("the device has too little shared memory per block (needs sm_80 or newer)");
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

#define DELEAKER_TRY(...)                 \
  do {                                    \
    const cudaError_t err_ = (__VA_ARGS__); \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

// Per device and instantiation, the kernels' shared-memory limits are raised once and the SM count read once:
// later calls (and CUDA graph captures after a first eager call) make no attribute calls at all.
constexpr int kMaxDevices = 64;

template <typename Elem, int D>
struct DeviceSetup {
  static std::atomic<int> sms[kMaxDevices];  // 0 until set up

  static cudaError_t get(int* sm_count) {
    int device = 0;
    DELEAKER_TRY(cudaGetDevice(&device));
    if (device >= 0 && device < kMaxDevices && sms[device].load(std::memory_order_acquire) > 0) {
      *sm_count = sms[device].load(std::memory_order_relaxed);
      return cudaSuccess;
    }
    int smem_limit = 0, count = 0;
    DELEAKER_TRY(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    DELEAKER_TRY(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    DELEAKER_TRY(allow_smem(stats_kernel<Elem, D>, StatsSmem<Elem, D>::kBytes, smem_limit));
    DELEAKER_TRY(allow_smem(region_kernel<Elem, D>, RegionSmem<Elem, D>::kBytes, smem_limit));
    DELEAKER_TRY(allow_smem(flash_kernel<Elem, D>, FlashSmem<Elem, D>::kBytes, smem_limit));
    if (device >= 0 && device < kMaxDevices) sms[device].store(count, std::memory_order_release);
    *sm_count = count;
    return cudaSuccess;
  }
};

template <typename Elem, int D>
std::atomic<int> DeviceSetup<Elem, D>::sms[kMaxDevices];

template <typename Elem, int D>
cudaError_t run(const DeLeakerParams& p, const Workspace& ws, const DeLeakerWorkspaceLayout& layout,
                cudaStream_t stream) {
  int sms = 0;
  DELEAKER_TRY(DeviceSetup<Elem, D>::get(&sms));
  constexpr int kStatsSmem = StatsSmem<Elem, D>::kBytes;
  constexpr int kRegionSmem = RegionSmem<Elem, D>::kBytes;
  constexpr int kFlashSmem = FlashSmem<Elem, D>::kBytes;

  const int n_img = p.grid_h * p.grid_w;
  const unsigned row_tiles = (unsigned)((n_img + kTileRows - 1) / kTileRows);
  // Without a device step the host knows the window and skips the launches that would return at once;
  // with one, every launch happens and the kernels decide on the device.
  const bool device_step = p.step != nullptr;
  const Window host = window_at(p, 0);
  const bool image_image = p.do_image_image != 0 && (device_step || host.intervene);
  if (image_image) {
    const size_t bytes = (size_t)p.batch * (size_t)n_img * (size_t)layout.cut_words * 4u;
    DELEAKER_TRY(cudaMemsetAsync(ws.cut_bits, 0, bytes, stream));
  }
  if (device_step || host.need_affinity || image_image)
    stats_kernel<Elem, D><<<dim3(row_tiles, p.heads, p.batch), kThreads, kStatsSmem, stream>>>(p, ws);
  mask_kernel<<<p.batch, kMaskThreads, 0, stream>>>(p, ws);
  if (image_image) {
    // |U| is only known on the device: enough blocks for the largest U, striding over the tiles of the real one.
    const int64_t max_tiles = (int64_t)row_tiles * row_tiles;
    const unsigned blocks = (unsigned)std::max<int64_t>(1, std::min<int64_t>(max_tiles, 4 * (int64_t)sms));
    region_kernel<Elem, D><<<dim3(blocks, p.batch), kThreads, kRegionSmem, stream>>>(p, ws, 0);
    region_kernel<Elem, D><<<dim3(blocks, p.batch), kThreads, kRegionSmem, stream>>>(p, ws, 1);
  }
  const unsigned query_tiles = (unsigned)((p.tokens + kTileRows - 1) / kTileRows);
  flash_kernel<Elem, D><<<dim3(query_tiles, p.heads, p.batch), kThreads, kFlashSmem, stream>>>(p, ws);
  return cudaGetLastError();
}

}  // namespace
}  // namespace deleaker

extern "C" {

int deleaker_abi_version(void) { return 1; }

size_t deleaker_attention_workspace_bytes(const DeLeakerParams* p) {
  return p == nullptr ? 0 : (size_t)deleaker_workspace_layout(p).total_bytes;
}

int deleaker_attention_workspace_layout(const DeLeakerParams* p, DeLeakerWorkspaceLayout* layout) {
  if (p == nullptr || layout == nullptr) return (int)deleaker::invalid("params and layout must not be NULL");
  *layout = deleaker_workspace_layout(p);
  return 0;
}

const char* deleaker_error_string(int code) {
  if (code == (int)cudaErrorInvalidValue && deleaker::g_last_error[0] != '\0') return deleaker::g_last_error;
  return cudaGetErrorString((cudaError_t)code);
}

int deleaker_attention_launch(const DeLeakerParams* params, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  deleaker::g_last_error[0] = '\0';
  const cudaError_t bad = deleaker::check(params, workspace, workspace_bytes);
  if (bad != cudaSuccess) return (int)bad;
  const DeLeakerWorkspaceLayout layout = deleaker_workspace_layout(params);
  const deleaker::Workspace ws = deleaker::workspace_views(workspace, layout);
  const bool bf16 = params->dtype == DELEAKER_DTYPE_BFLOAT16;
  cudaError_t err;
  if (params->head_dim == 64) {
    err = bf16 ? deleaker::run<__nv_bfloat16, 64>(*params, ws, layout, stream)
               : deleaker::run<__half, 64>(*params, ws, layout, stream);
  } else {
    err = bf16 ? deleaker::run<__nv_bfloat16, 128>(*params, ws, layout, stream)
               : deleaker::run<__half, 128>(*params, ws, layout, stream);
  }
  return (int)err;
}

}  // extern "C"
