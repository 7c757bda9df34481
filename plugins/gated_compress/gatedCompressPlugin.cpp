#include "gatedCompressPlugin.h"

#include <cstring>
#include <memory>

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{
namespace
{
char const* const kGATED_NAME = "GatedCompress";
char const* const kOVERLAP_NAME = "OverlapGatedCompress";
} // namespace

GatedCompressPlugin::GatedCompressPlugin(float eps, int32_t quant, bool overlap)
    : mEps(eps)
    , mQuant(quant)
    , mOverlap(overlap)
{
}

IPluginCapability* GatedCompressPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* GatedCompressPlugin::clone() noexcept
{
    try
    {
        return new GatedCompressPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* GatedCompressPlugin::getPluginName() const noexcept
{
    return mOverlap ? kOVERLAP_NAME : kGATED_NAME;
}

char const* GatedCompressPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* GatedCompressPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t GatedCompressPlugin::getNbOutputs() const noexcept
{
    return 1;
}

std::string GatedCompressPlugin::checkShapes(Dims const* in, int32_t nbInputs) const
{
    if (nbInputs != expectedInputs())
    {
        return "expected " + std::to_string(expectedInputs()) + " inputs, got " + std::to_string(nbInputs);
    }
    Dims const& kv = in[0];
    Dims const& score = in[1];
    int32_t const iw = mOverlap ? 4 : 2; // norm_weight
    Dims const& nw = in[iw];
    Dims const& cs = in[iw + 1];
    Dims const& sn = in[iw + 2];
    if (kv.nbDims != 4)
        return "kv must be [B, N, m, W], got " + dimsToString(kv);
    if (score.nbDims != 4)
        return "score must be [B, N, m, W], got " + dimsToString(score);
    for (int32_t i = 0; i < 4; ++i)
        if (!dimMatches(kv.d[i], score.d[i]))
            return "score " + dimsToString(score) + " must have the shape of kv " + dimsToString(kv);
    int64_t D = mOverlap ? -1 : kv.d[3];
    if (mOverlap)
    {
        Dims const& pk = in[2];
        Dims const& ps = in[3];
        if (pk.nbDims != 3 || ps.nbDims != 3)
            return "prev_kv / prev_score must be [B, m, D], got " + dimsToString(pk) + " / " + dimsToString(ps);
        for (int32_t i = 0; i < 3; ++i)
            if (!dimMatches(pk.d[i], ps.d[i]))
                return "prev_score " + dimsToString(ps) + " must have the shape of prev_kv " + dimsToString(pk);
        if (!dimMatches(pk.d[0], kv.d[0]) || !dimMatches(pk.d[1], kv.d[2]))
            return "prev_kv " + dimsToString(pk) + " must be [B, m, D] for kv " + dimsToString(kv);
        D = pk.d[2];
        if (D >= 0 && kv.d[3] >= 0 && kv.d[3] != 2 * D)
            return "kv " + dimsToString(kv) + " must be 2D = " + std::to_string(2 * D) + " wide (CSA halves)";
    }
    if (nw.nbDims != 1 || !dimMatches(nw.d[0], D))
        return "norm_weight must be [D] = [" + std::to_string(D) + "], got " + dimsToString(nw);
    if (cs.nbDims != 3 || sn.nbDims != 3)
        return "cos / sin must be [B, N, r/2], got " + dimsToString(cs) + " / " + dimsToString(sn);
    for (int32_t i = 0; i < 3; ++i)
        if (!dimMatches(cs.d[i], sn.d[i]))
            return "sin " + dimsToString(sn) + " must have the shape of cos " + dimsToString(cs);
    if (!dimMatches(cs.d[0], kv.d[0]) || !dimMatches(cs.d[1], kv.d[1]))
        return "cos " + dimsToString(cs) + " must be [B, N, r/2] for kv " + dimsToString(kv);
    if (D >= 0 && cs.d[2] >= 0 && 2 * cs.d[2] > D)
        return "RoPE width 2 * cos.shape[-1] exceeds D";
    if (D > 1024)
        return "D > 1024 is not supported";
    return "";
}

int32_t GatedCompressPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbOutputs != 1)
        {
            logError(std::string(getPluginName()) + ": expected 1 output");
            return -1;
        }
        std::vector<Dims> dims(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
            dims[i] = in[i].desc.dims;
        std::string const err = checkShapes(dims.data(), nbInputs);
        if (!err.empty())
        {
            logError(std::string(getPluginName()) + ": " + err);
            return -1;
        }
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

bool GatedCompressPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs)
        return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
        return false;
    if (pos < nbInputs)
        return isFloatType(desc.type);
    return desc.type == DataType::kFLOAT; // == getOutputDataTypes
}

int32_t GatedCompressPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != expectedInputs())
        return -1;
    outputTypes[0] = DataType::kFLOAT;
    return 0;
}

