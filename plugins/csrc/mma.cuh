// Warp-level tensor-core MMA for the hatrt kernels: mma.sync m16n8k16 with bf16 or fp16 inputs and
// fp32 accumulation (sm_80 and newer, so the same code serves sm_80/sm_89/sm_90a), D += A * B with
// A 16x16 (row-major), B 16x8 (column-major), D 16x8.
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16", floating point types), per lane
// with g = lane / 4 and t = lane % 4; each 32-bit register holds two 16-bit values, the one with the
// lower column (A) or row (B) index in the low half:
//   a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   d[0] = D[g][2t]  d[1] = D[g][2t+1]  d[2] = D[g+8][2t]  d[3] = D[g+8][2t+1]
// The CUDA emulator (plugins/emu) implements the same layout, so the kernel tests exercise every
// fragment index on the CPU.
#pragma once

#include "common.cuh"

namespace hatrt
{
namespace detail
{

template <bool kHalf>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t const (&a)[4], uint32_t const (&b)[2])
{
#if defined(HATRT_CUDA_EMU)
    emu::mma_m16n8k16<kHalf>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kHalf)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
    __trap(); // the launchers never pick a tensor-core kernel below sm_80
#endif
}

//! Two 16-bit values (lo at the lower index) in one register.
__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi)
{
    return uint32_t(lo) | (uint32_t(hi) << 16);
}

//! fp32 -> the 16-bit input type of the MMA (fp16 when kHalf, else bf16), round to nearest even.
template <bool kHalf>
__device__ __forceinline__ uint16_t to16(float v)
{
    if constexpr (kHalf)
        return __half_as_ushort(__float2half_rn(v));
    else
        return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

//! Two adjacent 16-bit values from shared memory (4-byte aligned): one A or B fragment register.
__device__ __forceinline__ uint32_t lds32(uint16_t const* p)
{
    return *reinterpret_cast<uint32_t const*>(p);
}

} // namespace detail
} // namespace hatrt
