// HybridSparseAttention (exporter/ops.py: sparse_attention): one online softmax over the sliding
// window and the selected compressed entries, with a per-head sink in the denominator only.
//
// Keys are the virtual list [window slots 0..L) ++ [selected entries 0..K) (key_source); invalid
// keys (outside the window, -1 / out-of-range indices) get probability 0, and tiles without any
// valid key are skipped. All heads of a row share the same keys (one KV head; every vector is both
// key and value), so a block stages a key tile once and uses it for all its heads. When B * S *
// head-groups is too small to fill the GPU the key list is split over blocks and a second kernel
// merges the partial (max, sum, acc) triples with the sink (flash-decoding).
//
// Two kernels behind one launcher, each a template over the KV loader (plain tensors, the ONNX
// contract, or the production 584-byte FP8 entry):
// - tensor cores (the production path: bf16/fp16 q, D == 512, sm_80+): one block per (row, 64 heads
//   (16 when H < 64), key split), 4 warps per 16 heads; tiles of 32 keys decoded once to 16-bit
//   values for all the block's heads; Q.K^T and P.V are mma.sync m16n8k16 with fp32 accumulation
//   (plugins/csrc/mma.cuh), softmax in fp32. Each warp scores 8 keys of the tile for its 16 heads
//   and owns 128 of the 512 output dims. Software-pipelined: the next tile's rows are copied as
//   stored (cp.async, plugins/csrc/async_copy.cuh) while the block computes on the current one.
//   Keys from the FP8 entry are exact in bf16 (e4m3 times a power of two; RoPE dims are bf16), so
//   the only roundings are P (and fp16/fp32 KV) to 16 bits.
// - CUDA cores (fp32 q, other D, sm < 80, or tensor_cores == false): one block per (row, 16 heads,
//   key split), tiles of 16 keys dequantized to fp32, fp32 throughout, exp2 with the scale folded
//   into q; it is also the 1e-5 reference the fp32 tests hold the op to.
// wgmma (sm_90a) is the next step for the tensor-core kernel, see docs/plugins.md.
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
constexpr int kHeads = 16;  // heads per block
constexpr int kTile = 16;   // keys per tile
constexpr int kMaxD = 512;  // 64 threads x 8 dims in the PV phase

struct SaArgs
{
    int64_t rows, S, L, N, K;
    int32_t H, D, window;
    float scale_log2; // scale * log2(e)
    void const* q;
    DType q_dtype;
    void const* q_pos;
    IndexType q_pos_type;
    void const* window_pos;
    IndexType window_pos_type;
    void const* entry_idx;
    IndexType entry_idx_type;
    void const* sink;
    DType sink_dtype;
    void* out;
    int32_t splits, tiles_per_split;
    float* ws_acc; // [splits, rows, H, D]
    float* ws_ml;  // [splits, rows, H, 2]
};

//! Key j of query `row` (batch b, position qt) in the virtual list [window slots 0..L) ++ [selected
//! entries 0..K): its source row in window_kv (is_ent = 0) or entries (is_ent = 1), or -1 when it
//! does not count (outside the window, an empty slot, a -1 or out-of-range index, past the end).
__device__ __forceinline__ int64_t key_source(SaArgs const& a, int64_t row, int64_t b, int64_t qt, int64_t j, int& is_ent)
{
    is_ent = 0;
    if (j < a.L)
    {
        int64_t const pos = load_idx(a.window_pos, a.window_pos_type, b * a.L + j);
        int64_t const dist = qt - pos;
        return pos >= 0 && dist >= 0 && dist < a.window ? b * a.L + j : -1;
    }
    if (j < a.L + a.K)
    {
        is_ent = 1;
        int64_t const idx = load_idx(a.entry_idx, a.entry_idx_type, row * a.K + (j - a.L));
        return idx >= 0 && idx < a.N ? b * a.N + idx : -1;
    }
    return -1;
}

//! The factor that turns head h's unnormalized accumulator (running max m and sum l, log2 units)
//! into the output: 2^(m - M) / (l 2^(m - M) + 2^(sink - M)), M = max(m, sink); 0 with no key.
__device__ __forceinline__ float sink_normalizer(SaArgs const& a, int h, float m, float l)
{
    float const sk = load_f(a.sink, a.sink_dtype, h) * kLog2e;
    float const M = fmaxf(m, sk);
    if (m == -INFINITY || M == -INFINITY)
        return 0.F;
    return exp2f(m - M) / (l * exp2f(m - M) + exp2f(sk - M));
}

