// TEST INFRASTRUCTURE: a stand-in for cuDNN's fused attention (plugins/trt/cudnn_attention.cpp) on host memory,
// linked into the CUDA-emulator build of the plugin (tests/test_kernels_emulated.py). Plain attention in double
// precision: o = softmax(s) v rounded to the input dtype (as a fused kernel returns it) and the natural-log row
// LSE of s = softmax_scale q k^T in float32, dense (batch, heads, tokens). It stands in for a provider that needs
// CUDA hardware; it never ships.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <vector>

#include "attention_provider.h"
#include "deleaker_params.h"

namespace deleaker_trt {
namespace {

double load(const void* base, int64_t index, int32_t dtype) {
  return dtype == DELEAKER_DTYPE_BFLOAT16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index])
                                          : __half2float(static_cast<const __half*>(base)[index]);
}

void store(void* base, int64_t index, int32_t dtype, double value) {
  if (dtype == DELEAKER_DTYPE_BFLOAT16) {
    static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(static_cast<float>(value));
  } else {
    static_cast<__half*>(base)[index] = __float2half_rn(static_cast<float>(value));
  }
}

class HostAttention final : public AttentionProvider {
 public:
  std::string prepare(const AttentionShape& shape) override {
    prepared_ = shape;
    has_prepared_ = true;
    return "";
  }
  size_t workspace_bytes(const AttentionShape& shape) const override {
    return static_cast<size_t>(shape.tokens) * sizeof(double);  // one row of probabilities: a real reservation
  }
  std::string run(const AttentionShape& s, const void* q, const void* k, const void* v, void* o, float* lse,
                  void* workspace, cudaStream_t) override {
    if (!has_prepared_ || !(prepared_ == s)) return "host attention: run() for a shape that was not prepared";
    double* p = static_cast<double*>(workspace);
    const int64_t n = s.tokens, d = s.head_dim;
    for (int64_t bh = 0; bh < s.batch * s.heads; ++bh) {
      const int64_t base = bh * n * d;
      for (int64_t i = 0; i < n; ++i) {
        double top = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0.0;
          for (int64_t c = 0; c < d; ++c) dot += load(q, base + i * d + c, s.dtype) * load(k, base + j * d + c, s.dtype);
          p[j] = s.softmax_scale * dot;
          top = std::fmax(top, p[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - top));
        lse[bh * n + i] = static_cast<float>(top + std::log(sum));
        for (int64_t c = 0; c < d; ++c) {
          double acc = 0.0;
          for (int64_t j = 0; j < n; ++j) acc += p[j] * load(v, base + j * d + c, s.dtype);
          store(o, base + i * d + c, s.dtype, acc / sum);
        }
      }
    }
    return "";
  }

 private:
  AttentionShape prepared_{};
  bool has_prepared_ = false;
};

}  // namespace

std::unique_ptr<AttentionProvider> make_attention_provider() { return std::make_unique<HostAttention>(); }

const char* attention_provider_description() { return "host attention (test infrastructure, CUDA emulator)"; }

}  // namespace deleaker_trt
