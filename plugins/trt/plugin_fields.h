// The DeLeakerAttention node's fields: what one exporter node carries (deleaker/export/onnx_node.py,
// `node_attributes`), their names, kinds and checks. No TensorRT and no CUDA here, so the codec is testable alone.
#ifndef DELEAKER_TRT_PLUGIN_FIELDS_H_
#define DELEAKER_TRT_PLUGIN_FIELDS_H_

#include <array>
#include <cstdint>
#include <string>

namespace deleaker_trt {

inline constexpr char kPluginName[] = "DeLeakerAttention";
inline constexpr char kPluginVersion[] = "1";
inline constexpr char kPluginNamespace[] = "deleaker";

//! How a field is stored: ONNX INT attributes become int32 fields, FLOAT attributes float32 fields; a flag is an
//! int that must be 0 or 1 (ONNX has no bool attribute).
enum class FieldKind { kInt, kFloat, kFlag };

struct FieldSpec {
  const char* name;
  FieldKind kind;
};

//! Every field, in the order the plugin serializes them: the block's place and the latent grid, then the
//! DeLeakerConfig knobs in their dataclass order (deleaker/config.py).
inline constexpr std::array<FieldSpec, 16> kFieldSpecs{{
    {"block_offset", FieldKind::kInt},
    {"num_blocks", FieldKind::kInt},
    {"grid_h", FieldKind::kInt},
    {"grid_w", FieldKind::kInt},
    {"std_mul_text", FieldKind::kFloat},
    {"std_mul_image_image", FieldKind::kFloat},
    {"k_strength", FieldKind::kFloat},
    {"start_aggregating_from", FieldKind::kInt},
    {"stop_aggregating_at", FieldKind::kInt},
    {"start_intervention_from", FieldKind::kInt},
    {"stop_intervention_at", FieldKind::kInt},
    {"use_history", FieldKind::kFlag},
    {"do_smoothing", FieldKind::kFlag},
    {"do_image_image", FieldKind::kFlag},
    {"do_image_text_strengthening", FieldKind::kFlag},
    {"do_image_text_weakening", FieldKind::kFlag},
}};
inline constexpr int kNumFields = static_cast<int>(kFieldSpecs.size());

//! One field as TensorRT hands it over, without TensorRT's types. `type` is the TensorRT PluginFieldType value.
struct RawField {
  const char* name;
  const void* data;
  int32_t type;
  int32_t length;
};

//! PluginFieldType values the codec reads (TensorRT's enum: NvInferPluginBase.h).
enum : int32_t {
  kFieldFloat32 = 1,
  kFieldFloat64 = 2,
  kFieldInt32 = 5,
  kFieldChar = 6,
  kFieldInt64 = 10,
};

//! The decoded fields. Every value is one field's, in kFieldSpecs order: `ints` holds the int and flag fields,
//! `floats` the float fields, each in the order they appear in kFieldSpecs.
struct PluginFields {
  std::array<int32_t, 13> ints{};
  std::array<float, 3> floats{};

  int32_t block_offset() const { return ints[0]; }
  int32_t num_blocks() const { return ints[1]; }
  int32_t grid_h() const { return ints[2]; }
  int32_t grid_w() const { return ints[3]; }
  int64_t num_image_tokens() const { return int64_t{ints[2]} * ints[3]; }
  float std_mul_text() const { return floats[0]; }
  float std_mul_image_image() const { return floats[1]; }
  float k_strength() const { return floats[2]; }
  int32_t start_aggregating_from() const { return ints[4]; }
  int32_t stop_aggregating_at() const { return ints[5]; }
  int32_t start_intervention_from() const { return ints[6]; }
  int32_t stop_intervention_at() const { return ints[7]; }
  bool use_history() const { return ints[8] != 0; }
  bool do_smoothing() const { return ints[9] != 0; }
  bool do_image_image() const { return ints[10] != 0; }
  bool do_image_text_strengthening() const { return ints[11] != 0; }
  bool do_image_text_weakening() const { return ints[12] != 0; }
};

//! Decodes and checks `count` fields. Returns "" and fills `out`, or a message naming every missing or unknown
//! field, a value of the wrong type or length, a non-integral int, a flag that is not 0/1, or a knob outside
//! its range (the checks of DeLeakerConfig and of the Python codec). `plugin_namespace` / `plugin_version`
//! (the ONNX lookup attributes) are checked if present and otherwise ignored.
std::string decode_fields(const RawField* fields, int count, PluginFields* out);

//! Where field `index` (kFieldSpecs order) lives in PluginFields: its slot in `ints` or `floats`.
int field_slot(int index);

}  // namespace deleaker_trt

#endif  // DELEAKER_TRT_PLUGIN_FIELDS_H_
