#include "indexerTopKPlugin.h"

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{

// ----------------------------------------------------------------------------- fields
FieldTable<IndexerTopKFields> IndexerTopKFields::table()
{
    static constexpr FieldDef<IndexerTopKFields> kDEFS[] = {
        intField("ratio", &IndexerTopKFields::ratio),
        intField("topk", &IndexerTopKFields::topk),
        intField("bf16_scores", &IndexerTopKFields::bf16_scores),
    };
    return makeFieldTable(kDEFS);
}

std::string IndexerTopKFields::validate(IndexerTopKFields const& f, FieldsSeen const& seen)
{
    if (!seen("ratio") || !seen("topk"))
        return "required fields 'ratio' and 'topk' must be given";
    if (f.ratio <= 0)
        return "ratio must be positive, got " + std::to_string(f.ratio);
    if (f.topk <= 0 || f.topk > 4096)
        return "topk must be in [1, 4096], got " + std::to_string(f.topk);
    if (f.bf16_scores != 0 && f.bf16_scores != 1)
        return "bf16_scores must be 0 or 1, got " + std::to_string(f.bf16_scores);
    return "";
}

// ----------------------------------------------------------------------------- plugin
namespace
{
//! keys may be a packed index key (uint8 or fp8 tensors): 68-byte MXFP4 or 132-byte FP8.
bool isPackedKeys(PluginTensorDesc const& d)
{
    return isByteType(d.type) && d.dims.nbDims == 3
        && (d.dims.d[2] == index_key68::kBytes || d.dims.d[2] == index_key132::kBytes);
}

DType packedKeyType(PluginTensorDesc const& d)
{
    return d.dims.d[2] == index_key68::kBytes ? DType::kIndexKey68 : DType::kIndexKey132;
}
} // namespace

std::string IndexerTopKPlugin::checkShapes(PluginTensorDesc const* in, int32_t nbInputs) const
{
    if (nbInputs != kNB_INPUTS)
        return "expected 4 inputs (q, weights, keys, q_pos), got " + std::to_string(nbInputs);
    Dims const& q = in[0].dims;
    Dims const& w = in[1].dims;
    Dims const& k = in[2].dims;
    Dims const& pos = in[3].dims;
    if (q.nbDims != 4)
        return "q must be [B, S, Hi, Di], got " + dimsToString(q);
    if (w.nbDims != 3 || !dimMatches(w.d[0], q.d[0]) || !dimMatches(w.d[1], q.d[1]) || !dimMatches(w.d[2], q.d[2]))
        return "weights must be [B, S, Hi] for q " + dimsToString(q) + ", got " + dimsToString(w);
    bool const packed = isPackedKeys(in[2]);
    if (k.nbDims != 3 || !dimMatches(k.d[0], q.d[0]) || (!packed && !dimMatches(k.d[2], q.d[3])))
        return "keys must be [B, N, Di] (or [B, N, 68 | 132] bytes) for q " + dimsToString(q) + ", got "
            + dimsToString(k);
    if (packed && !dimMatches(q.d[3], index_key68::kDim))
        return "packed index keys need Di == 128, q is " + dimsToString(q);
    if (pos.nbDims != 2 || !dimMatches(pos.d[0], q.d[0]) || !dimMatches(pos.d[1], q.d[1]))
        return "q_pos must be [B, S] for q " + dimsToString(q) + ", got " + dimsToString(pos);
    if (q.d[2] > 128)
        return "more than 128 indexer heads are not supported";
    if (q.d[3] > 256)
        return "indexer head width above 256 is not supported";
    return "";
}

bool IndexerTopKPlugin::supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/) const noexcept
{
    PluginTensorDesc const& desc = inOut[pos].desc;
    switch (pos)
    {
    case 0: // q
    case 1: // weights
        return isFloatType(desc.type);
    case 2: // keys: plain float tensors (the ONNX contract) or packed index keys (68-byte FP4, 132-byte FP8)
        return isFloatType(desc.type) || isPackedKeys(desc);
    case 3: // q_pos
        return isIndexType(desc.type);
    default: // entry_idx: exactly what getOutputDataTypes declares
        return desc.type == DataType::kINT64;
    }
}

DataType IndexerTopKPlugin::outputDataType(DataType const* /*inputTypes*/) const noexcept
{
    return DataType::kINT64;
}

int32_t IndexerTopKPlugin::outputShape(DimsExprs const* inputs, DimsExprs& out, IExprBuilder& exprBuilder) const noexcept
{
    if (inputs[0].nbDims != 4)
        return -1;
    out.nbDims = 3;
    out.d[0] = inputs[0].d[0];
    out.d[1] = inputs[0].d[1];
    out.d[2] = exprBuilder.constant(mFields.topk);
    return out.d[2] ? 0 : -1;
}

size_t IndexerTopKPlugin::workspaceSize(DynamicPluginTensorDesc const* inputs) const noexcept
{
    // monotone in rows and N, so enqueue can recompute a value <= this one from the actual shapes
    return indexer_topk_workspace_bytes(inputs[0].max.d[0] * inputs[0].max.d[1], inputs[2].max.d[1]);
}

int32_t IndexerTopKPlugin::enqueueOp(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream)
{
    std::string const shapeErr = checkShapes(inputDesc, kNB_INPUTS);
    if (!shapeErr.empty())
        return reportLaunch(kNAME, shapeErr.c_str(), cudaSuccess);
    if (outputDesc[0].type != DataType::kINT64)
        return reportLaunch(kNAME, "output must be int64", cudaSuccess);
    Dims const& q = inputDesc[0].dims;
    IndexerTopKParams p;
    p.B = q.d[0];
    p.S = q.d[1];
    p.Hi = static_cast<int32_t>(q.d[2]);
    p.Di = static_cast<int32_t>(q.d[3]);
    p.N = inputDesc[2].dims.d[1];
    p.ratio = mFields.ratio;
    p.topk = mFields.topk;
    p.bf16_scores = mFields.bf16_scores != 0;
    p.q = inputs[0];
    p.q_dtype = toDType(inputDesc[0].type);
    p.weights = inputs[1];
    p.weights_dtype = toDType(inputDesc[1].type);
    p.keys = inputs[2];
    p.keys_dtype = isPackedKeys(inputDesc[2]) ? packedKeyType(inputDesc[2]) : toDType(inputDesc[2].type);
    p.q_pos = inputs[3];
    p.q_pos_type = toIndexType(inputDesc[3].type);
    p.out = static_cast<int64_t*>(outputs[0]);
    p.workspace = workspace;
    p.workspace_bytes = workspace ? indexer_topk_workspace_bytes(p.B * p.S, p.N) : 0;
    char const* msg = indexer_topk_check(p);
    return reportLaunch(kNAME, msg, msg ? cudaSuccess : indexer_topk(p, stream));
}

} // namespace plugin
} // namespace hatrt
