// GatedCompress / OverlapGatedCompress (exporter/ops.py: compress_blocks), fused:
//   per-channel softmax pooling over the block's slots (one pass, online softmax, fp32)
//   -> RMSNorm with weight -> RoPE at the block's first position on the last r dims (interleaved
//   pairs) -> optional fake quantization (FP8 e4m3 blocks of 64 on dims [0, D - r), or Hadamard +
//   FP4 e2m1 blocks of 32) -> the fp32 entry and/or its cache form (the 584-byte KV entry, or the
//   68-byte FP4 index key for the indexer's compressor).
// One block per entry (b, i); each thread owns channels tid, tid + 256, ... so every slot read is
// coalesced across the block. CSA (overlap) entry i pools 2m slots per channel c: the FIRST halves
// (c) of block i-1 (prev_kv / prev_score for i == 0), then the SECOND halves (D + c) of block i.
// A slot whose score is -inf has weight 0 (the "no previous block" convention).
#include "../common.cuh"

#include <cmath>

namespace hatrt
{
namespace detail
{
namespace
{

constexpr int kThreads = 256;
constexpr int kMaxD = 1024;
constexpr int kCpt = kMaxD / kThreads; // channels per thread

struct CmpArgs
{
    int64_t B, N;
    int32_t m, D, W, r, quant;
    bool overlap;
    float eps;
    void const* kv;
    DType kv_dtype;
    void const* score;
    DType score_dtype;
    void const* prev_kv;
    DType prev_kv_dtype;
    void const* prev_score;
    DType prev_score_dtype;
    void const* nw;
    DType nw_dtype;
    void const* cos;
    DType cos_dtype;
    void const* sin;
    DType sin_dtype;
    float* out;
    uint8_t* cache;
    void const* cache_slot;
    IndexType cache_slot_type;
};

struct Online
{
    float mx = -INFINITY, sum = 0.F, acc = 0.F;

