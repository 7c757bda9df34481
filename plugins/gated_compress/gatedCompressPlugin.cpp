#include "gatedCompressPlugin.h"

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{

// ----------------------------------------------------------------------------- fields
FieldTable<CompressFields> CompressFields::table()
{
    static constexpr FieldDef<CompressFields> kDEFS[] = {
        floatField("eps", &CompressFields::eps),
        intField("quant", &CompressFields::quant),
    };
    return makeFieldTable(kDEFS);
}

std::string CompressFields::validate(CompressFields const& f, FieldsSeen const& seen)
{
    if (!seen("eps"))
        return "required field 'eps' is missing";
    if (!(f.eps >= 0.F))
        return "eps must be >= 0";
    if (f.quant < 0 || f.quant > 2)
        return "quant must be 0 (none), 1 (fp8) or 2 (fp4), got " + std::to_string(f.quant);
    return "";
}

// ----------------------------------------------------------------------------- plugin
template <bool kOverlap>
std::string CompressPlugin<kOverlap>::checkShapes(PluginTensorDesc const* in, int32_t nbInputs) const
{
    if (nbInputs != expectedInputs())
    {
        return "expected " + std::to_string(expectedInputs()) + " inputs, got " + std::to_string(nbInputs);
    }
    Dims const& kv = in[0].dims;
    Dims const& score = in[1].dims;
    int32_t const iw = kOverlap ? 4 : 2; // norm_weight
    Dims const& nw = in[iw].dims;
    Dims const& cs = in[iw + 1].dims;
    Dims const& sn = in[iw + 2].dims;
    if (kv.nbDims != 4)
        return "kv must be [B, N, m, W], got " + dimsToString(kv);
    if (score.nbDims != 4)
        return "score must be [B, N, m, W], got " + dimsToString(score);
    for (int32_t i = 0; i < 4; ++i)
        if (!dimMatches(kv.d[i], score.d[i]))
            return "score " + dimsToString(score) + " must have the shape of kv " + dimsToString(kv);
    int64_t D = kOverlap ? -1 : kv.d[3];
    if (kOverlap)
    {
        Dims const& pk = in[2].dims;
        Dims const& ps = in[3].dims;
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

template <bool kOverlap>
bool CompressPlugin<kOverlap>::configureOutputCount(int32_t nbOutputs) const noexcept
{
    if (nbOutputs != 1)
    {
        logError(std::string(kNAME) + ": expected 1 output");
        return false;
    }
    return true;
}

template <bool kOverlap>
bool CompressPlugin<kOverlap>::supportsType(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs) const noexcept
{
    DataType const type = inOut[pos].desc.type;
    if (pos < nbInputs)
        return isFloatType(type);
    return type == DataType::kFLOAT; // == getOutputDataTypes
}

template <bool kOverlap>
DataType CompressPlugin<kOverlap>::outputDataType(DataType const* /*inputTypes*/) const noexcept
{
    return DataType::kFLOAT;
}

template <bool kOverlap>
int32_t CompressPlugin<kOverlap>::outputShape(
    DimsExprs const* inputs, DimsExprs& out, IExprBuilder& /*exprBuilder*/) const noexcept
{
    if (inputs[0].nbDims != 4)
        return -1;
    out.nbDims = 3;
    out.d[0] = inputs[0].d[0];
    out.d[1] = inputs[0].d[1];
    if (kOverlap)
    {
        if (inputs[2].nbDims != 3)
            return -1;
        out.d[2] = inputs[2].d[2]; // D from prev_kv (kv is 2D wide)
    }
    else
    {
        out.d[2] = inputs[0].d[3];
    }
    return 0;
}

template <bool kOverlap>
size_t CompressPlugin<kOverlap>::workspaceSize(DynamicPluginTensorDesc const* /*inputs*/) const noexcept
{
    return 0;
}

template <bool kOverlap>
int32_t CompressPlugin<kOverlap>::enqueueOp(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream)
{
    if (outputDesc[0].type != DataType::kFLOAT)
        return reportLaunch(kNAME, "output must be float32", cudaSuccess);
    Dims const& kv = inputDesc[0].dims;
    int32_t const iw = kOverlap ? 4 : 2;
    CompressParams p;
    p.B = kv.d[0];
    p.N = kv.d[1];
    p.m = static_cast<int32_t>(kv.d[2]);
    p.D = static_cast<int32_t>(kOverlap ? inputDesc[2].dims.d[2] : kv.d[3]);
    p.r = static_cast<int32_t>(2 * inputDesc[iw + 1].dims.d[2]);
    p.overlap = kOverlap;
    p.eps = mFields.eps;
    p.quant = mFields.quant;
    p.kv = inputs[0];
    p.kv_dtype = toDType(inputDesc[0].type);
    p.score = inputs[1];
    p.score_dtype = toDType(inputDesc[1].type);
    if (kOverlap)
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
    std::string const shapeErr = checkShapes(inputDesc, expectedInputs());
    if (!shapeErr.empty())
        return reportLaunch(kNAME, shapeErr.c_str(), cudaSuccess);
    char const* msg = compress_check(p);
    return reportLaunch(kNAME, msg, msg ? cudaSuccess : compress(p, stream));
}

template class CompressPlugin<false>;
template class CompressPlugin<true>;

} // namespace plugin
} // namespace hatrt