int32_t GatedCompressPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbOutputs != 1 || nbInputs != expectedInputs() || inputs[0].nbDims != 4)
        return -1;
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    if (mOverlap)
    {
        if (inputs[2].nbDims != 3)
            return -1;
        outputs[0].d[2] = inputs[2].d[2]; // D from prev_kv (kv is 2D wide)
    }
    else
    {
        outputs[0].d[2] = inputs[0].d[3];
    }
    return 0;
}

size_t GatedCompressPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    return 0;
}

int32_t GatedCompressPlugin::onShapeChange(
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
            logError(std::string(getPluginName()) + ": " + err);
            return -1;
        }
        return 0;
    }
    catch (...)
    {
        return -1;
    }
}

int32_t GatedCompressPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    try
    {
        if (outputDesc[0].type != DataType::kFLOAT)
            return reportLaunch(getPluginName(), "output must be float32", cudaSuccess);
        Dims const& kv = inputDesc[0].dims;
        int32_t const iw = mOverlap ? 4 : 2;
        CompressParams p;
        p.B = kv.d[0];
        p.N = kv.d[1];
        p.m = static_cast<int32_t>(kv.d[2]);
        p.D = static_cast<int32_t>(mOverlap ? inputDesc[2].dims.d[2] : kv.d[3]);
        p.r = static_cast<int32_t>(2 * inputDesc[iw + 1].dims.d[2]);
        p.overlap = mOverlap;
        p.eps = mEps;
        p.quant = mQuant;
        p.kv = inputs[0];
        p.kv_dtype = toDType(inputDesc[0].type);
        p.score = inputs[1];
        p.score_dtype = toDType(inputDesc[1].type);
        if (mOverlap)
        {
            p.prev_kv = inputs[2];
            p.prev_kv_dtype = toDType(inputDesc[2].type);
            p.prev_score = inputs[3];
            p.prev_score_dtype = toDType(inputDesc[3].type);
        }
        p.norm_weight = inputs[iw];
        p.norm_weight_dtype = toDType(inputDesc[iw].type);
        p.cos = inputs[iw + 1];
        p.cos_dtype = toDType(inputDesc[iw + 1].type);
        p.sin = inputs[iw + 2];
        p.sin_dtype = toDType(inputDesc[iw + 2].type);
        p.out = static_cast<float*>(outputs[0]);
        if (p.N == 0 || p.B == 0)
            return 0;
        std::vector<Dims> dims(static_cast<size_t>(expectedInputs()));
        for (int32_t i = 0; i < expectedInputs(); ++i)
            dims[i] = inputDesc[i].dims;
        std::string const shapeErr = checkShapes(dims.data(), expectedInputs());
        if (!shapeErr.empty())
            return reportLaunch(getPluginName(), shapeErr.c_str(), cudaSuccess);
        char const* msg = compress_check(p);
        return reportLaunch(getPluginName(), msg, msg ? cudaSuccess : compress(p, stream));
    }
    catch (...)
    {
        return -1;
    }
}

IPluginV3* GatedCompressPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* GatedCompressPlugin::getFieldsToSerialize() noexcept
{
    mSerialized.clear();
    mSerialized.addFloat("eps", &mEps);
    mSerialized.addInt("quant", &mQuant);
    return mSerialized.get();
}

// ----------------------------------------------------------------------------- creator
std::string parseCompressFields(PluginFieldCollection const* fc, float& eps, int32_t& quant)
{
    if (fc == nullptr)
        return "no plugin fields";
    bool haveEps = false;
    quant = 0;
    std::string err;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr)
            continue;
        if (std::strcmp(f.name, "eps") == 0)
        {
            if (!readFloatField(f, eps, err))
                return err;
            haveEps = true;
        }
        else if (std::strcmp(f.name, "quant") == 0)
        {
            if (!readIntField(f, quant, err))
                return err;
        }
    }
    if (!haveEps)
        return "required field 'eps' is missing";
    if (!(eps >= 0.F))
        return "eps must be >= 0";
    if (quant < 0 || quant > 2)
        return "quant must be 0 (none), 1 (fp8) or 2 (fp4), got " + std::to_string(quant);
    return "";
}

GatedCompressPluginCreator::GatedCompressPluginCreator()
{
    mAttributes.emplace_back("eps", nullptr, PluginFieldType::kFLOAT32, 1);
    mAttributes.emplace_back("quant", nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mAttributes.size());
    mFC.fields = mAttributes.data();
}

char const* GatedCompressPluginCreator::getPluginName() const noexcept
{
    return kGATED_NAME;
}

char const* GatedCompressPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* GatedCompressPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* GatedCompressPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* GatedCompressPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        float eps = 0.F;
        int32_t quant = 0;
        std::string const err = parseCompressFields(fc, eps, quant);
        if (!err.empty())
        {
            logError(std::string(kGATED_NAME) + " '" + (name ? name : "") + "': " + err);
            return nullptr;
        }
        return new GatedCompressPlugin(eps, quant, false);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace hatrt
