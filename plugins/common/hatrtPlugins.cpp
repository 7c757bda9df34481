// The plugin library's entry points: TensorRT calls getCreators() after loading the library
// (trt.get_plugin_registry().load_library, trtexec --dynamicPlugins, polygraphy --plugins) and
// setLoggerFinder() so the plugins can log through the application's logger.
#include "../gated_compress/gatedCompressPlugin.h"
#include "../hybrid_sparse_attention/hybridSparseAttentionPlugin.h"
#include "../indexer_topk/indexerTopKPlugin.h"
#include "../overlap_gated_compress/overlapGatedCompressPlugin.h"
#include "../routed_experts/routedExpertsPlugin.h"
#include "hatrtPluginCommon.h"

#define HATRT_PLUGIN_API extern "C" __attribute__((visibility("default")))

HATRT_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    hatrt::plugin::setLoggerFinder(finder);
}

HATRT_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static hatrt::plugin::GatedCompressPluginCreator gatedCompress;
    static hatrt::plugin::OverlapGatedCompressPluginCreator overlapGatedCompress;
    static hatrt::plugin::IndexerTopKPluginCreator indexerTopK;
    static hatrt::plugin::HybridSparseAttentionPluginCreator hybridSparseAttention;
    static hatrt::plugin::RoutedExpertsPluginCreator routedExperts;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {
        &gatedCompress, &overlapGatedCompress, &indexerTopK, &hybridSparseAttention, &routedExperts};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
