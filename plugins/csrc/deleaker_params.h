// DeLeaker attention: the one host-to-kernel interface (DELEAKER_SPEC.md "Per call", FAST_PATH.md steps 2-6).
//
// Plain C: usable from C++ (and ctypes) without CUDA headers. The Python mirror of these structs lives in
// plugins/kernels.py (one field list), and tests/test_cuda_compile.py checks both layouts against this header.
//
// ABI version 5 (5: the workspace keeps the affinity kernel's per-tile arrival counters and the batch's largest |U|,
// affinity_arrivals and union_largest; 4: the workspace keeps the region tiles' pbar, DELEAKER_PBAR_TILES; 3: the workspace keeps four
// statistics per region pair, DELEAKER_PAIR_STATS; 2: the plain
// attention and its LSE come from the caller). The caller computes the plain attention first (any fused attention that returns the row
// log-sum-exp): `out` holds o = softmax(s) v of every row, `lse` the natural-log LSE of s = softmax_scale q k^T.
// The library then does only what DeLeaker adds and edits `out` in place, on the rows of the entity masks.
#ifndef DELEAKER_PARAMS_H_
#define DELEAKER_PARAMS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DELEAKER_ABI_VERSION = 5 };

enum { DELEAKER_DTYPE_FLOAT16 = 0, DELEAKER_DTYPE_BFLOAT16 = 1 };

//! Most entity rows the kernels take (E_max); rows are bits of one byte.
enum { DELEAKER_MAX_ENTITIES = 8 };

//! Largest sizes the kernels' launch grids take: batch and heads are grid dimensions (65535 at most), image rows
//! run in at most 65535 tiles of 64. Checked at launch (deleaker_attention.cu) and, earlier, by every host.
enum { DELEAKER_MAX_BATCH = 65535, DELEAKER_MAX_HEADS = 65535, DELEAKER_MAX_IMAGE_TOKENS = 65535 * 64 };

//! The library's own error codes: negative, so never a cudaError_t (the launches' own codes are passed through).
enum {
  DELEAKER_ERROR_INVALID_ARGUMENT = -1,  //!< a bad argument; deleaker_error_string() names it
  DELEAKER_ERROR_NOT_INITIALIZED = -2,   //!< deleaker_init() was not called for the current device
  DELEAKER_ERROR_UNSUPPORTED_DEVICE = -3 //!< the device cannot run the kernels (shared memory, device index)
};

//! Image-image statistics are summed into this many fixed partial slots (a fixed-order reduction: the result does
//! not depend on the grid size or on the order in which blocks run).
enum { DELEAKER_REGION_SLOTS = 256 };
//! Statistics of each region pair per slot: sum and sum of squares of pbar, and its least and largest value (a
//! region whose values are all equal has std exactly 0, which the two sums alone cannot tell after rounding).
enum { DELEAKER_PAIR_STATS = 4 };

//! The union U of the masks is corrected in bands of at most this many rows (a multiple of 64): the cut bits of
//! one band, U rows x U columns, are the workspace's only quadratic part, so it stays O(tokens). A compile-time
//! knob (the tests build the emulated library with a small band to exercise several bands); the library and any
//! host code must agree on it, so host code should ask the library (deleaker_attention_workspace_layout).
#ifndef DELEAKER_BAND_ROWS
#define DELEAKER_BAND_ROWS 4096
#endif

//! The statistics pass keeps the pbar values (float) of at most this many 64 x 64 tiles of U x U per sample (the
//! first ones in tile order: 16 MiB per sample at 1024), and the cut bits read them back instead of computing Q K^T
//! again; a tile beyond them is recomputed (the same function, so the same bits). 1024 tiles hold every region tile
//! of a union up to 2048 rows (50% of a 1024x1024 image). A compile-time knob like DELEAKER_BAND_ROWS (the tests
//! build the emulated library with a small one to exercise the recompute); host code should ask the library.
#ifndef DELEAKER_PBAR_TILES
#define DELEAKER_PBAR_TILES 1024
#endif

typedef struct DeLeakerParams {
  // Device tensors. q, k, v, out: (B, H, N, D), text tokens first, last dimension contiguous, 16-byte rows.
  const void* q;
  const void* k;
  const void* v;
  void* out;                   // in: the plain attention output o (every row); out: o with the edited rows
  const float* lse;            // natural-log row LSE of s; element (b, h, n) at b * lse_batch_stride +
                               // h * lse_head_stride + n (rows contiguous; rows T..N-1 are read)
  const uint8_t* entity_mask;  // (E_max, T) contiguous bytes, 0 or 1
  const float* history_in;     // (B, E_max, Nimg) contiguous float32, or NULL (zeros); may alias history_out
  float* history_out;          // (B, E_max, Nimg) contiguous float32
  const int64_t* step;         // device int64 scalar (denoising step), or NULL for step 0

  // Strides in elements (not bytes) of q, k, v, out, lse.
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t lse_batch_stride, lse_head_stride;

  // Sizes. tokens = N = text_tokens + grid_h * grid_w.
  int32_t batch, heads, tokens, text_tokens, head_dim, grid_h, grid_w, num_entities;
  int32_t dtype;  // DELEAKER_DTYPE_*

  // Block step on the device: t = (*step) * num_blocks + block_offset.
  int32_t block_offset, num_blocks;

  // Knobs (DeLeakerConfig). softmax_scale is 1 / sqrt(head_dim) as float32. Rows whose normaliser Z is below
  // fallback_threshold (in (0, 1]; 0.5: at most 2x the plain output's rounding) or not finite are recomputed
  // exactly.
  float softmax_scale, std_mul_text, std_mul_image_image, k_strength, fallback_threshold;
  int64_t start_aggregating_from, stop_aggregating_at, start_intervention_from, stop_intervention_at;
  int32_t use_history, do_smoothing, do_image_image, do_image_text_strengthening, do_image_text_weakening;
  int32_t reserved;  // keeps the size a multiple of 8 on every ABI; must be 0
} DeLeakerParams;

