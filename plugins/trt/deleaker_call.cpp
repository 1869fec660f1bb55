#include "deleaker_call.h"

#include <cmath>
#include <sstream>
#include <type_traits>
#include <utility>

namespace deleaker_trt {
namespace {

template <typename P, typename = void>
struct HasRowLse : std::false_type {};
template <typename P>
struct HasRowLse<P, std::void_t<decltype(std::declval<P&>().lse)>> : std::true_type {};
static_assert(HasRowLse<DeLeakerParams>::value,
              "plugins/trt needs the kernel library's C ABI version 2 (DeLeakerParams.lse, deleaker_init): "
              "plugins/csrc/deleaker_params.h is older");

constexpr const char* kInputNames[kNumInputs] = {"q", "k", "v", "entity_mask", "history", "step"};

size_t align256(size_t bytes) { return (bytes + 255u) & ~size_t{255u}; }

std::string shape_text(const TensorShape& shape) {
  std::ostringstream text;
  text << "(";
  for (int i = 0; i < shape.rank; ++i) text << (i ? ", " : "") << shape.dims[i];
  text << (shape.rank == 1 ? ",)" : ")");
  return text.str();
}

// "" when got and expected agree or either is unknown (-1).
std::string same(const char* name, int64_t got, int64_t expected, const std::string& what) {
  if (got < 0 || expected < 0 || got == expected) return "";
  std::ostringstream text;
  text << kPluginName << ": " << name << " has " << what << " " << got << ", expected " << expected;
  return text.str();
}

AttentionShape attention_shape(const CallShapes& shapes, int32_t dtype) {
  const int64_t* q = shapes.inputs[kQ].dims;
  return AttentionShape{q[0], q[1], q[2], q[3], dtype, static_cast<float>(1.0 / std::sqrt(static_cast<double>(q[3])))};
}

// Every DeLeakerParams field but the device addresses: dense (B, H, N, D) tensors, strides in elements.
DeLeakerParams params_for(const PluginFields& f, const CallShapes& shapes, int32_t dtype) {
  const AttentionShape a = attention_shape(shapes, dtype);
  DeLeakerParams p{};
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = a.heads * a.tokens * a.head_dim;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = a.tokens * a.head_dim;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = a.head_dim;
  p.lse_batch_stride = a.heads * a.tokens;
  p.lse_head_stride = a.tokens;
  p.batch = static_cast<int32_t>(a.batch);
  p.heads = static_cast<int32_t>(a.heads);
  p.tokens = static_cast<int32_t>(a.tokens);
  p.text_tokens = static_cast<int32_t>(shapes.inputs[kEntityMask].dims[1]);
  p.head_dim = static_cast<int32_t>(a.head_dim);
  p.grid_h = f.grid_h();
  p.grid_w = f.grid_w();
  p.num_entities = static_cast<int32_t>(shapes.inputs[kEntityMask].dims[0]);
  p.dtype = dtype;
  p.block_offset = f.block_offset();
  p.num_blocks = f.num_blocks();
  p.softmax_scale = a.softmax_scale;
  p.std_mul_text = f.std_mul_text();
  p.std_mul_image_image = f.std_mul_image_image();
  p.k_strength = f.k_strength();
  p.start_aggregating_from = f.start_aggregating_from();
  p.stop_aggregating_at = f.stop_aggregating_at();
  p.start_intervention_from = f.start_intervention_from();
  p.stop_intervention_at = f.stop_intervention_at();
  p.use_history = f.use_history();
  p.do_smoothing = f.do_smoothing();
  p.do_image_image = f.do_image_image();
  p.do_image_text_strengthening = f.do_image_text_strengthening();
  p.do_image_text_weakening = f.do_image_text_weakening();
  p.fallback_threshold = kFallbackThreshold;
  return p;
}

WorkspacePlan plan_workspace(const DeLeakerParams& params, const AttentionShape& a) {
  WorkspacePlan plan;
  plan.lse = 0;
  plan.kernels = align256(static_cast<size_t>(a.batch * a.heads * a.tokens) * sizeof(float));
  plan.kernel_bytes = deleaker_attention_workspace_bytes(&params);
  plan.attention = align256(plan.kernels + plan.kernel_bytes);
  plan.attention_bytes = attention_workspace_reserve(a);
  plan.total = align256(plan.attention + plan.attention_bytes);
  return plan;
}

std::string check_dtype(int32_t dtype) {
  if (dtype == DELEAKER_DTYPE_FLOAT16 || dtype == DELEAKER_DTYPE_BFLOAT16) return "";
  return std::string(kPluginName) + ": q must be float16 or bfloat16";
}

std::string check_concrete(const CallShapes& shapes) {
  for (int i = 0; i < kNumInputs; ++i) {
    const TensorShape& shape = shapes.inputs[i];
    for (int axis = 0; axis < shape.rank; ++axis) {
      if (shape.dims[axis] < 0) {
        return std::string(kPluginName) + ": " + kInputNames[i] + " has an unknown dimension " + shape_text(shape);
      }
    }
  }
  return "";
}

}  // namespace

size_t attention_workspace_reserve(const AttentionShape& a) {
  // cuDNN's fused attention forward asks for little or no workspace (0 for the flash engines of cuDNN 9 on the
  // shapes we know); 16 MiB plus 8 bytes per row is a generous bound. An estimate, checked in prepare().
  return (size_t{16} << 20) + static_cast<size_t>(a.batch * a.heads * a.tokens) * 8;
}

std::string check_shapes(const CallShapes& shapes, const PluginFields& fields) {
  const TensorShape* in = shapes.inputs;
  for (int i : {kQ, kK, kV}) {
    if (in[i].rank != 4) return std::string(kPluginName) + ": " + kInputNames[i] + " must be (B, H, N, D), got " + shape_text(in[i]);
  }
  if (in[kEntityMask].rank != 2) {
    return std::string(kPluginName) + ": entity_mask must be (E_max, T), got " + shape_text(in[kEntityMask]);
  }
  if (in[kHistory].rank != 3) {
    return std::string(kPluginName) + ": history must be (B, E_max, Nimg), got " + shape_text(in[kHistory]);
  }
  const TensorShape& step = in[kStep];
  if (step.rank > 1 || (step.rank == 1 && step.dims[0] != 1 && step.dims[0] != -1)) {
    return std::string(kPluginName) + ": step must be a scalar or (1,), got " + shape_text(step);
  }
  static const char* const kAxes[4] = {"batch", "heads", "tokens", "head dim"};
  for (int i : {kK, kV}) {
    for (int axis = 0; axis < 4; ++axis) {
      std::string problem = same(kInputNames[i], in[i].dims[axis], in[kQ].dims[axis], kAxes[axis]);
      if (!problem.empty()) return problem;
    }
  }
  const int64_t e_max = in[kEntityMask].dims[0], text_len = in[kEntityMask].dims[1];
  const int64_t nimg = fields.num_image_tokens();
  std::ostringstream grid;
  grid << "grid " << fields.grid_h() << "x" << fields.grid_w();
  std::string problem;
  if (text_len >= 0) {
    std::ostringstream what;
    what << "tokens (T=" << text_len << " + " << grid.str() << ")";
    problem = same("q", in[kQ].dims[2], text_len + nimg, what.str());
  }
  if (problem.empty()) problem = same("history", in[kHistory].dims[0], in[kQ].dims[0], "batch");
  if (problem.empty()) problem = same("history", in[kHistory].dims[1], e_max, "entities");
  if (problem.empty()) problem = same("history", in[kHistory].dims[2], nimg, "image tokens (" + grid.str() + ")");
  if (problem.empty() && e_max > DELEAKER_MAX_ENTITIES) {
    std::ostringstream text;
    text << kPluginName << ": the kernels take at most " << DELEAKER_MAX_ENTITIES << " entity rows, got " << e_max;
    problem = text.str();
  }
  // Sizes the kernels refuse at launch, refused before any work (a dimension of -1 is not known yet): the plain
  // attention would otherwise have written `out` before the kernels said no. (The head dim is checked when the
  // call is prepared to run: an engine for another head dim still builds, as the tests' tiny model's does.)
  const int64_t limits[3] = {DELEAKER_MAX_BATCH, DELEAKER_MAX_HEADS, INT32_MAX};  // tokens: an int32
  for (int axis = 0; axis < 3 && problem.empty(); ++axis) {
    const int64_t d = in[kQ].dims[axis];
    if (d == 0 || d > limits[axis]) {
      std::ostringstream text;
      text << kPluginName << ": q's " << kAxes[axis] << " must be in [1, " << limits[axis] << "], got "
           << shape_text(in[kQ]);
      problem = text.str();
    }
  }
  if (problem.empty() && (e_max == 0 || text_len == 0)) {
    problem = std::string(kPluginName) + ": entity_mask must have E_max >= 1 rows and T >= 1 text tokens, got " +
              shape_text(in[kEntityMask]);
  }
  return problem;
}

namespace {

// Everything a call's shapes and dtype must satisfy before they are planned or run: the first problem, or "".
std::string check_call(const CallShapes& shapes, const PluginFields& fields, int32_t dtype) {
  std::string problem = check_shapes(shapes, fields);
  if (problem.empty()) problem = check_concrete(shapes);
  if (problem.empty()) problem = check_dtype(dtype);
  return problem;
}

}  // namespace

DeLeakerCall::DeLeakerCall(const PluginFields& fields, std::unique_ptr<AttentionProvider> provider)
    : fields_(fields), provider_(std::move(provider)) {}

size_t DeLeakerCall::workspace_bytes(const CallShapes& shapes, int32_t dtype, std::string* problem) const {
  *problem = check_call(shapes, fields_, dtype);
  if (!problem->empty()) return 0;
  const DeLeakerParams params = params_for(fields_, shapes, dtype);
  return plan_workspace(params, attention_shape(shapes, dtype)).total;
}

std::string DeLeakerCall::prepare(const CallShapes& shapes, int32_t dtype) {
  prepared_ = false;
  std::string problem = check_call(shapes, fields_, dtype);
  if (!problem.empty()) return problem;
  const AttentionShape attention = attention_shape(shapes, dtype);
  problem = provider_->prepare(attention);  // first: a library built without cuDNN says so on any machine
  if (!problem.empty()) return std::string(kPluginName) + ": " + problem;
  if (attention.head_dim != 64 && attention.head_dim != 128) {  // before enqueue writes anything
    return std::string(kPluginName) + ": the kernels take head dim 64 or 128, got " + shape_text(shapes.inputs[kQ]);
  }
  const int code = deleaker_init();
  if (code != 0) return std::string(kPluginName) + ": deleaker_init failed: " + deleaker_error_string(code);
  const size_t needed = provider_->workspace_bytes(attention);
  const size_t reserved = attention_workspace_reserve(attention);
  if (needed > reserved) {
    std::ostringstream text;
    text << kPluginName << ": the fused attention needs " << needed << " bytes of workspace, more than the "
         << reserved << " the plugin reserves for it (attention_workspace_reserve in plugins/trt/deleaker_call.cpp)";
    return text.str();
  }
  attention_ = attention;
  params_ = params_for(fields_, shapes, dtype);
  plan_ = plan_workspace(params_, attention);
  prepared_ = true;
  return "";
}

std::string DeLeakerCall::enqueue(const void* const* inputs, void* const* outputs, void* workspace,
                                  cudaStream_t stream) {
  if (!prepared_) return std::string(kPluginName) + ": enqueue before a successful onShapeChange";
  char* base = static_cast<char*>(workspace);
  float* lse = reinterpret_cast<float*>(base + plan_.lse);
  std::string problem = provider_->run(attention_, inputs[kQ], inputs[kK], inputs[kV], outputs[kOut], lse,
                                       base + plan_.attention, stream);
  if (!problem.empty()) return std::string(kPluginName) + ": " + problem;
  DeLeakerParams params = params_;  // on the stack: enqueue allocates nothing
  params.q = inputs[kQ];
  params.k = inputs[kK];
  params.v = inputs[kV];
  params.out = outputs[kOut];
  params.entity_mask = static_cast<const uint8_t*>(inputs[kEntityMask]);
  params.history_in = static_cast<const float*>(inputs[kHistory]);
  params.history_out = static_cast<float*>(outputs[kHistoryOut]);
  params.step = static_cast<const int64_t*>(inputs[kStep]);
  params.lse = lse;
  const int code = deleaker_attention_launch(&params, base + plan_.kernels, plan_.kernel_bytes, stream);
  if (code != 0) return std::string(kPluginName) + ": kernel launch failed: " + deleaker_error_string(code);
  return "";
}

}  // namespace deleaker_trt
