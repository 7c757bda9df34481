// Run the hatrt CUDA kernels on the CPU, unchanged, so their logic is tested where no GPU is
// (CI, laptops). Not a simulator of the GPU's timing or memory model: a functional model of the
// CUDA execution rules our kernels rely on, strict enough to catch what breaks them on hardware.
//
// How: a kernel source is compiled by the host compiler with this header force-included
// (g++ -x c++ -include plugins/emu/cuda_emu.h). Every CUDA thread of a block is a fiber (its own
// stack); fibers run one at a time and switch only at synchronization points, so
//   __syncthreads[_or|_and|_count]  waits until every live thread of the block arrived;
//   __shfl_*_sync / __ballot_sync / __any_sync / __all_sync / __syncwarp wait for every lane of
//                                   the warp (a lane that exited, or is parked at another barrier,
//                                   is a deadlock: reported, not papered over);
//   __shared__                      is one copy per block (blocks run one after another);
//   dynamic shared memory           is fresh per block and filled with 0xFF (NaN as float) so a
//                                   read of something never written shows up;
//   launches                        check the block size and the dynamic shared memory against
//                                   the limits of an H100/H200 and the function's opt-in attribute.
// Threads run in forward or reverse order inside a block (alternating per launch), so a missing
// __syncthreads between a write by one thread and a read by another shows up in one of the two.
// The CUDA runtime calls the launchers make (cudaGetLastError, cudaFuncSetAttribute,
// cudaDeviceGetAttribute, ...) and the memory calls of the plugin harness come from
// plugins/emu/cuda_emu.cpp: "device" memory is host memory.
//
// Kernels spell the two CUDA-only syntaxes through macros of plugins/csrc/common.cuh:
// HATRT_DYNAMIC_SMEM(T, name) and HATRT_LAUNCH(kernel, grid, block, smem, stream)(args...).
#pragma once

#ifndef HATRT_CUDA_EMU
#define HATRT_CUDA_EMU 1
#endif

// Before the CUDA headers, which define these only when they are not defined yet.
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