size_t smem_bytes(int D)
{
    int const pitch = D + 4;
    return sizeof(float) * (size_t(kHeads + kTile) * pitch + kHeads * kTile + kHeads + 2 * kHeads);
}

template <class Loader>
__global__ void __launch_bounds__(kThreads) sparse_attention_kernel(SaArgs a, Loader win, Loader ent)
{
    HATRT_DYNAMIC_SMEM(float4, smem4);
    float* smem = reinterpret_cast<float*>(smem4);
    int const D = a.D;
    int const pitch = D + 4;
    float* sq = smem;                        // [kHeads][pitch]  q * scale * log2(e)
    float* skv = sq + kHeads * pitch;        // [kTile][pitch]   dequantized keys/values
    float* sp = skv + kTile * pitch;         // [kHeads][kTile]  probabilities of the tile
    float* salpha = sp + kHeads * kTile;     // [kHeads]         rescale of the running sums
    float* sml = salpha + kHeads;            // [kHeads][2]      final (max, sum)
    __shared__ int64_t s_row[kTile];         // source row (-1: invalid key)
    __shared__ int s_ent[kTile];             // 1: row of `entries`, 0: row of `window_kv`

    int const tid = threadIdx.x;
    int64_t const row = blockIdx.x; // b * S + s
    int const h0 = blockIdx.y * kHeads;
    int const split = blockIdx.z;
    int64_t const b = row / a.S;
    int64_t const t = load_idx(a.q_pos, a.q_pos_type, row);

    for (int i = tid; i < kHeads * D; i += kThreads)
    {
        int const hh = i / D, d = i - hh * D;
        int const h = h0 + hh;
        sq[hh * pitch + d] = h < a.H ? load_f(a.q, a.q_dtype, (row * a.H + h) * D + d) * a.scale_log2 : 0.F;
    }

    // logits layout: thread -> (head lh, key lk); PV layout: thread -> (4 heads ph*4.., 8 dims pc*8..)
    int const lh = tid / kTile, lk = tid % kTile;
    int const ph = tid / 64, pc = tid % 64;
    bool const pv_active = pc * 8 < D;
    float m_run = -INFINITY, l_run = 0.F;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e)
            acc[i][e] = 0.F;

    int64_t const n_keys = a.L + a.K;
    int64_t const n_tiles = (n_keys + kTile - 1) / kTile;
    int64_t const tile_begin = int64_t(split) * a.tiles_per_split;
    int64_t const tile_end = min(n_tiles, tile_begin + a.tiles_per_split);
    int const chunks = D / 8;

    for (int64_t tile = tile_begin; tile < tile_end; ++tile)
    {
        __syncthreads(); // previous tile fully consumed (and sq written, on the first pass)
        int valid = 0;
        if (tid < kTile)
        {
            int is_ent = 0;
            int64_t const src = key_source(a, row, b, t, tile * kTile + tid, is_ent);
            s_row[tid] = src;
            s_ent[tid] = is_ent;
            valid = src >= 0;
        }
        if (!__syncthreads_or(valid))
            continue; // no valid key in this tile: nothing to read or add

        for (int i = tid; i < kTile * chunks; i += kThreads)
        {
            int const k = i / chunks, c = i - k * chunks;
            float v[8];
            int64_t const src = s_row[k];
            if (src >= 0)
            {
                if (s_ent[k])
                    ent.load8(src, c * 8, v);
                else
                    win.load8(src, c * 8, v);
            }
            else
            {
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    v[e] = 0.F;
            }
            float4* dst = reinterpret_cast<float4*>(skv + k * pitch + c * 8);
            dst[0] = make_float4(v[0], v[1], v[2], v[3]);
            dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
        __syncthreads();

        // logits (log2 units) and the online-softmax update, one head per 16 lanes
        float s = 0.F;
        {
            float4 const* qa = reinterpret_cast<float4 const*>(sq + lh * pitch);
            float4 const* ka = reinterpret_cast<float4 const*>(skv + lk * pitch);
            for (int d4 = 0; d4 < D / 4; ++d4)
            {
                float4 const x = qa[d4], y = ka[d4];
                s = fmaf(x.x, y.x, s);
                s = fmaf(x.y, y.y, s);
                s = fmaf(x.z, y.z, s);
                s = fmaf(x.w, y.w, s);
            }
        }
        if (s_row[lk] < 0 || h0 + lh >= a.H)
            s = -INFINITY;
        float tmax = s;
#pragma unroll
        for (int o = kTile / 2; o > 0; o >>= 1)
            tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, o));
        float const m_new = fmaxf(m_run, tmax);
        float const p = m_new == -INFINITY ? 0.F : exp2f(s - m_new);
        float const alpha = m_new == -INFINITY ? 1.F : exp2f(m_run - m_new);
        float psum = p;
