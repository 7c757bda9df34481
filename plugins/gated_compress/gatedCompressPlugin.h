// hatrt::GatedCompress (HCA) TensorRT plugin; OverlapGatedCompress (CSA) is the same class with the
// overlap switch on (CompressPlugin<true>, plugins/overlap_gated_compress).
// Contract: exporter/custom_ops.py, math: exporter/ops.py compress_blocks.
#pragma once

#include "../common/hatrtPlugin.h"
#include "../common/hatrtPluginCreator.h"

#include <string>

namespace hatrt
{
namespace plugin
{

//! Fields (= ONNX attributes) of both compressors: eps (float, required), quant (int 0/1/2, default 0).
struct CompressFields
{
    float eps = 0.F;
    int32_t quant = 0;

    static FieldTable<CompressFields> table();
    static std::string validate(CompressFields const& f, FieldsSeen const& seen);
};

template <bool kOverlap>
class CompressPlugin : public HatrtPlugin<CompressPlugin<kOverlap>, CompressFields>
{
public:
    using Base = HatrtPlugin<CompressPlugin<kOverlap>, CompressFields>;
    static constexpr char const* kNAME = kOverlap ? "OverlapGatedCompress" : "GatedCompress";

    explicit CompressPlugin(CompressFields const& fields)
        : Base(fields)
    {
    }

private:
    friend Base;
    using Base::mFields;

    int32_t expectedInputs() const noexcept
    {
        return kOverlap ? 7 : 5;
    }
    //! Shape rules of the op; unknown (-1) dims pass. Returns "" when fine.
    std::string checkShapes(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs) const;
    //! configurePlugin logs a wrong output count (the other plugins refuse it silently).
    bool configureOutputCount(int32_t nbOutputs) const noexcept;
    bool supportsType(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs) const noexcept;
    nvinfer1::DataType outputDataType(nvinfer1::DataType const* inputTypes) const noexcept;
    int32_t outputShape(
        nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& out, nvinfer1::IExprBuilder& exprBuilder) const noexcept;
    size_t workspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs) const noexcept;
    int32_t enqueueOp(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream);
};

// Both instantiations live in gatedCompressPlugin.cpp.
extern template class CompressPlugin<false>;
extern template class CompressPlugin<true>;

using GatedCompressPlugin = CompressPlugin<false>;
using GatedCompressPluginCreator = HatrtPluginCreator<GatedCompressPlugin>;

} // namespace plugin
} // namespace hatrt
