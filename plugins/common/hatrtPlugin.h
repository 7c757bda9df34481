// The IPluginV3 plumbing shared by every hatrt plugin: HatrtPlugin<Derived, Fields> implements
// IPluginV3 + IPluginV3OneCore / OneBuild / OneRuntime and calls only the op's hooks, and the
// field table (FieldDef) that drives serialization here and parsing in HatrtPluginCreator.
//
// An op supplies:
//   struct Fields { ...int32_t / float members...;
//       static FieldTable<Fields> table();                             // names, types, order
//       static std::string validate(Fields const&, FieldsSeen const&);  // "" when fine
//   };
//   class Op : public HatrtPlugin<Op, Fields> {
//       static constexpr char const* kNAME;
//       int32_t expectedInputs() const noexcept;
//       std::string checkShapes(PluginTensorDesc const* in, int32_t nbInputs) const;  // "" when fine
//       bool supportsType(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs) const noexcept;
//       DataType outputDataType(DataType const* inputTypes) const noexcept;
//       int32_t outputShape(DimsExprs const* inputs, DimsExprs& out, IExprBuilder&) const noexcept;
//       size_t workspaceSize(DynamicPluginTensorDesc const* inputs) const noexcept;
//       int32_t enqueueOp(...same arguments as enqueue...);             // may throw
//       [bool configureOutputCount(int32_t nbOutputs) const noexcept;]  // optional, default == 1
//   };
// The hooks may be private when the op declares `friend Base;`.
#pragma once

#include "hatrtPluginCommon.h"

#include <cstring>
#include <string>
#include <vector>

namespace hatrt
{
namespace plugin
{

// ----------------------------------------------------------------------------- field table
//! One plugin field (= ONNX attribute): INT32 fields point at an int32_t member, FLOAT32 at a float.
template <typename Fields>
struct FieldDef
{
    char const* name;
    nvinfer1::PluginFieldType type;
    int32_t Fields::*intMember;
    float Fields::*floatMember;
};

template <typename Fields>
constexpr FieldDef<Fields> intField(char const* name, int32_t Fields::*member)
{
    return {name, nvinfer1::PluginFieldType::kINT32, member, nullptr};
}

template <typename Fields>
constexpr FieldDef<Fields> floatField(char const* name, float Fields::*member)
{
    return {name, nvinfer1::PluginFieldType::kFLOAT32, nullptr, member};
}

//! The op's fields, in creator / serialization order (points at a static array).
template <typename Fields>
struct FieldTable
{
    FieldDef<Fields> const* defs;
    int32_t size;

    FieldDef<Fields> const* begin() const
    {
        return defs;
    }
    FieldDef<Fields> const* end() const
    {
        return defs + size;
    }
};

template <typename Fields, int32_t N>
constexpr FieldTable<Fields> makeFieldTable(FieldDef<Fields> const (&defs)[N])
{
    return {defs, N};
}

//! Which fields createPlugin was given (by name).
class FieldsSeen
{
public:
    void add(char const* name)
    {
        mNames.emplace_back(name);
    }
    bool operator()(char const* name) const
    {
        for (char const* n : mNames)
            if (std::strcmp(n, name) == 0)
                return true;
        return false;
    }

private:
    std::vector<char const*> mNames;
};

// ----------------------------------------------------------------------------- plugin base
template <typename Derived, typename FieldsT>
class HatrtPlugin : public nvinfer1::IPluginV3,
                    public nvinfer1::IPluginV3OneCore,
                    public nvinfer1::IPluginV3OneBuild,
                    public nvinfer1::IPluginV3OneRuntime
{
public:
    using Fields = FieldsT;

    explicit HatrtPlugin(Fields const& fields)
        : mFields(fields)
    {
    }
    HatrtPlugin(HatrtPlugin const&) = default;
    ~HatrtPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new Derived(derived());
        }
        catch (...)
        {
            return nullptr;
        }
    }

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override
    {
        return Derived::kNAME;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        try
        {
            if (!derived().configureOutputCount(nbOutputs))
                return -1;
            std::vector<nvinfer1::PluginTensorDesc> descs(static_cast<size_t>(nbInputs));
            for (int32_t i = 0; i < nbInputs; ++i)
                descs[i] = in[i].desc;
            return logShapeError(descs.data(), nbInputs);
        }
        catch (...)
        {
            return -1;
        }
    }

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != derived().expectedInputs() || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs)
            return false;
        if (inOut[pos].desc.format != nvinfer1::TensorFormat::kLINEAR)
            return false;
        return derived().supportsType(pos, inOut, nbInputs);
    }

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != derived().expectedInputs())
            return -1;
        outputTypes[0] = derived().outputDataType(inputTypes);
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override
    {
        if (nbOutputs != 1 || nbInputs != derived().expectedInputs())
            return -1;
        return derived().outputShape(inputs, outputs[0], exprBuilder);
    }

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        if (nbInputs != derived().expectedInputs())
            return 0;
        return derived().workspaceSize(inputs);
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override
    {
        try
        {
            if (nbOutputs != 1)
                return -1;
            return logShapeError(in, nbInputs);
        }
        catch (...)
        {
            return -1;
        }
    }

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        try
        {
            return derived().enqueueOp(inputDesc, outputDesc, inputs, outputs, workspace, stream);
        }
        catch (...)
        {
            return -1;
        }
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override
    {
        return clone();
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerialized.clear();
        for (FieldDef<Fields> const& def : Fields::table())
        {
            if (def.type == nvinfer1::PluginFieldType::kINT32)
                mSerialized.addInt(def.name, &(mFields.*def.intMember));
            else
                mSerialized.addFloat(def.name, &(mFields.*def.floatMember));
        }
        return mSerialized.get();
    }

protected:
    //! Default hook: exactly one output, refused without a message.
    bool configureOutputCount(int32_t nbOutputs) const noexcept
    {
        return nbOutputs == 1;
    }

    Fields mFields;

private:
    Derived& derived() noexcept
    {
        return static_cast<Derived&>(*this);
    }
    Derived const& derived() const noexcept
    {
        return static_cast<Derived const&>(*this);
    }

    //! Runs the op's shape rules; logs "<name>: <error>" and returns -1 when they fail.
    int32_t logShapeError(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs) const
    {
        std::string const err = derived().checkShapes(in, nbInputs);
        if (!err.empty())
        {
            logError(std::string(Derived::kNAME) + ": " + err);
            return -1;
        }
        return 0;
    }

    FieldCollection mSerialized;
};

} // namespace plugin
} // namespace hatrt
