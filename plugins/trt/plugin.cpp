// DeLeakerAttention as a TensorRT IPluginV3 (core, build and runtime capabilities), its IPluginCreatorV3One and
// the entry points TensorRT's IPluginRegistry::loadLibrary, trtexec --dynamicPlugins and Triton look for:
// getCreators and setLoggerFinder. Every method converts TensorRT's types and calls the TensorRT-free layers
// (plugin_fields.h, deleaker_call.h). The library links no TensorRT library: the interfaces are all it uses.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include "deleaker_call.h"
#include "plugin_fields.h"

#ifndef DELEAKER_TRT_PLUGIN_VERSION_TEXT
#define DELEAKER_TRT_PLUGIN_VERSION_TEXT "unknown"
#endif

namespace deleaker_trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;
using nvinfer1::TensorFormat;

// TensorRT hands a plugin library its logger through the process-wide entry point setLoggerFinder (its ABI);
// this is the one piece of global state of the library, written by TensorRT, read when logging.
std::atomic<nvinfer1::ILoggerFinder*> g_logger_finder{nullptr};

void log(nvinfer1::ILogger::Severity severity, const std::string& message) noexcept {
  nvinfer1::ILoggerFinder* finder = g_logger_finder.load();
  nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
  if (logger != nullptr) logger->log(severity, message.c_str());
}

int32_t fail(const std::string& message) noexcept {
  log(nvinfer1::ILogger::Severity::kERROR, message);
  return -1;
}

#ifdef DELEAKER_TENSORRT_STAND_IN_HEADERS
constexpr bool kStandInHeaders = true;
#else
constexpr bool kStandInHeaders = false;
#endif

#define DELEAKER_STR2(x) #x
#define DELEAKER_STR(x) DELEAKER_STR2(x)
const std::string& build_info() {
  static const std::string info = std::string("deleaker_trt_plugin ") + DELEAKER_TRT_PLUGIN_VERSION_TEXT +
                                  "; plugin " + kPluginNamespace + "::" + kPluginName + " v" + kPluginVersion +
                                  "; tensorrt_headers " +
                                  (kStandInHeaders ? std::string("stand-in (test infrastructure, tests/tensorrt_stand_in)")
                                                   : std::string(DELEAKER_STR(NV_TENSORRT_MAJOR) "." DELEAKER_STR(
                                                         NV_TENSORRT_MINOR) "." DELEAKER_STR(NV_TENSORRT_PATCH))) +
                                  "; attention " + attention_provider_description() + "; kernel_abi " +
                                  std::to_string(deleaker_abi_version());
  return info;
}

int32_t dtype_code(DataType type) {
  switch (type) {
    case DataType::kHALF: return DELEAKER_DTYPE_FLOAT16;
    case DataType::kBF16: return DELEAKER_DTYPE_BFLOAT16;
    default: return -1;
  }
}

TensorShape shape_of(const nvinfer1::Dims& dims) {
  TensorShape shape;
  shape.rank = dims.nbDims < 0 ? 0 : (dims.nbDims > 8 ? 8 : dims.nbDims);
  for (int i = 0; i < shape.rank; ++i) shape.dims[i] = dims.d[i];
  return shape;
}

template <typename Desc, typename DimsOf>
bool call_shapes(const Desc* inputs, int32_t count, DimsOf dims_of, CallShapes* shapes, std::string* problem) {
  if (count != kNumInputs) {
    *problem = std::string(kPluginName) + " takes 6 inputs (q, k, v, entity_mask, history, step), got " +
               std::to_string(count);
    return false;
  }
  for (int i = 0; i < kNumInputs; ++i) shapes->inputs[i] = shape_of(dims_of(inputs[i]));
  return true;
}

const nvinfer1::Dims& declared_dims(const nvinfer1::DynamicPluginTensorDesc& d) { return d.desc.dims; }
const nvinfer1::Dims& max_dims(const nvinfer1::DynamicPluginTensorDesc& d) { return d.max; }
const nvinfer1::Dims& runtime_dims(const nvinfer1::PluginTensorDesc& d) { return d.dims; }

// The fields as the plugin serializes them: one-element INT32 / FLOAT32 fields, exactly what TensorRT's ONNX
// parser makes of the node's INT / FLOAT attributes, so a parsed and a deserialized plugin decode the same way.
class SerializedFields {
 public:
  explicit SerializedFields(const PluginFields& values) : values_(values) {
    for (int i = 0; i < kNumFields; ++i) {
      const FieldSpec& spec = kFieldSpecs[i];
      const int slot = field_slot(i);
      const bool is_float = spec.kind == FieldKind::kFloat;
      fields_[i] = nvinfer1::PluginField(spec.name, is_float ? static_cast<const void*>(&values_.floats[slot])
                                                             : static_cast<const void*>(&values_.ints[slot]),
                                         is_float ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, 1);
    }
    collection_.nbFields = kNumFields;
    collection_.fields = fields_;
  }
  SerializedFields(const SerializedFields&) = delete;
  SerializedFields& operator=(const SerializedFields&) = delete;

