#include "plugin_fields.h"

#include "deleaker_params.h"

#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <vector>

namespace deleaker_trt {
namespace {

std::string join(const std::vector<std::string>& names) {
  std::string text = "[";
  for (size_t i = 0; i < names.size(); ++i) text += (i ? ", '" : "'") + names[i] + "'";
  return text + "]";
}

int find_spec(const char* name) {
  for (int i = 0; i < kNumFields; ++i) {
    if (std::strcmp(kFieldSpecs[i].name, name) == 0) return i;
  }
  return -1;
}

// The one number a field holds, as a double; "" or the problem.
std::string read_number(const RawField& field, double* value) {
  if (field.data == nullptr || field.length != 1) {
    return std::string("plugin field ") + field.name + " must hold one value, got " + std::to_string(field.length);
  }
  switch (field.type) {
    case kFieldInt32: *value = *static_cast<const int32_t*>(field.data); return "";
    case kFieldInt64: *value = static_cast<double>(*static_cast<const int64_t*>(field.data)); return "";
    case kFieldFloat32: *value = *static_cast<const float*>(field.data); return "";
    case kFieldFloat64: *value = *static_cast<const double*>(field.data); return "";
    default:
      return std::string("plugin field ") + field.name + " has PluginFieldType " + std::to_string(field.type) +
             "; expected INT32, INT64, FLOAT32 or FLOAT64";
  }
}

// A number as it was given, without converting a double outside long long's range (undefined in C++).
std::string shown(double value) {
  std::ostringstream text;
  if (value == std::floor(value) && std::fabs(value) < 1e18) {
    text << static_cast<long long>(value);
  } else {
    text << std::setprecision(9) << value;
  }
  return text.str();
}

// The float knobs' ranges: DeLeakerConfig's (deleaker/config.py, FLOAT_RANGES), on the float32 the field stores.
struct FloatRange {
  const char* name;
  float low, high;
  bool low_included;
};
constexpr FloatRange kFloatRanges[] = {
    {"std_mul_text", -10.0f, 10.0f, true},
    {"std_mul_image_image", -10.0f, 10.0f, true},
    {"k_strength", 0.0f, 10.0f, false},
};

std::string check_float(const char* name, float value) {
  for (const FloatRange& range : kFloatRanges) {
    if (std::strcmp(range.name, name) != 0) continue;
    const bool above_low = range.low_included ? value >= range.low : value > range.low;
    if (!std::isfinite(value) || !above_low || value > range.high) {
      std::ostringstream problem;
      problem << "plugin field " << name << " must be a finite number in " << (range.low_included ? "[" : "(")
              << range.low << ", " << range.high << "] (as float32), got " << shown(value);
      return problem.str();
    }
  }
  return "";
}

std::string check_lookup(const RawField& field, const char* expected) {
  const bool is_text = field.type == kFieldChar && field.data != nullptr && field.length >= 0;
  const std::string got = is_text ? std::string(static_cast<const char*>(field.data),
                                                strnlen(static_cast<const char*>(field.data), field.length))
                                  : std::string("<not text>");
  if (got != expected) return std::string(field.name) + " must be '" + expected + "', got '" + got + "'";
  return "";
}

std::string check_knobs(const PluginFields& f) {
  std::ostringstream problem;
  if (f.num_blocks() < 1) {
    problem << "plugin field num_blocks must be >= 1, got " << f.num_blocks();
  } else if (f.block_offset() < 0 || f.block_offset() >= f.num_blocks()) {
    problem << "plugin field block_offset must be in [0, num_blocks=" << f.num_blocks() << "), got "
            << f.block_offset();
  } else if (f.grid_h() < 1 || f.grid_w() < 1) {
    problem << "plugin fields grid_h, grid_w must be >= 1, got " << f.grid_h() << ", " << f.grid_w();
  } else if (static_cast<int64_t>(f.grid_h()) * f.grid_w() > DELEAKER_MAX_IMAGE_TOKENS) {
    // The kernels' grid of 64-row image tiles (deleaker_attention.cu refuses it at launch: after the plain
    // attention wrote `out`); refused when the plugin is made, as every other field.
    problem << "plugin fields grid_h x grid_w must be at most " << DELEAKER_MAX_IMAGE_TOKENS
            << " image tokens (the kernels' limit), got " << f.grid_h() << "x" << f.grid_w();
  } else if (f.stop_aggregating_at() < f.start_aggregating_from()) {
    problem << "stop_aggregating_at (" << f.stop_aggregating_at() << ") must be >= start_aggregating_from ("
            << f.start_aggregating_from() << ")";
  } else if (f.stop_intervention_at() < f.start_intervention_from()) {
    problem << "stop_intervention_at (" << f.stop_intervention_at() << ") must be >= start_intervention_from ("
            << f.start_intervention_from() << ")";
  }
  return problem.str();
}

}  // namespace

int field_slot(int index) {
  int ints = 0, floats = 0;
  for (int i = 0; i < index; ++i) (kFieldSpecs[i].kind == FieldKind::kFloat ? floats : ints) += 1;
  return kFieldSpecs[index].kind == FieldKind::kFloat ? floats : ints;
}

std::string decode_fields(const RawField* fields, int count, PluginFields* out) {
  std::vector<bool> seen(kNumFields, false);
  std::vector<std::string> unknown;
  PluginFields decoded;
  for (int i = 0; i < count; ++i) {
    const RawField& field = fields[i];
    if (field.name == nullptr) return "a plugin field has no name";
    if (std::strcmp(field.name, "plugin_namespace") == 0 || std::strcmp(field.name, "plugin_version") == 0) {
      const char* expected = field.name[7] == 'n' ? kPluginNamespace : kPluginVersion;
      std::string problem = check_lookup(field, expected);
      if (!problem.empty()) return problem;
      continue;
    }
    const int index = find_spec(field.name);
    if (index < 0) {
      unknown.push_back(field.name);
      continue;
    }
    if (seen[index]) return std::string("plugin field ") + field.name + " is given twice; give each field once";
    double value = 0.0;
    std::string problem = read_number(field, &value);
    if (!problem.empty()) return problem;
    const FieldSpec& spec = kFieldSpecs[index];
    const int slot = field_slot(index);
    if (spec.kind == FieldKind::kFloat) {
      // Checked as stored: a FLOAT64 of 1e300 is finite but becomes inf in float32.
      const float stored = static_cast<float>(value);
      problem = check_float(spec.name, stored);
      if (!problem.empty()) return problem;
      decoded.floats[slot] = stored;
    } else {
      if (!std::isfinite(value) || value != std::floor(value)) {
        return std::string("plugin field ") + spec.name + " must be an integer, got " + shown(value);
      }
      if (spec.kind == FieldKind::kFlag && value != 0.0 && value != 1.0) {
        return std::string("plugin field ") + spec.name + " is a flag and must be 0 or 1, got " + shown(value);
      }
      if (value < 0.0 || value > 2147483647.0) {
        return std::string("plugin field ") + spec.name + " must be in [0, 2^31), got " + shown(value);
      }
      decoded.ints[slot] = static_cast<int32_t>(value);
    }
    seen[index] = true;
  }
  std::vector<std::string> missing;
  for (int i = 0; i < kNumFields; ++i) {
    if (!seen[i]) missing.push_back(kFieldSpecs[i].name);
  }
  if (!missing.empty() || !unknown.empty()) {
    std::vector<std::string> expected;
    for (const FieldSpec& spec : kFieldSpecs) expected.push_back(spec.name);
    return std::string(kPluginName) + " fields: missing " + join(missing) + ", unknown " + join(unknown) +
           "; expected exactly " + join(expected);
  }
  std::string problem = check_knobs(decoded);
  if (!problem.empty()) return std::string(kPluginName) + " fields: " + problem;
  *out = decoded;
  return "";
}

}  // namespace deleaker_trt