//! Byte offsets of the workspace's parts (the tests' debug views read them; every offset is 256-aligned), and
//! four counts. Nimg = grid_h * grid_w, E = num_entities (E_max), tiles = ceil(Nimg / 64).
typedef struct DeLeakerWorkspaceLayout {
  uint64_t entity_tokens;       // int32 (T): the text tokens of any entity, ascending
  uint64_t entity_token_bits;   // uint8 (T): bit e set iff that token is in T_e
  uint64_t entity_token_count;  // int32: entries of the two lists above
  uint64_t head_affinity;       // float (B, H, E, Nimg): per head, sum_{t in T_e} p[h, T+i, t]
  uint64_t affinity;            // float (B, E, Nimg): c_e[i] of this block (step 2), the head mean the affinity
                                //   kernel's last block per row tile takes
  uint64_t source;              // float (B, E, Nimg): the map thresholded in step 5
  uint64_t raw_masks;           // uint8 (B, E, Nimg): thresholded, before morphology
  uint64_t masks;               // uint8 (B, E, Nimg): M_e (after morphology when do_smoothing)
  uint64_t scratch;             // uint8 (2, B, E, Nimg): morphology ping-pong
  uint64_t mask_counts;         // int32 (B, E): |M_e|
  uint64_t row_entities;        // uint8 (B, Nimg): bit e set iff image token i is in M_e
  uint64_t union_count;         // int32 (B): |U|, U = union of the M_e
  uint64_t union_index;         // int32 (B, Nimg): every image token, U first (grouped by row_entities, ascending
                                //   within a group), then the others ascending
  uint64_t pair_partials;       // double (B, DELEAKER_REGION_SLOTS, E, E, DELEAKER_PAIR_STATS): sum, sum of
                                //   squares, least and largest value of pbar
  uint64_t thresholds;          // float (B, E, E): threshold of region M_e x M_f, NaN where the pair cuts nothing
  uint64_t cut_bits;            // uint64 (B, band_rows, tiles): bit c of word (u, w) set iff logit (U[u],
                                //   U[64 w + c]) is cut, for the rows of the last band (u - band start)
  uint64_t cut_tiles;           // int32 (B, band_rows / 64, tiles): 1 iff that 64x64 tile of cut_bits has a cut
  uint64_t pbar_tiles;          // float (B, stored_tiles, 32, 128): pbar of U x U tile t (t = row tile * ceil(|U| /
                                //   64) + column tile, t < stored_tiles) as the statistics saw it, in the order its
                                //   threads hold it (cell i of thread x at [i][x], CellOwner); only region tiles
  uint64_t z;                   // float (B, H, Nimg): Z of the rows in U (NaN where the corrected row is not
                                //   finite); other rows are not written
  uint64_t fallback_rows;       // int32 (B, H, Nimg): per (b, h) and band, the U positions u of the rows
                                //   recomputed exactly, ascending, from u = band * band_rows
  uint64_t fallback_counts;     // int32 (B, H, bands): entries of each list
  uint64_t fallback_count;      // int32: rows recomputed exactly, summed over B, H and bands
  uint64_t affinity_arrivals;   // int32 (B, tiles): heads of a row tile done (the last one takes the head mean);
                                //   zeroed by entity_tokens_kernel each call
  uint64_t union_largest;       // int32: the largest |U| over the batch (sizes the band kernels' work lists);
                                //   zeroed by mask_kernel each call
  uint64_t band_rows;           // rows of U per band: min(DELEAKER_BAND_ROWS, 64 * tiles)
  uint64_t bands;               // ceil(Nimg / band_rows)
  uint64_t tiles;               // ceil(Nimg / 64)
  uint64_t stored_tiles;        // min(tiles^2, DELEAKER_PBAR_TILES): pbar tiles kept per sample
  uint64_t total_bytes;         // workspace size
} DeLeakerWorkspaceLayout;

// The layout is plain arithmetic, shared by the launcher and any C++ host code.
static inline uint64_t deleaker_align256(uint64_t x) { return (x + 255u) & ~(uint64_t)255u; }