#pragma unroll
        for (int o = kTile / 2; o > 0; o >>= 1)
            psum += __shfl_xor_sync(0xFFFFFFFFu, psum, o);
        l_run = l_run * alpha + psum;
        m_run = m_new;
        sp[lh * kTile + lk] = p;
        if (lk == 0)
            salpha[lh] = alpha;
        __syncthreads();

        if (pv_active)
        {
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                float const al = salpha[ph * 4 + i];
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    acc[i][e] *= al;
            }
#pragma unroll 4
            for (int k = 0; k < kTile; ++k)
            {
                float4 const v0 = *reinterpret_cast<float4 const*>(skv + k * pitch + pc * 8);
                float4 const v1 = *reinterpret_cast<float4 const*>(skv + k * pitch + pc * 8 + 4);
                float const v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
                {
                    float const pk = sp[(ph * 4 + i) * kTile + k];
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        acc[i][e] = fmaf(pk, v[e], acc[i][e]);
                }
            }
        }
    }

    __syncthreads();
    if (lk == 0)
    {
        sml[2 * lh] = m_run;
        sml[2 * lh + 1] = l_run;
    }
    __syncthreads();
    if (!pv_active)
        return;
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int const hh = ph * 4 + i;
        int const h = h0 + hh;
        if (h >= a.H)
            continue;
        float const m = sml[2 * hh], l = sml[2 * hh + 1];
        if (a.splits == 1)
        {
            float const f = sink_normalizer(a, h, m, l);
            int64_t const o = (row * a.H + h) * D + pc * 8;
#pragma unroll
            for (int e = 0; e < 8; ++e)
                store_f(a.out, a.q_dtype, o + e, acc[i][e] * f);
        }
        else
        {
            int64_t const slot = (int64_t(split) * a.rows + row) * a.H + h;
            float4* dst = reinterpret_cast<float4*>(a.ws_acc + slot * D + pc * 8);
            dst[0] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            dst[1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
            if (pc == 0)
            {
                a.ws_ml[2 * slot] = m;
                a.ws_ml[2 * slot + 1] = l;
            }
        }
    }
}

//! Merge the key splits: out = sum_s acc_s 2^(m_s - M) / (sum_s l_s 2^(m_s - M) + 2^(sink - M)).
__global__ void __launch_bounds__(128) sparse_attention_combine_kernel(SaArgs a)
{
    int64_t const rh = blockIdx.x; // row * H + h
    int const h = int(rh % a.H);
    float const sk = load_f(a.sink, a.sink_dtype, h) * kLog2e;
    int64_t const stride = a.rows * a.H;
    float M = sk;
    for (int s = 0; s < a.splits; ++s)
        M = fmaxf(M, a.ws_ml[2 * (s * stride + rh)]);
    float denom = M == -INFINITY ? 0.F : exp2f(sk - M);
    for (int s = 0; s < a.splits; ++s)
    {
        float const m = a.ws_ml[2 * (s * stride + rh)];
        if (m != -INFINITY)
            denom += a.ws_ml[2 * (s * stride + rh) + 1] * exp2f(m - M);
    }
    for (int d = threadIdx.x; d < a.D; d += blockDim.x)
    {
        float v = 0.F;
        for (int s = 0; s < a.splits; ++s)
        {
            float const m = a.ws_ml[2 * (s * stride + rh)];
            if (m != -INFINITY)
                v = fmaf(a.ws_acc[(s * stride + rh) * a.D + d], exp2f(m - M), v);
        }
        store_f(a.out, a.q_dtype, rh * a.D + d, denom > 0.F ? v / denom : 0.F);
    }
}

// ----------------------------------------------------------------------------- tensor-core kernel
// A block holds kGroups groups of 16 heads (kGroups = 4 when H >= 64: the 64 heads of V4-Flash, or
// half of V4-Pro's 128, share one staged key tile, so the FP8 dequantization is done once for all
// of them), with 4 warps per group.
constexpr int kTcKeys = 32;                  // keys per tile: 8 per warp in Q.K^T
constexpr int kTcD = 512;                    // entry / head width of this kernel
constexpr int kTcPitch = kTcD + 8;           // 16-bit elements per staged row: conflict-free fragments
constexpr int kTcPPitch = kTcKeys + 8;
constexpr int kTcDimsPerWarp = kTcD / 4;     // output dims per warp in P.V
constexpr int kTcNT = kTcDimsPerWarp / 8;    // 8-wide n-tiles per warp