    __device__ __forceinline__ void add(float s, float v)
    {
        if (s == -INFINITY)
            return; // weight exactly 0
        if (s > mx)
        {
            float const f = expf(mx - s); // mx == -inf -> 0
            acc = acc * f + v;
            sum = sum * f + 1.F;
            mx = s;
        }
        else
        {
            float const w = expf(s - mx);
            acc = fmaf(w, v, acc);
            sum += w;
        }
    }
};

__device__ __forceinline__ float block_sum(float v, float* sred)
{
    v = warp_sum(v);
    int const lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0)
        sred[warp] = v;
    __syncthreads();
    float t = 0.F;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w)
        t += sred[w];
    return t;
}

__global__ void __launch_bounds__(kThreads) compress_kernel(CmpArgs a)
{
    __shared__ float sy[kMaxD];
    __shared__ float sscale[kMaxD / 32];
    __shared__ float sred[kThreads / 32];
    int const tid = threadIdx.x;
    int64_t const e = blockIdx.x; // b * N + i
    int64_t const b = e / a.N, i = e - b * a.N;
    int const D = a.D;

    // 1) pooling
    float val[kCpt];
#pragma unroll
    for (int cc = 0; cc < kCpt; ++cc)
    {
        int const c = tid + cc * kThreads;
        val[cc] = 0.F;
        if (c >= D)
            continue;
        Online o;
        if (a.overlap)
        {
            for (int j = 0; j < a.m; ++j)
            {
                float s, v;
                if (i == 0)
                {
                    int64_t const off = (b * a.m + j) * D + c;
                    s = load_f(a.prev_score, a.prev_score_dtype, off);
                    v = load_f(a.prev_kv, a.prev_kv_dtype, off);
                }
                else
                {
                    int64_t const off = ((e - 1) * a.m + j) * int64_t(a.W) + c;
                    s = load_f(a.score, a.score_dtype, off);
                    v = load_f(a.kv, a.kv_dtype, off);
                }
                o.add(s, v);
            }
            for (int j = 0; j < a.m; ++j)
            {
                int64_t const off = (e * a.m + j) * int64_t(a.W) + D + c;
                o.add(load_f(a.score, a.score_dtype, off), load_f(a.kv, a.kv_dtype, off));
            }
        }
        else
        {
            for (int j = 0; j < a.m; ++j)
            {
                int64_t const off = (e * a.m + j) * int64_t(a.W) + c;
                o.add(load_f(a.score, a.score_dtype, off), load_f(a.kv, a.kv_dtype, off));
            }
        }
        val[cc] = o.sum > 0.F ? o.acc / o.sum : 0.F;
    }

    // 2) RMSNorm with weight
    float ss = 0.F;
#pragma unroll
    for (int cc = 0; cc < kCpt; ++cc)
        ss = fmaf(val[cc], val[cc], ss);
    float const inv = 1.F / sqrtf(block_sum(ss, sred) / float(D) + a.eps);
#pragma unroll
    for (int cc = 0; cc < kCpt; ++cc)
    {
        int const c = tid + cc * kThreads;
        if (c < D)
            sy[c] = val[cc] * inv * load_f(a.nw, a.nw_dtype, c);
    }
    __syncthreads();

    // 3) RoPE at the block's first position on dims [D - r, D): pair p = (y[2p], y[2p + 1])
    int const r0 = D - a.r;
#pragma unroll
    for (int cc = 0; cc < kCpt; ++cc)
    {
        int const c = tid + cc * kThreads;
        val[cc] = c < D ? sy[c] : 0.F;
        if (c < D && c >= r0)
        {
            int const p = (c - r0) / 2;
            int64_t const cs = e * (a.r / 2) + p;
            float const co = load_f(a.cos, a.cos_dtype, cs), si = load_f(a.sin, a.sin_dtype, cs);
            float const x0 = sy[r0 + 2 * p], x1 = sy[r0 + 2 * p + 1];
            val[cc] = ((c - r0) & 1) == 0 ? x0 * co - x1 * si : x0 * si + x1 * co;
        }
    }
    __syncthreads();
#pragma unroll
    for (int cc = 0; cc < kCpt; ++cc)
    {
        int const c = tid + cc * kThreads;
        if (c < D)
            sy[c] = val[cc];
    }
    __syncthreads();

    // 4) fake quantization
    int const lane = tid % 32, warp = tid / 32;
    if (a.quant == 1)
    {
        // FP8 e4m3 on [0, D - r) in blocks of 64: one warp per block computes the scale
        for (int blk = warp; blk < r0 / 64; blk += kThreads / 32)
        {
            float const amax = warp_max(fmaxf(fabsf(sy[blk * 64 + lane]), fabsf(sy[blk * 64 + 32 + lane])));
            if (lane == 0)
                sscale[blk] = pow2_scale(amax, kFp8Max);
        }
        __syncthreads();
#pragma unroll
        for (int cc = 0; cc < kCpt; ++cc)
        {
            int const c = tid + cc * kThreads;
            if (c < r0)
                val[cc] = fake_fp8(val[cc], sscale[c / 64]);
        }
    }
    else if (a.quant == 2)
    {
        // orthonormal Sylvester-Hadamard over D (same butterflies as exporter.quant.hadamard)
        for (int h = 1; h < D; h <<= 1)
        {
            for (int q = tid; q < D / 2; q += kThreads)
            {
                int const i0 = (q / h) * 2 * h + (q % h), i1 = i0 + h;
                float const x = sy[i0], y = sy[i1];
                sy[i0] = x + y;
                sy[i1] = x - y;
            }
            __syncthreads();
        }
        float const hs = float(1.0 / sqrt(double(D)));
        for (int c = tid; c < D; c += kThreads)
            sy[c] *= hs;
        __syncthreads();
        for (int blk = warp; blk < D / 32; blk += kThreads / 32)
        {
            float const amax = warp_max(fabsf(sy[blk * 32 + lane]));
            if (lane == 0)
                sscale[blk] = pow2_scale(amax, kFp4Max);
        }
        __syncthreads();
#pragma unroll
        for (int cc = 0; cc < kCpt; ++cc)
        {
            int const c = tid + cc * kThreads;
            if (c < D)
                val[cc] = fake_fp4(sy[c], sscale[c / 32]);
        }
    }

    // 5) outputs
#pragma unroll
    for (int cc = 0; cc < kCpt; ++cc)
    {
        int const c = tid + cc * kThreads;
        if (c < D && a.out)
            a.out[e * D + c] = val[cc];
    }
    if (a.cache)
    {
        int64_t const slot = a.cache_slot ? load_idx(a.cache_slot, a.cache_slot_type, e) : e; // uniform
        if (slot < 0)
            return;
        if (a.quant == 2)
        {
            // the 68-byte FP4 index key: two e2m1 codes per byte (lower channel in the low nibble)
            __shared__ uint8_t scode[index_key68::kDim];
            if (tid < index_key68::kDim)
                scode[tid] = uint8_t(e2m1_code(val[0] / sscale[tid / index_key68::kBlock])); // on the grid: exact
            __syncthreads();
            uint8_t* dst = a.cache + slot * index_key68::kBytes;
            if (tid < index_key68::kScaleOffset)
                dst[tid] = uint8_t(scode[2 * tid] | (scode[2 * tid + 1] << 4));
            else if (tid < index_key68::kBytes)
                dst[tid] = ue8m0_of(sscale[tid - index_key68::kScaleOffset]);
            return;
        }
        uint8_t* dst = a.cache + slot * entry584::kBytes;
#pragma unroll
        for (int cc = 0; cc < kCpt; ++cc)
        {
            int const c = tid + cc * kThreads;
            if (c < entry584::kNope)
            {
                float const sc = sscale[c / 64];
                dst[c] = e4m3_of(fminf(fmaxf(val[cc] / sc, -kFp8Max), kFp8Max)); // val is on the grid: exact
            }
            else if (c < entry584::kDim)
            {
                __nv_bfloat16 const h = __float2bfloat16_rn(val[cc]);
                reinterpret_cast<__nv_bfloat16*>(dst + entry584::kRopeOffset)[c - entry584::kNope] = h;
            }
        }
        if (tid < entry584::kNumScales)
            dst[entry584::kScaleOffset + tid] = ue8m0_of(sscale[tid]);
        else if (tid == entry584::kNumScales)
            dst[entry584::kPadOffset] = 0;
    }
}

} // namespace
} // namespace detail

