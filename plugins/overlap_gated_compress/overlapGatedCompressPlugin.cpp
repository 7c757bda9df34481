// OverlapGatedCompress: the plugin is CompressPlugin<true> (plugins/gated_compress, instantiated
// there); its creator is the shared HatrtPluginCreator over the compressor fields (eps, quant).
#include "overlapGatedCompressPlugin.h"

namespace hatrt
{
namespace plugin
{

template class HatrtPluginCreator<OverlapGatedCompressPlugin>;

} // namespace plugin
} // namespace hatrt
