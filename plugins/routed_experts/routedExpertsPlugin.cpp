#include "routedExpertsPlugin.h"

#include <cmath>

using namespace nvinfer1;

namespace hatrt
{
namespace plugin
{

// ----------------------------------------------------------------------------- fields
FieldTable<RoutedExpertsFields> RoutedExpertsFields::table()
{
    static constexpr FieldDef<RoutedExpertsFields> kDEFS[] = {
        floatField("swiglu_limit", &RoutedExpertsFields::swiglu_limit),
    };
    return makeFieldTable(kDEFS);
}

std::string RoutedExpertsFields::validate(RoutedExpertsFields const& f, FieldsSeen const& /*seen*/)
{
    if (!(f.swiglu_limit >= 0.F) || std::isinf(f.swiglu_limit))
        return "swiglu_limit must be finite and >= 0 (0: no clamp)";
    return "";
}

// ----------------------------------------------------------------------------- plugin
std::string RoutedExpertsPlugin::checkShapes(PluginTensorDesc const* in, int32_t nbInputs) const
{
    if (nbInputs != kNB_INPUTS)
        return "expected 6 inputs (x, expert_idx, expert_weights, w1, w3, w2), got " + std::to_string(nbInputs);
    Dims const& x = in[0].dims;
    Dims const& idx = in[1].dims;
    Dims const& wts = in[2].dims;
    Dims const& w1 = in[3].dims;
    Dims const& w3 = in[4].dims;
    Dims const& w2 = in[5].dims;
    if (x.nbDims != 2)
        return "x must be [T, d], got " + dimsToString(x);
    if (idx.nbDims != 2 || !dimMatches(idx.d[0], x.d[0]))
        return "expert_idx must be [T, k] for x " + dimsToString(x) + ", got " + dimsToString(idx);
    if (wts.nbDims != 2 || !dimMatches(wts.d[0], idx.d[0]) || !dimMatches(wts.d[1], idx.d[1]))
        return "expert_weights must have the shape of expert_idx " + dimsToString(idx) + ", got " + dimsToString(wts);
    if (w1.nbDims != 3 || !dimMatches(w1.d[2], x.d[1]))
        return "w1 must be [E, I, d] for x " + dimsToString(x) + ", got " + dimsToString(w1);
    if (w3.nbDims != 3)
        return "w3 must be [E, I, d], got " + dimsToString(w3);
    for (int32_t i = 0; i < 3; ++i)
        if (!dimMatches(w3.d[i], w1.d[i]))
            return "w3 " + dimsToString(w3) + " must have the shape of w1 " + dimsToString(w1);
    if (w2.nbDims != 3 || !dimMatches(w2.d[0], w1.d[0]) || !dimMatches(w2.d[1], x.d[1]) || !dimMatches(w2.d[2], w1.d[1]))
        return "w2 must be [E, d, I] for w1 " + dimsToString(w1) + ", got " + dimsToString(w2);
    if (w1.d[0] == 0 || w1.d[1] == 0 || x.d[1] == 0)
        return "E, I and d must be >= 1";
    return "";
}

bool RoutedExpertsPlugin::supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/) const noexcept
{
    DataType const type = inOut[pos].desc.type;
    switch (pos)
    {
    case 1: return isIndexType(type); // expert_idx
    case 6: return type == DataType::kFLOAT; // out: exactly what getOutputDataTypes declares
    default: return isFloatType(type); // x, expert_weights, w1, w3, w2
    }
}

DataType RoutedExpertsPlugin::outputDataType(DataType const* /*inputTypes*/) const noexcept
{
    return DataType::kFLOAT;
}

int32_t RoutedExpertsPlugin::outputShape(DimsExprs const* inputs, DimsExprs& out, IExprBuilder& /*exprBuilder*/) const noexcept
{
    if (inputs[0].nbDims != 2)
        return -1;
    out = inputs[0]; // [T, d]
    return 0;
}

size_t RoutedExpertsPlugin::workspaceSize(DynamicPluginTensorDesc const* inputs) const noexcept
{
    // monotone in every dimension: enqueue's value from the actual shapes is never larger
    Dims const& x = inputs[0].max;
    Dims const& idx = inputs[1].max;
    Dims const& w1 = inputs[3].max;
    if (x.nbDims != 2 || idx.nbDims != 2 || w1.nbDims != 3)
        return 0;
    return routed_experts_workspace_bytes(x.d[0], static_cast<int32_t>(idx.d[1]), static_cast<int32_t>(w1.d[0]),
        static_cast<int32_t>(x.d[1]), static_cast<int32_t>(w1.d[1]));
}

int32_t RoutedExpertsPlugin::enqueueOp(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream)
{
    std::string const shapeErr = checkShapes(inputDesc, kNB_INPUTS);
    if (!shapeErr.empty())
        return reportLaunch(kNAME, shapeErr.c_str(), cudaSuccess);
    if (outputDesc[0].type != DataType::kFLOAT)
        return reportLaunch(kNAME, "output must be float32", cudaSuccess);
    Dims const& x = inputDesc[0].dims;
    Dims const& w1 = inputDesc[3].dims;
    RoutedExpertsParams p;
    p.T = x.d[0];
    p.k = static_cast<int32_t>(inputDesc[1].dims.d[1]);
    p.E = static_cast<int32_t>(w1.d[0]);
    p.d = static_cast<int32_t>(x.d[1]);
    p.I = static_cast<int32_t>(w1.d[1]);
    p.swiglu_limit = mFields.swiglu_limit;
    p.x = inputs[0];
    p.x_dtype = toDType(inputDesc[0].type);
    p.expert_idx = inputs[1];
    p.expert_idx_type = toIndexType(inputDesc[1].type);
    p.expert_weights = inputs[2];
    p.expert_weights_dtype = toDType(inputDesc[2].type);
    p.w1 = inputs[3];
    p.w1_dtype = toDType(inputDesc[3].type);
    p.w3 = inputs[4];
    p.w3_dtype = toDType(inputDesc[4].type);
    p.w2 = inputs[5];
    p.w2_dtype = toDType(inputDesc[5].type);
    p.out = static_cast<float*>(outputs[0]);
    p.workspace = workspace;
    p.workspace_bytes = workspace ? routed_experts_workspace_bytes(p.T, p.k, p.E, p.d, p.I) : 0;
    char const* msg = routed_experts_check(p);
    return reportLaunch(kNAME, msg, msg ? cudaSuccess : routed_experts(p, stream));
}

} // namespace plugin
} // namespace hatrt
