// Plugin harness: drives the hatrt plugins the way TensorRT does, without TensorRT's builder or
// libnvinfer (only its public headers).
//   CPU part (runs anywhere): getCreators / setLoggerFinder, creator names, versions, namespace and
//   field names; createPlugin with valid and invalid fields; the build-time interface
//   (getOutputDataTypes, supportsFormatCombination: exactly the declared output types, the
//   accepted input types); serialization round trip (getFieldsToSerialize -> createPlugin(kRUNTIME));
//   clone.
//   GPU part (when a CUDA device is present, or built with the CUDA emulator: -DHATRT_CUDA_EMU,
//   kernels from plugins/emu, see tests/test_cuda_emu.py): onShapeChange + enqueue of every plugin
//   on small random inputs with NaN-poisoned outputs; the result must equal the kernel launcher's
//   bit for bit (the launchers are checked against the PyTorch reference by
//   plugins/tests/test_kernels.py), and unsupported shapes must make enqueue fail with a logged
//   message.
// Exit status: number of failed checks (0 = all passed).
#include "NvInferRuntime.h"
#include "hatrt/kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(ILoggerFinder* finder);

namespace
{
int gFailures = 0;
int gChecks = 0;

#define CHECK(cond, what)                                                                                              \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::printf("FAIL %s:%d %s\n", __FILE__, __LINE__, std::string(what).c_str());                           \
        }                                                                                                              \
    } while (0)

struct Logger : ILogger
{
    std::string last;
    int errors = 0;
    void log(Severity s, AsciiChar const* msg) noexcept override
    {
        last = msg;
        if (s <= Severity::kERROR)
            ++errors;
        if (s <= Severity::kWARNING)
            std::printf("  [log] %s\n", msg);
    }
} gLogger;

struct Finder : ILoggerFinder
{
    ILogger* findLogger() noexcept override
    {
        return &gLogger;
    }
} gFinder;

IPluginCreatorV3One* findCreator(char const* name)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
            continue;
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), name) == 0)
            return c;
    }
    return nullptr;
}

struct Fields
{
    std::vector<PluginField> f;
    std::vector<int32_t> ints;
    std::vector<float> floats;
    Fields& i(char const* name, int32_t v)
    {
        ints.reserve(16);
        ints.push_back(v);
        f.emplace_back(name, &ints.back(), PluginFieldType::kINT32, 1);
        return *this;
    }
    Fields& fl(char const* name, float v)
    {
        floats.reserve(16);
        floats.push_back(v);
        f.emplace_back(name, &floats.back(), PluginFieldType::kFLOAT32, 1);
        return *this;
    }
    PluginFieldCollection fc() const
    {
        return PluginFieldCollection{static_cast<int32_t>(f.size()), f.data()};
    }
};

IPluginV3* create(char const* name, Fields const& fields, TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    IPluginCreatorV3One* c = findCreator(name);
    if (!c)
        return nullptr;
    PluginFieldCollection fc = fields.fc();
    return c->createPlugin("harness", &fc, phase);
}

IPluginV3OneBuild* build(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}
IPluginV3OneCore* core(IPluginV3* p)
{
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}

Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        d.d[i] = v[i];
    return d;
}

DynamicPluginTensorDesc ddesc(DataType t, std::vector<int64_t> const& shape)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = t;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims = dims(shape);
    d.min = d.max = d.opt = d.desc.dims;
    return d;
}

//! supportsFormatCombination(pos) with every other position already set as in `io`.
bool accepts(IPluginV3* p, std::vector<DynamicPluginTensorDesc> io, int nbIn, int pos, DataType t)
{
    io[pos].desc.type = t;
    return build(p)->supportsFormatCombination(pos, io.data(), nbIn, static_cast<int32_t>(io.size()) - nbIn);
}

void checkSerialization(char const* name, IPluginV3* p)
{
    PluginFieldCollection const* fc = runtime(p)->getFieldsToSerialize();
    CHECK(fc && fc->nbFields > 0, std::string(name) + ": fields to serialize");
    IPluginV3* q = findCreator(name)->createPlugin("deserialized", fc, TensorRTPhase::kRUNTIME);
    CHECK(q != nullptr, std::string(name) + ": createPlugin(kRUNTIME) from serialized fields");
    if (!q)
        return;
    PluginFieldCollection const* fc2 = runtime(q)->getFieldsToSerialize();
    bool same = fc2->nbFields == fc->nbFields;
    for (int32_t i = 0; same && i < fc->nbFields; ++i)
    {
        same = std::strcmp(fc->fields[i].name, fc2->fields[i].name) == 0 && fc->fields[i].type == fc2->fields[i].type
            && std::memcmp(fc->fields[i].data, fc2->fields[i].data, 4) == 0;
    }
    CHECK(same, std::string(name) + ": serialization round trip");
    IPluginV3* c = q->clone();
    CHECK(c && std::strcmp(core(c)->getPluginName(), name) == 0, std::string(name) + ": clone");
    delete c;
    delete q;
}

