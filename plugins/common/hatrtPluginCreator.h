// HatrtPluginCreator<Plugin>: the IPluginCreatorV3One of every hatrt plugin, driven by the op's
// field table (Plugin::Fields::table()) and validation (Plugin::Fields::validate), see hatrtPlugin.h.
#pragma once

#include "hatrtPlugin.h"

#include <cstring>
#include <string>
#include <vector>

namespace hatrt
{
namespace plugin
{

//! Reads the table's fields from fc into `fields` (unknown names are ignored, a later duplicate
//! wins), then runs the op's validation. Returns "" when fine.
template <typename Fields>
std::string parseFields(nvinfer1::PluginFieldCollection const* fc, Fields& fields)
{
    if (fc == nullptr)
        return "no plugin fields";
    FieldsSeen seen;
    std::string err;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        nvinfer1::PluginField const& f = fc->fields[i];
        if (f.name == nullptr)
            continue;
        for (FieldDef<Fields> const& def : Fields::table())
        {
            if (std::strcmp(f.name, def.name) != 0)
                continue;
            bool const ok = def.type == nvinfer1::PluginFieldType::kINT32
                ? readIntField(f, fields.*def.intMember, err)
                : readFloatField(f, fields.*def.floatMember, err);
            if (!ok)
                return err;
            seen.add(def.name);
            break;
        }
    }
    return Fields::validate(fields, seen);
}

template <typename Plugin>
class HatrtPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    using Fields = typename Plugin::Fields;

    HatrtPluginCreator()
    {
        for (FieldDef<Fields> const& def : Fields::table())
            mAttributes.emplace_back(def.name, nullptr, def.type, 1);
        mFC.nbFields = static_cast<int32_t>(mAttributes.size());
        mFC.fields = mAttributes.data();
    }
    ~HatrtPluginCreator() override = default;

    char const* getPluginName() const noexcept override
    {
        return Plugin::kNAME;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFC;
    }

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            Fields fields{};
            std::string const err = parseFields(fc, fields);
            if (!err.empty())
            {
                logError(std::string(Plugin::kNAME) + " '" + (name ? name : "") + "': " + err);
                return nullptr;
            }
            return new Plugin(fields);
        }
        catch (...)
        {
            return nullptr;
        }
    }

private:
    std::vector<nvinfer1::PluginField> mAttributes;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace plugin
} // namespace hatrt
