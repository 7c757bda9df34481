// The production KV-cache entry (attention-spec section 7, FlashMLA "MODEL1" layout), 584 bytes:
//   [0, 448)    FP8 e4m3 of dims 0..447, one power-of-two scale per 64 dims
//   [448, 576)  bf16 of dims 448..511 (the RoPE dims)
//   [576, 583)  7 ue8m0 scales (biased exponents: scale = 2^(byte - 127))
//   [583]       pad (0)
// kv_write_584 quantizes new window tokens (or any 512-wide vectors) into that layout; the scale of
// a block is exporter.quant.pow2_scale(amax, 448), so the dequantized entry equals fake_quant_fp8.
// One warp per vector; lane l owns dims [16 l, 16 l + 16): lanes 0..27 the FP8 part (4 lanes per
// scale block), lanes 28..31 the bf16 part.
//
// The production indexer key (attention-spec section 7), 68 bytes: 128 FP4 e2m1 values, two per
// byte (value 2i in the low nibble of byte i), then 4 ue8m0 scales, one per 32 values; the scale is
// pow2_scale(amax, 6), so the dequantized key equals fake_quant_fp4. One warp per key; lane l owns
// values [4 l, 4 l + 4) (8 lanes per scale block). Its FP8 variant, 132 bytes: 128 e4m3 values and
// one fp32 power-of-two scale per key (fake_quant_fp8 with blocks of 128).
#include "../common.cuh"

namespace hatrt
{
namespace detail
{
namespace
{

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads) kv_write_584_kernel(KvWriteParams p)
{
    int const lane = threadIdx.x % 32;
    int64_t const v = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (v >= p.n)
        return;
    int64_t const row = p.slot ? load_idx(p.slot, p.slot_type, v) : v;
    if (row < 0)
        return;
    float x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i)
        x[i] = load_f(p.src, p.src_dtype, v * entry584::kDim + lane * 16 + i);
    uint8_t* dst = p.cache + row * entry584::kBytes;
    float amax = 0.F;
#pragma unroll
    for (int i = 0; i < 16; ++i)
        amax = fmaxf(amax, fabsf(x[i]));
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 2));
    if (lane < entry584::kNope / 16)
    {
        float const scale = pow2_scale(amax, kFp8Max);
        uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int i = 0; i < 16; ++i)
            w[i / 4] |= uint32_t(e4m3_of(fminf(fmaxf(x[i] / scale, -kFp8Max), kFp8Max))) << (8 * (i % 4));
        uint2* out = reinterpret_cast<uint2*>(dst + lane * 16);
        out[0] = make_uint2(w[0], w[1]);
        out[1] = make_uint2(w[2], w[3]);
        if (lane % 4 == 0)
            dst[entry584::kScaleOffset + lane / 4] = ue8m0_of(scale);
    }
    else
    {
        uint32_t w[8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
        {
            uint32_t const lo = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i]));
            uint32_t const hi = __bfloat16_as_ushort(__float2bfloat16_rn(x[2 * i + 1]));
            w[i] = lo | (hi << 16);
        }
        uint2* out = reinterpret_cast<uint2*>(dst + entry584::kRopeOffset + (lane - entry584::kNope / 16) * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i)
            out[i] = make_uint2(w[2 * i], w[2 * i + 1]);
        if (lane == entry584::kNope / 16)
            dst[entry584::kPadOffset] = 0;
    }
}

__global__ void __launch_bounds__(kThreads) kv_read_584_kernel(
    int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out)
{
    int const lane = threadIdx.x % 32;
    int64_t const v = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (v >= n)
        return;
    int64_t const row = slot ? load_idx(slot, slot_type, v) : v;
    Entry584Loader const ld{cache};
    float x[8];
#pragma unroll
    for (int half = 0; half < 2; ++half)
    {
        int const d0 = lane * 16 + half * 8;
        if (row >= 0)
            ld.load8(row, d0, x);
        else
        {
#pragma unroll
            for (int i = 0; i < 8; ++i)
                x[i] = 0.F;
        }
        float4* o = reinterpret_cast<float4*>(out + v * entry584::kDim + d0);
        o[0] = make_float4(x[0], x[1], x[2], x[3]);
        o[1] = make_float4(x[4], x[5], x[6], x[7]);
    }
}

//! Index keys, one warp per key of 128 values: lane l loads values [4 l, 4 l + 4) of key v into x
//! and returns the absolute maximum over the `lanes` lanes of its scale block (8 for FP4 blocks
//! of 32, 32 for one FP8 scale per key). Every lane takes part in the shuffles.
__device__ __forceinline__ float load_key_quad(void const* src, DType src_dtype, int64_t v, int lane, int lanes, float (&x)[4])
{
    float amax = 0.F;
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        x[i] = load_f(src, src_dtype, v * 128 + lane * 4 + i);
        amax = fmaxf(amax, fabsf(x[i]));
    }
    for (int o = 1; o < lanes; o <<= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    return amax;
}

__global__ void __launch_bounds__(kThreads) index_key_write_68_kernel(
    int64_t n, void const* src, DType src_dtype, void const* slot, IndexType slot_type, uint8_t* cache)
{
    int const lane = threadIdx.x % 32;
    int64_t const v = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (v >= n)
        return;
    float x[4];
    float const amax = load_key_quad(src, src_dtype, v, lane, 8, x); // the 8 lanes of a scale block
    int64_t const row = slot ? load_idx(slot, slot_type, v) : v;
    if (row < 0)
        return;
    float const scale = pow2_scale(amax, kFp4Max);
    uint32_t codes = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        codes |= e2m1_code(round_e2m1(fminf(fmaxf(x[i] / scale, -kFp4Max), kFp4Max))) << (4 * i);
    uint8_t* dst = cache + row * index_key68::kBytes;
    *reinterpret_cast<uint16_t*>(dst + lane * 2) = static_cast<uint16_t>(codes);
    if (lane % 8 == 0)
        dst[index_key68::kScaleOffset + lane / 8] = ue8m0_of(scale);
}