//! q, the staged keys, P, the reductions, then the raw rows of the next tile (raw_row_bytes each).
size_t tc_smem_bytes(int groups, int raw_row_bytes)
{
    int const heads = groups * kHeads;
    return sizeof(uint16_t) * (size_t(heads) * kTcPitch + size_t(kTcKeys) * kTcPitch + size_t(heads) * kTcPPitch)
        + sizeof(float) * 4 * heads + size_t(kTcKeys) * raw_row_bytes;
}

template <int kGroups, bool kHalf, class Loader>
__global__ void __launch_bounds__(128 * kGroups) sparse_attention_tc_kernel(SaArgs a, Loader win, Loader ent)
{
    constexpr int kThreadsTc = 128 * kGroups;
    constexpr int kBlockHeads = kHeads * kGroups;
    constexpr int kRaw = Loader::row_bytes(kTcD);      // bytes of one KV row as stored
    constexpr int kPieces = kRaw / Loader::kPiece;     // asynchronous copies per row
    HATRT_DYNAMIC_SMEM(float4, smem4);
    uint16_t* sq = reinterpret_cast<uint16_t*>(smem4);                     // [heads][kTcPitch]
    uint16_t* skv = sq + kBlockHeads * kTcPitch;                            // [32 keys][kTcPitch]
    uint16_t* sp = skv + kTcKeys * kTcPitch;                                // [heads][kTcPPitch]
    float* sred = reinterpret_cast<float*>(sp + kBlockHeads * kTcPPitch);  // [groups][4 warps][16 heads]
    uint8_t* sraw = reinterpret_cast<uint8_t*>(sred + 4 * kBlockHeads);     // [32 keys][kRaw]: next tile, as stored
    // key-tile metadata, double-buffered: source row (-1: invalid key), window/entry, valid count
    __shared__ int64_t s_row[2][kTcKeys];
    __shared__ int s_ent[2][kTcKeys];
    __shared__ int s_valid[2];

    int const tid = threadIdx.x, lane = tid % 32, g = lane / 4, t = lane % 4;
    int const group = tid / 128, warp = (tid / 32) % 4; // this warp's 16-head group, its place in it
    int64_t const row = blockIdx.x;
    int const h0 = blockIdx.y * kBlockHeads + group * kHeads; // first head of this warp's group
    int const split = blockIdx.z;
    int64_t const b = row / a.S;
    int64_t const qt = load_idx(a.q_pos, a.q_pos_type, row);

    // q (16-bit, exact: q is bf16/fp16); heads beyond H are zero rows whose results are dropped
    for (int i = tid; i < kBlockHeads * (kTcD / 2); i += kThreadsTc)
    {
        int const hh = i / (kTcD / 2), d = 2 * (i % (kTcD / 2));
        int const h = blockIdx.y * kBlockHeads + hh;
        float v0 = 0.F, v1 = 0.F;
        if (h < a.H)
        {
            int64_t const o = (row * a.H + h) * kTcD + d;
            v0 = load_f(a.q, a.q_dtype, o);
            v1 = load_f(a.q, a.q_dtype, o + 1);
        }
        *reinterpret_cast<uint32_t*>(sq + hh * kTcPitch + d) = pack16(to16<kHalf>(v0), to16<kHalf>(v1));
    }

    float m_run[2] = {-INFINITY, -INFINITY}; // running max (log2 units) of heads g and g + 8
    float l_part[2] = {0.F, 0.F};            // this lane's share of the running sums
    float o[kTcNT][4];
#pragma unroll
    for (int j = 0; j < kTcNT; ++j)
        o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.F;

    int64_t const n_keys = a.L + a.K;
    int64_t const n_tiles = (n_keys + kTcKeys - 1) / kTcKeys;
    int64_t const tile_begin = int64_t(split) * a.tiles_per_split;
    int64_t const tile_end = min(n_tiles, tile_begin + a.tiles_per_split);
    int const key0 = warp * 8;      // this warp's keys in Q.K^T
    int const dim0 = warp * kTcDimsPerWarp; // this warp's output dims in P.V
    uint16_t const* gq = sq + group * kHeads * kTcPitch; // the group's q rows
    uint16_t* gp = sp + group * kHeads * kTcPPitch;      // the group's probability rows
    float* gred = sred + group * 4 * kHeads;             // the group's [4 warps][16 heads] exchange

    // Software pipeline: while the block computes on tile t (staged in skv), the raw rows of tile
    // t + 1 are on their way into sraw (cp.async); the first warp works out tile t + 2's rows.
    auto tile_meta = [&](int64_t tile, int slot) { // first warp only
        int is_ent = 0;
        int64_t const src = key_source(a, row, b, qt, tile * kTcKeys + lane, is_ent);
        s_row[slot][lane] = src;
        s_ent[slot][lane] = is_ent;
        unsigned const valid = __ballot_sync(0xFFFFFFFFu, src >= 0);
        if (lane == 0)
            s_valid[slot] = __popc(valid);
    };
    auto fetch = [&](int slot) { // every thread: copy the valid rows of a tile as stored
        for (int i = tid; i < kTcKeys * kPieces; i += kThreadsTc)
        {
            int const k = i / kPieces, c = i - k * kPieces;
            int64_t const src = s_row[slot][k];
            if (src >= 0)
                cp_async<Loader::kPiece>(sraw + k * kRaw + c * Loader::kPiece,
                    (s_ent[slot][k] ? ent : win).row_ptr(src) + c * Loader::kPiece);
        }
        cp_async_commit();
    };
    if (tile_begin < tile_end)
    {
        if (tid < 32)
            tile_meta(tile_begin, 0);
        __syncthreads();
        fetch(0);
    }

    for (int64_t tile = tile_begin; tile < tile_end; ++tile)
    {
        int const buf = int((tile - tile_begin) & 1);
        cp_async_wait_all();
        __syncthreads(); // this tile's rows landed; the previous tile is consumed (skv, sp, its metadata)
        if (tid < 32 && tile + 1 < tile_end)
            tile_meta(tile + 1, buf ^ 1);
        bool const any = s_valid[buf] > 0; // uniform
        if (any)
        {
            // decode to 16-bit values; invalid keys are zero so P.V never meets stale data
            for (int i = tid; i < kTcKeys * (kTcD / 8); i += kThreadsTc)
            {
                int const k = i / (kTcD / 8), c = i % (kTcD / 8);
                float v[8] = {0.F, 0.F, 0.F, 0.F, 0.F, 0.F, 0.F, 0.F};
                if (s_row[buf][k] >= 0)
                    Loader::template decode8<false>(sraw + k * kRaw, c * 8, v);
                uint4 packed;
                packed.x = pack16(to16<kHalf>(v[0]), to16<kHalf>(v[1]));
                packed.y = pack16(to16<kHalf>(v[2]), to16<kHalf>(v[3]));
                packed.z = pack16(to16<kHalf>(v[4]), to16<kHalf>(v[5]));
                packed.w = pack16(to16<kHalf>(v[6]), to16<kHalf>(v[7]));
                *reinterpret_cast<uint4*>(skv + k * kTcPitch + c * 8) = packed;
            }
        }
        __syncthreads(); // skv holds this tile; sraw is free; the next tile's metadata is visible
        if (tile + 1 < tile_end)
            fetch(buf ^ 1);
        if (!any)
            continue; // no valid key in this tile: nothing to add

        // S[16 heads][8 keys of this warp] = Q K^T
        float s[4] = {0.F, 0.F, 0.F, 0.F};
#pragma unroll 4
        for (int k0 = 0; k0 < kTcD; k0 += 16)
        {
            uint32_t const af[4] = {lds32(gq + g * kTcPitch + k0 + 2 * t), lds32(gq + (g + 8) * kTcPitch + k0 + 2 * t),
                lds32(gq + g * kTcPitch + k0 + 2 * t + 8), lds32(gq + (g + 8) * kTcPitch + k0 + 2 * t + 8)};
            uint32_t const bf[2]
                = {lds32(skv + (key0 + g) * kTcPitch + k0 + 2 * t), lds32(skv + (key0 + g) * kTcPitch + k0 + 2 * t + 8)};
            mma_16816<kHalf>(s, af, bf);
        }
        // s[0], s[1]: head g, keys key0 + 2t, +1; s[2], s[3]: head g + 8, same keys
        bool const ok0 = s_row[buf][key0 + 2 * t] >= 0, ok1 = s_row[buf][key0 + 2 * t + 1] >= 0;
        s[0] = ok0 ? s[0] * a.scale_log2 : -INFINITY;
        s[1] = ok1 ? s[1] * a.scale_log2 : -INFINITY;
        s[2] = ok0 ? s[2] * a.scale_log2 : -INFINITY;
        s[3] = ok1 ? s[3] * a.scale_log2 : -INFINITY;
        float mx[2] = {fmaxf(s[0], s[1]), fmaxf(s[2], s[3])};
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1)
        {
            mx[0] = fmaxf(mx[0], __shfl_xor_sync(0xFFFFFFFFu, mx[0], off));
            mx[1] = fmaxf(mx[1], __shfl_xor_sync(0xFFFFFFFFu, mx[1], off));
        }
        if (t == 0)
        {
            gred[warp * kHeads + g] = mx[0];
            gred[warp * kHeads + g + 8] = mx[1];
        }
        __syncthreads();
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
        {
            int const hh = g + 8 * r;
            float const tmax = fmaxf(fmaxf(gred[hh], gred[kHeads + hh]), fmaxf(gred[2 * kHeads + hh], gred[3 * kHeads + hh]));
            float const m_new = fmaxf(m_run[r], tmax);
            alpha[r] = m_new == -INFINITY ? 1.F : exp2f(m_run[r] - m_new);
            float const p0 = m_new == -INFINITY ? 0.F : exp2f(s[2 * r] - m_new);
            float const p1 = m_new == -INFINITY ? 0.F : exp2f(s[2 * r + 1] - m_new);
            l_part[r] = l_part[r] * alpha[r] + p0 + p1;
            m_run[r] = m_new;
            *reinterpret_cast<uint32_t*>(gp + hh * kTcPPitch + key0 + 2 * t) = pack16(to16<kHalf>(p0), to16<kHalf>(p1));
        }
        __syncthreads(); // P complete

        // O[16 heads][this warp's 128 dims] = O * alpha + P V
#pragma unroll
        for (int j = 0; j < kTcNT; ++j)
        {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
#pragma unroll
        for (int ks = 0; ks < kTcKeys; ks += 16)
        {
            uint32_t const af[4] = {lds32(gp + g * kTcPPitch + ks + 2 * t), lds32(gp + (g + 8) * kTcPPitch + ks + 2 * t),
                lds32(gp + g * kTcPPitch + ks + 2 * t + 8), lds32(gp + (g + 8) * kTcPPitch + ks + 2 * t + 8)};
#pragma unroll
            for (int j = 0; j < kTcNT; ++j)
            {
                uint16_t const* v = skv + (ks + 2 * t) * kTcPitch + dim0 + j * 8 + g;
                uint32_t const bf[2] = {pack16(v[0], v[kTcPitch]), pack16(v[8 * kTcPitch], v[9 * kTcPitch])};
                mma_16816<kHalf>(o[j], af, bf);
            }
        }
    }

    // row sums: over the quad's lanes, then over the 4 warps
#pragma unroll
    for (int r = 0; r < 2; ++r)
    {
        l_part[r] += __shfl_xor_sync(0xFFFFFFFFu, l_part[r], 1);
        l_part[r] += __shfl_xor_sync(0xFFFFFFFFu, l_part[r], 2);
    }
    __syncthreads();
    if (t == 0)
    {
        gred[warp * kHeads + g] = l_part[0];
        gred[warp * kHeads + g + 8] = l_part[1];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r)
    {
        int const hh = g + 8 * r;
        int const h = h0 + hh;
        if (h >= a.H)
            continue;
        float const m = m_run[r];
        float const l = gred[hh] + gred[kHeads + hh] + gred[2 * kHeads + hh] + gred[3 * kHeads + hh];
        if (a.splits == 1)
        {
            float const f = sink_normalizer(a, h, m, l);
            int64_t const base = (row * a.H + h) * kTcD + dim0 + 2 * t;
#pragma unroll
            for (int j = 0; j < kTcNT; ++j)
            {
                store_f(a.out, a.q_dtype, base + j * 8, o[j][2 * r] * f);
                store_f(a.out, a.q_dtype, base + j * 8 + 1, o[j][2 * r + 1] * f);
            }
        }
        else
        {
            int64_t const slot = (int64_t(split) * a.rows + row) * a.H + h;
            float* dst = a.ws_acc + slot * kTcD + dim0 + 2 * t;
#pragma unroll
            for (int j = 0; j < kTcNT; ++j)
            {
                dst[j * 8] = o[j][2 * r];
                dst[j * 8 + 1] = o[j][2 * r + 1];
            }
            if (warp == 0 && t == 0)
            {
                a.ws_ml[2 * slot] = m;
                a.ws_ml[2 * slot + 1] = l;
            }
        }
    }
}

