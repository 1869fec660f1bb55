// TEST INFRASTRUCTURE: plays TensorRT's part for one DeLeakerAttention call, through the plugin library's C++ entry
// points only (getCreators, setLoggerFinder, the IPluginV3 interfaces of tests/tensorrt_stand_in), in the order
// an engine's life calls them:
//   build:   createPlugin(kBUILD) from the node's fields, supportsFormatCombination for every position,
//            getOutputDataTypes, configurePlugin, getWorkspaceSize, getFieldsToSerialize;
//   runtime: createPlugin(kRUNTIME) from the serialized fields, attachToContext, onShapeChange, enqueue.
// Linked into the CUDA-emulator build of the plugin (host memory; tests/test_kernels_emulated.py), and built
// alone for a GPU (benchmarks/plugin_check.py), where it drives libdeleaker_trt_plugin.so on device buffers.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

namespace {

using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginTensorDesc;

class CapturingLogger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kERROR) last_error = message;
  }
  std::string last_error;
};

class OneLoggerFinder final : public nvinfer1::ILoggerFinder {
 public:
  explicit OneLoggerFinder(nvinfer1::ILogger* logger) : logger_(logger) {}
  nvinfer1::ILogger* findLogger() override { return logger_; }

 private:
  nvinfer1::ILogger* logger_;
};

struct PluginDeleter {
  void operator()(nvinfer1::IPluginV3* plugin) const { delete plugin; }
};
using PluginPtr = std::unique_ptr<nvinfer1::IPluginV3, PluginDeleter>;

}  // namespace

