// hatrt::GatedCompress (HCA) TensorRT plugin; OverlapGatedCompress (CSA) derives from it.
// Contract: exporter/custom_ops.py, math: exporter/ops.py compress_blocks.
#pragma once

#include "../common/hatrtPluginCommon.h"

#include <string>

namespace hatrt
{
namespace plugin
{

class GatedCompressPlugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    //! Fields (= ONNX attributes): eps (float, required), quant (int 0/1/2, default 0).
    GatedCompressPlugin(float eps, int32_t quant, bool overlap = false);
    GatedCompressPlugin(GatedCompressPlugin const&) = default;
    ~GatedCompressPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    int32_t expectedInputs() const noexcept
    {
        return mOverlap ? 7 : 5;
    }
    //! Shape rules of the op; unknown (-1) dims pass. Returns "" when fine.
    std::string checkShapes(nvinfer1::Dims const* in, int32_t nbInputs) const;

    float mEps;
    int32_t mQuant;
    bool mOverlap;
    FieldCollection mSerialized;
};

class GatedCompressPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    GatedCompressPluginCreator();
    ~GatedCompressPluginCreator() override = default;

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

//! Parses eps / quant for both compressor creators. Returns "" when fine.
std::string parseCompressFields(nvinfer1::PluginFieldCollection const* fc, float& eps, int32_t& quant);

} // namespace plugin
} // namespace hatrt