//! Keys per tile of the kernel the launcher picks.
int tile_keys(bool tensor_cores)
{
    return tensor_cores ? kTcKeys : kTile;
}

//! 16-head groups per block: 4 (64 heads share a staged key tile) when there are that many heads.
int head_groups(bool tensor_cores, int64_t H)
{
    return tensor_cores && H >= 4 * kHeads ? 4 : 1;
}

template <int kGroups, class Loader>
cudaError_t launch_tc(SaArgs const& a, Loader win, Loader ent, bool half, cudaStream_t stream)
{
    dim3 grid(unsigned(a.rows), unsigned((a.H + kGroups * kHeads - 1) / (kGroups * kHeads)), unsigned(a.splits));
    size_t const smem = tc_smem_bytes(kGroups, Loader::row_bytes(kTcD));
    auto kernel = half ? sparse_attention_tc_kernel<kGroups, true, Loader> : sparse_attention_tc_kernel<kGroups, false, Loader>;
    cudaError_t const err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess)
        return err;
    HATRT_LAUNCH(kernel, grid, 128 * kGroups, smem, stream)(a, win, ent);
    return cudaSuccess;
}

template <class Loader>
cudaError_t launch(SaArgs const& a, Loader win, Loader ent, bool tensor_cores, bool half, cudaStream_t stream)
{
    dim3 grid(unsigned(a.rows), unsigned((a.H + kHeads - 1) / kHeads), unsigned(a.splits));
    cudaError_t err = cudaSuccess;
    if (tensor_cores)
    {
        err = head_groups(true, a.H) == 4 ? launch_tc<4>(a, win, ent, half, stream) : launch_tc<1>(a, win, ent, half, stream);
        if (err != cudaSuccess)
            return err;
    }
    else
    {
        size_t const smem = smem_bytes(a.D);
        auto kernel = sparse_attention_kernel<Loader>;
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess)
            return err;
        HATRT_LAUNCH(kernel, grid, kThreads, smem, stream)(a, win, ent);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess || a.splits == 1)
        return err;
    HATRT_LAUNCH(sparse_attention_combine_kernel, unsigned(a.rows * a.H), 128, 0, stream)(a);
    return cudaGetLastError();
}

} // namespace
} // namespace detail

