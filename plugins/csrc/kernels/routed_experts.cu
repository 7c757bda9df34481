// RoutedExperts (exporter/custom_ops.py: routed_experts_reference, the MoE loop of
// exporter/model.py) as a grouped GEMM over the picked experts only:
//
//   1. count    every valid pick (t, j) counts for its expert (picks outside [0, E) are dropped);
//   2. scan     one block: exclusive prefix sums -> each expert's first row, and the table of
//               BM-row tiles (tile -> expert, first row): at most ceil(P / BM) + E tiles;
//   3. scatter  each pick gets a row of its expert's segment (counting sort; the order inside a
//               segment is whatever the atomics give, which changes no result: every row is
//               computed on its own) and the pick -> row map;
//   4. gemm1    per (tile, BN columns of I): gate = x W1^T and up = x W3^T for the tile's rows
//               (x gathered through the rows' tokens), SwiGLU with the clamp, -> H [P, I] fp32;
//   5. gemm2    per (tile, BN columns of d): H W2^T -> Y [P, d] fp32;
//   6. combine  out[t] = sum_j w[t, j] * Y[row(t, j)] in pick order (no float atomics: the result
//               is deterministic; repeated picks are separate rows and add up).
// Math: bf16 / fp16 activations and experts of one type run both GEMMs on tensor cores (mma.sync
// m16n8k16, fp32 accumulation; H is rounded to that type for the down projection, as the reference
// rounds it); anything else (or tensor_cores = false) in fp32 on CUDA cores. FP8/FP4 expert weights
// are future work (docs/moe.md). Scratch: routed_experts_workspace_bytes.
#include "../common.cuh"
#include "../mma.cuh"

#include <algorithm>
#include <cmath>

