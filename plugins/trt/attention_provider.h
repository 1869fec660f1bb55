// Step 1 of the fast path (FAST_PATH.md): the plain attention output o and the row log-sum-exp of every row,
// from the best fused attention available. One implementation is linked into each build:
//   cudnn_attention.cpp     cuDNN's SDPA through the cudnn-frontend graph API (the product)
//   no_attention.cpp        a library built without cuDNN (stand-in TensorRT headers, CI): every prepare fails
//   tests/trt_plugin_host/  host-memory attention for the CUDA emulator (test infrastructure)
#ifndef DELEAKER_TRT_ATTENTION_PROVIDER_H_
#define DELEAKER_TRT_ATTENTION_PROVIDER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <cuda_runtime.h>

namespace deleaker_trt {

//! One attention call: q, k, v and o are dense (batch, heads, tokens, head_dim) in `dtype`
//! (DELEAKER_DTYPE_FLOAT16 / DELEAKER_DTYPE_BFLOAT16); s = softmax_scale * q k^T.
struct AttentionShape {
  int64_t batch, heads, tokens, head_dim;
  int32_t dtype;
  float softmax_scale;

  bool operator==(const AttentionShape& other) const {
    return batch == other.batch && heads == other.heads && tokens == other.tokens && head_dim == other.head_dim &&
           dtype == other.dtype && softmax_scale == other.softmax_scale;
  }
};

class AttentionProvider {
 public:
  virtual ~AttentionProvider() = default;

  //! Makes `shape` ready to run: device set-up and the plan for that shape (built once, then cached). Called
  //! outside stream capture (TensorRT's onShapeChange). Returns "" or what went wrong.
  virtual std::string prepare(const AttentionShape& shape) = 0;

  //! Device workspace that the prepared plan for `shape` needs.
  virtual size_t workspace_bytes(const AttentionShape& shape) const = 0;

  //! Enqueues o = softmax(s) v and lse[b, h, i] = log(sum_j exp(s[b, h, i, j])) (natural log, float32, dense
  //! (batch, heads, tokens)) on `stream`. Only after prepare(shape); no allocation, no synchronisation.
  //! Returns "" or what went wrong.
  virtual std::string run(const AttentionShape& shape, const void* q, const void* k, const void* v, void* o,
                          float* lse, void* workspace, cudaStream_t stream) = 0;
};

//! The provider this library was built with (a fresh one per plugin instance; touches no device).
std::unique_ptr<AttentionProvider> make_attention_provider();

//! What the provider is, for deleaker_trt_plugin_build_info() (e.g. "cudnn-frontend 1.32.0, cuDNN 9.x loaded
//! at run time" or "none").
const char* attention_provider_description();

}  // namespace deleaker_trt

#endif  // DELEAKER_TRT_ATTENTION_PROVIDER_H_