void checkCreator(char const* name, std::vector<char const*> const& fieldNames)
{
    IPluginCreatorV3One* c = findCreator(name);
    CHECK(c != nullptr, std::string("creator ") + name);
    if (!c)
        return;
    CHECK(std::strcmp(c->getPluginVersion(), "1") == 0, std::string(name) + " version 1");
    CHECK(std::strcmp(c->getPluginNamespace(), "hatrt") == 0, std::string(name) + " namespace hatrt");
    PluginFieldCollection const* fc = c->getFieldNames();
    bool ok = fc && fc->nbFields == static_cast<int32_t>(fieldNames.size());
    for (size_t i = 0; ok && i < fieldNames.size(); ++i)
        ok = std::strcmp(fc->fields[i].name, fieldNames[i]) == 0;
    CHECK(ok, std::string(name) + ": field names equal the ONNX attribute names");
}

// ----------------------------------------------------------------------------- CPU checks
void cpuChecks()
{
    int32_t n = 0;
    getCreators(n);
    CHECK(n == 5, "five creators");
    checkCreator("GatedCompress", {"eps", "quant"});
    checkCreator("OverlapGatedCompress", {"eps", "quant"});
    checkCreator("IndexerTopK", {"ratio", "topk", "bf16_scores"});
    checkCreator("HybridSparseAttention", {"window", "scale"});
    checkCreator("RoutedExperts", {"swiglu_limit"});

    // invalid fields are refused with a message
    int const errors0 = gLogger.errors;
    CHECK(create("GatedCompress", Fields().i("quant", 1)) == nullptr, "GatedCompress without eps");
    CHECK(create("GatedCompress", Fields().fl("eps", 1e-6F).i("quant", 3)) == nullptr, "quant 3");
    CHECK(create("IndexerTopK", Fields().i("ratio", 4).i("topk", 0)) == nullptr, "topk 0");
    CHECK(create("IndexerTopK", Fields().i("topk", 8)) == nullptr, "IndexerTopK without ratio");
    CHECK(create("IndexerTopK", Fields().i("ratio", 4).i("topk", 8).i("bf16_scores", 2)) == nullptr, "bf16 2");
    CHECK(create("HybridSparseAttention", Fields().fl("scale", 0.1F)) == nullptr, "attention without window");
    CHECK(create("RoutedExperts", Fields().fl("swiglu_limit", -1.F)) == nullptr, "negative swiglu_limit");
    CHECK(gLogger.errors - errors0 == 7, "each refused plugin logged an error");

    // RoutedExperts
    {
        IPluginV3* p = create("RoutedExperts", Fields().fl("swiglu_limit", 10.F));
        IPluginV3* q = create("RoutedExperts", Fields()); // swiglu_limit defaults to 0 (no clamp)
        CHECK(p != nullptr && q != nullptr, "create RoutedExperts (with and without swiglu_limit)");
        delete q;
        if (p)
        {
            std::vector<DataType> in = {DataType::kBF16, DataType::kINT64, DataType::kFLOAT, DataType::kBF16,
                DataType::kBF16, DataType::kBF16};
            DataType outT{};
            CHECK(build(p)->getOutputDataTypes(&outT, 1, in.data(), 6) == 0 && outT == DataType::kFLOAT,
                "RoutedExperts: output float32");
            std::vector<DynamicPluginTensorDesc> io = {ddesc(DataType::kBF16, {7, 64}), ddesc(DataType::kINT64, {7, 6}),
                ddesc(DataType::kFLOAT, {7, 6}), ddesc(DataType::kBF16, {16, 32, 64}), ddesc(DataType::kBF16, {16, 32, 64}),
                ddesc(DataType::kBF16, {16, 64, 32}), ddesc(DataType::kFLOAT, {7, 64})};
            CHECK(accepts(p, io, 6, 6, DataType::kFLOAT) && !accepts(p, io, 6, 6, DataType::kBF16),
                "RoutedExperts: float32 output only");
            CHECK(accepts(p, io, 6, 1, DataType::kINT32) && !accepts(p, io, 6, 1, DataType::kFLOAT),
                "RoutedExperts: expert_idx int32/int64 only");
            CHECK(accepts(p, io, 6, 0, DataType::kHALF) && accepts(p, io, 6, 3, DataType::kFLOAT)
                    && !accepts(p, io, 6, 2, DataType::kINT64),
                "RoutedExperts: float inputs float32/float16/bfloat16");
            CHECK(build(p)->configurePlugin(io.data(), 6, io.data() + 6, 1) == 0, "RoutedExperts: configure");
            CHECK(build(p)->getWorkspaceSize(io.data(), 6, io.data() + 6, 1)
                    >= size_t(7 * 6) * (32 + 64) * sizeof(float),
                "RoutedExperts: workspace holds the intermediates");
            auto bad = io;
            bad[5].desc.dims = dims({16, 64, 16}); // w2's I != w1's
            CHECK(build(p)->configurePlugin(bad.data(), 6, bad.data() + 6, 1) != 0, "RoutedExperts: w2 shape checked");
            bad = io;
            bad[2].desc.dims = dims({7, 5});
            CHECK(build(p)->configurePlugin(bad.data(), 6, bad.data() + 6, 1) != 0,
                "RoutedExperts: expert_weights shape checked");
            checkSerialization("RoutedExperts", p);
            delete p;
        }
    }

    // GatedCompress / OverlapGatedCompress
    for (bool overlap : {false, true})
    {
        char const* name = overlap ? "OverlapGatedCompress" : "GatedCompress";
        IPluginV3* p = create(name, Fields().fl("eps", 1e-6F).i("quant", 1));
        CHECK(p != nullptr, std::string("create ") + name);
        if (!p)
            continue;
        CHECK(std::strcmp(core(p)->getPluginNamespace(), "hatrt") == 0, "namespace");
        int const nbIn = overlap ? 7 : 5;
        std::vector<DataType> in(nbIn, DataType::kBF16);
        DataType outT{};
        CHECK(build(p)->getOutputDataTypes(&outT, 1, in.data(), nbIn) == 0 && outT == DataType::kFLOAT,
            std::string(name) + ": output float32");
        std::vector<DynamicPluginTensorDesc> io;
        if (overlap)
            io = {ddesc(DataType::kBF16, {2, 3, 4, 1024}), ddesc(DataType::kBF16, {2, 3, 4, 1024}),
                ddesc(DataType::kFLOAT, {2, 4, 512}), ddesc(DataType::kFLOAT, {2, 4, 512}),
                ddesc(DataType::kFLOAT, {512}), ddesc(DataType::kFLOAT, {2, 3, 32}), ddesc(DataType::kFLOAT, {2, 3, 32}),
                ddesc(DataType::kFLOAT, {2, 3, 512})};
        else
            io = {ddesc(DataType::kFLOAT, {2, 3, 128, 512}), ddesc(DataType::kFLOAT, {2, 3, 128, 512}),
                ddesc(DataType::kFLOAT, {512}), ddesc(DataType::kFLOAT, {2, 3, 32}), ddesc(DataType::kFLOAT, {2, 3, 32}),
                ddesc(DataType::kFLOAT, {2, 3, 512})};
        CHECK(accepts(p, io, nbIn, nbIn, DataType::kFLOAT), std::string(name) + ": float32 output accepted");
        CHECK(!accepts(p, io, nbIn, nbIn, DataType::kHALF), std::string(name) + ": float16 output refused");
        CHECK(accepts(p, io, nbIn, 0, DataType::kHALF) && accepts(p, io, nbIn, 0, DataType::kBF16),
            std::string(name) + ": half/bf16 kv accepted");
        CHECK(!accepts(p, io, nbIn, 0, DataType::kINT32), std::string(name) + ": int kv refused");
        CHECK(build(p)->configurePlugin(io.data(), nbIn, io.data() + nbIn, 1) == 0, std::string(name) + ": configure");
        auto bad = io;
        bad[1].desc.dims = dims({2, 3, 4, 7});
        CHECK(build(p)->configurePlugin(bad.data(), nbIn, bad.data() + nbIn, 1) != 0,
            std::string(name) + ": mismatched score shape refused");
        checkSerialization(name, p);
        delete p;
    }

    // IndexerTopK
    {
        IPluginV3* p = create("IndexerTopK", Fields().i("ratio", 4).i("topk", 8).i("bf16_scores", 1));
        CHECK(p != nullptr, "create IndexerTopK");
        if (p)
        {
            std::vector<DataType> in = {DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kINT32};
            DataType outT{};
            CHECK(build(p)->getOutputDataTypes(&outT, 1, in.data(), 4) == 0 && outT == DataType::kINT64,
                "IndexerTopK: output int64");
            std::vector<DynamicPluginTensorDesc> io = {ddesc(DataType::kBF16, {2, 3, 64, 128}),
                ddesc(DataType::kFLOAT, {2, 3, 64}), ddesc(DataType::kBF16, {2, 100, 128}),
                ddesc(DataType::kINT64, {2, 3}), ddesc(DataType::kINT64, {2, 3, 8})};
            CHECK(accepts(p, io, 4, 4, DataType::kINT64), "IndexerTopK: int64 output accepted");
            CHECK(!accepts(p, io, 4, 4, DataType::kINT32), "IndexerTopK: int32 output refused");
            CHECK(accepts(p, io, 4, 3, DataType::kINT32) && !accepts(p, io, 4, 3, DataType::kFLOAT),
                "IndexerTopK: q_pos int32/int64 only");
            CHECK(build(p)->configurePlugin(io.data(), 4, io.data() + 4, 1) == 0, "IndexerTopK: configure");
            CHECK(build(p)->getWorkspaceSize(io.data(), 4, io.data() + 4, 1) >= 100 * 4, "IndexerTopK: workspace");
            auto packed = io;
            packed[2] = ddesc(DataType::kUINT8, {2, 100, 68});
            CHECK(accepts(p, packed, 4, 2, DataType::kUINT8), "IndexerTopK: packed 68-byte FP4 keys accepted");
            CHECK(build(p)->configurePlugin(packed.data(), 4, packed.data() + 4, 1) == 0,
                "IndexerTopK: configure packed keys");
            auto packed8 = io;
            packed8[2] = ddesc(DataType::kUINT8, {2, 100, 132});
            CHECK(accepts(p, packed8, 4, 2, DataType::kUINT8)
                    && build(p)->configurePlugin(packed8.data(), 4, packed8.data() + 4, 1) == 0,
                "IndexerTopK: packed 132-byte FP8 keys accepted");
            auto bad = packed;
            bad[2].desc.dims = dims({2, 100, 64});
            CHECK(!accepts(p, bad, 4, 2, DataType::kUINT8), "IndexerTopK: uint8 keys must be 68 or 132 wide");
            auto badDi = packed;
            badDi[0].desc.dims = dims({2, 3, 64, 64});
            CHECK(build(p)->configurePlugin(badDi.data(), 4, badDi.data() + 4, 1) != 0,
                "IndexerTopK: packed keys with Di != 128 refused");
            checkSerialization("IndexerTopK", p);
            delete p;
        }
    }

    // HybridSparseAttention
    {
        IPluginV3* p = create("HybridSparseAttention", Fields().i("window", 128).fl("scale", 0.0441941738F));
        CHECK(p != nullptr, "create HybridSparseAttention");
        if (p)
        {
            std::vector<DataType> in = {DataType::kBF16, DataType::kINT64, DataType::kBF16, DataType::kINT64,
                DataType::kBF16, DataType::kINT64, DataType::kFLOAT};
            DataType outT{};
            CHECK(build(p)->getOutputDataTypes(&outT, 1, in.data(), 7) == 0 && outT == DataType::kBF16,
                "HybridSparseAttention: output dtype = q dtype");
            std::vector<DynamicPluginTensorDesc> io = {ddesc(DataType::kBF16, {2, 1, 64, 512}),
                ddesc(DataType::kINT64, {2, 1}), ddesc(DataType::kBF16, {2, 128, 512}), ddesc(DataType::kINT64, {2, 128}),
                ddesc(DataType::kBF16, {2, 50, 512}), ddesc(DataType::kINT64, {2, 1, 16}), ddesc(DataType::kFLOAT, {64}),
                ddesc(DataType::kBF16, {2, 1, 64, 512})};
            CHECK(accepts(p, io, 7, 7, DataType::kBF16), "attention: out bf16 for bf16 q");
            CHECK(!accepts(p, io, 7, 7, DataType::kFLOAT), "attention: out float32 refused for bf16 q");
            CHECK(!accepts(p, io, 7, 4, DataType::kHALF), "attention: entries dtype must equal window_kv's");
            auto packed = io;
            packed[2] = ddesc(DataType::kUINT8, {2, 128, 584});
            packed[4] = ddesc(DataType::kUINT8, {2, 50, 584});
            CHECK(accepts(p, packed, 7, 2, DataType::kUINT8) && accepts(p, packed, 7, 2, DataType::kFP8),
                "attention: packed 584-byte KV accepted");
            CHECK(build(p)->configurePlugin(packed.data(), 7, packed.data() + 7, 1) == 0, "attention: configure packed");
            auto bad = io;
            bad[2].desc.dims = dims({2, 128, 256});
            CHECK(!accepts(p, bad, 7, 2, DataType::kUINT8), "attention: uint8 KV must be 584 wide");
            CHECK(build(p)->configurePlugin(bad.data(), 7, bad.data() + 7, 1) != 0, "attention: D mismatch refused");
            CHECK(build(p)->getWorkspaceSize(io.data(), 7, io.data() + 7, 1) > 0, "attention: workspace");
            checkSerialization("HybridSparseAttention", p);
            delete p;
        }
    }
}

