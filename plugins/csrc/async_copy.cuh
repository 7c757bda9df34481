// Asynchronous global -> shared copies (cp.async, sm_80+), for software pipelining: a block issues
// the copies of its next tile, computes on the current one, and waits only when it needs the data.
// Each thread waits for its own copies (cp_async_wait_all); a __syncthreads after that makes them
// visible to the block. The CUDA emulator (plugins/emu) performs a thread's copies only when it
// waits, so reading a tile before waiting for it fails the tests instead of working by luck.
#pragma once

#include "common.cuh"

namespace hatrt
{
namespace detail
{

//! Copy kBytes (4, 8 or 16; both addresses aligned to kBytes) from global to shared memory.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* smem, void const* gmem)
{
    static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(HATRT_CUDA_EMU)
    emu::async_copy(smem, gmem, kBytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    uint32_t const dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    if constexpr (kBytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
    else if constexpr (kBytes == 8)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem) : "memory");
#elif defined(__CUDA_ARCH__)
    __trap(); // only the tensor-core kernels (sm_80+) copy asynchronously
#endif
}

__device__ __forceinline__ void cp_async_commit()
{
#if !defined(HATRT_CUDA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

//! Wait until every copy this thread issued has landed.
__device__ __forceinline__ void cp_async_wait_all()
{
#if defined(HATRT_CUDA_EMU)
    emu::async_wait_all();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

} // namespace detail
} // namespace hatrt
