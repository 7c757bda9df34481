// hatrt::RoutedExperts TensorRT plugin: the routed experts of a MoE layer as one grouped GEMM over
// the picked experts (docs/moe.md). Contract: exporter/custom_ops.py (routed_experts), math:
// custom_ops.routed_experts_reference (the MoE loop of exporter/model.py).
#pragma once

#include "../common/hatrtPlugin.h"
#include "../common/hatrtPluginCreator.h"

#include <string>

namespace hatrt
{
namespace plugin
{

//! Fields (= ONNX attributes): swiglu_limit (float, default 0 = no clamp).
struct RoutedExpertsFields
{
    float swiglu_limit = 0.F;

    static FieldTable<RoutedExpertsFields> table();
    static std::string validate(RoutedExpertsFields const& f, FieldsSeen const& seen);
};

class RoutedExpertsPlugin : public HatrtPlugin<RoutedExpertsPlugin, RoutedExpertsFields>
{
public:
    using Base = HatrtPlugin<RoutedExpertsPlugin, RoutedExpertsFields>;
    static constexpr char const* kNAME = "RoutedExperts";
    static constexpr int32_t kNB_INPUTS = 6; // x, expert_idx, expert_weights, w1, w3, w2

    explicit RoutedExpertsPlugin(RoutedExpertsFields const& fields)
        : Base(fields)
    {
    }

private:
    friend Base;

    int32_t expectedInputs() const noexcept
    {
        return kNB_INPUTS;
    }
    std::string checkShapes(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs) const;
    bool supportsType(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs) const noexcept;
    nvinfer1::DataType outputDataType(nvinfer1::DataType const* inputTypes) const noexcept;
    int32_t outputShape(
        nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& out, nvinfer1::IExprBuilder& exprBuilder) const noexcept;
    size_t workspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs) const noexcept;
    int32_t enqueueOp(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream);
};

using RoutedExpertsPluginCreator = HatrtPluginCreator<RoutedExpertsPlugin>;

} // namespace plugin
} // namespace hatrt
