// IndexerTopK (exporter/ops.py: indexer_topk): weighted-ReLU indexer scores fused with a
// fixed-width top-k by radix select.
//
//   I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]),  visible s < (t + 1) // ratio
//   out[t]  = the top-k visible s in rank order: score descending, LOWER INDEX FIRST on equal
//             scores (the documented tie rule), -1 padded to width topk.
//
// Scoring, two variants behind one launcher (tiles of 64 keys, 8 warps):
// - tensor cores (q bf16/fp16 with keys of the same type, or the packed 68-byte MXFP4 / 132-byte
//   FP8 keys of production; Di % 16 == 0; sm_80+): q and the key tile as 16-bit values in shared
//   memory (exact: the inputs are already 16-bit, and e2m1 or e4m3 times a power of two is exact in
//   bf16; in fp16 too unless the scale leaves fp16's range);
//   warp w computes heads [16 (w % 4), +16) x keys [32 (w / 4), +32) with mma.sync m16n8k16, fp32
//   accumulation, then ReLU, the head weight, and a sum over heads (shuffles, then 4 warps). Keys
//   arrive in stages of up to 36 KB copied as stored (cp.async: 512 FP4 keys at once), so a block
//   waits for memory once per stage rather than once per 64-key tile.
// - CUDA cores (everything else, e.g. fp32 inputs): keys transposed to fp32, each thread
//   accumulates 4 keys x 4 heads with fp32 FMAs, the 16 head groups reduced in shared memory.
// Selection (block_topk): scores are mapped to order-preserving 32-bit keys (-0 -> +0 so equal
// scores have equal keys), four 8-bit radix passes find the k-th largest key T and how many keys
// equal to T are needed; the block then takes every key > T and the lowest-index keys == T (an
// ordered block scan), and sorts only those k (key, index) pairs (bitonic, in shared memory).
// Paths: fused (one block per query: score into shared memory, select) when the visible scores fit
// and there are enough rows to fill the GPU; otherwise a grid-wide scoring kernel writes scores to
// the workspace and one block per row selects from there.
#include "../async_copy.cuh"
#include "../mma.cuh"

#include <cmath>

