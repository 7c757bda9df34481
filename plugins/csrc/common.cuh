// Device helpers shared by the hatrt kernels: dtype-generic loads/stores, index loads, the
// quantization formats of exporter/quant.py (FP8 e4m3 / FP4 e2m1 with power-of-two scales) and
// the 584-byte KV entry loaders.
#pragma once

#include "hatrt/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

// The two CUDA-only syntaxes, spelled so that the CPU emulator (plugins/emu, used by the tests)
// compiles the very same kernel source.
#ifdef HATRT_CUDA_EMU
#define HATRT_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::hatrt::emu::dynamic_smem())
#define HATRT_LAUNCH(kernel, grid, block, smem, stream) ::hatrt::emu::launch(kernel, grid, block, smem, stream)
#else
#define HATRT_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define HATRT_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace hatrt
{
namespace detail
{

constexpr float kLog2e = 1.4426950408889634F;
constexpr float kFp8Max = 448.F;
constexpr float kFp4Max = 6.F;
constexpr float kAmaxFloor = 1e-4F;

// ----------------------------------------------------------------------------- loads / stores
__device__ __forceinline__ float load_f(void const* p, DType t, int64_t i)
{
    switch (t)
    {
    case DType::kFloat16: return __half2float(static_cast<__half const*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<__nv_bfloat16 const*>(p)[i]);
    default: return static_cast<float const*>(p)[i];
    }
}

__device__ __forceinline__ void store_f(void* p, DType t, int64_t i, float v)
{
    switch (t)
    {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
    }
}

__device__ __forceinline__ int64_t load_idx(void const* p, IndexType t, int64_t i)
{
    return t == IndexType::kInt64 ? static_cast<int64_t const*>(p)[i] : int64_t(static_cast<int32_t const*>(p)[i]);
}

//! Python's floor division (positions may be -1 for "empty").
__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
    {
        --q;
    }
    return q;
}

// ----------------------------------------------------------------------------- quantization
//! exporter.quant.pow2_scale: exp2(ceil(log2(max(amax, 1e-4) / qmax))), same fp32 operations.
__device__ __forceinline__ float pow2_scale(float amax, float qmax)
{
    return exp2f(ceilf(log2f(fmaxf(amax, kAmaxFloor) / qmax)));
}

//! ue8m0 byte (biased exponent) of a power-of-two scale.
__device__ __forceinline__ uint8_t ue8m0_of(float pow2)
{
    int e = int((__float_as_uint(pow2) >> 23) & 0xFF); // exact for normal powers of two
    return static_cast<uint8_t>(e);
}

__device__ __forceinline__ float ue8m0_value(uint8_t b)
{
    return b == 0 ? exp2f(-127.F) : __uint_as_float(uint32_t(b) << 23);
}

//! float -> e4m3 byte, round to nearest even, saturating (the caller clamps to +-448 first, as
//! fake_quant_fp8 does, so saturation never triggers on finite inputs).
__device__ __forceinline__ uint8_t e4m3_of(float v)
{
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_value(uint8_t b)
{
    __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
    return __half2float(__half(h));
}

//! One FP8 fake-quant step: value -> dequantized value, given the block's power-of-two scale.
__device__ __forceinline__ float fake_fp8(float v, float scale)
{
    float y = fminf(fmaxf(v / scale, -kFp8Max), kFp8Max);
    return e4m3_value(e4m3_of(y)) * scale;
}

//! exporter.quant.round_e2m1 for |y| <= 6: nearest e2m1 value, ties to even mantissa.
__device__ __forceinline__ float round_e2m1(float y)
{
    float const a = fabsf(y);
    // edges 0.25 0.75 1.25 1.75 2.5 3.5 5 between values 0 .5 1 1.5 2 3 4 6; a value on an edge
    // rounds up at 0.75, 1.75, 3.5 and down at 0.25, 1.25, 2.5, 5.
    float r;
    if (a < 0.25F || a == 0.25F)
        r = 0.F;
    else if (a < 0.75F)
        r = 0.5F;
    else if (a < 1.25F || a == 1.25F)
        r = 1.F;
    else if (a < 1.75F)
        r = 1.5F;
    else if (a < 2.5F || a == 2.5F)
        r = 2.F;
    else if (a < 3.5F)
        r = 3.F;
    else if (a < 5.F || a == 5.F)
        r = 4.F;
    else
        r = 6.F;
    return copysignf(r, y);
}

//! e2m1 code (sign bit 3) of a value round_e2m1 returned.
__device__ __forceinline__ uint32_t e2m1_code(float r)
{
    float const a = fabsf(r);
    uint32_t const mag = a < 0.25F ? 0U : a < 0.75F ? 1U : a < 1.25F ? 2U : a < 1.75F ? 3U : a < 2.5F ? 4U : a < 3.5F ? 5U : a < 5.F ? 6U : 7U;
    return mag | ((__float_as_uint(r) >> 31) << 3); // the sign bit, -0 included
}

__device__ __forceinline__ float e2m1_value(uint32_t code)
{
    // 0 0.5 1 1.5 2 3 4 6 for codes 0..7; bit 3 is the sign
    uint32_t const m = code & 7U;
    float const a = m < 4U ? 0.5F * float(m) : float(1U << (m / 2U - 1U)) * (m % 2U ? 1.5F : 1.F);
    return (code & 8U) ? -a : a;
}

__device__ __forceinline__ float fake_fp4(float v, float scale)
{
    return round_e2m1(fminf(fmaxf(v / scale, -kFp4Max), kFp4Max)) * scale;
}

// ----------------------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// ----------------------------------------------------------------------------- KV loaders
template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits)
{
    if constexpr (std::is_same<T, __half>::value)
        return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    else
        return __uint_as_float(bits << 16); // bfloat16 -> float is exact
}

//! A load through the read-only data cache (global memory) or a plain one (shared memory).
template <bool kGlobal, typename T>
__device__ __forceinline__ T ld(T const* p)
{
    if constexpr (kGlobal)
        return __ldg(p);
    else
        return *p;
}

// A loader reads 8 consecutive values [d0, d0 + 8) of one KV row as fp32 (load8: from global
// memory). The sparse-attention kernels are templates over the loader: plain [.., D] tensors (the
// ONNX contract) or the production 584-byte FP8 entry. The tensor-core kernel copies whole rows
// into shared memory asynchronously and decodes them there, so a loader also gives the row's bytes
// (row_bytes, row_ptr), the widest copy its alignment allows (kPiece), and decode8<false>, the
// same decoding from a row already in shared memory.
template <typename T>
struct PlainLoader
{
    using value_type = T;
    T const* base;
    int32_t D;

    static constexpr int kPiece = 16; // rows are 16-byte aligned: D % 8 == 0, base 16-byte aligned

    __host__ __device__ static constexpr int row_bytes(int dim)
    {
        return dim * int(sizeof(T));
    }

    __device__ __forceinline__ uint8_t const* row_ptr(int64_t row) const
    {
        return reinterpret_cast<uint8_t const*>(base + row * D);
    }

    template <bool kGlobal>
    __device__ __forceinline__ static void decode8(uint8_t const* row, int d0, float (&v)[8])
    {
        T const* p = reinterpret_cast<T const*>(row) + d0;
        if constexpr (sizeof(T) == 4)
        {
            float4 const a = ld<kGlobal>(reinterpret_cast<float4 const*>(p));
            float4 const b = ld<kGlobal>(reinterpret_cast<float4 const*>(p) + 1);
            v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
        }
        else
        {
            uint4 const raw = ld<kGlobal>(reinterpret_cast<uint4 const*>(p));
            uint32_t const w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                v[2 * i] = half_bits_to_float<T>(w[i] & 0xFFFFu);
                v[2 * i + 1] = half_bits_to_float<T>(w[i] >> 16);
            }
        }
    }

    __device__ __forceinline__ void load8(int64_t row, int d0, float (&v)[8]) const
    {
        decode8<true>(row_ptr(row), d0, v);
    }
};