namespace hatrt
{
namespace detail
{
namespace
{

constexpr int kMoeBM = 32;       // rows per tile
constexpr int kMoeBN = 64;       // output columns per block
constexpr int kMoeBK = 16;       // reduction step
constexpr int kMoeThreads = 256; // 16 x 16: each thread 2 rows x 4 columns
constexpr int kMoeRowsPerThread = kMoeBM / 16;
constexpr int kMoeColsPerThread = kMoeBN / 16;
constexpr int kScanThreads = 256;

struct Workspace
{
    int32_t* counts;      // [E]
    int32_t* cursor;      // [E]
    int32_t* row_start;   // [E + 1]
    int32_t* tile_start;  // [E + 1]
    int32_t* tile_expert; // [max_tiles]
    int32_t* tile_row;    // [max_tiles] first row of the tile
    int32_t* num_tiles;   // [1]
    int32_t* row_pick;    // [P] row -> pick (t * k + j)
    int32_t* pick_row;    // [P] pick -> row, -1 = dropped
    float* h;             // [P, I]
    float* y;             // [P, d]
};

constexpr size_t align16(size_t n)
{
    return (n + 15) & ~size_t(15);
}

int64_t max_tiles(int64_t P, int32_t E)
{
    return (P + kMoeBM - 1) / kMoeBM + E;
}

//! Byte offsets of the workspace pieces (in Workspace order), and the total.
struct Layout
{
    size_t off[11];
    size_t total;
};

Layout layout(int64_t T, int32_t k, int32_t E, int32_t d, int32_t I)
{
    int64_t const P = T * k;
    int64_t const tiles = max_tiles(P, E);
    size_t const sizes[11] = {size_t(E) * 4, size_t(E) * 4, size_t(E + 1) * 4, size_t(E + 1) * 4, size_t(tiles) * 4,
        size_t(tiles) * 4, 4, size_t(P) * 4, size_t(P) * 4, size_t(P) * size_t(I) * 4, size_t(P) * size_t(d) * 4};
    Layout l{};
    size_t at = 0;
    for (int i = 0; i < 11; ++i)
    {
        l.off[i] = at;
        at += align16(sizes[i]);
    }
    l.total = at;
    return l;
}

Workspace carve(void* base, Layout const& l)
{
    auto* b = static_cast<uint8_t*>(base);
    Workspace w{};
    w.counts = reinterpret_cast<int32_t*>(b + l.off[0]);
    w.cursor = reinterpret_cast<int32_t*>(b + l.off[1]);
    w.row_start = reinterpret_cast<int32_t*>(b + l.off[2]);
    w.tile_start = reinterpret_cast<int32_t*>(b + l.off[3]);
    w.tile_expert = reinterpret_cast<int32_t*>(b + l.off[4]);
    w.tile_row = reinterpret_cast<int32_t*>(b + l.off[5]);
    w.num_tiles = reinterpret_cast<int32_t*>(b + l.off[6]);
    w.row_pick = reinterpret_cast<int32_t*>(b + l.off[7]);
    w.pick_row = reinterpret_cast<int32_t*>(b + l.off[8]);
    w.h = reinterpret_cast<float*>(b + l.off[9]);
    w.y = reinterpret_cast<float*>(b + l.off[10]);
    return w;
}

struct MoeArgs
{
    int64_t T;
    int32_t k, E, d, I;
    float limit; // +inf: no clamp
    void const* x;
    DType x_dtype;
    void const* idx;
    IndexType idx_type;
    void const* wts;
    DType wts_dtype;
    void const* w1;
    DType w1_dtype;
    void const* w3;
    DType w3_dtype;
    void const* w2;
    DType w2_dtype;
    float* out;
    Workspace ws;
};

__device__ __forceinline__ int32_t pick_expert(MoeArgs const& a, int64_t p)
{
    int64_t const e = load_idx(a.idx, a.idx_type, p);
    return (e >= 0 && e < a.E) ? int32_t(e) : -1;
}

__global__ void __launch_bounds__(kScanThreads) moe_count_kernel(MoeArgs a)
{
    int64_t const P = a.T * a.k;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x)
    {
        int32_t const e = pick_expert(a, p);
        if (e >= 0)
            atomicAdd(&a.ws.counts[e], 1);
    }
}

//! One block: thread 0 scans the counts (E is a few hundred), then all threads fill the tile table.
__global__ void __launch_bounds__(kScanThreads) moe_scan_kernel(MoeArgs a)
{
    Workspace const& w = a.ws;
    if (threadIdx.x == 0)
    {
        int32_t rows = 0, tiles = 0;
        for (int32_t e = 0; e < a.E; ++e)
        {
            w.row_start[e] = rows;
            w.tile_start[e] = tiles;
            rows += w.counts[e];
            tiles += (w.counts[e] + kMoeBM - 1) / kMoeBM;
        }
        w.row_start[a.E] = rows;
        w.tile_start[a.E] = tiles;
        *w.num_tiles = tiles;
    }
    __syncthreads(); // global writes of thread 0 are visible to the block after the barrier
    for (int32_t e = threadIdx.x; e < a.E; e += blockDim.x)
    {
        int32_t const t0 = w.tile_start[e], t1 = w.tile_start[e + 1];
        for (int32_t t = t0; t < t1; ++t)
        {
            w.tile_expert[t] = e;
            w.tile_row[t] = w.row_start[e] + (t - t0) * kMoeBM;
        }
    }
}

__global__ void __launch_bounds__(kScanThreads) moe_scatter_kernel(MoeArgs a)
{
    int64_t const P = a.T * a.k;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x)
    {
        int32_t const e = pick_expert(a, p);
        if (e < 0)
        {
            a.ws.pick_row[p] = -1;
            continue;
        }
        int32_t const row = a.ws.row_start[e] + atomicAdd(&a.ws.cursor[e], 1);
        a.ws.row_pick[row] = int32_t(p);
        a.ws.pick_row[p] = row;
    }
}

//! The tile of this block: expert, first row, rows in the tile (0: nothing to do).
__device__ __forceinline__ int32_t tile_rows(MoeArgs const& a, int32_t tile, int32_t& e, int32_t& row0)
{
    if (tile >= *a.ws.num_tiles)
        return 0;
    e = a.ws.tile_expert[tile];
    row0 = a.ws.tile_row[tile];
    int32_t const end = a.ws.row_start[e + 1];
    return min(kMoeBM, end - row0);
}

//! gate / up for one (tile, BN columns of I), then SwiGLU with the clamp -> H.
__global__ void __launch_bounds__(kMoeThreads) moe_gemm1_kernel(MoeArgs a)
{
    __shared__ float sa[kMoeBK][kMoeBM + 1];
    __shared__ float sb1[kMoeBK][kMoeBN + 1];
    __shared__ float sb3[kMoeBK][kMoeBN + 1];
    __shared__ int64_t stok[kMoeBM];
    int32_t e = 0, row0 = 0;
    int32_t const rows = tile_rows(a, int32_t(blockIdx.x), e, row0);
    if (rows <= 0)
        return; // uniform over the block
    int const tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int32_t const n0 = int32_t(blockIdx.y) * kMoeBN;
    int32_t const d = a.d, I = a.I;
    if (tid < kMoeBM)
        stok[tid] = tid < rows ? int64_t(a.ws.row_pick[row0 + tid] / a.k) : -1;
    __syncthreads();

    float g[kMoeRowsPerThread][kMoeColsPerThread] = {};
    float u[kMoeRowsPerThread][kMoeColsPerThread] = {};
    int64_t const wbase = int64_t(e) * I * d;
    for (int32_t k0 = 0; k0 < d; k0 += kMoeBK)
    {
        for (int i = tid; i < kMoeBM * kMoeBK; i += kMoeThreads)
        {
            int const r = i / kMoeBK, kk = i % kMoeBK;
            int64_t const t = stok[r];
            sa[kk][r] = (t >= 0 && k0 + kk < d) ? load_f(a.x, a.x_dtype, t * d + k0 + kk) : 0.F;
        }
        for (int i = tid; i < kMoeBN * kMoeBK; i += kMoeThreads)
        {
            int const n = i / kMoeBK, kk = i % kMoeBK;
            bool const in = n0 + n < I && k0 + kk < d;
            int64_t const off = wbase + int64_t(n0 + n) * d + k0 + kk;
            sb1[kk][n] = in ? load_f(a.w1, a.w1_dtype, off) : 0.F;
            sb3[kk][n] = in ? load_f(a.w3, a.w3_dtype, off) : 0.F;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kMoeBK; ++kk)
        {
            float av[kMoeRowsPerThread], b1[kMoeColsPerThread], b3[kMoeColsPerThread];
#pragma unroll
            for (int r = 0; r < kMoeRowsPerThread; ++r)
                av[r] = sa[kk][ty + 16 * r];
#pragma unroll
            for (int c = 0; c < kMoeColsPerThread; ++c)
            {
                b1[c] = sb1[kk][tx + 16 * c];
                b3[c] = sb3[kk][tx + 16 * c];
            }
#pragma unroll
            for (int r = 0; r < kMoeRowsPerThread; ++r)
#pragma unroll
                for (int c = 0; c < kMoeColsPerThread; ++c)
                {
                    g[r][c] = fmaf(av[r], b1[c], g[r][c]);
                    u[r][c] = fmaf(av[r], b3[c], u[r][c]);
                }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kMoeRowsPerThread; ++r)
    {
        int const rr = ty + 16 * r;
        if (rr >= rows)
            continue;
#pragma unroll
        for (int c = 0; c < kMoeColsPerThread; ++c)
        {
            int32_t const n = n0 + tx + 16 * c;
            if (n >= I)
                continue;
            float const gate = fminf(g[r][c], a.limit);
            float const up = fminf(fmaxf(u[r][c], -a.limit), a.limit);
            float const silu = gate / (1.F + expf(-gate));
            a.ws.h[int64_t(row0 + rr) * I + n] = silu * up;
        }
    }
}

//! Y = H W2^T for one (tile, BN columns of d).
__global__ void __launch_bounds__(kMoeThreads) moe_gemm2_kernel(MoeArgs a)
{
    __shared__ float sa[kMoeBK][kMoeBM + 1];
    __shared__ float sb[kMoeBK][kMoeBN + 1];
    int32_t e = 0, row0 = 0;
    int32_t const rows = tile_rows(a, int32_t(blockIdx.x), e, row0);
    if (rows <= 0)
        return;
    int const tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int32_t const n0 = int32_t(blockIdx.y) * kMoeBN;
    int32_t const d = a.d, I = a.I;
    float acc[kMoeRowsPerThread][kMoeColsPerThread] = {};
    int64_t const wbase = int64_t(e) * d * I;
    for (int32_t k0 = 0; k0 < I; k0 += kMoeBK)
    {
        for (int i = tid; i < kMoeBM * kMoeBK; i += kMoeThreads)
        {
            int const r = i / kMoeBK, kk = i % kMoeBK;
            sa[kk][r] = (r < rows && k0 + kk < I) ? a.ws.h[int64_t(row0 + r) * I + k0 + kk] : 0.F;
        }
        for (int i = tid; i < kMoeBN * kMoeBK; i += kMoeThreads)
        {
            int const n = i / kMoeBK, kk = i % kMoeBK;
            sb[kk][n] = (n0 + n < d && k0 + kk < I) ? load_f(a.w2, a.w2_dtype, wbase + int64_t(n0 + n) * I + k0 + kk)
                                                     : 0.F;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kMoeBK; ++kk)
        {
            float av[kMoeRowsPerThread], bv[kMoeColsPerThread];
#pragma unroll
            for (int r = 0; r < kMoeRowsPerThread; ++r)
                av[r] = sa[kk][ty + 16 * r];
#pragma unroll
            for (int c = 0; c < kMoeColsPerThread; ++c)
                bv[c] = sb[kk][tx + 16 * c];
#pragma unroll
            for (int r = 0; r < kMoeRowsPerThread; ++r)
#pragma unroll
                for (int c = 0; c < kMoeColsPerThread; ++c)
                    acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kMoeRowsPerThread; ++r)
    {
        int const rr = ty + 16 * r;
        if (rr >= rows)
            continue;
#pragma unroll
        for (int c = 0; c < kMoeColsPerThread; ++c)
        {
            int32_t const n = n0 + tx + 16 * c;
            if (n < d)
                a.ws.y[int64_t(row0 + rr) * d + n] = acc[r][c];
        }
    }
}

// ----------------------------------------------------------------------------- tensor-core GEMMs
// The same tiles (32 rows x 64 columns, 256 threads) as 8 warps of mma.sync m16n8k16: warp w owns
// rows 16 (w / 4) .. +16 and columns 16 (w % 4) .. +16 (two n8 tiles). Tiles of 32 k values are
// staged in shared memory as 16-bit values, k contiguous (rows of A, rows of W = columns of B).
constexpr int kTcBK = 32;
constexpr int kTcPad = 8; // row stride 40 halves = 80 bytes: 4-byte aligned fragment loads

//! One 16 x 16 (rows) x 16 (k) step for the warp's two n8 tiles of one B matrix.
template <bool kHalf>
__device__ __forceinline__ void tc_step(float (&acc)[2][4], uint16_t const (*sa)[kTcBK + kTcPad],
    uint16_t const (*sb)[kTcBK + kTcPad], int m0, int n0, int k, int g, int t)
{
    uint32_t const a[4] = {lds32(&sa[m0 + g][k + 2 * t]), lds32(&sa[m0 + g + 8][k + 2 * t]),
        lds32(&sa[m0 + g][k + 2 * t + 8]), lds32(&sa[m0 + g + 8][k + 2 * t + 8])};
#pragma unroll
    for (int j = 0; j < 2; ++j)
    {
        int const n = n0 + 8 * j + g;
        uint32_t const b[2] = {lds32(&sb[n][k + 2 * t]), lds32(&sb[n][k + 2 * t + 8])};
        mma_16816<kHalf>(acc[j], a, b);
    }
}

__device__ __forceinline__ uint16_t raw16(void const* p, int64_t i)
{
    return static_cast<uint16_t const*>(p)[i];
}

template <bool kHalf>
__global__ void __launch_bounds__(kMoeThreads) moe_gemm1_tc_kernel(MoeArgs a)
{
    __shared__ __align__(16) uint16_t sa[kMoeBM][kTcBK + kTcPad];
    __shared__ __align__(16) uint16_t sb1[kMoeBN][kTcBK + kTcPad];
    __shared__ __align__(16) uint16_t sb3[kMoeBN][kTcBK + kTcPad];
    __shared__ int64_t stok[kMoeBM];
    int32_t e = 0, row0 = 0;
    int32_t const rows = tile_rows(a, int32_t(blockIdx.x), e, row0);
    if (rows <= 0)
        return; // uniform over the block
    int const tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    int const m0 = 16 * (warp / 4), nw = 16 * (warp % 4);
    int32_t const n0 = int32_t(blockIdx.y) * kMoeBN;
    int32_t const d = a.d, I = a.I;
    if (tid < kMoeBM)
        stok[tid] = tid < rows ? int64_t(a.ws.row_pick[row0 + tid] / a.k) : -1;
    __syncthreads();

    float gate[2][4] = {}, up[2][4] = {};
    int64_t const wbase = int64_t(e) * I * d;
    for (int32_t k0 = 0; k0 < d; k0 += kTcBK)
    {
        for (int i = tid; i < kMoeBM * kTcBK; i += kMoeThreads)
        {
            int const r = i / kTcBK, kk = i % kTcBK;
            int64_t const tok = stok[r];
            sa[r][kk] = (tok >= 0 && k0 + kk < d) ? raw16(a.x, tok * d + k0 + kk) : uint16_t(0);
        }
        for (int i = tid; i < kMoeBN * kTcBK; i += kMoeThreads)
        {
            int const n = i / kTcBK, kk = i % kTcBK;
            bool const in = n0 + n < I && k0 + kk < d;
            int64_t const off = wbase + int64_t(n0 + n) * d + k0 + kk;
            sb1[n][kk] = in ? raw16(a.w1, off) : uint16_t(0);
            sb3[n][kk] = in ? raw16(a.w3, off) : uint16_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kTcBK; k += 16)
        {
            tc_step<kHalf>(gate, sa, sb1, m0, nw, k, g, t);
            tc_step<kHalf>(up, sa, sb3, m0, nw, k, g, t);
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q)
        {
            int const rr = m0 + g + 8 * (q / 2);
            int32_t const n = n0 + nw + 8 * j + 2 * t + (q % 2);
            if (rr >= rows || n >= I)
                continue;
            float const gv = fminf(gate[j][q], a.limit);
            float const uv = fminf(fmaxf(up[j][q], -a.limit), a.limit);
            a.ws.h[int64_t(row0 + rr) * I + n] = gv / (1.F + expf(-gv)) * uv;
        }
}

template <bool kHalf>
__global__ void __launch_bounds__(kMoeThreads) moe_gemm2_tc_kernel(MoeArgs a)
{
    __shared__ __align__(16) uint16_t sa[kMoeBM][kTcBK + kTcPad];
    __shared__ __align__(16) uint16_t sb[kMoeBN][kTcBK + kTcPad];
    int32_t e = 0, row0 = 0;
    int32_t const rows = tile_rows(a, int32_t(blockIdx.x), e, row0);
    if (rows <= 0)
        return;
    int const tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    int const m0 = 16 * (warp / 4), nw = 16 * (warp % 4);
    int32_t const n0 = int32_t(blockIdx.y) * kMoeBN;
    int32_t const d = a.d, I = a.I;
    float acc[2][4] = {};
    int64_t const wbase = int64_t(e) * d * I;
    for (int32_t k0 = 0; k0 < I; k0 += kTcBK)
    {
        for (int i = tid; i < kMoeBM * kTcBK; i += kMoeThreads)
        {
            int const r = i / kTcBK, kk = i % kTcBK;
            sa[r][kk] = (r < rows && k0 + kk < I) ? to16<kHalf>(a.ws.h[int64_t(row0 + r) * I + k0 + kk]) : uint16_t(0);
        }
        for (int i = tid; i < kMoeBN * kTcBK; i += kMoeThreads)
        {
            int const n = i / kTcBK, kk = i % kTcBK;
            sb[n][kk] = (n0 + n < d && k0 + kk < I) ? raw16(a.w2, wbase + int64_t(n0 + n) * I + k0 + kk) : uint16_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kTcBK; k += 16)
            tc_step<kHalf>(acc, sa, sb, m0, nw, k, g, t);
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q)
        {
            int const rr = m0 + g + 8 * (q / 2);
            int32_t const n = n0 + nw + 8 * j + 2 * t + (q % 2);
            if (rr < rows && n < d)
                a.ws.y[int64_t(row0 + rr) * d + n] = acc[j][q];
        }
}

//! out[t, :] = sum_j w[t, j] * Y[row(t, j), :], picks in order; one block per token.
__global__ void __launch_bounds__(kScanThreads) moe_combine_kernel(MoeArgs a)
{
    int64_t const t = blockIdx.x;
    for (int32_t c = threadIdx.x; c < a.d; c += blockDim.x)
    {
        float acc = 0.F;
        for (int32_t j = 0; j < a.k; ++j)
        {
            int64_t const p = t * a.k + j;
            int32_t const row = a.ws.pick_row[p];
            if (row >= 0)
                acc = fmaf(load_f(a.wts, a.wts_dtype, p), a.ws.y[int64_t(row) * a.d + c], acc);
        }
        a.out[t * a.d + c] = acc;
    }
}

} // namespace
} // namespace detail

bool routed_experts_uses_tensor_cores(RoutedExpertsParams const& p)
{
    using namespace detail;
    bool const x16 = p.x_dtype == DType::kBFloat16 || p.x_dtype == DType::kFloat16;
    return p.tensor_cores && x16 && p.w1_dtype == p.x_dtype && p.w3_dtype == p.x_dtype && p.w2_dtype == p.x_dtype
        && device_cc_major() >= 8;
}

size_t routed_experts_workspace_bytes(int64_t T, int32_t k, int32_t E, int32_t d, int32_t I)
{
    if (T <= 0 || k <= 0 || E <= 0 || d <= 0 || I <= 0)
        return 0;
    return detail::layout(T, k, E, d, I).total;
}

char const* routed_experts_check(RoutedExpertsParams const& p)
{
    using namespace detail;
    if (p.T < 0 || p.k < 0 || p.E <= 0 || p.d <= 0 || p.I <= 0)
        return "routed_experts: need T >= 0, k >= 0 and E, d, I >= 1";
    if (!(p.swiglu_limit >= 0.F))
        return "routed_experts: swiglu_limit must be >= 0 (0: no clamp)";
    if (p.T * p.k > 0x7FFFFFFFLL || max_tiles(p.T * p.k, p.E) > 0x7FFFFFFFLL)
        return "routed_experts: T * k exceeds 2^31 - 1";
    if (p.T > 0x7FFFFFFFLL)
        return "routed_experts: T exceeds 2^31 - 1 (one block per token in the combine step)";
    if ((p.I + kMoeBN - 1) / kMoeBN > 65535 || (p.d + kMoeBN - 1) / kMoeBN > 65535)
        return "routed_experts: d or I too large for the grid";
    if (!is_float_dtype(p.x_dtype) || !is_float_dtype(p.expert_weights_dtype) || !is_float_dtype(p.w1_dtype)
        || !is_float_dtype(p.w3_dtype) || !is_float_dtype(p.w2_dtype))
        return "routed_experts: float inputs must be float32, float16 or bfloat16";
    if (p.T == 0)
        return nullptr;
    if (!p.out)
        return "routed_experts: null output pointer";
    if (p.k == 0)
        return nullptr;
    if (!p.x || !p.expert_idx || !p.expert_weights || !p.w1 || !p.w3 || !p.w2)
        return "routed_experts: null input pointer";
    if (!p.workspace || p.workspace_bytes < routed_experts_workspace_bytes(p.T, p.k, p.E, p.d, p.I))
        return "routed_experts: workspace smaller than routed_experts_workspace_bytes()";
    if (!aligned(p.workspace, 16))
        return "routed_experts: workspace must be 16-byte aligned";
    return nullptr;
}

cudaError_t routed_experts(RoutedExpertsParams const& p, cudaStream_t stream)
{
    using namespace detail;
    if (routed_experts_check(p) != nullptr)
        return cudaErrorInvalidValue;
    if (p.T == 0)
        return cudaSuccess;
    if (p.k == 0) // no picks: the routed experts contribute nothing
        return cudaMemsetAsync(p.out, 0, size_t(p.T) * size_t(p.d) * sizeof(float), stream);
    Layout const l = layout(p.T, p.k, p.E, p.d, p.I);
    MoeArgs a{};
    a.T = p.T, a.k = p.k, a.E = p.E, a.d = p.d, a.I = p.I;
    a.limit = p.swiglu_limit > 0.F ? p.swiglu_limit : INFINITY;
    a.x = p.x, a.x_dtype = p.x_dtype, a.idx = p.expert_idx, a.idx_type = p.expert_idx_type;
    a.wts = p.expert_weights, a.wts_dtype = p.expert_weights_dtype;
    a.w1 = p.w1, a.w1_dtype = p.w1_dtype, a.w3 = p.w3, a.w3_dtype = p.w3_dtype, a.w2 = p.w2, a.w2_dtype = p.w2_dtype;
    a.out = p.out;
    a.ws = carve(p.workspace, l);
    // counts and cursors are adjacent: one memset
    cudaError_t err = cudaMemsetAsync(p.workspace, 0, l.off[2], stream);
    if (err != cudaSuccess)
        return err;
    int64_t const P = p.T * p.k;
    unsigned const pick_blocks = unsigned(std::min<int64_t>((P + kScanThreads - 1) / kScanThreads, 4096));
    HATRT_LAUNCH(moe_count_kernel, pick_blocks, kScanThreads, 0, stream)(a);
    HATRT_LAUNCH(moe_scan_kernel, 1, kScanThreads, 0, stream)(a);
    HATRT_LAUNCH(moe_scatter_kernel, pick_blocks, kScanThreads, 0, stream)(a);
    unsigned const tiles = unsigned(max_tiles(P, p.E));
    dim3 const grid1(tiles, unsigned((p.I + kMoeBN - 1) / kMoeBN)), grid2(tiles, unsigned((p.d + kMoeBN - 1) / kMoeBN));
    if (!routed_experts_uses_tensor_cores(p))
    {
        HATRT_LAUNCH(moe_gemm1_kernel, grid1, kMoeThreads, 0, stream)(a);
        HATRT_LAUNCH(moe_gemm2_kernel, grid2, kMoeThreads, 0, stream)(a);
    }
    else if (p.x_dtype == DType::kFloat16)
    {
        HATRT_LAUNCH(moe_gemm1_tc_kernel<true>, grid1, kMoeThreads, 0, stream)(a);
        HATRT_LAUNCH(moe_gemm2_tc_kernel<true>, grid2, kMoeThreads, 0, stream)(a);
    }
    else
    {
        HATRT_LAUNCH(moe_gemm1_tc_kernel<false>, grid1, kMoeThreads, 0, stream)(a);
        HATRT_LAUNCH(moe_gemm2_tc_kernel<false>, grid2, kMoeThreads, 0, stream)(a);
    }
    HATRT_LAUNCH(moe_combine_kernel, unsigned(p.T), kScanThreads, 0, stream)(a);
    return cudaGetLastError();
}

} // namespace hatrt