bool use_tensor_cores(SparseAttentionParams const& p)
{
    return p.tensor_cores && p.D == detail::kTcD && (p.q_dtype == DType::kBFloat16 || p.q_dtype == DType::kFloat16)
        && detail::device_cc_major() >= 8;
}

char const* sparse_attention_check(SparseAttentionParams const& p)
{
    using namespace detail;
    if (p.B < 0 || p.S < 0 || p.L < 0 || p.N < 0 || p.K < 0 || p.H < 0)
        return "sparse_attention: negative dimension";
    if (p.D <= 0 || p.D % 8 != 0 || p.D > kMaxD)
        return "sparse_attention: D (head/entry width) must be a positive multiple of 8 and <= 512";
    if (!is_float_dtype(p.q_dtype))
        return "sparse_attention: q must be float32, float16 or bfloat16";
    if (!is_float_dtype(p.sink_dtype))
        return "sparse_attention: sink must be float32, float16 or bfloat16";
    if (!is_float_dtype(p.kv_dtype) && p.kv_dtype != DType::kEntry584)
        return "sparse_attention: window_kv / entries must be float32, float16, bfloat16 or the 584-byte FP8 entry";
    if (p.kv_dtype == DType::kEntry584 && p.D != entry584::kDim)
        return "sparse_attention: the 584-byte FP8 KV layout needs D == 512";
    if (p.B * p.S > 0x7FFFFFFFLL)
        return "sparse_attention: B * S exceeds 2^31 - 1";
    if (p.B * p.S == 0 || p.H == 0)
        return nullptr;
    if (!p.q || !p.q_pos || !p.sink || !p.out || (p.L > 0 && (!p.window_kv || !p.window_pos))
        || (p.K > 0 && !p.entry_idx) || (p.N > 0 && p.K > 0 && !p.entries))
        return "sparse_attention: null input or output pointer";
    size_t const kv_align = p.kv_dtype == DType::kEntry584 ? 8 : 16;
    if ((p.window_kv && !aligned(p.window_kv, kv_align)) || (p.entries && !aligned(p.entries, kv_align)))
        return "sparse_attention: window_kv / entries must be 16-byte aligned (8 for the 584-byte layout)";
    if (p.workspace && !aligned(p.workspace, 16))
        return "sparse_attention: workspace must be 16-byte aligned";
    return nullptr;
}