struct Entry584Loader
{
    uint8_t const* base;

    static constexpr int kPiece = 8; // 584 = 8 * 73

    __host__ __device__ static constexpr int row_bytes(int /*dim*/)
    {
        return entry584::kBytes;
    }

    __device__ __forceinline__ uint8_t const* row_ptr(int64_t row) const
    {
        return base + row * entry584::kBytes;
    }

    template <bool kGlobal>
    __device__ __forceinline__ static void decode8(uint8_t const* e, int d0, float (&v)[8])
    {
        if (d0 < entry584::kNope)
        {
            uint2 const raw = ld<kGlobal>(reinterpret_cast<uint2 const*>(e + d0));
            float const s = ue8m0_value(ld<kGlobal>(e + entry584::kScaleOffset + d0 / entry584::kBlock));
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                v[i] = e4m3_value(uint8_t(raw.x >> (8 * i))) * s;
                v[4 + i] = e4m3_value(uint8_t(raw.y >> (8 * i))) * s;
            }
        }
        else
        {
            uint2 const* p = reinterpret_cast<uint2 const*>(e + entry584::kRopeOffset + 2 * (d0 - entry584::kNope));
            uint2 const r0 = ld<kGlobal>(p), r1 = ld<kGlobal>(p + 1);
            uint32_t const w[4] = {r0.x, r0.y, r1.x, r1.y};
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                v[2 * i] = __uint_as_float(w[i] << 16);
                v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
            }
        }
    }

    __device__ __forceinline__ void load8(int64_t row, int d0, float (&v)[8]) const // 8-byte aligned rows
    {
        decode8<true>(row_ptr(row), d0, v);
    }
};

