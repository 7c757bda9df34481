// hatrt::OverlapGatedCompress (CSA, overlapping blocks) TensorRT plugin. Same implementation as
// GatedCompress with the overlap switch on: inputs kv, score [B, N, m, 2D], prev_kv, prev_score
// [B, m, D], norm_weight, cos, sin; output float32 [B, N, D].
#pragma once

#include "../gated_compress/gatedCompressPlugin.h"

namespace hatrt
{
namespace plugin
{

using OverlapGatedCompressPlugin = CompressPlugin<true>;
using OverlapGatedCompressPluginCreator = HatrtPluginCreator<OverlapGatedCompressPlugin>;

} // namespace plugin
} // namespace hatrt
