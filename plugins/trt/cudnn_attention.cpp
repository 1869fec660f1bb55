// Step 1 of the fast path through cuDNN's fused attention (SDPA forward with statistics), built with the
// header-only cudnn-frontend graph API. cuDNN is loaded at run time (cudnn-frontend's dynamic loading: the
// library has no link-time dependency on cuDNN, so it loads on machines without cuDNN or a GPU and fails only
// when a shape is prepared there). One graph per shape, built in prepare() (TensorRT's onShapeChange), never in
// run(); run() only binds the addresses and enqueues.
#ifndef NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#error "cudnn_attention.cpp must be built with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING (see plugins/trt/CMakeLists.txt)"
#endif

#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "attention_provider.h"
#include "deleaker_params.h"

// cudnn-frontend's dynamic loading resolves every cuDNN call through this handle, which the user of the
// headers defines and opens (its design); set once per process in load_cudnn().
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace deleaker_trt {
namespace {

namespace fe = cudnn_frontend;

//! cuDNN 9's library (it loads its sub-libraries from its own directory). pip's nvidia-cudnn-cu12/13 put it
//! under site-packages/nvidia/cudnn/lib: add that to LD_LIBRARY_PATH, or load it before the plugin runs.
constexpr char kCudnnLibrary[] = "libcudnn.so.9";

enum Uid : int64_t { kUidQ = 1, kUidK, kUidV, kUidO, kUidStats };

std::string load_cudnn() {
  static std::once_flag once;
  static std::string problem;
  std::call_once(once, [] {
    fe::cudnn_dlhandle = dlopen(kCudnnLibrary, RTLD_NOW | RTLD_GLOBAL);
    if (fe::cudnn_dlhandle == nullptr) {
      const char* reason = dlerror();
      problem = std::string("cannot load cuDNN (") + kCudnnLibrary + "): " + (reason ? reason : "unknown reason") +
                "; install cuDNN 9 (e.g. pip install nvidia-cudnn-cu13) and put its lib directory on LD_LIBRARY_PATH";
    }
  });
  return problem;
}

struct Plan {
  AttentionShape shape;
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
  std::unordered_map<int64_t, void*> pack;  // every uid present: run() only overwrites values (no allocation)
};

std::vector<int64_t> dense(int64_t b, int64_t h, int64_t n, int64_t d) { return {h * n * d, n * d, d, 1}; }

class CudnnAttention final : public AttentionProvider {
 public:
  ~CudnnAttention() override {
    if (handle_ != nullptr) fe::detail::destroy_handle(handle_);
  }

  std::string prepare(const AttentionShape& shape) override {
    try {
      std::string problem = load_cudnn();
      if (!problem.empty()) return problem;
      if (handle_ == nullptr && fe::detail::create_handle(&handle_) != CUDNN_STATUS_SUCCESS) {
        handle_ = nullptr;
        return "cudnnCreate failed (no usable GPU, or a cuDNN that does not match the driver)";
      }
      if (find(shape) != nullptr) return "";
      Plan plan;
      plan.shape = shape;
      problem = build(&plan);
      if (!problem.empty()) return problem;
      plans_.push_back(std::move(plan));
      return "";
    } catch (const std::exception& error) {
      return std::string("cuDNN attention: ") + error.what();
    }
  }

  size_t workspace_bytes(const AttentionShape& shape) const override {
    const Plan* plan = find(shape);
    return plan != nullptr ? static_cast<size_t>(plan->workspace) : 0;
  }

  std::string run(const AttentionShape& shape, const void* q, const void* k, const void* v, void* o, float* lse,
                  void* workspace, cudaStream_t stream) override {
    Plan* plan = find(shape);
    if (plan == nullptr) return "cuDNN attention: run() for a shape that was not prepared";
    if (fe::detail::set_stream(handle_, stream) != CUDNN_STATUS_SUCCESS) return "cudnnSetStream failed";
    plan->pack[kUidQ] = const_cast<void*>(q);
    plan->pack[kUidK] = const_cast<void*>(k);
    plan->pack[kUidV] = const_cast<void*>(v);
    plan->pack[kUidO] = o;
    plan->pack[kUidStats] = lse;
    fe::error_t status = plan->graph->execute(handle_, plan->pack, workspace);
    return status.is_good() ? "" : "cuDNN attention: " + status.get_message();
  }

 private:
  Plan* find(const AttentionShape& shape) {
    for (Plan& plan : plans_) {
      if (plan.shape == shape) return &plan;
    }
    return nullptr;
  }
  const Plan* find(const AttentionShape& shape) const { return const_cast<CudnnAttention*>(this)->find(shape); }

  std::string build(Plan* plan) {
    const AttentionShape& s = plan->shape;
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(s.dtype == DELEAKER_DTYPE_BFLOAT16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const std::vector<int64_t> dims = {s.batch, s.heads, s.tokens, s.head_dim};
    const std::vector<int64_t> strides = dense(s.batch, s.heads, s.tokens, s.head_dim);
    auto tensor = [&](const char* name, int64_t uid) {
      return graph->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dims).set_stride(strides));
    };
    auto q = tensor("q", kUidQ), k = tensor("k", kUidK), v = tensor("v", kUidV);
    auto options = fe::graph::SDPA_attributes()
                       .set_name("deleaker_plain_attention")
                       .set_generate_stats(true)
                       .set_attn_scale(s.softmax_scale);
    auto [o, stats] = graph->sdpa(q, k, v, options);
    o->set_output(true).set_dim(dims).set_stride(strides).set_uid(kUidO);
    // The statistics are the natural-log LSE of each row of softmax_scale * q k^T, float32 (B, H, N, 1).
    stats->set_output(true)
        .set_data_type(fe::DataType_t::FLOAT)
        .set_dim({s.batch, s.heads, s.tokens, 1})
        .set_stride({s.heads * s.tokens, s.tokens, 1, 1})
        .set_uid(kUidStats);
    fe::error_t status = graph->build(handle_, {fe::HeurMode_t::A});
    if (!status.is_good()) return "cuDNN has no fused attention plan for this shape: " + status.get_message();
    if (!graph->get_workspace_size(plan->workspace).is_good()) return "cuDNN attention: get_workspace_size failed";
    plan->graph = std::move(graph);
    for (int64_t uid : {kUidQ, kUidK, kUidV, kUidO, kUidStats}) plan->pack[uid] = nullptr;
    return "";
  }

  cudnnHandle_t handle_ = nullptr;
  std::vector<Plan> plans_;  // one per shape the engine ran with (its batch sizes); never more than a few
};

}  // namespace

std::unique_ptr<AttentionProvider> make_attention_provider() { return std::make_unique<CudnnAttention>(); }

#define DELEAKER_CUDNN_STR2(x) #x
#define DELEAKER_CUDNN_STR(x) DELEAKER_CUDNN_STR2(x)
const char* attention_provider_description() {
  return "cuDNN SDPA through cudnn-frontend " DELEAKER_CUDNN_STR(CUDNN_FRONTEND_MAJOR_VERSION) "." DELEAKER_CUDNN_STR(
      CUDNN_FRONTEND_MINOR_VERSION) "." DELEAKER_CUDNN_STR(CUDNN_FRONTEND_PATCH_VERSION) " (cuDNN headers " DELEAKER_CUDNN_STR(CUDNN_MAJOR) "." DELEAKER_CUDNN_STR(CUDNN_MINOR) ", libcudnn.so.9 loaded at run time)";
}

}  // namespace deleaker_trt