namespace hatrt
{
namespace emu
{

//! Indices of the thread that runs now (the scheduler sets them before it resumes a fiber).
extern uint3 g_threadIdx;
extern uint3 g_blockIdx;
extern dim3 g_blockDim;
extern dim3 g_gridDim;

//! Run `body` for every thread of every block of the grid. Returns cudaSuccess, or an error whose
//! text last_error_message() keeps (bad launch configuration, deadlock at a barrier).
cudaError_t run_grid(void const* func, dim3 grid, dim3 block, size_t dynamic_smem, std::function<void()> const& body);
char const* last_error_message();
void* dynamic_smem();
//! A device-side fault in the running thread: the launch stops with cudaErrorMisalignedAddress.
[[noreturn]] void fault(std::string const& what);
//! cp.async: queued per thread (addresses checked for alignment), performed when the thread waits
//! (async_wait_all) or exits.
void async_copy(void* smem, void const* gmem, size_t bytes);
void async_wait_all();

//! Block-wide barrier; returns the reduction of `pred` over the block: 0 count, 1 and, 2 or.
int block_barrier(int pred, int reduce);
//! Warp exchange: every lane in `mask` deposits `bytes` (<= kExchangeBytes) of `src` and gets
//! back all 32 deposits: lane l's bytes start at result + l * kExchangeBytes.
constexpr size_t kExchangeBytes = 64;
unsigned char const* warp_exchange(unsigned mask, void const* src, size_t bytes);

template <class T>
uint64_t to_bits(T v)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

template <class T>
T from_bits(uint64_t b)
{
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

//! The 64-bit deposits of a warp exchange (the shuffles and votes).
struct Lanes
{
    unsigned char const* base;
    uint64_t operator[](unsigned lane) const
    {
        uint64_t v;
        std::memcpy(&v, base + lane * kExchangeBytes, sizeof(v));
        return v;
    }
};

inline Lanes exchange64(unsigned mask, uint64_t value)
{
    return Lanes{warp_exchange(mask, &value, sizeof(value))};
}

inline unsigned lane_id()
{
    unsigned const t = g_threadIdx.x + g_blockDim.x * (g_threadIdx.y + g_blockDim.y * g_threadIdx.z);
    return t % 32U;
}

//! The kernel launch syntax: HATRT_LAUNCH(k, grid, block, smem, stream)(args...).
template <class... P>
struct Launch
{
    void (*kernel)(P...);
    dim3 grid, block;
    size_t smem;

    template <class... A>
    void operator()(A&&... args) const
    {
        auto k = kernel;
        run_grid(reinterpret_cast<void const*>(k), grid, block, smem, [&] { k(args...); });
    }
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t)
{
    return Launch<P...>{kernel, grid, block, smem};
}

} // namespace emu
} // namespace hatrt

// ----------------------------------------------------------------------------- built-in variables
#define threadIdx (::hatrt::emu::g_threadIdx)
#define blockIdx (::hatrt::emu::g_blockIdx)
#define blockDim (::hatrt::emu::g_blockDim)
#define gridDim (::hatrt::emu::g_gridDim)
constexpr int warpSize = 32;

// ----------------------------------------------------------------------------- synchronization
inline void __syncthreads()
{
    ::hatrt::emu::block_barrier(0, 0);
}
inline int __syncthreads_count(int p)
{
    return ::hatrt::emu::block_barrier(p, 0);
}
inline int __syncthreads_and(int p)
{
    return ::hatrt::emu::block_barrier(p, 1);
}
inline int __syncthreads_or(int p)
{
    return ::hatrt::emu::block_barrier(p, 2);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFU)
{
    ::hatrt::emu::exchange64(mask, 0);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    auto const all = ::hatrt::emu::exchange64(mask, ::hatrt::emu::to_bits(v));
    unsigned const lane = ::hatrt::emu::lane_id();
    unsigned const base = lane - lane % unsigned(width);
    return ::hatrt::emu::from_bits<T>(all[base + unsigned(src) % unsigned(width)]);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    auto const all = ::hatrt::emu::exchange64(mask, ::hatrt::emu::to_bits(v));
    unsigned const lane = ::hatrt::emu::lane_id();
    unsigned const src = lane ^ unsigned(lane_mask);
    // a source outside the lane's width segment returns the lane's own value
    return ::hatrt::emu::from_bits<T>(all[src / unsigned(width) == lane / unsigned(width) ? src : lane]);
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    auto const all = ::hatrt::emu::exchange64(mask, ::hatrt::emu::to_bits(v));
    unsigned const lane = ::hatrt::emu::lane_id();
    unsigned const in_seg = lane % unsigned(width);
    return ::hatrt::emu::from_bits<T>(all[in_seg >= delta ? lane - delta : lane]);
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    auto const all = ::hatrt::emu::exchange64(mask, ::hatrt::emu::to_bits(v));
    unsigned const lane = ::hatrt::emu::lane_id();
    unsigned const in_seg = lane % unsigned(width);
    return ::hatrt::emu::from_bits<T>(all[in_seg + delta < unsigned(width) ? lane + delta : lane]);
}

inline unsigned __ballot_sync(unsigned mask, int pred)
{
    auto const all = ::hatrt::emu::exchange64(mask, pred != 0);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l)
        r |= ((mask >> l) & 1U) && all[l] ? (1U << l) : 0U;
    return r;
}
inline int __any_sync(unsigned mask, int pred)
{
    return __ballot_sync(mask, pred) != 0;
}
inline int __all_sync(unsigned mask, int pred)
{
    return __ballot_sync(mask, pred) == mask;
}

// ----------------------------------------------------------------------------- intrinsics
inline int __popc(unsigned x)
{
    return __builtin_popcount(x);
}
inline int __popcll(unsigned long long x)
{
    return __builtin_popcountll(x);
}
inline int __clz(int x)
{
    return x == 0 ? 32 : __builtin_clz(unsigned(x));
}
inline int __ffs(int x)
{
    return __builtin_ffs(x);
}
inline unsigned __float_as_uint(float f)
{
    return ::hatrt::emu::from_bits<unsigned>(::hatrt::emu::to_bits(f));
}
inline float __uint_as_float(unsigned u)
{
    return ::hatrt::emu::from_bits<float>(::hatrt::emu::to_bits(u));
}
inline int __float_as_int(float f)
{
    return ::hatrt::emu::from_bits<int>(::hatrt::emu::to_bits(f));
}
inline float __int_as_float(int i)
{
    return ::hatrt::emu::from_bits<float>(::hatrt::emu::to_bits(i));
}
inline float rsqrtf(float x)
{
    return 1.F / std::sqrt(x);
}
inline float __fdividef(float a, float b)
{
    return a / b;
}
inline float __expf(float x)
{
    return std::exp(x);
}
inline float __saturatef(float x)
{
    return x < 0.F ? 0.F : (x > 1.F ? 1.F : x);
}

