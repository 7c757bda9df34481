// Shared pieces of the hatrt TensorRT plugins: namespace/version, logging through the logger
// finder TensorRT hands to the library, dtype mapping to the kernel launchers, plugin-field parsing
// and serialization helpers.
#pragma once

#include "NvInferRuntime.h"
#include "hatrt/kernels.h"

#include <cstdint>
#include <string>
#include <vector>

namespace hatrt
{
namespace plugin
{

//! The ONNX nodes carry plugin_namespace="hatrt", plugin_version="1" (exporter/onnx_ops.py).
constexpr char const* kPLUGIN_NAMESPACE = "hatrt";
constexpr char const* kPLUGIN_VERSION = "1";

//! Called by the exported setLoggerFinder().
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
//! Log through TensorRT's logger when one was handed over, else to stderr.
void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept;
inline void logError(std::string const& msg) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, msg);
}

// ----------------------------------------------------------------------------- types
inline bool isFloatType(nvinfer1::DataType t)
{
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF || t == nvinfer1::DataType::kBF16;
}

inline bool isIndexType(nvinfer1::DataType t)
{
    return t == nvinfer1::DataType::kINT32 || t == nvinfer1::DataType::kINT64;
}

//! Byte-typed tensors that may carry the 584-byte FP8 KV entry.
inline bool isByteType(nvinfer1::DataType t)
{
    return t == nvinfer1::DataType::kUINT8 || t == nvinfer1::DataType::kFP8;
}

inline DType toDType(nvinfer1::DataType t)
{
    switch (t)
    {
    case nvinfer1::DataType::kHALF: return DType::kFloat16;
    case nvinfer1::DataType::kBF16: return DType::kBFloat16;
    default: return DType::kFloat32;
    }
}

inline IndexType toIndexType(nvinfer1::DataType t)
{
    return t == nvinfer1::DataType::kINT64 ? IndexType::kInt64 : IndexType::kInt32;
}

char const* dataTypeName(nvinfer1::DataType t) noexcept;
std::string dimsToString(nvinfer1::Dims const& d);

//! d[i] when known (>= 0) in both, compare; unknown (-1) dimensions always match.
inline bool dimMatches(int64_t a, int64_t b)
{
    return a < 0 || b < 0 || a == b;
}

// ----------------------------------------------------------------------------- fields
//! Reads an integer attribute (INT32 from the ONNX parser; INT64/INT16/INT8 also accepted).
bool readIntField(nvinfer1::PluginField const& f, int32_t& out, std::string& err);
//! Reads a float attribute (FLOAT32 from the ONNX parser; FLOAT64/FLOAT16 also accepted).
bool readFloatField(nvinfer1::PluginField const& f, float& out, std::string& err);

//! Owns the field list returned by getFieldsToSerialize().
class FieldCollection
{
public:
    void clear()
    {
        mFields.clear();
    }
    void addInt(char const* name, int32_t const* value)
    {
        mFields.emplace_back(name, value, nvinfer1::PluginFieldType::kINT32, 1);
    }
    void addFloat(char const* name, float const* value)
    {
        mFields.emplace_back(name, value, nvinfer1::PluginFieldType::kFLOAT32, 1);
    }
    nvinfer1::PluginFieldCollection const* get()
    {
        mFC.nbFields = static_cast<int32_t>(mFields.size());
        mFC.fields = mFields.data();
        return &mFC;
    }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFC{};
};

//! Reports a kernel launcher's result from enqueue: 0 on success, -1 (with a logged message) if not.
int32_t reportLaunch(char const* plugin, char const* checkMessage, cudaError_t err) noexcept;

} // namespace plugin
} // namespace hatrt