  const nvinfer1::PluginFieldCollection* collection() const { return &collection_; }

 private:
  PluginFields values_;
  nvinfer1::PluginField fields_[kNumFields];
  nvinfer1::PluginFieldCollection collection_;
};

class DeLeakerAttentionPlugin final : public nvinfer1::IPluginV3,
                                      public nvinfer1::IPluginV3OneCore,
                                      public nvinfer1::IPluginV3OneBuild,
                                      public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit DeLeakerAttentionPlugin(const PluginFields& fields)
      : call_(fields, make_attention_provider()), serialized_(fields) {}

  // --- IPluginV3 ---
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      return new DeLeakerAttentionPlugin(call_.fields());
    } catch (...) {
      fail(std::string(kPluginName) + ": out of host memory in clone");
      return nullptr;
    }
  }

  // --- IPluginV3OneCore ---
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // --- IPluginV3OneBuild ---
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc*, int32_t) noexcept override {
    try {
      CallShapes shapes;
      std::string problem;
      if (!call_shapes(in, nb_inputs, declared_dims, &shapes, &problem)) return fail(problem);
      problem = check_shapes(shapes, call_.fields());
      if (problem.empty() && call_shapes(in, nb_inputs, max_dims, &shapes, &problem)) {
        problem = check_shapes(shapes, call_.fields());
      }
      return problem.empty() ? 0 : fail(problem);
    } catch (const std::exception& error) {
      return fail(std::string(kPluginName) + ": configurePlugin: " + error.what());
    }
  }

  int32_t getOutputDataTypes(DataType* output_types, int32_t nb_outputs, const DataType* input_types,
                             int32_t nb_inputs) const noexcept override {
    if (nb_outputs != kNumOutputs || nb_inputs != kNumInputs) {
      return fail(std::string(kPluginName) + " has 6 inputs and 2 outputs");
    }
    if (dtype_code(input_types[kQ]) < 0) return fail(std::string(kPluginName) + ": q must be float16 or bfloat16");
    output_types[kOut] = input_types[kQ];
    output_types[kHistoryOut] = DataType::kFLOAT;
    return 0;
  }

  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs, const nvinfer1::DimsExprs*, int32_t,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder&) noexcept override {
    if (nb_inputs != kNumInputs || nb_outputs != kNumOutputs) {
      return fail(std::string(kPluginName) + " has 6 inputs and 2 outputs");
    }
    // out is shaped as q, history_out as history: copies of the input expressions, no arithmetic.
    outputs[kOut] = inputs[kQ];
    outputs[kHistoryOut] = inputs[kHistory];
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override {
    if (nb_inputs != kNumInputs || nb_outputs != kNumOutputs || pos < 0 || pos >= kNumInputs + kNumOutputs) {
      return false;
    }
    const nvinfer1::PluginTensorDesc& desc = in_out[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    const DataType q_type = in_out[kQ].desc.type;
    switch (pos) {
      case kQ: return dtype_code(desc.type) >= 0;
      case kK:
      case kV:
      case kNumInputs + kOut: return desc.type == q_type && dtype_code(desc.type) >= 0;
      case kEntityMask: return desc.type == DataType::kBOOL;
      case kStep: return desc.type == DataType::kINT64;
      default: return desc.type == DataType::kFLOAT;  // history, history_out
    }
  }

  int32_t getNbOutputs() const noexcept override { return kNumOutputs; }

  size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept override {
    try {
      CallShapes shapes;
      std::string problem;
      if (!call_shapes(inputs, nb_inputs, max_dims, &shapes, &problem)) return 0;
      const size_t bytes = call_.workspace_bytes(shapes, dtype_code(inputs[kQ].desc.type), &problem);
      if (!problem.empty()) fail(problem);
      return bytes;
    } catch (const std::exception& error) {
      fail(std::string(kPluginName) + ": getWorkspaceSize: " + error.what());
      return 0;
    }
  }

  // --- IPluginV3OneRuntime ---
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs, const nvinfer1::PluginTensorDesc*,
                        int32_t) noexcept override {
    try {
      CallShapes shapes;
      std::string problem;
      if (!call_shapes(in, nb_inputs, runtime_dims, &shapes, &problem)) return fail(problem);
      problem = call_.prepare(shapes, dtype_code(in[kQ].type));
      return problem.empty() ? 0 : fail(problem);
    } catch (const std::exception& error) {
      return fail(std::string(kPluginName) + ": onShapeChange: " + error.what());
    }
  }

  int32_t enqueue(const nvinfer1::PluginTensorDesc*, const nvinfer1::PluginTensorDesc*, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    try {
      const std::string problem = call_.enqueue(inputs, outputs, workspace, stream);
      return problem.empty() ? 0 : fail(problem);
    } catch (const std::exception& error) {  // cudnn-frontend may throw; enqueue must not
      return fail(std::string(kPluginName) + ": enqueue: " + error.what());
    }
  }

  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }

  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override {
    return serialized_.collection();
  }

 private:
  DeLeakerCall call_;
  SerializedFields serialized_;
};

class DeLeakerAttentionCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  DeLeakerAttentionCreator() {
    for (int i = 0; i < kNumFields; ++i) {
      const bool is_float = kFieldSpecs[i].kind == FieldKind::kFloat;
      names_[i] = nvinfer1::PluginField(kFieldSpecs[i].name, nullptr,
                                        is_float ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, 1);
    }
    collection_.nbFields = kNumFields;
    collection_.fields = names_;
  }

  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase) noexcept override {
    try {
      if (fc == nullptr || fc->nbFields < 0 || (fc->nbFields > 0 && fc->fields == nullptr)) {
        fail(std::string(kPluginName) + ": no plugin fields");
        return nullptr;
      }
      std::unique_ptr<RawField[]> raw(new RawField[fc->nbFields > 0 ? fc->nbFields : 1]);
      for (int i = 0; i < fc->nbFields; ++i) {
        const nvinfer1::PluginField& field = fc->fields[i];
        raw[i] = RawField{field.name, field.data, static_cast<int32_t>(field.type), field.length};
      }
      PluginFields fields;
      const std::string problem = decode_fields(raw.get(), fc->nbFields, &fields);
      if (!problem.empty()) {
        fail(std::string(name != nullptr ? name : "?") + ": " + problem);
        return nullptr;
      }
      return new DeLeakerAttentionPlugin(fields);
    } catch (const std::exception& error) {
      fail(std::string(kPluginName) + ": createPlugin: " + error.what());
      return nullptr;
    }
  }

  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
  const char* getPluginName() const noexcept override { return kPluginName; }
  const char* getPluginVersion() const noexcept override { return kPluginVersion; }
  const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  nvinfer1::PluginField names_[kNumFields];
  nvinfer1::PluginFieldCollection collection_;
};

DeLeakerAttentionCreator& the_creator() {
  static DeLeakerAttentionCreator creator;
  return creator;
}

#ifndef DELEAKER_TENSORRT_STAND_IN_HEADERS
// Hosts that only dlopen a plugin library (Triton's TensorRT backend with --backend-config=tensorrt,plugins=...)
// expect it to register its creators when it is loaded. IPluginRegistry's layout changes between TensorRT majors,
// so this happens only in a build against real headers, and only when the TensorRT already in the process is of
// the headers' major version. TensorRT's own loadLibrary (trtexec --dynamicPlugins) registers what getCreators
// returns: getCreators first takes this registration back, so the creator is registered once either way.
std::atomic<nvinfer1::IPluginRegistry*> g_registered_at_load{nullptr};

void* tensorrt_symbol(const char* name) {
  if (void* symbol = dlsym(RTLD_DEFAULT, name)) return symbol;
  // A host may have loaded TensorRT with RTLD_LOCAL: find it among the loaded libraries without loading it.
  const std::string library = "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD);
  return handle != nullptr ? dlsym(handle, name) : nullptr;
}

__attribute__((constructor)) void register_when_loaded() {
  auto version = reinterpret_cast<int32_t (*)()>(tensorrt_symbol("getInferLibVersion"));
  auto registry_of = reinterpret_cast<nvinfer1::IPluginRegistry* (*)()>(tensorrt_symbol("getPluginRegistry"));
  if (version == nullptr || registry_of == nullptr || version() / 10000 != NV_TENSORRT_MAJOR) return;
  nvinfer1::IPluginRegistry* registry = registry_of();
  if (registry != nullptr && registry->registerCreator(the_creator(), kPluginNamespace)) {
    g_registered_at_load.store(registry);
  }
}

void take_back_load_time_registration() {
  if (nvinfer1::IPluginRegistry* registry = g_registered_at_load.exchange(nullptr)) {
    registry->deregisterCreator(the_creator());
  }
}
#else
void take_back_load_time_registration() {}  // the stand-in declares no IPluginRegistry: nothing was registered
#endif

}  // namespace
}  // namespace deleaker_trt

extern "C" {

//! TensorRT's entry point: the creators of this library (one).
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  deleaker_trt::take_back_load_time_registration();
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&deleaker_trt::the_creator()};
  nbCreators = 1;
  if (deleaker_trt::kStandInHeaders) {
    deleaker_trt::log(nvinfer1::ILogger::Severity::kWARNING,
                      "libdeleaker_trt_plugin was built against the test stand-in TensorRT headers "
                      "(tests/tensorrt_stand_in), not TensorRT's: for checks only");
  }
  return creators;
}

//! TensorRT's entry point: how the library finds TensorRT's logger.
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  deleaker_trt::g_logger_finder.store(finder);
}

//! What this library is: its version, the TensorRT headers it was built against ("stand-in" for the test
//! stand-in), its attention provider and the kernel ABI. Needs no TensorRT and no GPU.
__attribute__((visibility("default"))) const char* deleaker_trt_plugin_build_info(void) {
  return deleaker_trt::build_info().c_str();
}

}  // extern "C"
