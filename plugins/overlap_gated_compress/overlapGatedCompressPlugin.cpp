#include "overlapGatedCompressPlugin.h"

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{
namespace
{
char const* const kNAME = "OverlapGatedCompress";
} // namespace

IPluginV3* OverlapGatedCompressPlugin::clone() noexcept
{
    try
    {
        return new OverlapGatedCompressPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

OverlapGatedCompressPluginCreator::OverlapGatedCompressPluginCreator()
{
    mAttributes.emplace_back("eps", nullptr, PluginFieldType::kFLOAT32, 1);
    mAttributes.emplace_back("quant", nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mAttributes.size());
    mFC.fields = mAttributes.data();
}

char const* OverlapGatedCompressPluginCreator::getPluginName() const noexcept
{
    return kNAME;
}

char const* OverlapGatedCompressPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* OverlapGatedCompressPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* OverlapGatedCompressPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* OverlapGatedCompressPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        float eps = 0.F;
        int32_t quant = 0;
        std::string const err = parseCompressFields(fc, eps, quant);
        if (!err.empty())
        {
            logError(std::string(kNAME) + " '" + (name ? name : "") + "': " + err);
            return nullptr;
        }
        return new OverlapGatedCompressPlugin(eps, quant);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace hatrt
