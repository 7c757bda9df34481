// Self-test of the CUDA emulator (plugins/emu): the rules the kernel tests rely on hold, and the
// mistakes it promises to expose are exposed. Built by tests/test_cuda_emu.py:
//   g++ -std=c++17 -x c++ -include plugins/emu/cuda_emu.h plugins/emu/emu_selftest.cu plugins/emu/cuda_emu.cpp
// Plain CUDA (with the HATRT_* spellings of common.cuh), so nvcc compiles it too and a GPU run of
// the "correct" half gives the same answers (scripts/gpu_check.sh runs it): in particular the
// tensor-core check below holds the documented mma fragment layout (plugins/csrc/mma.cuh), which
// the emulator implements and the kernels rely on, against the hardware.
#include "../csrc/mma.cuh" // also brings HATRT_LAUNCH / HATRT_DYNAMIC_SMEM (common.cuh)

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace
{

int gChecks = 0, gFailures = 0;

void check(bool ok, std::string const& what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL %s\n", what.c_str());
    }
}

// Block sum: shared memory + __syncthreads + warp shuffles; per-block result in out[blockIdx.x].
__global__ void block_sum(float const* x, float* out)
{
    __shared__ float warp_sums[32];
    int const tid = threadIdx.x;
    float v = x[blockIdx.x * blockDim.x + tid];
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if (tid % 32 == 0)
        warp_sums[tid / 32] = v;
    __syncthreads();
    if (tid < 32)
    {
        float w = tid < int(blockDim.x / 32) ? warp_sums[tid] : 0.F;
        for (int o = 16; o > 0; o >>= 1)
            w += __shfl_down_sync(0xFFFFFFFFu, w, o);
        if (tid == 0)
            out[blockIdx.x] = w;
    }
}

// Inclusive warp scan with __shfl_up_sync, ballot and the block-wide predicate reductions.
__global__ void warp_ops(int const* x, int* scan, unsigned* ballots, int* counts)
{
    int const tid = threadIdx.x, lane = tid % 32;
    int v = x[tid];
    for (int o = 1; o < 32; o <<= 1)
    {
        int const u = __shfl_up_sync(0xFFFFFFFFu, v, o);
        if (lane >= o)
            v += u;
    }
    scan[tid] = v;
    unsigned const b = __ballot_sync(0xFFFFFFFFu, x[tid] > 2);
    if (lane == 0)
        ballots[tid / 32] = b;
    int const c = __syncthreads_count(x[tid] > 2);
    int const any = __syncthreads_or(x[tid] == 4);
    int const all = __syncthreads_and(x[tid] >= 0);
    if (tid == 0)
        counts[0] = c, counts[1] = any, counts[2] = all;
}

// D = A B for one m16n8k16 tile, each lane building its fragments by the layout of mma.cuh.
__global__ void mma_tile(float const* A, float const* B, float* D) // A [16][16], B [16][8], D [16][8]
{
    using hatrt::detail::pack16;
    unsigned const lane = threadIdx.x, g = lane / 4, t = lane % 4;
    auto bf = [](float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); };
    uint32_t const a[4] = {pack16(bf(A[g * 16 + 2 * t]), bf(A[g * 16 + 2 * t + 1])),
        pack16(bf(A[(g + 8) * 16 + 2 * t]), bf(A[(g + 8) * 16 + 2 * t + 1])),
        pack16(bf(A[g * 16 + 2 * t + 8]), bf(A[g * 16 + 2 * t + 9])),
        pack16(bf(A[(g + 8) * 16 + 2 * t + 8]), bf(A[(g + 8) * 16 + 2 * t + 9]))};
    uint32_t const b[2] = {pack16(bf(B[(2 * t) * 8 + g]), bf(B[(2 * t + 1) * 8 + g])),
        pack16(bf(B[(2 * t + 8) * 8 + g]), bf(B[(2 * t + 9) * 8 + g]))};
    float d[4] = {0.F, 0.F, 0.F, 0.F};
    hatrt::detail::mma_16816<false>(d, a, b);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

#ifdef HATRT_CUDA_EMU // the buggy kernels only run on the emulator
// BUG: reads a neighbour's shared-memory slot without a __syncthreads after the writes.
__global__ void missing_barrier(float* out)
{
    HATRT_DYNAMIC_SMEM(float, s);
    int const tid = threadIdx.x;
    s[tid] = float(tid);
    out[tid] = s[(tid + 1) % blockDim.x];
}