static inline DeLeakerWorkspaceLayout deleaker_workspace_layout(const DeLeakerParams* p) {
  DeLeakerWorkspaceLayout w;
  const uint64_t b = (uint64_t)(p->batch > 0 ? p->batch : 0);
  const uint64_t h = (uint64_t)(p->heads > 0 ? p->heads : 0);
  const uint64_t e = (uint64_t)(p->num_entities > 0 ? p->num_entities : 0);
  const uint64_t t = (uint64_t)(p->text_tokens > 0 ? p->text_tokens : 0);
  const uint64_t n = (uint64_t)(p->grid_h > 0 && p->grid_w > 0 ? (int64_t)p->grid_h * p->grid_w : 0);
  w.tiles = (n + 63) / 64;
  w.band_rows = 64 * w.tiles < (uint64_t)DELEAKER_BAND_ROWS ? 64 * w.tiles : (uint64_t)DELEAKER_BAND_ROWS;
  w.bands = w.band_rows > 0 ? (n + w.band_rows - 1) / w.band_rows : 0;
  w.stored_tiles = w.tiles * w.tiles < (uint64_t)DELEAKER_PBAR_TILES ? w.tiles * w.tiles : (uint64_t)DELEAKER_PBAR_TILES;
  uint64_t at = 0;
  w.entity_tokens = at;      at = deleaker_align256(at + t * 4);
  w.entity_token_bits = at;  at = deleaker_align256(at + t);
  w.entity_token_count = at; at = deleaker_align256(at + 4);
  w.head_affinity = at;      at = deleaker_align256(at + b * h * e * n * 4);
  w.affinity = at;           at = deleaker_align256(at + b * e * n * 4);
  w.source = at;             at = deleaker_align256(at + b * e * n * 4);
  w.raw_masks = at;          at = deleaker_align256(at + b * e * n);
  w.masks = at;              at = deleaker_align256(at + b * e * n);
  w.scratch = at;            at = deleaker_align256(at + 2 * b * e * n);
  w.mask_counts = at;        at = deleaker_align256(at + b * e * 4);
  w.row_entities = at;       at = deleaker_align256(at + b * n);
  w.union_count = at;        at = deleaker_align256(at + b * 4);
  w.union_index = at;        at = deleaker_align256(at + b * n * 4);
  w.pair_partials = at;      at = deleaker_align256(at + b * (uint64_t)DELEAKER_REGION_SLOTS * e * e * DELEAKER_PAIR_STATS * 8);
  w.thresholds = at;         at = deleaker_align256(at + b * e * e * 4);
  w.cut_bits = at;           at = deleaker_align256(at + b * w.band_rows * w.tiles * 8);
  w.cut_tiles = at;          at = deleaker_align256(at + b * (w.band_rows / 64) * w.tiles * 4);
  w.pbar_tiles = at;         at = deleaker_align256(at + b * w.stored_tiles * 64 * 64 * 4);
  w.z = at;                  at = deleaker_align256(at + b * h * n * 4);
  w.fallback_rows = at;      at = deleaker_align256(at + b * h * n * 4);
  w.fallback_counts = at;    at = deleaker_align256(at + b * h * w.bands * 4);
  w.fallback_count = at;     at = deleaker_align256(at + 4);
  w.affinity_arrivals = at;  at = deleaker_align256(at + b * w.tiles * 4);
  w.union_largest = at;      at = deleaker_align256(at + 4);
  w.total_bytes = at;
  return w;
}

// ---- the library's entry points (deleaker_attention.cu); cudaStream_t is `struct CUstream_st*` --------------
struct CUstream_st;

//! DELEAKER_ABI_VERSION of the library: bumped whenever the structs above or these functions change.
int deleaker_abi_version(void);
//! Once per device, outside any stream capture: raises the kernels' shared-memory limits and reads the SM count
//! of the CURRENT device. 0, a DELEAKER_ERROR_* code or a CUDA error code. Idempotent and thread-safe.
int deleaker_init(void);
//! Device workspace the launch needs (256-byte aligned, no initialisation needed); depends only on sizes.
size_t deleaker_attention_workspace_bytes(const DeLeakerParams* params);
//! Fills `layout` (the parts of the workspace); 0 or DELEAKER_ERROR_INVALID_ARGUMENT.
int deleaker_attention_workspace_layout(const DeLeakerParams* params, DeLeakerWorkspaceLayout* layout);
//! Enqueues one DeLeaker correction on `stream`. Preconditions: params->out holds the plain attention output
//! o = softmax(s) v of every row (input dtype) and params->lse the natural-log row LSE of s (float32). Edits out
//! in place (rows in the entity masks only) and writes history_out. Never synchronises, never allocates;
//! capturable in a CUDA graph after deleaker_init(). Returns 0, DELEAKER_ERROR_INVALID_ARGUMENT /
//! DELEAKER_ERROR_NOT_INITIALIZED (deleaker_error_string() says why), or the CUDA error code of one of the
//! library's own launches.
int deleaker_attention_launch(const DeLeakerParams* params, void* workspace, size_t workspace_bytes,
                              struct CUstream_st* stream);
//! The reason of this thread's last DELEAKER_ERROR_*, or the CUDA error string of `code`.
const char* deleaker_error_string(int code);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // DELEAKER_PARAMS_H_