__global__ void __launch_bounds__(kThreads) index_key_write_132_kernel(
    int64_t n, void const* src, DType src_dtype, void const* slot, IndexType slot_type, uint8_t* cache)
{
    int const lane = threadIdx.x % 32;
    int64_t const v = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (v >= n)
        return;
    float x[4];
    float const amax = load_key_quad(src, src_dtype, v, lane, 32, x); // one scale per key
    int64_t const row = slot ? load_idx(slot, slot_type, v) : v;
    if (row < 0)
        return;
    float const scale = pow2_scale(amax, kFp8Max);
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        w |= uint32_t(e4m3_of(fminf(fmaxf(x[i] / scale, -kFp8Max), kFp8Max))) << (8 * i);
    uint8_t* dst = cache + row * index_key132::kBytes;
    *reinterpret_cast<uint32_t*>(dst + lane * 4) = w;
    if (lane == 0)
        *reinterpret_cast<float*>(dst + index_key132::kScaleOffset) = scale;
}

template <class Loader, int kDim>
__global__ void __launch_bounds__(kThreads) index_key_read_kernel(
    int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out)
{
    int const lane = threadIdx.x % 32;
    int64_t const v = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (v >= n || lane >= kDim / 8)
        return;
    int64_t const row = slot ? load_idx(slot, slot_type, v) : v;
    float x[8] = {0.F, 0.F, 0.F, 0.F, 0.F, 0.F, 0.F, 0.F};
    if (row >= 0)
        Loader{cache}.load8(row, lane * 8, x);
    float4* o = reinterpret_cast<float4*>(out + v * kDim + lane * 8);
    o[0] = make_float4(x[0], x[1], x[2], x[3]);
    o[1] = make_float4(x[4], x[5], x[6], x[7]);
}

} // namespace
} // namespace detail

namespace
{
//! One warp per key, both packed index-key formats.
template <class Kernel>
cudaError_t launch_index_key_write(Kernel kernel, int64_t n, void const* src, DType src_dtype, void const* slot,
    IndexType slot_type, uint8_t* cache, cudaStream_t stream)
{
    using namespace detail;
    if (n < 0 || !is_float_dtype(src_dtype) || (n > 0 && (!src || !cache || !aligned(cache, 4)))
        || (n + kWarps - 1) / kWarps > 0x7FFFFFFFLL)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    HATRT_LAUNCH(kernel, unsigned((n + kWarps - 1) / kWarps), kThreads, 0, stream)(n, src, src_dtype, slot, slot_type, cache);
    return cudaGetLastError();
}

template <class Loader>
cudaError_t launch_index_key_read(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream)
{
    using namespace detail;
    if (n < 0 || (n > 0 && (!cache || !out || !aligned(cache, 4) || !aligned(out, 16))))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    HATRT_LAUNCH((index_key_read_kernel<Loader, 128>), unsigned((n + kWarps - 1) / kWarps), kThreads, 0, stream)(
        n, cache, slot, slot_type, out);
    return cudaGetLastError();
}
} // namespace

cudaError_t index_key_write_68(int64_t n, void const* src, DType src_dtype, void const* slot, IndexType slot_type,
    uint8_t* cache, cudaStream_t stream)
{
    return launch_index_key_write(detail::index_key_write_68_kernel, n, src, src_dtype, slot, slot_type, cache, stream);
}

cudaError_t index_key_read_68(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream)
{
    return launch_index_key_read<detail::IndexKey68Loader>(n, cache, slot, slot_type, out, stream);
}

cudaError_t index_key_write_132(int64_t n, void const* src, DType src_dtype, void const* slot, IndexType slot_type,
    uint8_t* cache, cudaStream_t stream)
{
    return launch_index_key_write(detail::index_key_write_132_kernel, n, src, src_dtype, slot, slot_type, cache, stream);
}

cudaError_t index_key_read_132(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream)
{
    return launch_index_key_read<detail::IndexKey132Loader>(n, cache, slot, slot_type, out, stream);
}

char const* kv_write_584_check(KvWriteParams const& p)
{
    using namespace detail;
    if (p.n < 0)
        return "kv_write_584: negative count";
    if (!is_float_dtype(p.src_dtype))
        return "kv_write_584: source must be float32, float16 or bfloat16";
    if (p.n == 0)
        return nullptr;
    if (!p.src || !p.cache)
        return "kv_write_584: null pointer";
    if (!aligned(p.cache, 8))
        return "kv_write_584: cache must be 8-byte aligned";
    if ((p.n + kWarps - 1) / kWarps > 0x7FFFFFFFLL)
        return "kv_write_584: too many vectors";
    return nullptr;
}

cudaError_t kv_write_584(KvWriteParams const& p, cudaStream_t stream)
{
    using namespace detail;
    if (kv_write_584_check(p) != nullptr)
        return cudaErrorInvalidValue;
    if (p.n == 0)
        return cudaSuccess;
    HATRT_LAUNCH(kv_write_584_kernel, unsigned((p.n + kWarps - 1) / kWarps), kThreads, 0, stream)(p);
    return cudaGetLastError();
}

cudaError_t kv_read_584(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream)
{
    using namespace detail;
    if (n < 0 || (n > 0 && (!cache || !out || !aligned(cache, 8) || !aligned(out, 16))))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    HATRT_LAUNCH(kv_read_584_kernel, unsigned((n + kWarps - 1) / kWarps), kThreads, 0, stream)(n, cache, slot, slot_type, out);
    return cudaGetLastError();
}

} // namespace hatrt