// ----------------------------------------------------------------------------- GPU checks
#define CUDA_OK(x) CHECK((x) == cudaSuccess, #x)

uint64_t gRng = 0x9E3779B97F4A7C15ULL;
float frand()
{
    gRng ^= gRng << 13, gRng ^= gRng >> 7, gRng ^= gRng << 17;
    return static_cast<float>((gRng >> 11) * (1.0 / 9007199254740992.0)) * 2.F - 1.F;
}

struct Buf
{
    void* p = nullptr;
    size_t bytes = 0;
    explicit Buf(size_t b)
        : bytes(b)
    {
        if (cudaMalloc(&p, b > 0 ? b : 1) != cudaSuccess)
            p = nullptr;
    }
    ~Buf()
    {
        cudaFree(p);
    }
    template <typename T>
    void upload(std::vector<T> const& v)
    {
        cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
    template <typename T>
    std::vector<T> download(size_t n) const
    {
        std::vector<T> v(n);
        cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
        return v;
    }
};

std::vector<float> randf(size_t n, float s = 1.F)
{
    std::vector<float> v(n);
    for (auto& x : v)
        x = frand() * s;
    return v;
}

PluginTensorDesc pdesc(DataType t, std::vector<int64_t> const& shape)
{
    PluginTensorDesc d{};
    d.type = t;
    d.format = TensorFormat::kLINEAR;
    d.dims = dims(shape);
    d.scale = -1.F;
    return d;
}

//! enqueue through the runtime interface with a workspace sized by getWorkspaceSize.
int32_t runPlugin(IPluginV3* p, std::vector<PluginTensorDesc> const& in, std::vector<void const*> const& inPtrs,
    PluginTensorDesc const& out, void* outPtr)
{
    std::vector<DynamicPluginTensorDesc> din(in.size());
    for (size_t i = 0; i < in.size(); ++i)
    {
        din[i].desc = in[i];
        din[i].min = din[i].max = din[i].opt = in[i].dims;
    }
    DynamicPluginTensorDesc dout{};
    dout.desc = out;
    dout.min = dout.max = dout.opt = out.dims;
    int32_t const nbIn = static_cast<int32_t>(in.size());
    if (build(p)->configurePlugin(din.data(), nbIn, &dout, 1) != 0)
        return -100;
    size_t const ws = build(p)->getWorkspaceSize(din.data(), nbIn, &dout, 1);
    Buf wsBuf(ws);
    IPluginV3* rt = runtime(p)->attachToContext(nullptr);
    int32_t rc = runtime(rt)->onShapeChange(in.data(), nbIn, &out, 1);
    if (rc == 0)
    {
        void* outs[] = {outPtr};
        rc = runtime(rt)->enqueue(in.data(), &out, inPtrs.data(), outs, ws ? wsBuf.p : nullptr, nullptr);
    }
    cudaError_t const err = cudaDeviceSynchronize();
    delete rt;
    return err == cudaSuccess ? rc : -200;
}

std::vector<__nv_bfloat16> bf(std::vector<float> const& v)
{
    std::vector<__nv_bfloat16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        h[i] = __float2bfloat16(v[i]);
    return h;
}

bool allFinite(std::vector<float> const& v)
{
    for (float x : v)
        if (!std::isfinite(x))
            return false;
    return true;
}

void gpuCompress()
{
    int64_t const B = 2, N = 3, m = 4, D = 512, r = 64;
    Buf kv(B * N * m * 2 * D * 4), sc(B * N * m * 2 * D * 4), pk(B * m * D * 4), ps(B * m * D * 4), nw(D * 4),
        cs(B * N * r / 2 * 4), sn(B * N * r / 2 * 4), out(B * N * D * 4), ref(B * N * D * 4);
    kv.upload(randf(B * N * m * 2 * D)), sc.upload(randf(B * N * m * 2 * D, 3.F));
    pk.upload(randf(B * m * D)), ps.upload(randf(B * m * D, 3.F)), nw.upload(randf(D));
    cs.upload(randf(B * N * r / 2)), sn.upload(randf(B * N * r / 2));
    cudaMemset(out.p, 0xFF, out.bytes); // NaN poison
    IPluginV3* p = create("OverlapGatedCompress", Fields().fl("eps", 1e-6F).i("quant", 1));
    std::vector<PluginTensorDesc> in = {pdesc(DataType::kFLOAT, {B, N, m, 2 * D}),
        pdesc(DataType::kFLOAT, {B, N, m, 2 * D}), pdesc(DataType::kFLOAT, {B, m, D}), pdesc(DataType::kFLOAT, {B, m, D}),
        pdesc(DataType::kFLOAT, {D}), pdesc(DataType::kFLOAT, {B, N, r / 2}), pdesc(DataType::kFLOAT, {B, N, r / 2})};
    std::vector<void const*> ptrs = {kv.p, sc.p, pk.p, ps.p, nw.p, cs.p, sn.p};
    CHECK(runPlugin(p, in, ptrs, pdesc(DataType::kFLOAT, {B, N, D}), out.p) == 0, "OverlapGatedCompress enqueue");
    hatrt::CompressParams c;
    c.B = B, c.N = N, c.m = int32_t(m), c.D = int32_t(D), c.r = int32_t(r), c.overlap = true, c.eps = 1e-6F, c.quant = 1;
    c.kv = kv.p, c.score = sc.p, c.prev_kv = pk.p, c.prev_score = ps.p, c.norm_weight = nw.p, c.cos = cs.p, c.sin = sn.p;
    c.out = static_cast<float*>(ref.p);
    CUDA_OK(hatrt::compress(c, nullptr));
    cudaDeviceSynchronize();
    auto o = out.download<float>(B * N * D), e = ref.download<float>(B * N * D);
    CHECK(allFinite(o) && o == e, "OverlapGatedCompress plugin == launcher");
    // an unsupported shape fails loudly
    auto bad = in;
    bad[2] = pdesc(DataType::kFLOAT, {B, m, D / 2});
    int const errors0 = gLogger.errors;
    CHECK(runPlugin(p, bad, ptrs, pdesc(DataType::kFLOAT, {B, N, D / 2}), out.p) != 0, "bad prev_kv refused");
    CHECK(gLogger.errors > errors0, "bad shape logged");
    delete p;
}

void gpuIndexerPacked()
{
    // production inputs: bf16 q and weights, 68-byte FP4 keys (tensor-core scoring), bf16 scores
    int64_t const B = 2, S = 2, Hi = 64, Di = 128, N = 2000, topk = 128;
    Buf q(B * S * Hi * Di * 2), w(B * S * Hi * 2), kf(B * N * Di * 4), k(B * N * 68), pos(B * S * 8),
        out(B * S * topk * 8), ref(B * S * topk * 8);
    q.upload(bf(randf(B * S * Hi * Di))), w.upload(bf(randf(B * S * Hi))), kf.upload(randf(B * N * Di));
    CUDA_OK(hatrt::index_key_write_68(B * N, kf.p, hatrt::DType::kFloat32, nullptr, hatrt::IndexType::kInt64,
        static_cast<uint8_t*>(k.p), nullptr));
    pos.upload(std::vector<int64_t>{7999, 4000, 123, 7999});
    cudaMemset(out.p, 0x7F, out.bytes);
    IPluginV3* p = create("IndexerTopK", Fields().i("ratio", 4).i("topk", int32_t(topk)).i("bf16_scores", 1));
    std::vector<PluginTensorDesc> in = {pdesc(DataType::kBF16, {B, S, Hi, Di}), pdesc(DataType::kBF16, {B, S, Hi}),
        pdesc(DataType::kUINT8, {B, N, 68}), pdesc(DataType::kINT64, {B, S})};
    std::vector<void const*> ptrs = {q.p, w.p, k.p, pos.p};
    CHECK(runPlugin(p, in, ptrs, pdesc(DataType::kINT64, {B, S, topk}), out.p) == 0, "IndexerTopK (FP4 keys) enqueue");
    hatrt::IndexerTopKParams c;
    c.B = B, c.S = S, c.Hi = int32_t(Hi), c.Di = int32_t(Di), c.N = N, c.ratio = 4, c.topk = int32_t(topk);
    c.bf16_scores = true;
    c.q = q.p, c.q_dtype = hatrt::DType::kBFloat16, c.weights = w.p, c.weights_dtype = hatrt::DType::kBFloat16;
    c.keys = k.p, c.keys_dtype = hatrt::DType::kIndexKey68, c.q_pos = pos.p, c.out = static_cast<int64_t*>(ref.p);
    CHECK(hatrt::indexer_uses_tensor_cores(c), "IndexerTopK (FP4 keys) scores on tensor cores");
    Buf ws(hatrt::indexer_topk_workspace_bytes(B * S, N));
    c.workspace = ws.p, c.workspace_bytes = ws.bytes;
    CUDA_OK(hatrt::indexer_topk(c, nullptr));
    cudaDeviceSynchronize();
    auto o = out.download<int64_t>(B * S * topk), e = ref.download<int64_t>(B * S * topk);
    CHECK(o == e, "IndexerTopK (FP4 keys) plugin == launcher");
    delete p;
}

void gpuIndexer()
{
    int64_t const B = 2, S = 3, Hi = 64, Di = 128, N = 3000, topk = 64;
    Buf q(B * S * Hi * Di * 4), w(B * S * Hi * 4), k(B * N * Di * 4), pos(B * S * 4), out(B * S * topk * 8),
        ref(B * S * topk * 8);
    q.upload(randf(B * S * Hi * Di)), w.upload(randf(B * S * Hi)), k.upload(randf(B * N * Di));
    std::vector<int32_t> hp(B * S);
    for (size_t i = 0; i < hp.size(); ++i)
        hp[i] = static_cast<int32_t>(i * 2000 % (4 * N));
    pos.upload(hp);
    cudaMemset(out.p, 0x7F, out.bytes);
    IPluginV3* p = create("IndexerTopK", Fields().i("ratio", 4).i("topk", int32_t(topk)));
    std::vector<PluginTensorDesc> in = {pdesc(DataType::kFLOAT, {B, S, Hi, Di}), pdesc(DataType::kFLOAT, {B, S, Hi}),
        pdesc(DataType::kFLOAT, {B, N, Di}), pdesc(DataType::kINT32, {B, S})};
    std::vector<void const*> ptrs = {q.p, w.p, k.p, pos.p};
    CHECK(runPlugin(p, in, ptrs, pdesc(DataType::kINT64, {B, S, topk}), out.p) == 0, "IndexerTopK enqueue");
    hatrt::IndexerTopKParams c;
    c.B = B, c.S = S, c.Hi = int32_t(Hi), c.Di = int32_t(Di), c.N = N, c.ratio = 4, c.topk = int32_t(topk);
    c.q = q.p, c.weights = w.p, c.keys = k.p, c.q_pos = pos.p, c.q_pos_type = hatrt::IndexType::kInt32;
    c.out = static_cast<int64_t*>(ref.p);
    Buf ws(hatrt::indexer_topk_workspace_bytes(B * S, N));
    c.workspace = ws.p, c.workspace_bytes = ws.bytes;
    CUDA_OK(hatrt::indexer_topk(c, nullptr));
    cudaDeviceSynchronize();
    auto o = out.download<int64_t>(B * S * topk), e = ref.download<int64_t>(B * S * topk);
    CHECK(o == e, "IndexerTopK plugin == launcher");
    bool valid = true;
    for (int64_t i = 0; i < B * S; ++i)
        for (int64_t j = 0; j < topk; ++j)
        {
            int64_t const vis = std::min<int64_t>(N, (hp[i] + 1) / 4);
            int64_t const x = o[i * topk + j];
            valid &= (j < std::min<int64_t>(vis, topk)) ? (x >= 0 && x < vis) : (x == -1);
        }
    CHECK(valid, "IndexerTopK indices visible, -1 padded");
    delete p;
}

void gpuAttention(bool packed)
{
    int64_t const B = 2, S = 1, H = 64, D = 512, L = 128, N = 200, K = 32;
    int64_t const rowBytes = packed ? 584 : D * 2;
    Buf q(B * S * H * D * 2), qp(B * S * 8), wkv(B * L * rowBytes), wp(B * L * 8), ent(B * N * rowBytes),
        idx(B * S * K * 8), sink(H * 4), out(B * S * H * D * 2), ref(B * S * H * D * 2);
    q.upload(bf(randf(B * S * H * D)));
    std::vector<int64_t> hqp(B * S, 500), hwp(B * L), hidx(B * S * K);
    for (int64_t i = 0; i < B * L; ++i)
        hwp[i] = (i % 10 == 3) ? -1 : 500 - (i % L);
    for (int64_t i = 0; i < B * S * K; ++i)
        hidx[i] = (i % 7 == 0) ? -1 : (i * 37) % N;
    qp.upload(hqp), wp.upload(hwp), idx.upload(hidx), sink.upload(randf(H));
    if (packed)
    {
        Buf src((B * L + B * N) * D * 4);
        src.upload(randf((B * L + B * N) * D, 3.F));
        hatrt::KvWriteParams w;
        w.n = B * L, w.src = src.p, w.cache = static_cast<uint8_t*>(wkv.p);
        CUDA_OK(hatrt::kv_write_584(w, nullptr));
        w.n = B * N, w.src = static_cast<float*>(src.p) + B * L * D, w.cache = static_cast<uint8_t*>(ent.p);
        CUDA_OK(hatrt::kv_write_584(w, nullptr));
        cudaDeviceSynchronize();
    }
    else
    {
        wkv.upload(bf(randf(B * L * D))), ent.upload(bf(randf(B * N * D)));
    }
    cudaMemset(out.p, 0xFF, out.bytes); // bf16 NaN poison
    IPluginV3* p = create("HybridSparseAttention", Fields().i("window", 128).fl("scale", 0.0441941738F));
    DataType const kvT = packed ? DataType::kUINT8 : DataType::kBF16;
    std::vector<PluginTensorDesc> in = {pdesc(DataType::kBF16, {B, S, H, D}), pdesc(DataType::kINT64, {B, S}),
        pdesc(kvT, {B, L, packed ? 584 : D}), pdesc(DataType::kINT64, {B, L}), pdesc(kvT, {B, N, packed ? 584 : D}),
        pdesc(DataType::kINT64, {B, S, K}), pdesc(DataType::kFLOAT, {H})};
    std::vector<void const*> ptrs = {q.p, qp.p, wkv.p, wp.p, ent.p, idx.p, sink.p};
    std::string const tag = packed ? "HybridSparseAttention (584-byte FP8 KV)" : "HybridSparseAttention (bf16 KV)";
    CHECK(runPlugin(p, in, ptrs, pdesc(DataType::kBF16, {B, S, H, D}), out.p) == 0, tag + " enqueue");
    hatrt::SparseAttentionParams c;
    c.B = B, c.S = S, c.H = int32_t(H), c.D = int32_t(D), c.L = L, c.N = N, c.K = K, c.window = 128;
    c.scale = 0.0441941738F;
    c.q = q.p, c.q_dtype = hatrt::DType::kBFloat16, c.q_pos = qp.p, c.window_kv = wkv.p, c.window_pos = wp.p;
    c.entries = ent.p, c.entry_idx = idx.p, c.kv_dtype = packed ? hatrt::DType::kEntry584 : hatrt::DType::kBFloat16;
    c.sink = sink.p, c.out = ref.p;
    Buf ws(hatrt::sparse_attention_workspace_bytes(c.H, c.D, 160));
    c.workspace = ws.p, c.workspace_bytes = ws.bytes;
    CUDA_OK(hatrt::sparse_attention(c, nullptr));
    cudaDeviceSynchronize();
    auto o = out.download<uint16_t>(B * S * H * D), e = ref.download<uint16_t>(B * S * H * D);
    bool finite = true;
    for (uint16_t x : o)
        finite &= (x & 0x7F80) != 0x7F80;
    CHECK(finite && o == e, tag + " plugin == launcher");
    delete p;
}
void gpuRoutedExperts()
{
    // bf16 activations and experts, int64 picks with repeats and one out-of-range pick, fp32 weights
    int64_t const T = 19, k = 6, E = 16, d = 64, I = 96;
    Buf x(T * d * 2), idx(T * k * 8), wts(T * k * 4), w1(E * I * d * 2), w3(E * I * d * 2), w2(E * d * I * 2),
        out(T * d * 4), ref(T * d * 4);
    std::vector<int64_t> picks(T * k);
    for (int64_t i = 0; i < T * k; ++i)
        picks[i] = static_cast<int64_t>((frand() + 1.F) * 0.5F * E) % E;
    for (int64_t t = 0; t < T; t += 3)
        picks[t * k + 1] = picks[t * k]; // repeated picks add up
    picks[5] = E;                        // outside [0, E): skipped
    x.upload(bf(randf(T * d))), idx.upload(picks), wts.upload(randf(T * k));
    w1.upload(bf(randf(E * I * d, 0.125F))), w3.upload(bf(randf(E * I * d, 0.125F)));
    w2.upload(bf(randf(E * d * I, 0.1F)));
    cudaMemset(out.p, 0xFF, out.bytes); // NaN poison
    IPluginV3* p = create("RoutedExperts", Fields().fl("swiglu_limit", 0.5F));
    std::vector<PluginTensorDesc> in = {pdesc(DataType::kBF16, {T, d}), pdesc(DataType::kINT64, {T, k}),
        pdesc(DataType::kFLOAT, {T, k}), pdesc(DataType::kBF16, {E, I, d}), pdesc(DataType::kBF16, {E, I, d}),
        pdesc(DataType::kBF16, {E, d, I})};
    std::vector<void const*> ptrs = {x.p, idx.p, wts.p, w1.p, w3.p, w2.p};
    CHECK(runPlugin(p, in, ptrs, pdesc(DataType::kFLOAT, {T, d}), out.p) == 0, "RoutedExperts enqueue");
    hatrt::RoutedExpertsParams c;
    c.T = T, c.k = int32_t(k), c.E = int32_t(E), c.d = int32_t(d), c.I = int32_t(I), c.swiglu_limit = 0.5F;
    c.x = x.p, c.x_dtype = hatrt::DType::kBFloat16, c.expert_idx = idx.p, c.expert_weights = wts.p;
    c.w1 = w1.p, c.w1_dtype = hatrt::DType::kBFloat16, c.w3 = w3.p, c.w3_dtype = hatrt::DType::kBFloat16;
    c.w2 = w2.p, c.w2_dtype = hatrt::DType::kBFloat16, c.out = static_cast<float*>(ref.p);
    Buf ws(hatrt::routed_experts_workspace_bytes(T, int32_t(k), int32_t(E), int32_t(d), int32_t(I)));
    c.workspace = ws.p, c.workspace_bytes = ws.bytes;
    CUDA_OK(hatrt::routed_experts(c, nullptr));
    cudaDeviceSynchronize();
    auto o = out.download<float>(T * d), e = ref.download<float>(T * d);
    CHECK(allFinite(o) && o == e, "RoutedExperts plugin == launcher");
    auto bad = in;
    bad[4] = pdesc(DataType::kBF16, {E, I / 2, d});
    int const errors0 = gLogger.errors;
    CHECK(runPlugin(p, bad, ptrs, pdesc(DataType::kFLOAT, {T, d}), out.p) != 0, "RoutedExperts: bad w3 refused");
    CHECK(gLogger.errors > errors0, "RoutedExperts: bad shape logged");
    delete p;
}
} // namespace

int main()
{
    setLoggerFinder(&gFinder);
    cpuChecks();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0)
    {
#ifdef HATRT_CUDA_EMU
        std::printf("GPU part: on the CUDA emulator (plugins/emu), kernels compiled for the CPU\n");
#endif
        gpuCompress();
        gpuIndexer();
        gpuIndexerPacked();
        gpuAttention(false);
        gpuAttention(true);
        gpuRoutedExperts();
    }
    else
    {
        cudaGetLastError();
        std::printf("no CUDA device: GPU part skipped\n");
    }
    std::printf("%d checks, %d failed\n", gChecks, gFailures);
    return gFailures;
}
