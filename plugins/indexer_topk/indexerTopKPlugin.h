// hatrt::IndexerTopK TensorRT plugin. Contract: exporter/custom_ops.py, math: exporter/ops.py
// indexer_topk (rank order, lower index first on equal scores, -1 padded, visibility (t+1)//ratio).
#pragma once

#include "../common/hatrtPlugin.h"
#include "../common/hatrtPluginCreator.h"

#include <string>

namespace hatrt
{
namespace plugin
{

//! Fields (= ONNX attributes): ratio (int), topk (int), bf16_scores (int 0/1, default 0).
struct IndexerTopKFields
{
    int32_t ratio = 0;
    int32_t topk = 0;
    int32_t bf16_scores = 0;

    static FieldTable<IndexerTopKFields> table();
    static std::string validate(IndexerTopKFields const& f, FieldsSeen const& seen);
};

class IndexerTopKPlugin : public HatrtPlugin<IndexerTopKPlugin, IndexerTopKFields>
{
public:
    using Base = HatrtPlugin<IndexerTopKPlugin, IndexerTopKFields>;
    static constexpr char const* kNAME = "IndexerTopK";
    static constexpr int32_t kNB_INPUTS = 4; // q, weights, keys, q_pos

    explicit IndexerTopKPlugin(IndexerTopKFields const& fields)
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

using IndexerTopKPluginCreator = HatrtPluginCreator<IndexerTopKPlugin>;

} // namespace plugin
} // namespace hatrt