namespace hatrt
{
namespace detail
{
namespace
{

constexpr int kThreads = 256;
constexpr int kTileN = 64;    // keys per scoring tile
constexpr int kHeadBlock = 64; // heads per pass (16 groups x 4)
constexpr int kMaxHeads = 128;
constexpr int kMaxDi = 256;
constexpr int kMaxTopK = 4096;
constexpr int kBins = 4096;     // split selection: histogram of the top 12 bits of the order key
constexpr int kBinShift = 20;
// after a row's kBins histogram words: its candidate count, how many scoring blocks are done, and
// the threshold bin with the number of keys in bins >= it
constexpr int kCount = kBins, kDone = kBins + 1, kBin = kBins + 2, kTotal = kBins + 3;
constexpr int kHistWords = kBins + 4;

struct IxArgs
{
    int64_t S, N;
    int32_t Hi, Hp, Di, ratio, topk;
    bool bf16;
    void const* q;
    DType q_dtype;
    void const* w;
    DType w_dtype;
    void const* keys;
    DType k_dtype;
    void const* q_pos;
    IndexType q_pos_type;
    int64_t* out;
    float* ws;        // scores scratch [rows_in_batch][ws_stride]
    int64_t ws_stride; // floats per scores row (>= N, 16-byte multiple)
    unsigned* hist;   // split selection: [rows_in_batch][kHistWords] (bins, then kCount .. kTotal)
    unsigned long long* cand; // split selection: [rows_in_batch][kMaxTopK] (~key << 32 | index)
    int64_t row0;     // first row of this batch (score scratch row = row - row0)
    int32_t n_chunk;  // split scoring: keys per block
};

__device__ __forceinline__ int64_t visible_count(IxArgs const& a, int64_t row)
{
    int64_t const t = load_idx(a.q_pos, a.q_pos_type, row);
    int64_t v = floor_div(t + 1, a.ratio);
    v = v < 0 ? 0 : v;
    return v < a.N ? v : a.N;
}

//! Order-preserving key of a score: larger score -> larger key; -0 and +0 share one key.
__device__ __forceinline__ uint32_t order_key(float f)
{
    if (f == 0.F)
        f = 0.F;
    uint32_t const u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ----------------------------------------------------------------------------- scoring
enum ScoreMode : int
{
    kCudaCores = 0,
    kTensorBf16 = 1,
    kTensorFp16 = 2,
};

//! Tensor-core scoring copies keys as stored into shared memory in stages of up to this many bytes
//! (512 FP4 keys, 256 FP8 keys, 128 bf16 keys of width 128) before decoding them tile by tile, so
//! a block waits for memory once per stage instead of once per 64-key tile.
constexpr int kStageBytes = 36 * 1024;

//! Scoring shared memory, bytes. CUDA cores: q^T [Di][Hp], w [Hp], keys^T [Di][kTileN + 4],
//! partial sums [16][kTileN] (fp32). Tensor cores: q [Hp][Di + 8] and keys [kTileN][Di + 8]
//! (16-bit), w [Hp], partial sums [4][kTileN] (fp32), the key stage (kStageBytes).
__host__ __device__ size_t score_smem_bytes(int mode, int Hp, int Di)
{
    if (mode == kCudaCores)
        return sizeof(float) * (size_t(Di) * Hp + Hp + size_t(Di) * (kTileN + 4) + 16 * kTileN);
    return sizeof(uint16_t) * (size_t(Hp) + kTileN) * (Di + 8) + sizeof(float) * (Hp + 4 * kTileN) + kStageBytes;
}

//! Element d of key row `key_row` (b * N + n) as fp32, for every key dtype.
__device__ __forceinline__ float load_key(IxArgs const& a, int64_t key_row, int d)
{
    if (a.k_dtype == DType::kIndexKey68)
    {
        uint8_t const* e = static_cast<uint8_t const*>(a.keys) + key_row * index_key68::kBytes;
        uint32_t const code = (uint32_t(__ldg(e + d / 2)) >> (4 * (d % 2))) & 0xFU;
        return e2m1_value(code) * ue8m0_value(__ldg(e + index_key68::kScaleOffset + d / index_key68::kBlock));
    }
    if (a.k_dtype == DType::kIndexKey132)
    {
        uint8_t const* e = static_cast<uint8_t const*>(a.keys) + key_row * index_key132::kBytes;
        return e4m3_value(__ldg(e + d)) * __ldg(reinterpret_cast<float const*>(e + index_key132::kScaleOffset));
    }
    return load_f(a.keys, a.k_dtype, key_row * a.Di + d);
}

__device__ void load_query(IxArgs const& a, int64_t row, float* sqt, float* sw)
{
    for (int i = threadIdx.x; i < a.Hp * a.Di; i += kThreads)
    {
        int const h = i / a.Di, d = i - h * a.Di;
        sqt[d * a.Hp + h] = h < a.Hi ? load_f(a.q, a.q_dtype, (row * a.Hi + h) * a.Di + d) : 0.F;
    }
    for (int h = threadIdx.x; h < a.Hp; h += kThreads)
        sw[h] = h < a.Hi ? load_f(a.w, a.w_dtype, row * a.Hi + h) : 0.F;
}

//! One finished score, as both scorers store it: rounded to bf16 if asked, then counted into the
//! shared histogram shist (top 12 bits of the order key) when one is given.
__device__ __forceinline__ void store_score(IxArgs const& a, float* dst, float s, unsigned* shist)
{
    if (a.bf16)
        s = __bfloat162float(__float2bfloat16_rn(s));
    *dst = s;
    if (shist)
        atomicAdd(&shist[order_key(s) >> kBinShift], 1U);
}

//! Scores of keys [n_begin, n_end) of row `row` (batch b) -> dst[n] (fp32, bf16-rounded if asked),
//! counted into the shared histogram shist (top 12 bits of the order key) when it is given.
__device__ void score_range(IxArgs const& a, int64_t b, int64_t n_begin, int64_t n_end, float const* sqt,
    float const* sw, float* skt, float* sred, float* dst, unsigned* shist)
{
    int const tid = threadIdx.x;
    int const eg = tid % 16, hg = tid / 16;
    int const kp = kTileN + 4;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileN)
    {
        __syncthreads();
        for (int i = tid; i < kTileN * a.Di; i += kThreads)
        {
            int const j = i / a.Di, d = i - j * a.Di;
            int64_t const n = n0 + j;
            skt[d * kp + j] = n < n_end ? load_key(a, b * a.N + n, d) : 0.F;
        }
        __syncthreads();
        float part[4] = {0.F, 0.F, 0.F, 0.F};
        for (int hb = 0; hb < a.Hp; hb += kHeadBlock)
        {
            float acc[4][4];
#pragma unroll
            for (int e = 0; e < 4; ++e)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[e][j] = 0.F;
            float const* qcol = sqt + hb + hg;
#pragma unroll 4
            for (int d = 0; d < a.Di; ++d)
            {
                float4 const kv = *reinterpret_cast<float4 const*>(skt + d * kp + eg * 4);
                float const* qd = qcol + d * a.Hp;
                float const qv[4] = {qd[0], qd[16], qd[32], qd[48]};
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    acc[0][j] = fmaf(kv.x, qv[j], acc[0][j]);
                    acc[1][j] = fmaf(kv.y, qv[j], acc[1][j]);
                    acc[2][j] = fmaf(kv.z, qv[j], acc[2][j]);
                    acc[3][j] = fmaf(kv.w, qv[j], acc[3][j]);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                float const wj = sw[hb + hg + 16 * j];
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    part[e] = fmaf(wj, fmaxf(acc[e][j], 0.F), part[e]);
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e)
            sred[hg * kTileN + eg * 4 + e] = part[e];
        __syncthreads();
        if (tid < kTileN && n0 + tid < n_end)
        {
            float s = 0.F;
#pragma unroll
            for (int g = 0; g < 16; ++g)
                s += sred[g * kTileN + tid];
            store_score(a, dst + n0 + tid, s, shist);
        }
    }
    __syncthreads();
}

//! q [Hp][Di + 8] (16-bit) and w [Hp] (fp32) of row `row`; heads beyond Hi are zero.
template <bool kHalf>
__device__ void load_query16(IxArgs const& a, int64_t row, uint16_t* sq, float* sw)
{
    int const qp = a.Di + 8;
    for (int i = threadIdx.x; i < a.Hp * a.Di; i += kThreads)
    {
        int const h = i / a.Di, d = i - h * a.Di;
        sq[h * qp + d] = to16<kHalf>(h < a.Hi ? load_f(a.q, a.q_dtype, (row * a.Hi + h) * a.Di + d) : 0.F);
    }
    for (int h = threadIdx.x; h < a.Hp; h += kThreads)
        sw[h] = h < a.Hi ? load_f(a.w, a.w_dtype, row * a.Hi + h) : 0.F;
}

//! Copy key rows [s0, s1) of batch b as stored into `raw` (cp.async), then wait for them.
template <class Loader>
__device__ __forceinline__ void stage_keys(Loader ld, int64_t first_row, int rows, int row_bytes, uint8_t* raw)
{
    int const pieces = row_bytes / Loader::kPiece;
    for (int i = threadIdx.x; i < rows * pieces; i += kThreads)
    {
        int const k = i / pieces, c = i - k * pieces;
        cp_async<Loader::kPiece>(raw + k * row_bytes + c * Loader::kPiece, ld.row_ptr(first_row + k) + c * Loader::kPiece);
    }
    cp_async_commit();
    cp_async_wait_all();
}

//! Tensor-core scores of keys [n_begin, n_end) of row batch b -> dst[n].
template <bool kHalf>
__device__ void score_range_tc(IxArgs const& a, int64_t b, int64_t n_begin, int64_t n_end, uint16_t const* sq,
    float const* sw, uint16_t* sk, float* sred, uint8_t* sraw, float* dst, unsigned* shist)
{
    using Plain = PlainLoader<std::conditional_t<kHalf, __half, __nv_bfloat16>>;
    int const tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
    int const mt = warp % 4, kg = warp / 4; // head tile (16 heads of each 64), key group (32 keys)
    int const qp = a.Di + 8;
    int const chunks = a.Di / 8;
    bool const packed4 = a.k_dtype == DType::kIndexKey68, packed8 = a.k_dtype == DType::kIndexKey132;
    uint8_t const* kbase = static_cast<uint8_t const*>(a.keys);
    int const row_bytes = packed4 ? index_key68::kBytes : packed8 ? index_key132::kBytes : Plain::row_bytes(a.Di);
    int const stage = kStageBytes / row_bytes / kTileN * kTileN; // keys per stage, a multiple of the tile
    for (int64_t s0 = n_begin; s0 < n_end; s0 += stage)
    {
        int const rows = int(min(int64_t(stage), n_end - s0));
        __syncthreads(); // the previous stage is decoded
        if (packed4)
            stage_keys(IndexKey68Loader{kbase}, b * a.N + s0, rows, row_bytes, sraw);
        else if (packed8)
            stage_keys(IndexKey132Loader{kbase}, b * a.N + s0, rows, row_bytes, sraw);
        else
            stage_keys(Plain{reinterpret_cast<typename Plain::value_type const*>(kbase), a.Di}, b * a.N + s0, rows,
                row_bytes, sraw);
        for (int64_t n0 = s0; n0 < s0 + rows; n0 += kTileN)
        {
            __syncthreads(); // the stage landed (first tile); the previous tile's keys are consumed
            for (int i = tid; i < kTileN * chunks; i += kThreads)
            {
                int const j = i / chunks, c = i - j * chunks;
                int64_t const k = n0 - s0 + j; // row in the stage
                float v[8] = {0.F, 0.F, 0.F, 0.F, 0.F, 0.F, 0.F, 0.F};
                if (k < rows)
                {
                    uint8_t const* r = sraw + k * row_bytes;
                    if (packed4)
                        IndexKey68Loader::decode8<false>(r, c * 8, v);
                    else if (packed8)
                        IndexKey132Loader::decode8<false>(r, c * 8, v);
                    else
                        Plain::template decode8<false>(r, c * 8, v);
                }
                uint4 w;
                w.x = pack16(to16<kHalf>(v[0]), to16<kHalf>(v[1]));
                w.y = pack16(to16<kHalf>(v[2]), to16<kHalf>(v[3]));
                w.z = pack16(to16<kHalf>(v[4]), to16<kHalf>(v[5]));
                w.w = pack16(to16<kHalf>(v[6]), to16<kHalf>(v[7]));
                *reinterpret_cast<uint4*>(sk + j * qp + c * 8) = w;
            }
            __syncthreads();
            float part[4][2] = {{0.F, 0.F}, {0.F, 0.F}, {0.F, 0.F}, {0.F, 0.F}}; // [n-tile][key 2t, 2t + 1]
            for (int hb = 0; hb < a.Hp; hb += kHeadBlock)
            {
                int const h = hb + 16 * mt;
                float acc[4][4];
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.F;
                for (int k0 = 0; k0 < a.Di; k0 += 16)
                {
                    uint32_t const af[4] = {lds32(sq + (h + g) * qp + k0 + 2 * t), lds32(sq + (h + g + 8) * qp + k0 + 2 * t),
                        lds32(sq + (h + g) * qp + k0 + 2 * t + 8), lds32(sq + (h + g + 8) * qp + k0 + 2 * t + 8)};
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                    {
                        uint16_t const* kr = sk + (kg * 32 + j * 8 + g) * qp + k0 + 2 * t;
                        uint32_t const bf[2] = {lds32(kr), lds32(kr + 8)};
                        mma_16816<kHalf>(acc[j], af, bf);
                    }
                }
                // acc[j]: [0] head h+g key 2t, [1] head h+g key 2t+1, [2] head h+g+8 key 2t, [3] head h+g+8 key 2t+1
                float const w0 = sw[h + g], w1 = sw[h + g + 8];
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    part[j][0] += w0 * fmaxf(acc[j][0], 0.F) + w1 * fmaxf(acc[j][2], 0.F);
                    part[j][1] += w0 * fmaxf(acc[j][1], 0.F) + w1 * fmaxf(acc[j][3], 0.F);
                }
            }
            // sum over the 8 head rows of the tile (lanes with equal t), then over the 4 head tiles
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
#pragma unroll
                    for (int off = 4; off < 32; off <<= 1)
                        part[j][e] += __shfl_xor_sync(0xFFFFFFFFu, part[j][e], off);
            if (g == 0)
            {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    sred[mt * kTileN + kg * 32 + j * 8 + 2 * t] = part[j][0];
                    sred[mt * kTileN + kg * 32 + j * 8 + 2 * t + 1] = part[j][1];
                }
            }
            __syncthreads();
            if (tid < kTileN && n0 + tid < n_end)
            {
                float s = (sred[tid] + sred[kTileN + tid]) + (sred[2 * kTileN + tid] + sred[3 * kTileN + tid]);
                store_score(a, dst + n0 + tid, s, shist);
            }
        }
    }
    __syncthreads();
}

//! Load row `row`'s query into shared memory and score its keys [n_begin, n_end) -> dst.
template <int kMode>
__device__ void score_row(
    IxArgs const& a, int64_t row, int64_t n_begin, int64_t n_end, unsigned char* smem, float* dst, unsigned* shist = nullptr)
{
    int64_t const b = row / a.S;
    if constexpr (kMode == kCudaCores)
    {
        float* sqt = reinterpret_cast<float*>(smem);
        float* sw = sqt + size_t(a.Di) * a.Hp;
        float* skt = sw + a.Hp;
        float* sred = skt + size_t(a.Di) * (kTileN + 4);
        load_query(a, row, sqt, sw);
        score_range(a, b, n_begin, n_end, sqt, sw, skt, sred, dst, shist);
    }
    else
    {
        constexpr bool kHalf = kMode == kTensorFp16;
        uint8_t* sraw = smem; // the key stage first: 16-byte aligned for the widest copies
        uint16_t* sq = reinterpret_cast<uint16_t*>(smem + kStageBytes);
        uint16_t* sk = sq + size_t(a.Hp) * (a.Di + 8);
        float* sw = reinterpret_cast<float*>(sk + size_t(kTileN) * (a.Di + 8));
        float* sred = sw + a.Hp;
        load_query16<kHalf>(a, row, sq, sw);
        score_range_tc<kHalf>(a, b, n_begin, n_end, sq, sw, sk, sred, sraw, dst, shist);
    }
}

// ----------------------------------------------------------------------------- selection
struct SelectSmem
{
    unsigned long long pairs[kMaxTopK]; // (~key << 32) | index, sorted ascending = rank order
    int hist[256];
    int warp_tot[kThreads / 32];
    int count;
    int digit;
    int need;
};

//! Bitonic sort (ascending) of sm.pairs[0, cnt), padded to a power of two with the largest value.
__device__ void sort_pairs(SelectSmem& sm, int cnt)
{
    int const tid = threadIdx.x;
    int size = 1;
    while (size < cnt)
        size <<= 1;
    for (int i = cnt + tid; i < size; i += kThreads)
        sm.pairs[i] = ~0ULL;
    __syncthreads();
    for (int len = 2; len <= size; len <<= 1)
    {
        for (int stride = len >> 1; stride > 0; stride >>= 1)
        {
            for (int i = tid; i < size; i += kThreads)
            {
                int const j = i ^ stride;
                if (j > i)
                {
                    unsigned long long const x = sm.pairs[i], y = sm.pairs[j];
                    bool const up = (i & len) == 0;
                    if ((x > y) == up)
                    {
                        sm.pairs[i] = y;
                        sm.pairs[j] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

//! Top-k of scores[0, n) in rank order -> out[0, k), -1 padded. Whole block; scores may live in
//! shared or global memory.
__device__ void block_topk(float const* scores, int64_t n, int k, int64_t* out, SelectSmem& sm)
{
    int const tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    if (tid == 0)
        sm.count = 0;
    __syncthreads();
    uint32_t thr = 0;   // the k-th largest key (when n > k)
    int need_eq = 0;    // how many keys == thr to take, lowest indices first
    if (n > k)
    {
        uint32_t prefix = 0, mask = 0;
        int need = k;
        for (int shift = 24; shift >= 0; shift -= 8)
        {
            for (int i = tid; i < 256; i += kThreads)
                sm.hist[i] = 0;
            __syncthreads();
            for (int64_t i = tid; i < n; i += kThreads)
            {
                uint32_t const key = order_key(scores[i]);
                if ((key & mask) == prefix)
                    atomicAdd(&sm.hist[(key >> shift) & 0xFF], 1);
            }
            __syncthreads();
            if (warp == 0)
            {
                // lane l owns digits 255 - 8l .. 248 - 8l (descending)
                int c[8], tot = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j)
                {
                    c[j] = sm.hist[255 - (lane * 8 + j)];
                    tot += c[j];
                }
                int incl = tot;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1)
                {
                    int const v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
                    if (lane >= o)
                        incl += v;
                }
                int const excl = incl - tot;
                if (excl < need && need <= incl)
                {
                    int run = excl;
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                    {
                        if (run + c[j] >= need)
                        {
                            sm.digit = 255 - (lane * 8 + j);
                            sm.need = need - run;
                            break;
                        }
                        run += c[j];
                    }
                }
            }
            __syncthreads();
            prefix |= uint32_t(sm.digit) << shift;
            mask |= 0xFFu << shift;
            need = sm.need;
            __syncthreads();
        }
        thr = prefix;
        need_eq = need;

        // every key > thr
        for (int64_t i = tid; i < n; i += kThreads)
        {
            uint32_t const key = order_key(scores[i]);
            if (key > thr)
            {
                int const slot = atomicAdd(&sm.count, 1);
                sm.pairs[slot] = (static_cast<unsigned long long>(~key) << 32) | static_cast<uint32_t>(i);
            }
        }
        __syncthreads();
        // the first need_eq keys == thr in index order (ordered block scan over chunks)
        int taken = 0;
        int const base_count = sm.count;
        __syncthreads();
        for (int64_t start = 0; start < n && taken < need_eq; start += kThreads)
        {
            int64_t const i = start + tid;
            bool const flag = i < n && order_key(scores[i]) == thr;
            unsigned const ballot = __ballot_sync(0xFFFFFFFFu, flag);
            if (lane == 0)
                sm.warp_tot[warp] = __popc(ballot);
            __syncthreads();
            int before = 0, total = 0;
#pragma unroll
            for (int w = 0; w < kThreads / 32; ++w)
            {
                int const c = sm.warp_tot[w];
                before += w < warp ? c : 0;
                total += c;
            }
            int const rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
            if (flag && rank < need_eq)
                sm.pairs[base_count + rank] = (static_cast<unsigned long long>(~thr) << 32) | static_cast<uint32_t>(i);
            taken += total; // uniform
            __syncthreads();
        }
        if (tid == 0)
            sm.count = k;
        __syncthreads();
    }
    else
    {
        for (int64_t i = tid; i < n; i += kThreads)
            sm.pairs[i] = (static_cast<unsigned long long>(~order_key(scores[i])) << 32) | static_cast<uint32_t>(i);
        if (tid == 0)
            sm.count = int(n);
        __syncthreads();
    }

    sort_pairs(sm, sm.count);
    int const cnt = sm.count;
    for (int i = tid; i < k; i += kThreads)
        out[i] = i < cnt ? int64_t(static_cast<uint32_t>(sm.pairs[i] & 0xFFFFFFFFu)) : int64_t(-1);
}

// ----------------------------------------------------------------------------- kernels
//! One block per query row: score every visible key, then select. Scores live in shared memory
//! (kSmemScores) or in the row's workspace slot.
template <bool kSmemScores, int kMode>
__global__ void __launch_bounds__(kThreads) indexer_fused_kernel(IxArgs a)
{
    HATRT_DYNAMIC_SMEM(float4, smem4);
    unsigned char* smem = reinterpret_cast<unsigned char*>(smem4);
    __shared__ SelectSmem sel;
    int64_t const row = a.row0 + blockIdx.x;
    int64_t const n = visible_count(a, row);
    float* scores = kSmemScores ? reinterpret_cast<float*>(smem + score_smem_bytes(kMode, a.Hp, a.Di))
                                : a.ws + size_t(blockIdx.x) * a.ws_stride;
    if (n > 0)
        score_row<kMode>(a, row, 0, n, smem, scores);
    block_topk(scores, n, a.topk, a.out + row * a.topk, sel);
}

// Split selection for few, long rows, so that no single block reads a whole row four times:
// (1) indexer_score_kernel: every chunk block scores its keys and adds their top 12 bits to the
//     row's histogram; the row's last block to finish finds the threshold bin (the highest bin b
//     with at least k keys in bins >= b);
// (2) indexer_filter_kernel: every chunk block appends its keys in bins >= b to the row's
//     candidates, as unique (~key << 32 | index) pairs;
// (3) indexer_final_kernel: one block per row sorts the candidates: ascending pairs are the rank
//     order with the lower index first among equal scores, the same tie rule.
// A row whose candidates would exceed kMaxTopK (a crowded threshold bin) falls back to block_topk
// over its scores, as do rows with at most k visible keys.
__device__ __forceinline__ bool chunk_range(IxArgs const& a, int64_t row, int64_t& begin, int64_t& end, int64_t& n)
{
    n = visible_count(a, row);
    begin = int64_t(blockIdx.x) * a.n_chunk;
    end = begin + a.n_chunk < n ? begin + a.n_chunk : n;
    return begin < n && n > a.topk;
}

//! The row's threshold bin and how many keys lie in bins >= it (warp 0; 32 lanes x 128 bins). The
//! histogram was written by other blocks of this launch: read through L2 (__ldcg), not L1.
__device__ void threshold_bin(unsigned const* gh, int k, int& bin, int& total)
{
    int const lane = threadIdx.x % 32;
    constexpr int kPer = kBins / 32;
    int const top = kBins - 1 - lane * kPer; // lane l owns bins top, top - 1, ..., top - kPer + 1
    int c = 0;
    for (int j = 0; j < kPer; ++j)
        c += int(__ldcg(gh + top - j));
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1)
    {
        int const v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (lane >= o)
            incl += v;
    }
    int const excl = incl - c;
    if (excl < k && k <= incl)
    {
        int run = excl;
        for (int j = 0; j < kPer; ++j)
        {
            run += int(__ldcg(gh + top - j));
            if (run >= k)
            {
                bin = top - j;
                total = run;
                break;
            }
        }
    }
}

//! Grid-wide scoring for few, long rows: block (chunk, row) scores keys [chunk * n_chunk, ...) and
//! does step (1) of the split selection.
template <int kMode>
__global__ void __launch_bounds__(kThreads) indexer_score_kernel(IxArgs a)
{
    HATRT_DYNAMIC_SMEM(float4, smem4);
    __shared__ unsigned hist[kBins];
    __shared__ int s_last;
    int64_t const row = a.row0 + blockIdx.y;
    int64_t begin, end, n;
    bool const counted = chunk_range(a, row, begin, end, n); // uniform in the block
    if (n <= a.topk && begin >= n)
        return;
    if (counted)
    {
        for (int i = threadIdx.x; i < kBins; i += kThreads)
            hist[i] = 0;
        __syncthreads();
    }
    if (begin < n)
        score_row<kMode>(a, row, begin, end, reinterpret_cast<unsigned char*>(smem4),
            a.ws + size_t(blockIdx.y) * a.ws_stride, counted ? hist : nullptr);
    if (n <= a.topk)
        return; // every visible key is selected: the final kernel needs no histogram
    unsigned* gh = a.hist + size_t(blockIdx.y) * kHistWords;
    __syncthreads();
    if (counted)
        for (int i = threadIdx.x; i < kBins; i += kThreads)
            if (hist[i] != 0)
                atomicAdd(&gh[i], hist[i]);
    __threadfence(); // this block's counts reach L2 before it reports done
    __syncthreads();
    if (threadIdx.x == 0)
        s_last = atomicAdd(&gh[kDone], 1U) == gridDim.x - 1;
    __syncthreads();
    if (!s_last || threadIdx.x >= 32)
        return;
    int bin = 0, total = 0;
    threshold_bin(gh, a.topk, bin, total);
    if (total > 0) // the one lane that found it
    {
        gh[kBin] = unsigned(bin);
        gh[kTotal] = unsigned(total);
    }
}

__global__ void __launch_bounds__(kThreads) indexer_filter_kernel(IxArgs a)
{
    __shared__ int s_base;
    __shared__ int warp_cnt[kThreads / 32];
    int64_t begin, end, n;
    if (!chunk_range(a, a.row0 + blockIdx.y, begin, end, n))
        return;
    int const tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    unsigned* gh = a.hist + size_t(blockIdx.y) * kHistWords;
    if (gh[kTotal] > unsigned(kMaxTopK))
        return; // crowded threshold bin: the final kernel selects from all scores
    uint32_t const bin = gh[kBin];
    float const* sc = a.ws + size_t(blockIdx.y) * a.ws_stride;
    unsigned long long* cand = a.cand + size_t(blockIdx.y) * kMaxTopK;
    for (int64_t start = begin; start < end; start += kThreads)
    {
        int64_t const i = start + tid;
        uint32_t const key = i < end ? order_key(sc[i]) : 0U;
        bool const flag = i < end && (key >> kBinShift) >= bin;
        unsigned const ballot = __ballot_sync(0xFFFFFFFFu, flag);
        if (lane == 0)
            warp_cnt[warp] = __popc(ballot);
        __syncthreads();
        if (tid == 0)
        {
            int total = 0;
            for (int w = 0; w < kThreads / 32; ++w)
            {
                int const c = warp_cnt[w];
                warp_cnt[w] = total;
                total += c;
            }
            s_base = total > 0 ? int(atomicAdd(&gh[kCount], unsigned(total))) : 0;
        }
        __syncthreads();
        if (flag)
        {
            int const slot = s_base + warp_cnt[warp] + __popc(ballot & ((1U << lane) - 1U));
            if (slot < kMaxTopK) // always, since kTotal <= kMaxTopK; never write past the row's list
                cand[slot] = (static_cast<unsigned long long>(~key) << 32) | static_cast<uint32_t>(i);
        }
        __syncthreads(); // warp_cnt / s_base are rewritten by the next round
    }
}

__global__ void __launch_bounds__(kThreads) indexer_final_kernel(IxArgs a)
{
    __shared__ SelectSmem sel;
    int64_t const row = a.row0 + blockIdx.x;
    int64_t const n = visible_count(a, row);
    float const* sc = a.ws + size_t(blockIdx.x) * a.ws_stride;
    int64_t* out = a.out + row * a.topk;
    int const count = int(a.hist[size_t(blockIdx.x) * kHistWords + kCount]);
    // the filter either wrote every key of bins >= the threshold bin (>= k of them) or nothing
    if (n <= a.topk || count < a.topk || count > kMaxTopK)
    {
        block_topk(sc, n, a.topk, out, sel);
        return;
    }
    unsigned long long const* cand = a.cand + size_t(blockIdx.x) * kMaxTopK;
    for (int i = threadIdx.x; i < count; i += kThreads)
        sel.pairs[i] = cand[i];
    sort_pairs(sel, count);
    for (int i = threadIdx.x; i < a.topk; i += kThreads)
        out[i] = int64_t(static_cast<uint32_t>(sel.pairs[i] & 0xFFFFFFFFu));
}

} // namespace
} // namespace detail

char const* indexer_topk_check(IndexerTopKParams const& p)
{
    using namespace detail;
    if (p.B < 0 || p.S < 0 || p.N < 0)
        return "indexer_topk: negative dimension";
    if (p.Hi <= 0 || p.Hi > kMaxHeads)
        return "indexer_topk: indexer heads must be in [1, 128]";
    if (p.Di <= 0 || p.Di > kMaxDi)
        return "indexer_topk: indexer head width must be in [1, 256]";
    if (p.ratio <= 0)
        return "indexer_topk: ratio must be positive";
    if (p.topk <= 0 || p.topk > kMaxTopK)
        return "indexer_topk: topk must be in [1, 4096]";
    if (p.N > 0xFFFFFFFFLL)
        return "indexer_topk: more than 2^32 - 1 entries";
    if (!is_float_dtype(p.q_dtype) || !is_float_dtype(p.weights_dtype))
        return "indexer_topk: q and weights must be float32, float16 or bfloat16";
    if (!is_float_dtype(p.keys_dtype) && !is_index_key(p.keys_dtype))
        return "indexer_topk: keys must be float32, float16, bfloat16 or a packed index key (68-byte FP4, 132-byte FP8)";
    if (is_index_key(p.keys_dtype) && p.Di != 128)
        return "indexer_topk: packed index keys need Di == 128";
    if (p.B * p.S > 0x7FFFFFFFLL)
        return "indexer_topk: B * S exceeds 2^31 - 1";
    if (p.B * p.S == 0)
        return nullptr;
    if (!p.q || !p.weights || !p.q_pos || !p.out || (p.N > 0 && !p.keys))
        return "indexer_topk: null input or output pointer";
    if (is_index_key(p.keys_dtype) && p.keys && !aligned(p.keys, 4))
        return "indexer_topk: packed index keys must be 4-byte aligned";
    if (p.workspace && !aligned(p.workspace, 16))
        return "indexer_topk: workspace must be 16-byte aligned";
    return nullptr;
}

namespace detail
{
//! Workspace per query row in flight: its scores (16-byte rows), then the split selection's
//! candidates and histogram (+ candidate count).
size_t scores_row_bytes(int64_t N)
{
    return (size_t(N) * sizeof(float) + 15) / 16 * 16;
}

size_t ws_row_bytes(int64_t N)
{
    return scores_row_bytes(N) + size_t(kMaxTopK) * sizeof(unsigned long long) + size_t(kHistWords) * sizeof(unsigned);
}
} // namespace detail

namespace
{
int score_mode(IndexerTopKParams const& p)
{
    using namespace detail;
    bool const q16 = p.q_dtype == DType::kBFloat16 || p.q_dtype == DType::kFloat16;
    bool const same = p.keys_dtype == p.q_dtype && (!p.keys || aligned(p.keys, 16));
    if (!p.tensor_cores || !q16 || p.Di % 16 != 0 || !(same || is_index_key(p.keys_dtype))
        || device_cc_major() < 8)
        return kCudaCores;
    return p.q_dtype == DType::kFloat16 ? kTensorFp16 : kTensorBf16;
}

template <int kMode>
cudaError_t launch_indexer(detail::IxArgs a, IndexerTopKParams const& p, cudaStream_t stream)
{
    using namespace detail;
    int64_t const rows = p.B * p.S;
    int const sms = device_num_sms(p.num_sms);
    int const optin = device_smem_optin();
    size_t const score_smem = score_smem_bytes(kMode, a.Hp, a.Di);
    size_t const select_smem = sizeof(SelectSmem);
    size_t const fused_smem = score_smem + size_t(p.N) * sizeof(float);
    size_t const row_bytes = ws_row_bytes(p.N);
    int64_t const ws_rows = (p.workspace && p.N > 0) ? int64_t(p.workspace_bytes / row_bytes) : 0;

    // 1) fused, scores in shared memory: enough rows to fill the GPU (or no workspace to split)
    if (fused_smem + select_smem <= size_t(optin) && (rows >= sms || ws_rows == 0))
    {
        auto kernel = indexer_fused_kernel<true, kMode>;
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(fused_smem));
        if (err != cudaSuccess)
            return err;
        a.row0 = 0;
        HATRT_LAUNCH(kernel, unsigned(rows), kThreads, fused_smem, stream)(a);
        return cudaGetLastError();
    }
    if (p.N == 0)
    {
        // nothing visible anywhere: the fused kernel only pads (scores never read)
        auto kernel = indexer_fused_kernel<false, kMode>;
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(score_smem));
        if (err != cudaSuccess)
            return err;
        a.row0 = 0;
        HATRT_LAUNCH(kernel, unsigned(rows), kThreads, score_smem, stream)(a);
        return cudaGetLastError();
    }
    if (ws_rows == 0)
        return cudaErrorInvalidValue; // scores do not fit in shared memory and no workspace was given
    if (score_smem + select_smem > size_t(optin))
        return cudaErrorInvalidValue;

    // workspace: scores [ws_rows][ws_stride] | candidates [ws_rows][kMaxTopK] | histograms [ws_rows][kHistWords]
    unsigned char* base = static_cast<unsigned char*>(p.workspace);
    a.ws_stride = int64_t(scores_row_bytes(p.N) / sizeof(float));
    a.ws = reinterpret_cast<float*>(base);
    a.cand = reinterpret_cast<unsigned long long*>(base + size_t(ws_rows) * scores_row_bytes(p.N));
    a.hist = reinterpret_cast<unsigned*>(a.cand + size_t(ws_rows) * kMaxTopK);
    cudaError_t err = cudaSuccess;
    if (rows >= sms)
    {
        // 2) fused, scores in the workspace (long rows, many of them)
        auto kernel = indexer_fused_kernel<false, kMode>;
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(score_smem));
        if (err != cudaSuccess)
            return err;
        for (int64_t r0 = 0; r0 < rows; r0 += ws_rows)
        {
            a.row0 = r0;
            int64_t const nr = rows - r0 < ws_rows ? rows - r0 : ws_rows;
            HATRT_LAUNCH(kernel, unsigned(nr), kThreads, score_smem, stream)(a);
            if ((err = cudaGetLastError()) != cudaSuccess)
                return err;
        }
        return cudaSuccess;
    }
    // 3) few rows: score over the whole GPU, then one selecting block per row
    auto score = indexer_score_kernel<kMode>;
    err = cudaFuncSetAttribute(score, cudaFuncAttributeMaxDynamicSharedMemorySize, int(score_smem));
    if (err != cudaSuccess)
        return err;
    for (int64_t r0 = 0; r0 < rows; r0 += ws_rows)
    {
        a.row0 = r0;
        int64_t const nr = rows - r0 < ws_rows ? rows - r0 : ws_rows;
        int64_t chunks = (4 * int64_t(sms) + nr - 1) / nr;
        int64_t const max_chunks = (p.N + kTileN - 1) / kTileN;
        chunks = chunks < max_chunks ? chunks : max_chunks;
        int64_t n_chunk = (p.N + chunks - 1) / chunks;
        n_chunk = (n_chunk + kTileN - 1) / kTileN * kTileN;
        a.n_chunk = int32_t(n_chunk);
        dim3 grid(unsigned((p.N + n_chunk - 1) / n_chunk), unsigned(nr));
        if ((err = cudaMemsetAsync(a.hist, 0, size_t(nr) * kHistWords * sizeof(unsigned), stream)) != cudaSuccess)
            return err;
        HATRT_LAUNCH(score, grid, kThreads, score_smem, stream)(a);
        HATRT_LAUNCH(indexer_filter_kernel, grid, kThreads, 0, stream)(a);
        HATRT_LAUNCH(indexer_final_kernel, unsigned(nr), kThreads, 0, stream)(a);
        if ((err = cudaGetLastError()) != cudaSuccess)
            return err;
    }
    return cudaSuccess;
}
} // namespace