size_t sparse_attention_workspace_bytes(int32_t H, int32_t D, int32_t num_sms)
{
    // Splits are used only while rows * head-groups < 2 * SMs, with splits * blocks <= 4 * SMs.
    int const sms = detail::device_num_sms(num_sms);
    int const hpb = H < 4 * detail::kHeads ? H : 4 * detail::kHeads; // heads per block, at most
    return size_t(4) * sms * hpb * (size_t(D) + 2) * sizeof(float) + 256;
}

cudaError_t sparse_attention(SparseAttentionParams const& p, cudaStream_t stream)
{
    using namespace detail;
    if (sparse_attention_check(p) != nullptr)
        return cudaErrorInvalidValue;
    int64_t const rows = p.B * p.S;
    if (rows == 0 || p.H == 0)
        return cudaSuccess;

    SaArgs a{};
    a.rows = rows, a.S = p.S, a.L = p.L, a.N = p.N, a.K = p.K;
    a.H = p.H, a.D = p.D, a.window = p.window;
    a.scale_log2 = p.scale * kLog2e;
    a.q = p.q, a.q_dtype = p.q_dtype, a.q_pos = p.q_pos, a.q_pos_type = p.q_pos_type;
    a.window_pos = p.window_pos, a.window_pos_type = p.window_pos_type;
    a.entry_idx = p.entry_idx, a.entry_idx_type = p.entry_idx_type;
    a.sink = p.sink, a.sink_dtype = p.sink_dtype, a.out = p.out;

    // Key splits (flash-decoding) when the grid would not fill the GPU.
    bool const tc = use_tensor_cores(p);
    int64_t const n_tiles = (p.L + p.K + tile_keys(tc) - 1) / tile_keys(tc);
    int const block_heads = kHeads * head_groups(tc, p.H);
    int64_t const blocks = rows * ((p.H + block_heads - 1) / block_heads);
    int const sms = device_num_sms(p.num_sms);
    int64_t splits = 1;
    if (blocks < 2 * sms && n_tiles > 1)
    {
        splits = (2 * sms + blocks - 1) / blocks;
        splits = splits < n_tiles ? splits : n_tiles;
        splits = splits < 64 ? splits : 64;
        size_t const per_split = size_t(rows) * p.H * (size_t(p.D) + 2) * sizeof(float);
        size_t const fit = p.workspace ? p.workspace_bytes / per_split : 0;
        splits = int64_t(fit) < splits ? int64_t(fit) : splits;
        if (splits < 1)
            splits = 1;
    }
    int64_t const tps = n_tiles == 0 ? 1 : (n_tiles + splits - 1) / splits;
    a.splits = int32_t(n_tiles == 0 ? 1 : (n_tiles + tps - 1) / tps);
    a.tiles_per_split = int32_t(tps);
    if (a.splits > 1)
    {
        a.ws_acc = static_cast<float*>(p.workspace);
        a.ws_ml = a.ws_acc + size_t(a.splits) * rows * p.H * p.D;
    }

    bool const half = p.q_dtype == DType::kFloat16;
    switch (p.kv_dtype)
    {
    case DType::kFloat32:
        return launch(a, PlainLoader<float>{static_cast<float const*>(p.window_kv), p.D},
            PlainLoader<float>{static_cast<float const*>(p.entries), p.D}, tc, half, stream);
    case DType::kFloat16:
        return launch(a, PlainLoader<__half>{static_cast<__half const*>(p.window_kv), p.D},
            PlainLoader<__half>{static_cast<__half const*>(p.entries), p.D}, tc, half, stream);
    case DType::kBFloat16:
        return launch(a, PlainLoader<__nv_bfloat16>{static_cast<__nv_bfloat16 const*>(p.window_kv), p.D},
            PlainLoader<__nv_bfloat16>{static_cast<__nv_bfloat16 const*>(p.entries), p.D}, tc, half, stream);
    case DType::kEntry584:
        return launch(a, Entry584Loader{static_cast<uint8_t const*>(p.window_kv)},
            Entry584Loader{static_cast<uint8_t const*>(p.entries)}, tc, half, stream);
    case DType::kIndexKey68:
    case DType::kIndexKey132: break; // refused by sparse_attention_check
    }
    return cudaErrorInvalidValue;
}

} // namespace hatrt