char const* compress_check(CompressParams const& p)
{
    using namespace detail;
    if (p.B < 0 || p.N < 0)
        return "compress: negative dimension";
    if (p.m <= 0)
        return "compress: block size m must be positive";
    if (p.D <= 0 || p.D > kMaxD)
        return "compress: entry width D must be in [1, 1024]";
    if (p.r < 0 || p.r % 2 != 0 || p.r > p.D)
        return "compress: RoPE dims r = 2 * cos.shape[-1] must be even and <= D";
    if (p.quant < 0 || p.quant > 2)
        return "compress: quant must be 0 (none), 1 (fp8) or 2 (fp4)";
    if (p.quant == 1 && (p.D - p.r) % 64 != 0)
        return "compress: quant=1 (fp8) needs D - r to be a multiple of 64";
    if (p.quant == 2 && ((p.D & (p.D - 1)) != 0 || p.D % 32 != 0))
        return "compress: quant=2 (fp4) needs D to be a power of two >= 32";
    if (p.cache && !(p.D == entry584::kDim && p.r == entry584::kRope && p.quant == 1)
        && !(p.D == index_key68::kDim && p.quant == 2))
        return "compress: the cache write needs D == 512, r == 64, quant == 1 (584-byte KV entry) or D == 128, "
               "quant == 2 (68-byte FP4 index key)";
    if (p.cache && !aligned(p.cache, p.quant == 2 ? 4 : 8))
        return "compress: cache must be 8-byte aligned (4 for the 68-byte index key)";
    if (!is_float_dtype(p.kv_dtype) || !is_float_dtype(p.score_dtype) || !is_float_dtype(p.norm_weight_dtype)
        || !is_float_dtype(p.cos_dtype) || !is_float_dtype(p.sin_dtype)
        || (p.overlap && (!is_float_dtype(p.prev_kv_dtype) || !is_float_dtype(p.prev_score_dtype))))
        return "compress: float inputs must be float32, float16 or bfloat16";
    if (p.B * p.N > 0x7FFFFFFFLL)
        return "compress: B * N exceeds 2^31 - 1";
    if (p.B * p.N == 0)
        return nullptr;
    if (!p.kv || !p.score || !p.norm_weight || (p.r > 0 && (!p.cos || !p.sin)) || (!p.out && !p.cache)
        || (p.overlap && (!p.prev_kv || !p.prev_score)))
        return "compress: null input or output pointer";
    return nullptr;
}

cudaError_t compress(CompressParams const& p, cudaStream_t stream)
{
    using namespace detail;
    if (compress_check(p) != nullptr)
        return cudaErrorInvalidValue;
    if (p.B * p.N == 0)
        return cudaSuccess;
    CmpArgs a{};
    a.B = p.B, a.N = p.N, a.m = p.m, a.D = p.D, a.W = p.overlap ? 2 * p.D : p.D, a.r = p.r, a.quant = p.quant;
    a.overlap = p.overlap, a.eps = p.eps;
    a.kv = p.kv, a.kv_dtype = p.kv_dtype, a.score = p.score, a.score_dtype = p.score_dtype;
    a.prev_kv = p.prev_kv, a.prev_kv_dtype = p.prev_kv_dtype;
    a.prev_score = p.prev_score, a.prev_score_dtype = p.prev_score_dtype;
    a.nw = p.norm_weight, a.nw_dtype = p.norm_weight_dtype;
    a.cos = p.cos, a.cos_dtype = p.cos_dtype, a.sin = p.sin, a.sin_dtype = p.sin_dtype;
    a.out = p.out, a.cache = p.cache, a.cache_slot = p.cache_slot, a.cache_slot_type = p.cache_slot_type;
    HATRT_LAUNCH(compress_kernel, unsigned(p.B * p.N), kThreads, 0, stream)(a);
    return cudaGetLastError();
}

} // namespace hatrt
