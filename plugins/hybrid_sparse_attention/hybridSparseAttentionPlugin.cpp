#include "hybridSparseAttentionPlugin.h"

#include <cstring>

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{
namespace
{
char const* const kNAME = "HybridSparseAttention";
// inputs: q, q_pos, window_kv, window_pos, entries, entry_idx, sink
constexpr int32_t kQ = 0, kQ_POS = 1, kWINDOW_KV = 2, kWINDOW_POS = 3, kENTRIES = 4, kENTRY_IDX = 5, kSINK = 6;
constexpr int32_t kNB_INPUTS = 7;

//! window_kv / entries may be the 584-byte FP8 entry (uint8 or fp8 tensors, last dim 584).
bool isPackedKv(PluginTensorDesc const& d)
{
    return isByteType(d.type) && d.dims.nbDims == 3 && d.dims.d[2] == entry584::kBytes;
}
} // namespace

HybridSparseAttentionPlugin::HybridSparseAttentionPlugin(int32_t window_, float scale_)
    : window(window_)
    , scale(scale_)
{
}

IPluginCapability* HybridSparseAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* HybridSparseAttentionPlugin::clone() noexcept
{
    try
    {
        return new HybridSparseAttentionPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* HybridSparseAttentionPlugin::getPluginName() const noexcept
{
    return kNAME;
}

char const* HybridSparseAttentionPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* HybridSparseAttentionPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t HybridSparseAttentionPlugin::getNbOutputs() const noexcept
{
    return 1;
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

int32_t HybridSparseAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbOutputs != 1)
            return -1;
        std::vector<PluginTensorDesc> descs(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
            descs[i] = in[i].desc;
        std::string const err = checkShapes(descs.data(), nbInputs);
        if (!err.empty())
        {
            logError(std::string(kNAME) + ": " + err);
            return -1;
        }
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

bool HybridSparseAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs)
        return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
        return false;
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

int32_t HybridSparseAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != kNB_INPUTS)
        return -1;
    outputTypes[0] = inputTypes[kQ];
    return 0;
}

int32_t HybridSparseAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbOutputs != 1 || nbInputs != kNB_INPUTS || inputs[kQ].nbDims != 4)
        return -1;
    outputs[0] = inputs[kQ];
    return 0;
}

size_t HybridSparseAttentionPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    if (nbInputs != kNB_INPUTS)
        return 0;
    return sparse_attention_workspace_bytes(
        static_cast<int32_t>(inputs[kQ].max.d[2]), static_cast<int32_t>(inputs[kQ].max.d[3]), kWORKSPACE_SMS);
}

int32_t HybridSparseAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbOutputs != 1)
            return -1;
        std::string const err = checkShapes(in, nbInputs);
        if (!err.empty())
        {
            logError(std::string(kNAME) + ": " + err);
            return -1;
        }
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

int32_t HybridSparseAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
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
        p.window = window;
        p.scale = scale;
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
    catch (...)
    {
        return -1;
    }
}

IPluginV3* HybridSparseAttentionPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* HybridSparseAttentionPlugin::getFieldsToSerialize() noexcept
{
    mSerialized.clear();
    mSerialized.addInt("window", &window);
    mSerialized.addFloat("scale", &scale);
    return mSerialized.get();
}

// ----------------------------------------------------------------------------- creator
HybridSparseAttentionPluginCreator::HybridSparseAttentionPluginCreator()
{
    mAttributes.emplace_back("window", nullptr, PluginFieldType::kINT32, 1);
    mAttributes.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFC.nbFields = static_cast<int32_t>(mAttributes.size());
    mFC.fields = mAttributes.data();
}

char const* HybridSparseAttentionPluginCreator::getPluginName() const noexcept
{
    return kNAME;
}

char const* HybridSparseAttentionPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* HybridSparseAttentionPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* HybridSparseAttentionPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* HybridSparseAttentionPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::string const who = std::string(kNAME) + " '" + (name ? name : "") + "': ";
        if (fc == nullptr)
        {
            logError(who + "no plugin fields");
            return nullptr;
        }
        int32_t window = 0;
        float scale = 0.F;
        bool haveWindow = false, haveScale = false;
        std::string err;
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
                continue;
            bool ok = true;
            if (std::strcmp(f.name, "window") == 0)
                ok = readIntField(f, window, err), haveWindow = true;
            else if (std::strcmp(f.name, "scale") == 0)
                ok = readFloatField(f, scale, err), haveScale = true;
            if (!ok)
            {
                logError(who + err);
                return nullptr;
            }
        }
        if (!haveWindow || !haveScale)
            err = "required fields 'window' and 'scale' must be given";
        else if (window < 0)
            err = "window must be >= 0, got " + std::to_string(window);
        if (!err.empty())
        {
            logError(who + err);
            return nullptr;
        }
        return new HybridSparseAttentionPlugin(window, scale);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace hatrt
