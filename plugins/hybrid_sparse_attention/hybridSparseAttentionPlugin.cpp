#include "hybridSparseAttentionPlugin.h"

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{
namespace
{
// inputs: q, q_pos, window_kv, window_pos, entries, entry_idx, sink
constexpr int32_t kQ = 0, kQ_POS = 1, kWINDOW_KV = 2, kWINDOW_POS = 3, kENTRIES = 4, kENTRY_IDX = 5, kSINK = 6;
constexpr int32_t kNB_INPUTS = 7;

//! window_kv / entries may be the 584-byte FP8 entry (uint8 or fp8 tensors, last dim 584).
bool isPackedKv(PluginTensorDesc const& d)
{
    return isByteType(d.type) && d.dims.nbDims == 3 && d.dims.d[2] == entry584::kBytes;
}
} // namespace

// ----------------------------------------------------------------------------- fields
FieldTable<HybridSparseAttentionFields> HybridSparseAttentionFields::table()
{
    static constexpr FieldDef<HybridSparseAttentionFields> kDEFS[] = {
        intField("window", &HybridSparseAttentionFields::window),
        floatField("scale", &HybridSparseAttentionFields::scale),
    };
    return makeFieldTable(kDEFS);
}

std::string HybridSparseAttentionFields::validate(HybridSparseAttentionFields const& f, FieldsSeen const& seen)
{
    if (!seen("window") || !seen("scale"))
        return "required fields 'window' and 'scale' must be given";
    if (f.window < 0)
        return "window must be >= 0, got " + std::to_string(f.window);
    return "";
}

// ----------------------------------------------------------------------------- plugin
int32_t HybridSparseAttentionPlugin::expectedInputs() const noexcept
{
    return kNB_INPUTS;
}

std::string HybridSparseAttentionPlugin::checkShapes(PluginTensorDesc const* in, int32_t nbInputs) const
{
    if (nbInputs != kNB_INPUTS)
        return "expected 7 inputs (q, q_pos, window_kv, window_pos, entries, entry_idx, sink), got "
            + std::to_string(nbInputs);
    Dims const& q = in[kQ].dims;
    Dims const& qp = in[kQ_POS].dims;
    Dims const& wkv = in[kWINDOW_KV].dims;
    Dims const& wp = in[kWINDOW_POS].dims;
    Dims const& ent = in[kENTRIES].dims;
    Dims const& idx = in[kENTRY_IDX].dims;
    Dims const& sink = in[kSINK].dims;
    if (q.nbDims != 4)
        return "q must be [B, S, H, D], got " + dimsToString(q);
    if (qp.nbDims != 2 || !dimMatches(qp.d[0], q.d[0]) || !dimMatches(qp.d[1], q.d[1]))
        return "q_pos must be [B, S] for q " + dimsToString(q) + ", got " + dimsToString(qp);
    bool const packed = isPackedKv(in[kWINDOW_KV]);
    int64_t const kvWidth = packed ? int64_t(entry584::kBytes) : q.d[3];
    if (wkv.nbDims != 3 || !dimMatches(wkv.d[0], q.d[0]) || !dimMatches(wkv.d[2], kvWidth))
        return "window_kv must be [B, L, D] (or [B, L, 584] bytes) for q " + dimsToString(q) + ", got "
            + dimsToString(wkv);
    if (wp.nbDims != 2 || !dimMatches(wp.d[0], q.d[0]) || !dimMatches(wp.d[1], wkv.d[1]))
        return "window_pos must be [B, L] for window_kv " + dimsToString(wkv) + ", got " + dimsToString(wp);
    if (ent.nbDims != 3 || !dimMatches(ent.d[0], q.d[0]) || !dimMatches(ent.d[2], kvWidth))
        return "entries must be [B, N, D] (or [B, N, 584] bytes, like window_kv) for q " + dimsToString(q)
            + ", got " + dimsToString(ent);
    if (idx.nbDims != 3 || !dimMatches(idx.d[0], q.d[0]) || !dimMatches(idx.d[1], q.d[1]))
        return "entry_idx must be [B, S, K] for q " + dimsToString(q) + ", got " + dimsToString(idx);
    if (sink.nbDims != 1 || !dimMatches(sink.d[0], q.d[2]))
        return "sink must be [H] for q " + dimsToString(q) + ", got " + dimsToString(sink);
    if (packed && !dimMatches(q.d[3], entry584::kDim))
        return "the 584-byte FP8 KV layout needs D == 512, q is " + dimsToString(q);
    if (q.d[3] >= 0 && (q.d[3] % 8 != 0 || q.d[3] > 512))
        return "D must be a multiple of 8 and <= 512, q is " + dimsToString(q);
    return "";
}

bool HybridSparseAttentionPlugin::supportsType(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/) const noexcept
{
    PluginTensorDesc const& desc = inOut[pos].desc;
    switch (pos)
    {
    case kQ: return isFloatType(desc.type);
    case kQ_POS:
    case kWINDOW_POS:
    case kENTRY_IDX: return isIndexType(desc.type);
    case kWINDOW_KV:
        // plain float tensors (the ONNX contract) or the packed 584-byte FP8 entry
        return isFloatType(desc.type) || (isByteType(desc.type) && desc.dims.nbDims == 3 && desc.dims.d[2] == entry584::kBytes);
    case kENTRIES: return desc.type == inOut[kWINDOW_KV].desc.type; // one KV loader for both
    case kSINK: return isFloatType(desc.type);
    default: return desc.type == inOut[kQ].desc.type;               // out: == getOutputDataTypes
    }
}

DataType HybridSparseAttentionPlugin::outputDataType(DataType const* inputTypes) const noexcept
{
    return inputTypes[kQ];
}

int32_t HybridSparseAttentionPlugin::outputShape(
    DimsExprs const* inputs, DimsExprs& out, IExprBuilder& /*exprBuilder*/) const noexcept
{
    if (inputs[kQ].nbDims != 4)
        return -1;
    out = inputs[kQ];
    return 0;
}

size_t HybridSparseAttentionPlugin::workspaceSize(DynamicPluginTensorDesc const* inputs) const noexcept
{
    return sparse_attention_workspace_bytes(
        static_cast<int32_t>(inputs[kQ].max.d[2]), static_cast<int32_t>(inputs[kQ].max.d[3]), kWORKSPACE_SMS);
}

int32_t HybridSparseAttentionPlugin::enqueueOp(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream)
{
    std::string const shapeErr = checkShapes(inputDesc, kNB_INPUTS);
    if (!shapeErr.empty())
        return reportLaunch(kNAME, shapeErr.c_str(), cudaSuccess);
    if (outputDesc[0].type != inputDesc[kQ].type)
        return reportLaunch(kNAME, "output dtype must equal q's dtype", cudaSuccess);
    Dims const& q = inputDesc[kQ].dims;
    SparseAttentionParams p;
    p.B = q.d[0];
    p.S = q.d[1];
    p.H = static_cast<int32_t>(q.d[2]);
    p.D = static_cast<int32_t>(q.d[3]);
    p.L = inputDesc[kWINDOW_KV].dims.d[1];
    p.N = inputDesc[kENTRIES].dims.d[1];
    p.K = inputDesc[kENTRY_IDX].dims.d[2];
    p.window = mFields.window;
    p.scale = mFields.scale;
    p.q = inputs[kQ];
    p.q_dtype = toDType(inputDesc[kQ].type);
    p.q_pos = inputs[kQ_POS];
    p.q_pos_type = toIndexType(inputDesc[kQ_POS].type);
    p.window_kv = inputs[kWINDOW_KV];
    p.window_pos = inputs[kWINDOW_POS];
    p.window_pos_type = toIndexType(inputDesc[kWINDOW_POS].type);
    p.entries = inputs[kENTRIES];
    p.entry_idx = inputs[kENTRY_IDX];
    p.entry_idx_type = toIndexType(inputDesc[kENTRY_IDX].type);
    p.kv_dtype = isPackedKv(inputDesc[kWINDOW_KV]) ? DType::kEntry584 : toDType(inputDesc[kWINDOW_KV].type);
    if (inputDesc[kENTRIES].type != inputDesc[kWINDOW_KV].type)
        return reportLaunch(kNAME, "window_kv and entries must have the same dtype", cudaSuccess);
    p.sink = inputs[kSINK];
    p.sink_dtype = toDType(inputDesc[kSINK].type);
    p.out = outputs[0];
    p.workspace = workspace;
    p.workspace_bytes = workspace ? sparse_attention_workspace_bytes(p.H, p.D, kWORKSPACE_SMS) : 0;
    char const* msg = sparse_attention_check(p);
    return reportLaunch(kNAME, msg, msg ? cudaSuccess : sparse_attention(p, stream));
}

} // namespace plugin
} // namespace hatrt