//! 8 consecutive values [d0, d0 + 8) of a 68-byte MXFP4 index key, exactly (same interface as the
//! KV loaders; rows are 4-byte aligned: 68 = 4 * 17).
struct IndexKey68Loader
{
    uint8_t const* base;

    static constexpr int kPiece = 4;

    __host__ __device__ static constexpr int row_bytes(int /*dim*/)
    {
        return index_key68::kBytes;
    }

    __device__ __forceinline__ uint8_t const* row_ptr(int64_t row) const
    {
        return base + row * index_key68::kBytes;
    }

    template <bool kGlobal>
    __device__ __forceinline__ static void decode8(uint8_t const* e, int d0, float (&v)[8])
    {
        uint32_t const w = ld<kGlobal>(reinterpret_cast<uint32_t const*>(e + d0 / 2));
        float const s = ue8m0_value(ld<kGlobal>(e + index_key68::kScaleOffset + d0 / index_key68::kBlock));
#pragma unroll
        for (int i = 0; i < 8; ++i)
            v[i] = e2m1_value((w >> (4 * i)) & 0xFU) * s;
    }

    __device__ __forceinline__ void load8(int64_t row, int d0, float (&v)[8]) const
    {
        decode8<true>(row_ptr(row), d0, v);
    }
};

//! 8 consecutive values [d0, d0 + 8) of a 132-byte FP8 index key, exactly (power-of-two scale).
struct IndexKey132Loader
{
    uint8_t const* base;

    static constexpr int kPiece = 4; // 132 = 4 * 33

    __host__ __device__ static constexpr int row_bytes(int /*dim*/)
    {
        return index_key132::kBytes;
    }

    __device__ __forceinline__ uint8_t const* row_ptr(int64_t row) const
    {
        return base + row * index_key132::kBytes;
    }

    template <bool kGlobal>
    __device__ __forceinline__ static void decode8(uint8_t const* e, int d0, float (&v)[8])
    {
        uint32_t const w0 = ld<kGlobal>(reinterpret_cast<uint32_t const*>(e + d0));
        uint32_t const w1 = ld<kGlobal>(reinterpret_cast<uint32_t const*>(e + d0 + 4));
        float const s = ld<kGlobal>(reinterpret_cast<float const*>(e + index_key132::kScaleOffset));
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            v[i] = e4m3_value(uint8_t(w0 >> (8 * i))) * s;
            v[4 + i] = e4m3_value(uint8_t(w1 >> (8 * i))) * s;
        }
    }

    __device__ __forceinline__ void load8(int64_t row, int d0, float (&v)[8]) const
    {
        decode8<true>(row_ptr(row), d0, v);
    }
};

inline bool is_index_key(DType t)
{
    return t == DType::kIndexKey68 || t == DType::kIndexKey132;
}

inline int device_num_sms(int32_t given)
{
    if (given > 0)
        return given;
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 108;
    return n;
}

inline int device_cc_major()
{
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
        return 0;
    return major;
}

inline int device_smem_optin()
{
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess
        || cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
        return 48 * 1024;
    return n;
}

inline bool aligned(void const* p, size_t a)
{
    return (reinterpret_cast<uintptr_t>(p) % a) == 0;
}

inline bool is_float_dtype(DType t)
{
    return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

} // namespace detail
} // namespace hatrt
