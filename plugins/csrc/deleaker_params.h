// DeLeaker attention: the one host-to-kernel interface (DELEAKER_SPEC.md, "Per call").
//
// Plain C: usable from C++ (and ctypes) without CUDA headers. The Python mirror of these structs lives in
// plugins/kernels.py (one field list), and tests/test_cuda_compile.py checks both layouts against this header.
#ifndef DELEAKER_PARAMS_H_
#define DELEAKER_PARAMS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DELEAKER_DTYPE_FLOAT16 = 0, DELEAKER_DTYPE_BFLOAT16 = 1 };

//! Most entity rows the kernels take (E_max); rows are bits of one byte.
enum { DELEAKER_MAX_ENTITIES = 8 };

typedef struct DeLeakerParams {
  // Device tensors. q, k, v, out: (B, H, N, D), text tokens first, last dimension contiguous.
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const uint8_t* entity_mask;  // (E_max, T) contiguous bytes, 0 or 1
  const float* history_in;     // (B, E_max, Nimg) contiguous float32, or NULL (zeros); may alias history_out
  float* history_out;          // (B, E_max, Nimg) contiguous float32
  const int64_t* step;         // device int64 scalar (denoising step), or NULL for step 0

  // Strides in elements (not bytes) of q, k, v, out.
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;

  // Sizes. tokens = N = text_tokens + grid_h * grid_w.
  int32_t batch, heads, tokens, text_tokens, head_dim, grid_h, grid_w, num_entities;
  int32_t dtype;  // DELEAKER_DTYPE_*

  // Block step on the device: t = (*step) * num_blocks + block_offset.
  int32_t block_offset, num_blocks;

  // Knobs (DeLeakerConfig). softmax_scale is 1 / sqrt(head_dim) as float32.
  float softmax_scale, std_mul_text, std_mul_image_image, k_strength;
  int64_t start_aggregating_from, stop_aggregating_at, start_intervention_from, stop_intervention_at;
  int32_t use_history, do_smoothing, do_image_image, do_image_text_strengthening, do_image_text_weakening;
  int32_t reserved;  // keeps the size a multiple of 8 on every ABI; must be 0
} DeLeakerParams;

//! Byte offsets of the workspace's parts (the debug views of the tests read them). Every offset is 256-aligned.
typedef struct DeLeakerWorkspaceLayout {
  uint64_t lse;            // float (B, H, Nimg): pre-intervention row log-sum-exp of image-query rows
  uint64_t head_affinity;  // float (B, H, E_max, Nimg): per head, sum_{t in T_e} p[h, T+i, t]
  uint64_t affinity;       // float (B, E_max, Nimg): c_e[i] of this block (step 2)
  uint64_t source;         // float (B, E_max, Nimg): the map thresholded in step 5
  uint64_t raw_masks;      // uint8 (B, E_max, Nimg): thresholded, before morphology
  uint64_t masks;          // uint8 (B, E_max, Nimg): M_e (after morphology when do_smoothing)
  uint64_t scratch;        // uint8 (2, B, E_max, Nimg): morphology ping-pong
  uint64_t row_entities;   // uint8 (B, Nimg): bit e set iff i in M_e
  uint64_t mask_counts;    // int32 (B, E_max): |M_e|
  uint64_t union_count;    // int32 (B): |U|, U = union of the M_e
  uint64_t union_index;    // int32 (B, Nimg): the image tokens of U, ascending
  uint64_t pair_stats;     // double (B, E_max, E_max, 2): sum and sum of squares of pbar over M_e x M_f
  uint64_t cut_bits;       // uint32 (B, Nimg, cut_words): bit j of row i set iff logit (T+i, T+j) is cut
  uint64_t cut_words;      // 32-bit words per row of cut_bits: ceil(Nimg / 32)
  uint64_t total_bytes;    // workspace size
} DeLeakerWorkspaceLayout;

// The layout is plain arithmetic, shared by the launcher and any C++ host code.
static inline uint64_t deleaker_align256(uint64_t x) { return (x + 255u) & ~(uint64_t)255u; }

static inline DeLeakerWorkspaceLayout deleaker_workspace_layout(const DeLeakerParams* p) {
  DeLeakerWorkspaceLayout w;
  const uint64_t b = (uint64_t)(p->batch > 0 ? p->batch : 0);
  const uint64_t h = (uint64_t)(p->heads > 0 ? p->heads : 0);
  const uint64_t e = (uint64_t)(p->num_entities > 0 ? p->num_entities : 0);
  const uint64_t n = (uint64_t)(p->grid_h > 0 && p->grid_w > 0 ? (int64_t)p->grid_h * p->grid_w : 0);
  uint64_t at = 0;
  w.lse = at;           at = deleaker_align256(at + b * h * n * 4);
  w.head_affinity = at; at = deleaker_align256(at + b * h * e * n * 4);
  w.affinity = at;      at = deleaker_align256(at + b * e * n * 4);
  w.source = at;        at = deleaker_align256(at + b * e * n * 4);
  w.raw_masks = at;     at = deleaker_align256(at + b * e * n);
  w.masks = at;         at = deleaker_align256(at + b * e * n);
  w.scratch = at;       at = deleaker_align256(at + 2 * b * e * n);
  w.row_entities = at;  at = deleaker_align256(at + b * n);
  w.mask_counts = at;   at = deleaker_align256(at + b * e * 4);
  w.union_count = at;   at = deleaker_align256(at + b * 4);
  w.union_index = at;   at = deleaker_align256(at + b * n * 4);
  w.pair_stats = at;    at = deleaker_align256(at + b * e * e * 2 * 8);
  w.cut_words = (n + 31) / 32;
  w.cut_bits = at;      at = deleaker_align256(at + b * n * w.cut_words * 4);
  w.total_bytes = at;
  return w;
}

// ---- the library's entry points (deleaker_attention.cu); cudaStream_t is `struct CUstream_st*` --------------
struct CUstream_st;

//! Bumped whenever DeLeakerParams, DeLeakerWorkspaceLayout or these functions change.
int deleaker_abi_version(void);
//! Device workspace the launch needs (256-byte aligned, no initialisation needed).
size_t deleaker_attention_workspace_bytes(const DeLeakerParams* params);
//! Fills `layout` (the parts of the workspace); 0 on success.
int deleaker_attention_workspace_layout(const DeLeakerParams* params, DeLeakerWorkspaceLayout* layout);
//! Enqueues one DeLeaker attention on `stream`. Returns 0 or a cudaError_t code (cudaErrorInvalidValue = 1 for
//! bad arguments: deleaker_error_string() names the argument). Never synchronises; capturable in a CUDA graph
//! after a first call on the device (which raises the kernels' shared-memory limits).
int deleaker_attention_launch(const DeLeakerParams* params, void* workspace, size_t workspace_bytes,
                              struct CUstream_st* stream);
//! The reason of this thread's last argument error, or the CUDA error string of `code`.
const char* deleaker_error_string(int code);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // DELEAKER_PARAMS_H_
