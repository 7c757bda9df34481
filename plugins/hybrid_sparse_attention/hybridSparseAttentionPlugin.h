// hatrt::HybridSparseAttention TensorRT plugin. Contract: exporter/custom_ops.py, math:
// exporter/ops.py sparse_attention (window + selected compressed entries + sink, one softmax).
#pragma once

#include "../common/hatrtPlugin.h"
#include "../common/hatrtPluginCreator.h"

#include <string>

namespace hatrt
{
namespace plugin
{

//! Fields (= ONNX attributes): window (int), scale (float).
struct HybridSparseAttentionFields
{
    int32_t window = 0;
    float scale = 0.F;

    static FieldTable<HybridSparseAttentionFields> table();
    static std::string validate(HybridSparseAttentionFields const& f, FieldsSeen const& seen);
};

class HybridSparseAttentionPlugin : public HatrtPlugin<HybridSparseAttentionPlugin, HybridSparseAttentionFields>
{
public:
    using Base = HatrtPlugin<HybridSparseAttentionPlugin, HybridSparseAttentionFields>;
    static constexpr char const* kNAME = "HybridSparseAttention";
    //! SM count the workspace is sized for (the launcher never splits beyond what fits).
    static constexpr int32_t kWORKSPACE_SMS = 160;

    explicit HybridSparseAttentionPlugin(HybridSparseAttentionFields const& fields)
        : Base(fields)
    {
    }

private:
    friend Base;

    int32_t expectedInputs() const noexcept;
    std::string checkShapes(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs) const;
    bool supportsType(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs) const noexcept;
    nvinfer1::DataType outputDataType(nvinfer1::DataType const* inputTypes) const noexcept;
    int32_t outputShape(
        nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& out, nvinfer1::IExprBuilder& exprBuilder) const noexcept;
    size_t workspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs) const noexcept;
    int32_t enqueueOp(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream);
};

using HybridSparseAttentionPluginCreator = HatrtPluginCreator<HybridSparseAttentionPlugin>;

} // namespace plugin
} // namespace hatrt
