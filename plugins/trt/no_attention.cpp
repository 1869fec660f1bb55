// The attention provider of a stand-in TensorRT header build without cuDNN's headers (CI): the library loads,
// registers and takes part in an engine build, but cannot run; onShapeChange says so.
#include "attention_provider.h"

namespace deleaker_trt {
namespace {

class NoAttention final : public AttentionProvider {
 public:
  std::string prepare(const AttentionShape&) override {
    return "this libdeleaker_trt_plugin was built without cuDNN (a stand-in header build, for checks only) and "
           "cannot run; build it with `deleaker-trt plugin --out DIR` on a machine with TensorRT's headers, cuDNN "
           "and cudnn-frontend";
  }
  size_t workspace_bytes(const AttentionShape&) const override { return 0; }
  std::string run(const AttentionShape&, const void*, const void*, const void*, void*, float*, void*,
                  cudaStream_t) override {
    return "built without cuDNN: no attention to run";
  }
};

}  // namespace

std::unique_ptr<AttentionProvider> make_attention_provider() { return std::make_unique<NoAttention>(); }

const char* attention_provider_description() { return "none (built without cuDNN: cannot run)"; }

}  // namespace deleaker_trt