// BUG: lane 5 has exited when the others shuffle with the full mask.
__global__ void exited_lane(float* out)
{
    if (threadIdx.x == 5)
        return;
    out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, float(threadIdx.x), 1);
}

// BUG: a __syncthreads that half of the block can never reach (the other half waits at a shuffle).
__global__ void divergent_barrier(float* out)
{
    float v = float(threadIdx.x);
    if (threadIdx.x % 32 < 16)
        __syncthreads();
    else
        v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    out[threadIdx.x] = v;
}

// BUG: a 16-byte vector load from an address that is only 4-byte aligned.
__global__ void misaligned_load(float const* x, float* out)
{
    float4 const v = __ldg(reinterpret_cast<float4 const*>(x + 1));
    out[threadIdx.x] = v.x;
}

__global__ void big_smem(float* out)
{
    HATRT_DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = 1.F;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
#endif

} // namespace

int main()
{
    // correct kernels give the right answers
    {
        int const blocks = 3, threads = 256;
        std::vector<float> x(blocks * threads);
        for (size_t i = 0; i < x.size(); ++i)
            x[i] = float(i % 17) - 8.F;
        float *dx = nullptr, *dout = nullptr;
        cudaMalloc(reinterpret_cast<void**>(&dx), x.size() * 4);
        cudaMalloc(reinterpret_cast<void**>(&dout), blocks * 4);
        cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice);
        for (int rep = 0; rep < 2; ++rep) // both thread orders
        {
            HATRT_LAUNCH(block_sum, blocks, threads, 0, nullptr)(dx, dout);
            check(cudaGetLastError() == cudaSuccess, "block_sum launches");
            std::vector<float> out(blocks);
            cudaMemcpy(out.data(), dout, blocks * 4, cudaMemcpyDeviceToHost);
            for (int b = 0; b < blocks; ++b)
            {
                float ref = 0.F;
                for (int t = 0; t < threads; ++t)
                    ref += x[b * threads + t];
                check(out[b] == ref, "block_sum block " + std::to_string(b));
            }
        }
        cudaFree(dx);
        cudaFree(dout);
    }
    {
        int const threads = 64;
        std::vector<int> x(threads);
        for (int i = 0; i < threads; ++i)
            x[i] = (i * 7) % 5;
        int *dx = nullptr, *dscan = nullptr, *dcounts = nullptr;
        unsigned* dballots = nullptr;
        cudaMalloc(reinterpret_cast<void**>(&dx), threads * 4);
        cudaMalloc(reinterpret_cast<void**>(&dscan), threads * 4);
        cudaMalloc(reinterpret_cast<void**>(&dballots), 2 * 4);
        cudaMalloc(reinterpret_cast<void**>(&dcounts), 3 * 4);
        cudaMemcpy(dx, x.data(), threads * 4, cudaMemcpyHostToDevice);
        HATRT_LAUNCH(warp_ops, 1, threads, 0, nullptr)(dx, dscan, dballots, dcounts);
        check(cudaGetLastError() == cudaSuccess, "warp_ops launches");
        std::vector<int> scan(threads), counts(3);
        std::vector<unsigned> ballots(2);
        cudaMemcpy(scan.data(), dscan, threads * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(ballots.data(), dballots, 2 * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(counts.data(), dcounts, 3 * 4, cudaMemcpyDeviceToHost);
        int run = 0, count = 0, any = 0;
        unsigned ref_ballot[2] = {0, 0};
        for (int i = 0; i < threads; ++i)
        {
            run = (i % 32 == 0 ? 0 : run) + x[i];
            check(scan[i] == run, "shfl_up scan at " + std::to_string(i));
            ref_ballot[i / 32] |= (x[i] > 2 ? 1U : 0U) << (i % 32);
            count += x[i] > 2;
            any |= x[i] == 4;
        }
        check(ballots[0] == ref_ballot[0] && ballots[1] == ref_ballot[1], "ballot");
        check(counts[0] == count && counts[1] == any && counts[2] == 1, "__syncthreads_count/or/and");
        cudaFree(dx);
        cudaFree(dscan);
        cudaFree(dballots);
        cudaFree(dcounts);
    }

    {
        // small integers: exact in bf16 and in the fp32 sums, so D must equal A B exactly
        std::vector<float> A(256), B(128), D(128, -1.F);
        for (int i = 0; i < 256; ++i)
            A[i] = float((i * 7 + 3) % 9) - 4.F;
        for (int i = 0; i < 128; ++i)
            B[i] = float((i * 5 + 1) % 7) - 3.F;
        float *dA = nullptr, *dB = nullptr, *dD = nullptr;
        cudaMalloc(reinterpret_cast<void**>(&dA), 256 * 4);
        cudaMalloc(reinterpret_cast<void**>(&dB), 128 * 4);
        cudaMalloc(reinterpret_cast<void**>(&dD), 128 * 4);
        cudaMemcpy(dA, A.data(), 256 * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dB, B.data(), 128 * 4, cudaMemcpyHostToDevice);
        HATRT_LAUNCH(mma_tile, 1, 32, 0, nullptr)(dA, dB, dD);
        check(cudaGetLastError() == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess, "mma_tile runs");
        cudaMemcpy(D.data(), dD, 128 * 4, cudaMemcpyDeviceToHost);
        bool exact = true;
        for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 8; ++c)
            {
                float ref = 0.F;
                for (int k = 0; k < 16; ++k)
                    ref += A[r * 16 + k] * B[k * 8 + c];
                exact &= D[r * 8 + c] == ref;
            }
        check(exact, "mma.sync m16n8k16 with the documented fragment layout computes A B");
        cudaFree(dA);
        cudaFree(dB);
        cudaFree(dD);
    }

#ifdef HATRT_CUDA_EMU
    // the mistakes are exposed
    float* d = nullptr;
    cudaMalloc(reinterpret_cast<void**>(&d), 64 * 4);
    {
        bool exposed = false;
        for (int rep = 0; rep < 2; ++rep) // one of the two thread orders reads before the write
        {
            HATRT_LAUNCH(missing_barrier, 1, 64, 64 * 4, nullptr)(d);
            std::vector<float> out(64);
            cudaMemcpy(out.data(), d, 64 * 4, cudaMemcpyDeviceToHost);
            for (int t = 0; t < 64; ++t)
                exposed |= !(out[t] == float((t + 1) % 64));
        }
        check(cudaGetLastError() == cudaSuccess, "missing_barrier still launches");
        check(exposed, "a missing __syncthreads shows up as poisoned shared memory");
    }
    {
        HATRT_LAUNCH(exited_lane, 1, 32, 0, nullptr)(d);
        cudaError_t const err = cudaGetLastError();
        check(err == cudaErrorLaunchFailure, "shuffle with an exited lane fails the launch");
        check(std::strstr(cudaGetErrorString(err), "deadlock") != nullptr, "... and says deadlock");
    }
    {
        HATRT_LAUNCH(divergent_barrier, 1, 64, 0, nullptr)(d);
        check(cudaGetLastError() == cudaErrorLaunchFailure, "a barrier half the block cannot reach fails the launch");
    }
    {
        HATRT_LAUNCH(misaligned_load, 1, 32, 0, nullptr)(d, d);
        cudaError_t const err = cudaGetLastError();
        check(err == cudaErrorMisalignedAddress, "a misaligned vector load faults");
        check(std::strstr(cudaGetErrorString(err), "misaligned") != nullptr, "... and says so");
    }
    {
        HATRT_LAUNCH(big_smem, 1, 64, 64 * 1024, nullptr)(d);
        cudaError_t const err = cudaGetLastError();
        check(err == cudaErrorInvalidValue, "64 KB of dynamic shared memory without the opt-in is refused");
        check(std::strstr(cudaGetErrorString(err), "MaxDynamicSharedMemorySize") != nullptr, "... naming the attribute");
        check(cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
            "opt-in accepted");
        HATRT_LAUNCH(big_smem, 1, 64, 64 * 1024, nullptr)(d);
        check(cudaGetLastError() == cudaSuccess, "... and then the launch works");
        check(cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024) != cudaSuccess,
            "more than the card's 227 KB is refused");
        HATRT_LAUNCH(big_smem, 1, 2048, 0, nullptr)(d);
        check(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads per block are refused");
    }
    cudaFree(d);
#endif
    std::printf("%d checks, %d failed\n", gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
