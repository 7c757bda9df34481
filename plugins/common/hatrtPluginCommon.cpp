#include "hatrtPluginCommon.h"

#include <atomic>
#include <cstdio>
#include <sstream>

namespace hatrt
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        std::string const text = std::string("[hatrt plugin] ") + msg;
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
    }
}

char const* dataTypeName(nvinfer1::DataType t) noexcept
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kINT8: return "int8";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kUINT8: return "uint8";
    case nvinfer1::DataType::kFP8: return "fp8";
    default: return "other";
    }
}

std::string dimsToString(nvinfer1::Dims const& d)
{
    std::ostringstream s;
    s << "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s << (i ? ", " : "") << d.d[i];
    }
    s << "]";
    return s.str();
}

bool readIntField(nvinfer1::PluginField const& f, int32_t& out, std::string& err)
{
    if (f.data == nullptr || f.length < 1)
    {
        err = std::string("field '") + f.name + "' has no value";
        return false;
    }
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT64: out = static_cast<int32_t>(*static_cast<int64_t const*>(f.data)); return true;
    case nvinfer1::PluginFieldType::kINT16: out = *static_cast<int16_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT8: out = *static_cast<int8_t const*>(f.data); return true;
    default: err = std::string("field '") + f.name + "' must be an integer (INT32)"; return false;
    }
}

bool readFloatField(nvinfer1::PluginField const& f, float& out, std::string& err)
{
    if (f.data == nullptr || f.length < 1)
    {
        err = std::string("field '") + f.name + "' has no value";
        return false;
    }
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kFLOAT64: out = static_cast<float>(*static_cast<double const*>(f.data)); return true;
    default: err = std::string("field '") + f.name + "' must be a float (FLOAT32)"; return false;
    }
}

int32_t reportLaunch(char const* plugin, char const* checkMessage, cudaError_t err) noexcept
{
    if (checkMessage != nullptr)
    {
        logError(std::string(plugin) + "::enqueue: unsupported input: " + checkMessage);
        return -1;
    }
    if (err != cudaSuccess)
    {
        logError(std::string(plugin) + "::enqueue: CUDA error: " + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

} // namespace plugin
} // namespace hatrt
