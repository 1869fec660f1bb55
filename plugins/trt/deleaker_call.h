// The plugin's host path without TensorRT: shape checks, the kernels' params, the workspace layout and the launch
// sequence of one DeLeaker attention (fused attention with statistics, then the kernel library's C ABI, version 2).
// plugin.cpp converts TensorRT's descriptors into CallShapes and calls this; the CUDA-emulator tests call it the
// same way (through the plugin) on host memory.
#ifndef DELEAKER_TRT_DELEAKER_CALL_H_
#define DELEAKER_TRT_DELEAKER_CALL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "attention_provider.h"
#include "deleaker_params.h"
#include "plugin_fields.h"

namespace deleaker_trt {

//! I/O positions as TensorRT numbers them (inputs, then outputs).
enum IoIndex { kQ = 0, kK, kV, kEntityMask, kHistory, kStep, kNumInputs, kOut = 0, kHistoryOut, kNumOutputs };

//! Dims of a tensor; -1 is a dimension not known yet (build time).
struct TensorShape {
  int32_t rank = 0;
  int64_t dims[8] = {};
};

//! The six input shapes of one call.
struct CallShapes {
  TensorShape inputs[kNumInputs];
};

//! Rows whose normaliser Z falls below this are recomputed exactly (FAST_PATH.md step 6: at most 2x the plain
//! output's rounding error).
inline constexpr float kFallbackThreshold = 0.5f;

//! Checks the input shapes against each other and the fields; -1 dims are skipped. Returns "" or a message
//! naming the tensor and the expected shape.
std::string check_shapes(const CallShapes& shapes, const PluginFields& fields);

//! Offsets (bytes, 256-aligned) of the parts of the plugin's workspace.
struct WorkspacePlan {
  size_t lse = 0;        // float32 (B, H, N): row LSE of every row, written by the attention provider
  size_t kernels = 0;    // the kernel library's workspace
  size_t kernel_bytes = 0;
  size_t attention = 0;  // the attention provider's workspace
  size_t attention_bytes = 0;
  size_t total = 0;
};

//! Device workspace reserved for the attention provider: an upper bound fixed by the shape alone, so that the
//! size TensorRT allocates at build time (getWorkspaceSize, maybe on a machine without the GPU) covers what
//! cuDNN asks for at run time. An estimate, checked at run time: prepare() fails, naming both numbers, if the
//! provider needs more.
size_t attention_workspace_reserve(const AttentionShape& shape);

//! One DeLeaker attention node's host side: its fields, its attention provider and what prepare() set up.
class DeLeakerCall {
 public:
  DeLeakerCall(const PluginFields& fields, std::unique_ptr<AttentionProvider> provider);

  const PluginFields& fields() const { return fields_; }

  //! Workspace bytes for these (concrete, largest) shapes and dtype (DELEAKER_DTYPE_*): sizes only, no device
  //! work. 0 if the shapes are invalid (then `problem` says why).
  size_t workspace_bytes(const CallShapes& shapes, int32_t dtype, std::string* problem) const;

  //! Checks concrete shapes and dtypes, initialises the kernels (deleaker_init) and prepares the attention
  //! provider for them. Outside stream capture; returns "" or what went wrong. `dtype` is DELEAKER_DTYPE_*.
  std::string prepare(const CallShapes& shapes, int32_t dtype);

  //! Enqueues the call on `stream` for the shapes of the last prepare(): nothing allocated, nothing lazy.
  //! `workspace` holds at least workspace_bytes(those shapes). Returns "" or what went wrong.
  std::string enqueue(const void* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream);

 private:
  PluginFields fields_;
  std::unique_ptr<AttentionProvider> provider_;
  bool prepared_ = false;
  AttentionShape attention_{};
  DeLeakerParams params_{};  // every field but the addresses, for the prepared shapes
  WorkspacePlan plan_{};
};

}  // namespace deleaker_trt

#endif  // DELEAKER_TRT_DELEAKER_CALL_H_
