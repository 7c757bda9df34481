// The CUDA emulator under AddressSanitizer and ThreadSanitizer: planted bugs are reported, and a
// correct kernel (barriers, shuffles, shared-memory atomics, cp.async: every kind of fiber switch
// and every happens-before edge the emulator declares) runs clean. Built by tests/test_cuda_emu.py
// with -fsanitize=address or -fsanitize=thread:
//   g++ -fsanitize=address -x c++ -include plugins/emu/cuda_emu.h plugins/emu/sanitizer_selftest.cu plugins/emu/cuda_emu.cpp
//   ./sanitizer_selftest clean | global | dynamic-smem | static-smem | stack | race | warp-race
// "clean" exits 0 without a report under either sanitizer. Under ASan, global / dynamic-smem /
// static-smem / stack end in a report of their kind (heap-buffer-overflow, global-buffer-overflow,
// stack-buffer-overflow); under TSan, race (a missing __syncthreads) and warp-race (a missing
// __syncwarp) end in a data-race report.
#include "../csrc/async_copy.cuh" // also brings HATRT_LAUNCH / HATRT_DYNAMIC_SMEM (common.cuh)

#include <cstdio>
#include <cstring>
#include <vector>

namespace
{

constexpr int kThreads = 64;

// Correct: stage through dynamic shared memory with cp.async, reduce with shuffles across a barrier.
__global__ void clean_kernel(float const* in, float* out)
{
    HATRT_DYNAMIC_SMEM(float, s);
    hatrt::detail::cp_async<4>(s + threadIdx.x, in + blockIdx.x * kThreads + threadIdx.x);
    hatrt::detail::cp_async_commit();
    hatrt::detail::cp_async_wait_all();
    __syncthreads();
    float v = s[(threadIdx.x + 1) % kThreads];
    for (int o = 16; o > 0; o /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (threadIdx.x % 32 == 0)
        s[threadIdx.x / 32] = v;
    __shared__ unsigned count;
    if (threadIdx.x == 0)
        count = 0;
    __syncthreads();
    atomicAdd(&count, 1U); // every thread, no barrier in between: atomics do not race
    __syncthreads();
    if (threadIdx.x == 0)
        out[blockIdx.x] = count == kThreads ? s[0] + s[1] : -1.0f;
}

// Each thread writes its slot and then reads its neighbour's without a __syncthreads between.
__global__ void race_kernel(float const* in, float* out)
{
    __shared__ float s[kThreads];
    s[threadIdx.x] = in[threadIdx.x];
    out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

// The same inside one warp, where a __syncwarp is what orders the lanes.
__global__ void warp_race_kernel(float const* in, float* out)
{
    __shared__ float s[32];
    s[threadIdx.x] = in[threadIdx.x];
    out[threadIdx.x] = s[(threadIdx.x + 1) % 32];
}

// The last thread reads one element past the end of `in` (n elements).
__global__ void global_kernel(float const* in, float* out, int n)
{
    out[threadIdx.x] = in[threadIdx.x + (threadIdx.x == kThreads - 1 ? n - threadIdx.x : 0)];
}

// Launched with kThreads - 1 floats of dynamic shared memory: the last thread writes past it.
__global__ void dynamic_smem_kernel(float* out)
{
    HATRT_DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[0];
}

// A __shared__ array of kThreads - 1 floats; the last thread writes past it.
__global__ void static_smem_kernel(float* out)
{
    __shared__ float s[kThreads - 1];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[0];
}

// A thread-local array (on the fiber's stack) indexed one past its end by the last thread.
__global__ void stack_kernel(float* out, int extra)
{
    float local[4];
    for (int i = 0; i < 4; ++i)
        local[i] = float(i + threadIdx.x);
    __syncthreads(); // a fiber switch between the writes and the read
    out[threadIdx.x] = local[threadIdx.x == kThreads - 1 ? 3 + extra : 0];
}

} // namespace

int main(int argc, char** argv)
{
    char const* what = argc > 1 ? argv[1] : "clean";
    int const blocks = 3, n = blocks * kThreads;
    float *in = nullptr, *out = nullptr;
    if (cudaMalloc(&in, n * sizeof(float)) != cudaSuccess || cudaMalloc(&out, n * sizeof(float)) != cudaSuccess)
        return 2;
    std::vector<float> host(n);
    for (int i = 0; i < n; ++i)
        host[i] = float(i % 7);
    cudaMemcpy(in, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    if (std::strcmp(what, "clean") == 0)
    {
        HATRT_LAUNCH(clean_kernel, blocks, kThreads, kThreads * sizeof(float), nullptr)(in, out);
        HATRT_LAUNCH(clean_kernel, blocks, kThreads, kThreads * sizeof(float), nullptr)(in, out); // reverse order
        std::vector<float> got(blocks);
        cudaMemcpy(got.data(), out, blocks * sizeof(float), cudaMemcpyDeviceToHost);
        for (int b = 0; b < blocks; ++b)
        {
            float want = 0;
            for (int t = 0; t < kThreads; ++t)
                want += host[b * kThreads + t];
            if (got[b] != want)
            {
                std::printf("FAIL block %d: %g != %g\n", b, got[b], want);
                return 1;
            }
        }
    }
    else if (std::strcmp(what, "global") == 0)
        HATRT_LAUNCH(global_kernel, 1, kThreads, 0, nullptr)(in, out, n);
    else if (std::strcmp(what, "dynamic-smem") == 0)
        HATRT_LAUNCH(dynamic_smem_kernel, 1, kThreads, (kThreads - 1) * sizeof(float), nullptr)(out);
    else if (std::strcmp(what, "static-smem") == 0)
        HATRT_LAUNCH(static_smem_kernel, 1, kThreads, 0, nullptr)(out);
    else if (std::strcmp(what, "stack") == 0)
        HATRT_LAUNCH(stack_kernel, 1, kThreads, 0, nullptr)(out, argc - 1);
    else if (std::strcmp(what, "race") == 0)
        HATRT_LAUNCH(race_kernel, 1, kThreads, 0, nullptr)(in, out);
    else if (std::strcmp(what, "warp-race") == 0)
        HATRT_LAUNCH(warp_race_kernel, 1, 32, 0, nullptr)(in, out);
    else
        return 2;
    cudaError_t const err = cudaDeviceSynchronize();
    std::printf("%s: %s\n", what, cudaGetErrorString(err));
    cudaFree(in);
    cudaFree(out);
    return err == cudaSuccess ? 0 : 1;
}