extern "C" {

//! A tensor of the call: its data, nvinfer1::DataType and dims.
typedef struct DriverTensor {
  void* data;
  int32_t type;
  int32_t rank;
  int64_t dims[8];
} DriverTensor;

//! A plugin field: name, nvinfer1::PluginFieldType, one value at `data`.
typedef struct DriverField {
  const char* name;
  int32_t type;
  const void* data;
} DriverField;

typedef nvinfer1::IPluginCreatorInterface* const* (*GetCreatorsFn)(int32_t&);
typedef void (*SetLoggerFinderFn)(nvinfer1::ILoggerFinder*);

//! One call: 6 inputs, 2 outputs. With workspace == NULL it stops after the build phase and reports the
//! workspace size; otherwise it runs the runtime phase too and enqueues on `stream`. Returns 0, or -1 with the
//! plugin's logged error (or the driver's) in `message`.
__attribute__((visibility("default"))) int deleaker_plugin_drive(
    void* get_creators, void* set_logger_finder, const DriverField* fields, int32_t num_fields,
    const DriverTensor* inputs, const DriverTensor* outputs, void* workspace, uint64_t workspace_capacity,
    void* stream, uint64_t* workspace_bytes, char* message, uint64_t message_capacity) {
  CapturingLogger logger;
  OneLoggerFinder finder(&logger);
  reinterpret_cast<SetLoggerFinderFn>(set_logger_finder)(&finder);
  auto failed = [&](const std::string& why) {
    const std::string text = logger.last_error.empty() ? why : why + ": " + logger.last_error;
    std::snprintf(message, message_capacity, "%s", text.c_str());
    reinterpret_cast<SetLoggerFinderFn>(set_logger_finder)(nullptr);
    return -1;
  };

  int32_t count = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = reinterpret_cast<GetCreatorsFn>(get_creators)(count);
  nvinfer1::IPluginCreatorV3One* creator = nullptr;
  for (int32_t i = 0; i < count; ++i) {
    if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0) {
      creator = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
    }
  }
  if (creator == nullptr || std::strcmp(creator->getPluginName(), "DeLeakerAttention") != 0) {
    return failed("the library has no DeLeakerAttention IPluginCreatorV3One");
  }

  std::unique_ptr<nvinfer1::PluginField[]> plugin_fields(new nvinfer1::PluginField[num_fields]);
  for (int32_t i = 0; i < num_fields; ++i) {
    plugin_fields[i] = nvinfer1::PluginField(fields[i].name, fields[i].data,
                                             static_cast<nvinfer1::PluginFieldType>(fields[i].type), 1);
  }
  const nvinfer1::PluginFieldCollection collection{num_fields, plugin_fields.get()};

  // ---- build phase ----
  PluginPtr built(creator->createPlugin("driver", &collection, nvinfer1::TensorRTPhase::kBUILD));
  if (!built) return failed("createPlugin(kBUILD) failed");
  auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(
      built->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  if (build == nullptr || build->getNbOutputs() != 2) return failed("no build capability with 2 outputs");
  DynamicPluginTensorDesc io[8] = {};
  for (int i = 0; i < 8; ++i) {
    const DriverTensor& tensor = i < 6 ? inputs[i] : outputs[i - 6];
    nvinfer1::Dims dims{};
    dims.nbDims = tensor.rank;
    for (int axis = 0; axis < tensor.rank; ++axis) dims.d[axis] = tensor.dims[axis];
    io[i].desc.dims = dims;
    io[i].desc.type = static_cast<nvinfer1::DataType>(tensor.type);
    io[i].desc.format = nvinfer1::TensorFormat::kLINEAR;
    io[i].desc.scale = 1.0f;
    io[i].min = io[i].max = io[i].opt = dims;
  }
  for (int pos = 0; pos < 8; ++pos) {
    if (!build->supportsFormatCombination(pos, io, 6, 2)) {
      return failed("supportsFormatCombination refused position " + std::to_string(pos));
    }
  }
  nvinfer1::DataType input_types[6], output_types[2];
  for (int i = 0; i < 6; ++i) input_types[i] = io[i].desc.type;
  if (build->getOutputDataTypes(output_types, 2, input_types, 6) != 0) return failed("getOutputDataTypes failed");
  if (output_types[0] != io[6].desc.type || output_types[1] != io[7].desc.type) {
    return failed("getOutputDataTypes disagrees with the outputs' types");
  }
  if (build->configurePlugin(io, 6, io + 6, 2) != 0) return failed("configurePlugin failed");
  *workspace_bytes = build->getWorkspaceSize(io, 6, io + 6, 2);
  if (*workspace_bytes == 0) return failed("getWorkspaceSize returned 0");
  auto* build_runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
      built->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  const nvinfer1::PluginFieldCollection* serialized = build_runtime->getFieldsToSerialize();
  if (workspace == nullptr) {
    reinterpret_cast<SetLoggerFinderFn>(set_logger_finder)(nullptr);
    return 0;
  }
  if (workspace_capacity < *workspace_bytes) return failed("the workspace is smaller than getWorkspaceSize");

  // ---- runtime phase: deserialize, attach, shapes, enqueue ----
  PluginPtr deserialized(creator->createPlugin("driver", serialized, nvinfer1::TensorRTPhase::kRUNTIME));
  if (!deserialized) return failed("createPlugin(kRUNTIME) from the serialized fields failed");
  auto* attacher = static_cast<nvinfer1::IPluginV3OneRuntime*>(
      deserialized->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  PluginPtr attached(attacher->attachToContext(nullptr));
  if (!attached) return failed("attachToContext failed");
  auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
      attached->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  PluginTensorDesc in_desc[6], out_desc[2];
  const void* in_data[6];
  void* out_data[2];
  for (int i = 0; i < 6; ++i) in_desc[i] = io[i].desc, in_data[i] = inputs[i].data;
  for (int i = 0; i < 2; ++i) out_desc[i] = io[6 + i].desc, out_data[i] = outputs[i].data;
  if (runtime->onShapeChange(in_desc, 6, out_desc, 2) != 0) return failed("onShapeChange failed");
  if (runtime->enqueue(in_desc, out_desc, in_data, out_data, workspace, static_cast<cudaStream_t>(stream)) != 0) {
    return failed("enqueue failed");
  }
  reinterpret_cast<SetLoggerFinderFn>(set_logger_finder)(nullptr);
  return 0;
}

}  // extern "C"