// A vector load must be naturally aligned on a GPU (a misaligned one faults): checked here.
template <class T>
T __ldg(T const* p)
{
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
        ::hatrt::emu::fault("misaligned __ldg of a " + std::to_string(sizeof(T)) + "-byte value");
    return *p;
}

template <class T>
T __ldcg(T const* p)
{
    return __ldg(p);
}

// Fibers never run at the same time, so a read-modify-write is atomic by construction; it is still
// spelled as a relaxed atomic (CUDA's atomics are relaxed) so a ThreadSanitizer build sees an
// atomic that orders nothing, not a racy plain access.
namespace hatrt
{
namespace emu
{
template <class T, class F>
T atomic_update(T* p, F f)
{
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte values");
    using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
    U* const q = reinterpret_cast<U*>(p);
    U seen = __atomic_load_n(q, __ATOMIC_RELAXED);
    for (;;)
    {
        T old;
        std::memcpy(&old, &seen, sizeof(T));
        T const next = f(old);
        U bits;
        std::memcpy(&bits, &next, sizeof(T));
        if (__atomic_compare_exchange_n(q, &seen, bits, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return old;
    }
}
} // namespace emu
} // namespace hatrt

template <class T>
T atomicAdd(T* p, T v)
{
    return ::hatrt::emu::atomic_update(p, [v](T old) { return T(old + v); });
}
template <class T>
T atomicMax(T* p, T v)
{
    return ::hatrt::emu::atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <class T>
T atomicMin(T* p, T v)
{
    return ::hatrt::emu::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <class T>
T atomicCAS(T* p, T cmp, T v)
{
    return ::hatrt::emu::atomic_update(p, [cmp, v](T old) { return old == cmp ? v : old; });
}
template <class T>
T atomicExch(T* p, T v)
{
    return ::hatrt::emu::atomic_update(p, [v](T) { return v; });
}

// CUDA's integer/float min and max overloads accept mixed argument types.
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b)
{
    using C = typename std::common_type<A, B>::type;
    return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b)
{
    using C = typename std::common_type<A, B>::type;
    return C(a) < C(b) ? C(b) : C(a);
}

// nvcc's cuda_runtime.h adds this template overload; host compilers do not see it.
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*func)(P...), cudaFuncAttribute attr, int value)
{
    return cudaFuncSetAttribute(reinterpret_cast<void const*>(func), attr, value);
}

// ----------------------------------------------------------------------------- tensor cores
namespace hatrt
{
namespace emu
{
//! mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D += A * B: the warp's
//! fragments are gathered and each lane computes its own four accumulators (fp32 FMAs over k in
//! order; the hardware's summation order is unspecified). Fragment layout: plugins/csrc/mma.cuh.
template <bool kHalf>
inline void mma_m16n8k16(float (&d)[4], uint32_t const (&a)[4], uint32_t const (&b)[2])
{
    uint32_t const mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    unsigned char const* all = warp_exchange(0xFFFFFFFFU, mine, sizeof(mine));
    auto val = [](uint32_t bits16) {
        return kHalf ? __half2float(__ushort_as_half(static_cast<unsigned short>(bits16))) : __uint_as_float(bits16 << 16);
    };
    auto frag = [all](unsigned l, unsigned reg) {
        uint32_t f;
        std::memcpy(&f, all + l * kExchangeBytes + 4 * reg, sizeof(f));
        return f;
    };
    // Only what this lane's outputs need: A rows g and g + 8, B columns 2t and 2t + 1. Element
    // (row, k) of A sits in lane 4 (row % 8) + (k % 8) / 2, register 2 (k / 8) + row / 8, half k % 2;
    // element (k, n) of B in lane 4 n + (k % 8) / 2, register 4 + k / 8, half k % 2.
    unsigned const lane = lane_id(), g = lane / 4, t = lane % 4;
    float A[2][16], B[16][2];
    for (unsigned k = 0; k < 16; ++k)
    {
        for (unsigned r = 0; r < 2; ++r)
            A[r][k] = val((frag(4 * g + (k % 8) / 2, 2 * (k / 8) + r) >> (16 * (k % 2))) & 0xFFFFU);
        for (unsigned c = 0; c < 2; ++c)
            B[k][c] = val((frag(4 * (2 * t + c) + (k % 8) / 2, 4 + k / 8) >> (16 * (k % 2))) & 0xFFFFU);
    }
    for (unsigned i = 0; i < 4; ++i)
    {
        float acc = d[i];
        for (unsigned k = 0; k < 16; ++k)
            acc = std::fma(A[i / 2][k], B[k][i % 2], acc);
        d[i] = acc;
    }
}
} // namespace emu
} // namespace hatrt
