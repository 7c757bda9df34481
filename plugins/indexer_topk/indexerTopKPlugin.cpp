#include "indexerTopKPlugin.h"

#include <cstring>

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{
namespace
{
char const* const kNAME = "IndexerTopK";
constexpr int32_t kNB_INPUTS = 4; // q, weights, keys, q_pos
} // namespace

IndexerTopKPlugin::IndexerTopKPlugin(int32_t ratio_, int32_t topk_, int32_t bf16Scores)
    : ratio(ratio_)
    , topk(topk_)
    , bf16_scores(bf16Scores)
{
}

IPluginCapability* IndexerTopKPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* IndexerTopKPlugin::clone() noexcept
{
    try
    {
        return new IndexerTopKPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* IndexerTopKPlugin::getPluginName() const noexcept
{
    return kNAME;
}

char const* IndexerTopKPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* IndexerTopKPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t IndexerTopKPlugin::getNbOutputs() const noexcept
{
    return 1;
}

std::string IndexerTopKPlugin::checkShapes(Dims const* in, int32_t nbInputs) const
{
    if (nbInputs != kNB_INPUTS)
        return "expected 4 inputs (q, weights, keys, q_pos), got " + std::to_string(nbInputs);
    Dims const& q = in[0];
    Dims const& w = in[1];
    Dims const& k = in[2];
    Dims const& pos = in[3];
    if (q.nbDims != 4)
        return "q must be [B, S, Hi, Di], got " + dimsToString(q);
    if (w.nbDims != 3 || !dimMatches(w.d[0], q.d[0]) || !dimMatches(w.d[1], q.d[1]) || !dimMatches(w.d[2], q.d[2]))
        return "weights must be [B, S, Hi] for q " + dimsToString(q) + ", got " + dimsToString(w);
    if (k.nbDims != 3 || !dimMatches(k.d[0], q.d[0]) || !dimMatches(k.d[2], q.d[3]))
        return "keys must be [B, N, Di] for q " + dimsToString(q) + ", got " + dimsToString(k);
    if (pos.nbDims != 2 || !dimMatches(pos.d[0], q.d[0]) || !dimMatches(pos.d[1], q.d[1]))
        return "q_pos must be [B, S] for q " + dimsToString(q) + ", got " + dimsToString(pos);
    if (q.d[2] > 128)
        return "more than 128 indexer heads are not supported";
    if (q.d[3] > 256)
        return "indexer head width above 256 is not supported";
    return "";
}

int32_t IndexerTopKPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbOutputs != 1)
            return -1;
        std::vector<Dims> dims(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
            dims[i] = in[i].desc.dims;
        std::string const err = checkShapes(dims.data(), nbInputs);
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

bool IndexerTopKPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs)
        return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
        return false;
    switch (pos)
    {
    case 0: // q
    case 1: // weights
    case 2: // keys
        return isFloatType(desc.type);
    case 3: // q_pos
        return isIndexType(desc.type);
    default: // entry_idx: exactly what getOutputDataTypes declares
        return desc.type == DataType::kINT64;
    }
}

int32_t IndexerTopKPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != kNB_INPUTS)
        return -1;
    outputTypes[0] = DataType::kINT64;
    return 0;
}

int32_t IndexerTopKPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbOutputs != 1 || nbInputs != kNB_INPUTS || inputs[0].nbDims != 4)
        return -1;
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2] = exprBuilder.constant(topk);
    return outputs[0].d[2] ? 0 : -1;
}

size_t IndexerTopKPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    if (nbInputs != kNB_INPUTS)
        return 0;
    // monotone in rows and N, so enqueue can recompute a value <= this one from the actual shapes
    return indexer_topk_workspace_bytes(inputs[0].max.d[0] * inputs[0].max.d[1], inputs[2].max.d[1]);
}

