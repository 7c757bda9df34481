// hatrt::OverlapGatedCompress (CSA, overlapping blocks) TensorRT plugin. Same implementation as
// GatedCompress with the overlap switch on: inputs kv, score [B, N, m, 2D], prev_kv, prev_score
// [B, m, D], norm_weight, cos, sin; output float32 [B, N, D].
#pragma once

#include "../gated_compress/gatedCompressPlugin.h"

namespace hatrt
{
namespace plugin
{

class OverlapGatedCompressPlugin : public GatedCompressPlugin
{
public:
    OverlapGatedCompressPlugin(float eps, int32_t quant)
        : GatedCompressPlugin(eps, quant, true)
    {
    }
    OverlapGatedCompressPlugin(OverlapGatedCompressPlugin const&) = default;

    nvinfer1::IPluginV3* clone() noexcept override;
};

class OverlapGatedCompressPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    OverlapGatedCompressPluginCreator();
    ~OverlapGatedCompressPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mAttributes;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace plugin
} // namespace hatrt