bool indexer_uses_tensor_cores(IndexerTopKParams const& p)
{
    return score_mode(p) != detail::kCudaCores;
}

size_t indexer_topk_workspace_bytes(int64_t rows, int64_t N, size_t cap)
{
    if (N <= 0 || rows <= 0)
        return 0;
    size_t const row_bytes = detail::ws_row_bytes(N);
    size_t const all = row_bytes * size_t(rows);
    size_t const bytes = all < cap ? all : cap;
    return bytes < row_bytes ? row_bytes : bytes;
}

cudaError_t indexer_topk(IndexerTopKParams const& p, cudaStream_t stream)
{
    using namespace detail;
    if (indexer_topk_check(p) != nullptr)
        return cudaErrorInvalidValue;
    int64_t const rows = p.B * p.S;
    if (rows == 0)
        return cudaSuccess;

    IxArgs a{};
    a.S = p.S, a.N = p.N;
    a.Hi = p.Hi, a.Hp = (p.Hi + kHeadBlock - 1) / kHeadBlock * kHeadBlock, a.Di = p.Di;
    a.ratio = p.ratio, a.topk = p.topk, a.bf16 = p.bf16_scores;
    a.q = p.q, a.q_dtype = p.q_dtype, a.w = p.weights, a.w_dtype = p.weights_dtype;
    a.keys = p.keys, a.k_dtype = p.keys_dtype, a.q_pos = p.q_pos, a.q_pos_type = p.q_pos_type;
    a.out = p.out;
    switch (score_mode(p))
    {
    case kTensorBf16: return launch_indexer<kTensorBf16>(a, p, stream);
    case kTensorFp16: return launch_indexer<kTensorFp16>(a, p, stream);
    default: return launch_indexer<kCudaCores>(a, p, stream);
    }
}

} // namespace hatrt