int32_t IndexerTopKPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbOutputs != 1)
            return -1;
        std::vector<Dims> dims(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
            dims[i] = in[i].dims;
        std::string const err = checkShapes(dims.data(), nbInputs);
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

int32_t IndexerTopKPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < kNB_INPUTS; ++i)
            dims[i] = inputDesc[i].dims;
        std::string const shapeErr = checkShapes(dims, kNB_INPUTS);
        if (!shapeErr.empty())
            return reportLaunch(kNAME, shapeErr.c_str(), cudaSuccess);
        if (outputDesc[0].type != DataType::kINT64)
            return reportLaunch(kNAME, "output must be int64", cudaSuccess);
        Dims const& q = dims[0];
        IndexerTopKParams p;
        p.B = q.d[0];
        p.S = q.d[1];
        p.Hi = static_cast<int32_t>(q.d[2]);
        p.Di = static_cast<int32_t>(q.d[3]);
        p.N = dims[2].d[1];
        p.ratio = ratio;
        p.topk = topk;
        p.bf16_scores = bf16_scores != 0;
        p.q = inputs[0];
        p.q_dtype = toDType(inputDesc[0].type);
        p.weights = inputs[1];
        p.weights_dtype = toDType(inputDesc[1].type);
        p.keys = inputs[2];
        p.keys_dtype = toDType(inputDesc[2].type);
        p.q_pos = inputs[3];
        p.q_pos_type = toIndexType(inputDesc[3].type);
        p.out = static_cast<int64_t*>(outputs[0]);
        p.workspace = workspace;
        p.workspace_bytes = workspace ? indexer_topk_workspace_bytes(p.B * p.S, p.N) : 0;
        char const* msg = indexer_topk_check(p);
        return reportLaunch(kNAME, msg, msg ? cudaSuccess : indexer_topk(p, stream));
    }
    catch (...)
    {
        return -1;
    }
}

IPluginV3* IndexerTopKPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* IndexerTopKPlugin::getFieldsToSerialize() noexcept
{
    mSerialized.clear();
    mSerialized.addInt("ratio", &ratio);
    mSerialized.addInt("topk", &topk);
    mSerialized.addInt("bf16_scores", &bf16_scores);
    return mSerialized.get();
}

// ----------------------------------------------------------------------------- creator
IndexerTopKPluginCreator::IndexerTopKPluginCreator()
{
    mAttributes.emplace_back("ratio", nullptr, PluginFieldType::kINT32, 1);
    mAttributes.emplace_back("topk", nullptr, PluginFieldType::kINT32, 1);
    mAttributes.emplace_back("bf16_scores", nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mAttributes.size());
    mFC.fields = mAttributes.data();
}

char const* IndexerTopKPluginCreator::getPluginName() const noexcept
{
    return kNAME;
}

char const* IndexerTopKPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* IndexerTopKPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* IndexerTopKPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* IndexerTopKPluginCreator::createPlugin(
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
        int32_t ratio = 0, topk = 0, bf16 = 0;
        bool haveRatio = false, haveTopk = false;
        std::string err;
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
                continue;
            bool ok = true;
            if (std::strcmp(f.name, "ratio") == 0)
                ok = readIntField(f, ratio, err), haveRatio = true;
            else if (std::strcmp(f.name, "topk") == 0)
                ok = readIntField(f, topk, err), haveTopk = true;
            else if (std::strcmp(f.name, "bf16_scores") == 0)
                ok = readIntField(f, bf16, err);
            if (!ok)
            {
                logError(who + err);
                return nullptr;
            }
        }
        if (!haveRatio || !haveTopk)
            err = "required fields 'ratio' and 'topk' must be given";
        else if (ratio <= 0)
            err = "ratio must be positive, got " + std::to_string(ratio);
        else if (topk <= 0 || topk > 4096)
            err = "topk must be in [1, 4096], got " + std::to_string(topk);
        else if (bf16 != 0 && bf16 != 1)
            err = "bf16_scores must be 0 or 1, got " + std::to_string(bf16);
        if (!err.empty())
        {
            logError(who + err);
            return nullptr;
        }
        return new IndexerTopKPlugin(ratio, topk, bf16);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace hatrt
