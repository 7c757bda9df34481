// hatrt CUDA kernels: plain C++ launchers (no torch, no TensorRT).
//
// Each launcher implements one op contract of exporter/ops.py (see exporter/custom_ops.py for the
// ONNX names):
//   compress()          GatedCompress / OverlapGatedCompress   (ops.compress_blocks)
//   indexer_topk()      IndexerTopK                            (ops.indexer_topk)
//   sparse_attention()  HybridSparseAttention                  (ops.sparse_attention)
//   routed_experts()    RoutedExperts                          (custom_ops.routed_experts_reference)
// plus the production KV-cache write / read of the 584-byte FP8 entry (attention-spec section 7):
//   kv_write_584(), kv_read_584().
//
// Conventions
// - Tensors are dense, row-major, contiguous, with the shapes given per field. Element offsets are
//   64-bit. Float inputs may be float32, float16 or bfloat16 (each input its own type, as in the
//   ONNX schemas); index inputs int32 or int64.
// - All arithmetic is fp32. Outputs: compress -> float32, indexer_topk -> int64, sparse_attention
//   -> the dtype of q, routed_experts -> float32.
// - Every launcher validates its parameters first and returns cudaErrorInvalidValue without
//   launching anything when they are unsupported; *_check() returns the reason as text (nullptr
//   when the parameters are fine), so callers (the TensorRT plugins) can report it.
// - Launchers are asynchronous on `stream` and return the launch status (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>
#include <cstddef>
#include <cstdint>

namespace hatrt
{

enum class DType : int32_t
{
    kFloat32 = 0,
    kFloat16 = 1,
    kBFloat16 = 2,
    //! Production KV entry: uint8 [..., 584] = 448 e4m3 + 64 bf16 + 7 ue8m0 scales + 1 pad byte.
    //! Only for the KV inputs of sparse_attention (window_kv, entries), with D == 512.
    kEntry584 = 3,
    //! Production indexer key: uint8 [..., 68] = 128 FP4 e2m1 values (MXFP4: 64 bytes, two per
    //! byte) + 4 ue8m0 scales (one per 32 values). Only for the keys of indexer_topk, Di == 128.
    kIndexKey68 = 4,
    //! Indexer key, FP8 variant: uint8 [..., 132] = 128 FP8 e4m3 values + their fp32 power-of-two
    //! scale (one per key). Only for the keys of indexer_topk, Di == 128.
    kIndexKey132 = 5,
};

enum class IndexType : int32_t
{
    kInt32 = 0,
    kInt64 = 1,
};

// ----------------------------------------------------------------------------- the 584-byte entry
namespace entry584
{
constexpr int kDim = 512;      //!< D: values per entry
constexpr int kNope = 448;     //!< dims [0, 448): FP8 e4m3, one power-of-two scale per 64 dims
constexpr int kRope = 64;      //!< dims [448, 512): bf16 (RoPE dims)
constexpr int kBlock = 64;     //!< FP8 scale block
constexpr int kNumScales = 7;  //!< kNope / kBlock
constexpr int kRopeOffset = 448;                 //!< byte offset of the bf16 part
constexpr int kScaleOffset = 448 + 2 * 64;       //!< byte offset of the ue8m0 scales (576)
constexpr int kPadOffset = kScaleOffset + 7;     //!< 583, written as 0
constexpr int kBytes = 584;
} // namespace entry584

// ----------------------------------------------------------------------------- the 68-byte index key
namespace index_key68
{
constexpr int kDim = 128;       //!< Di: values per key
constexpr int kBlock = 32;      //!< FP4 scale block
constexpr int kNumScales = 4;   //!< kDim / kBlock
constexpr int kScaleOffset = 64; //!< byte offset of the ue8m0 scales; value 2i is the low nibble of byte i
constexpr int kBytes = 68;
} // namespace index_key68

namespace index_key132
{
constexpr int kDim = 128;         //!< Di: values per key
constexpr int kScaleOffset = 128; //!< byte offset of the fp32 scale
constexpr int kBytes = 132;
} // namespace index_key132

// ----------------------------------------------------------------------------- sparse attention
//! HybridSparseAttention: one softmax over the sliding window and the selected compressed entries,
//! with a per-head sink logit in the denominator. Decode (S == 1) and prefill (S > 1) alike.
struct SparseAttentionParams
{
    int64_t B = 0, S = 0; //!< batch, queries per sequence
    int32_t H = 0;        //!< query heads
    int32_t D = 0;        //!< entry / head width (multiple of 8, <= 512; 512 for kEntry584)
    int64_t L = 0;        //!< window candidates per sequence
    int64_t N = 0;        //!< compressed entries per sequence (0 allowed)
    int64_t K = 0;        //!< selected entries per query (0 allowed)
    int32_t window = 0;   //!< key j is in query t's window when 0 <= t - window_pos[j] < window
    float scale = 0.F;    //!< logit scale (1/sqrt(D) in V4)

    void const* q = nullptr;          //!< [B, S, H, D] q_dtype
    DType q_dtype = DType::kFloat32;
    void const* q_pos = nullptr;      //!< [B, S]
    IndexType q_pos_type = IndexType::kInt64;
    void const* window_kv = nullptr;  //!< [B, L, D] kv_dtype (or [B, L, 584] bytes)
    void const* window_pos = nullptr; //!< [B, L], -1 = empty slot
    IndexType window_pos_type = IndexType::kInt64;
    void const* entries = nullptr;    //!< [B, N, D] kv_dtype (or [B, N, 584] bytes)
    void const* entry_idx = nullptr;  //!< [B, S, K], -1 = none; indices >= N are ignored too
    IndexType entry_idx_type = IndexType::kInt64;
    DType kv_dtype = DType::kFloat32; //!< dtype of window_kv AND entries
    void const* sink = nullptr;       //!< [H]
    DType sink_dtype = DType::kFloat32;
    void* out = nullptr;              //!< [B, S, H, D] in q_dtype

    //! Optional fp32 scratch for splitting long key lists over several blocks (flash-decoding).
    //! With too little (or none) the kernel runs unsplit: still correct, fewer blocks in flight.
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    int32_t num_sms = 0; //!< 0: read from the current device

    //! Use the tensor-core kernel where it applies (bf16/fp16 q, D == 512, sm_80+): Q.K^T and P.V
    //! with 16-bit inputs (keys/values rounded to q's type: exact for the FP8 entry and bf16 KV)
    //! and fp32 accumulation. false: the fp32 CUDA-core kernel for every case.
    bool tensor_cores = true;
};

char const* sparse_attention_check(SparseAttentionParams const& p);
//! Whether sparse_attention() runs these parameters on the tensor-core kernel.
bool use_tensor_cores(SparseAttentionParams const& p);
//! Scratch that lets sparse_attention() split keys whenever that helps, for any B * S.
size_t sparse_attention_workspace_bytes(int32_t H, int32_t D, int32_t num_sms);
cudaError_t sparse_attention(SparseAttentionParams const& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- indexer + top-k
//! IndexerTopK: I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]) over the visible entries
//! s < (t + 1) // ratio, then the top-k in rank order (score descending, lower index first on
//! equal scores), -1 padded to width topk. Radix select, not a sort of all candidates.
struct IndexerTopKParams
{
    int64_t B = 0, S = 0;
    int32_t Hi = 0;  //!< indexer heads (<= 128)
    int32_t Di = 0;  //!< indexer head width (<= 256)
    int64_t N = 0;   //!< compressed entries (0 allowed)
    int32_t ratio = 0;
    int32_t topk = 0;           //!< output width (1..4096)
    bool bf16_scores = false;   //!< round scores to bf16 before ranking (production)

    void const* q = nullptr;       //!< [B, S, Hi, Di]
    DType q_dtype = DType::kFloat32;
    void const* weights = nullptr; //!< [B, S, Hi]
    DType weights_dtype = DType::kFloat32;
    void const* keys = nullptr;    //!< [B, N, Di] (or [B, N, 68 | 132] bytes: kIndexKey68 / 132, Di == 128)
    DType keys_dtype = DType::kFloat32;
    void const* q_pos = nullptr;   //!< [B, S]
    IndexType q_pos_type = IndexType::kInt64;
    int64_t* out = nullptr;        //!< [B, S, topk]

    //! Scratch: per query in flight, its N fp32 scores plus 48 KiB for the split selection.
    //! Needed when a query's visible scores do not fit in shared memory, and used to spread the
    //! scoring and selection of few, long rows over the whole GPU. Rows are processed in batches
    //! that fit; at least indexer_topk_workspace_bytes(1, N) bytes when needed.
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    int32_t num_sms = 0;

    //! Score on tensor cores where it is exact (q bf16/fp16 with keys of the same type or packed
    //! FP4/FP8, Di % 16 == 0, sm_80+): 16-bit products, fp32 accumulation. false: fp32 CUDA cores.
    bool tensor_cores = true;
};

char const* indexer_topk_check(IndexerTopKParams const& p);
//! Whether indexer_topk() scores these parameters on tensor cores.
bool indexer_uses_tensor_cores(IndexerTopKParams const& p);
//! Scratch for the fastest path at these sizes (capped at `cap` bytes, but at least one row's).
size_t indexer_topk_workspace_bytes(int64_t rows, int64_t N, size_t cap = size_t(256) << 20);
cudaError_t indexer_topk(IndexerTopKParams const& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- compressor
//! GatedCompress (overlap == false) / OverlapGatedCompress (overlap == true): per-channel softmax
//! pooling over the m slots of each complete block (CSA: the previous block's first halves, then
//! the current block's second halves), RMSNorm with weight, RoPE at the block's first position on
//! the last r dims (interleaved pairs), then the optional fake quantization:
//!   quant 0 none; 1 FP8 e4m3 on dims [0, D - r) in blocks of 64 (power-of-two scales);
//!   2 Hadamard over D, then FP4 e2m1 in blocks of 32 (power-of-two scales).
struct CompressParams
{
    int64_t B = 0, N = 0; //!< batch, blocks (>= 1)
    int32_t m = 0;        //!< tokens per block (slots; CSA pools 2m)
    int32_t D = 0;        //!< entry width (<= 1024)
    int32_t r = 0;        //!< RoPE dims = 2 * cos.shape[-1] (even, <= D)
    bool overlap = false; //!< CSA
    float eps = 1e-6F;
    int32_t quant = 0;

    void const* kv = nullptr;         //!< [B, N, m, W], W = D (HCA) or 2D (CSA)
    DType kv_dtype = DType::kFloat32;
    void const* score = nullptr;      //!< [B, N, m, W] (positional bias already added)
    DType score_dtype = DType::kFloat32;
    void const* prev_kv = nullptr;    //!< CSA: [B, m, D] first halves of the block before block 0
    DType prev_kv_dtype = DType::kFloat32;
    void const* prev_score = nullptr; //!< CSA: [B, m, D] (-inf = no previous block)
    DType prev_score_dtype = DType::kFloat32;
    void const* norm_weight = nullptr; //!< [D]
    DType norm_weight_dtype = DType::kFloat32;
    void const* cos = nullptr;        //!< [B, N, r / 2]
    DType cos_dtype = DType::kFloat32;
    void const* sin = nullptr;        //!< [B, N, r / 2]
    DType sin_dtype = DType::kFloat32;

    float* out = nullptr;             //!< [B, N, D] float32 (may be null when only `cache` is written)
    //! Optional fused cache write of each finished entry: the 584-byte KV layout (D == 512, r == 64,
    //! quant == 1: dequantizes exactly to `out`, RoPE dims rounded to bf16) or the 68-byte FP4 index
    //! key (D == 128, quant == 2, the indexer's compressor: dequantizes exactly to `out`).
    uint8_t* cache = nullptr;         //!< [rows, 584] or [rows, 68]
    void const* cache_slot = nullptr; //!< [B, N] row of `cache` per entry (<0: skip); null: b * N + i
    IndexType cache_slot_type = IndexType::kInt64;
};

char const* compress_check(CompressParams const& p);
cudaError_t compress(CompressParams const& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- routed experts
//! RoutedExperts: the routed experts of a MoE layer as a grouped GEMM over the picked experts only,
//!   out[t] = sum_j expert_weights[t, j] * FFN_{expert_idx[t, j]}(x[t]),
//!   FFN_e(v) = w2[e] (silu(min(w1[e] v, L)) * clamp(w3[e] v, -L, L))   (no clamp when L == 0).
//! Repeated picks add up; picks outside [0, E) contribute nothing. Tokens are counting-sorted by
//! expert, each expert's rows run in BM-row tiles (gate/up GEMM + SwiGLU, then the down GEMM), and
//! a per-token combine sums the weighted rows in pick order (deterministic, no float atomics).
struct RoutedExpertsParams
{
    int64_t T = 0;           //!< tokens
    int32_t k = 0;           //!< picks per token (0 allowed: out = 0)
    int32_t E = 0;           //!< experts
    int32_t d = 0;           //!< hidden size
    int32_t I = 0;           //!< expert intermediate size
    float swiglu_limit = 0.F; //!< L; 0 = no clamp

    void const* x = nullptr;              //!< [T, d]
    DType x_dtype = DType::kFloat32;
    void const* expert_idx = nullptr;     //!< [T, k]
    IndexType expert_idx_type = IndexType::kInt64;
    void const* expert_weights = nullptr; //!< [T, k] (the router's final weights)
    DType expert_weights_dtype = DType::kFloat32;
    void const* w1 = nullptr;             //!< [E, I, d] gate projection (nn.Linear layout)
    DType w1_dtype = DType::kFloat32;
    void const* w3 = nullptr;             //!< [E, I, d] up projection
    DType w3_dtype = DType::kFloat32;
    void const* w2 = nullptr;             //!< [E, d, I] down projection
    DType w2_dtype = DType::kFloat32;
    float* out = nullptr;                 //!< [T, d] float32

    //! Scratch (16-byte aligned), at least routed_experts_workspace_bytes(T, k, E, d, I): the sort,
    //! the tile table and the fp32 intermediates [T * k, I] and [T * k, d].
    void* workspace = nullptr;
    size_t workspace_bytes = 0;

    //! Both GEMMs on tensor cores where they apply (x, w1, w3, w2 all bf16 or all fp16, sm_80+):
    //! 16-bit products, fp32 accumulation, the SwiGLU output rounded to that type before the down
    //! projection. false: the fp32 CUDA-core kernels for every case.
    bool tensor_cores = true;
};

char const* routed_experts_check(RoutedExpertsParams const& p);
//! Whether routed_experts() runs these parameters on the tensor-core kernels.
bool routed_experts_uses_tensor_cores(RoutedExpertsParams const& p);
//! Monotone in every argument (a plugin may size it from the maximum shapes).
size_t routed_experts_workspace_bytes(int64_t T, int32_t k, int32_t E, int32_t d, int32_t I);
cudaError_t routed_experts(RoutedExpertsParams const& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- KV cache write/read
//! Quantize n vectors of 512 values into 584-byte entries: dims [0, 448) to FP8 e4m3 with one
//! power-of-two scale per 64 (2^ceil(log2(max(amax, 1e-4) / 448)), stored as ue8m0 = exponent +
//! 127), dims [448, 512) rounded to bf16, pad byte 0. The dequantized entry equals
//! exporter.quant.fake_quant_fp8 of the non-RoPE dims (and bf16 RoPE dims).
struct KvWriteParams
{
    int64_t n = 0;
    void const* src = nullptr;   //!< [n, 512]
    DType src_dtype = DType::kFloat32;
    void const* slot = nullptr;  //!< [n] destination row in `cache` (<0: skip); null: row i
    IndexType slot_type = IndexType::kInt64;
    uint8_t* cache = nullptr;    //!< [rows, 584]
};

char const* kv_write_584_check(KvWriteParams const& p);
cudaError_t kv_write_584(KvWriteParams const& p, cudaStream_t stream);

//! Dequantize n entries (rows slot[i], or i when slot is null) into float32 [n, 512].
cudaError_t kv_read_584(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream);

//! Quantize n indexer keys of 128 values into 68-byte entries: FP4 e2m1 in blocks of 32 with a
//! power-of-two scale 2^ceil(log2(max(amax, 1e-4) / 6)) (ue8m0 byte = exponent + 127), ties to
//! even. The dequantized key equals exporter.quant.fake_quant_fp4 of the input (the input is
//! expected to be Hadamard-rotated already, as the compressor's quant == 2 output is).
cudaError_t index_key_write_68(int64_t n, void const* src, DType src_dtype, void const* slot, IndexType slot_type,
    uint8_t* cache, cudaStream_t stream);
//! Dequantize n 68-byte keys (rows slot[i], or i when slot is null) into float32 [n, 128].
cudaError_t index_key_read_68(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream);

//! Quantize n indexer keys of 128 values into 132-byte entries: FP8 e4m3 with one power-of-two
//! scale per key, 2^ceil(log2(max(amax, 1e-4) / 448)), stored as fp32 after the 128 bytes. The
//! dequantized key equals exporter.quant.fake_quant_fp8(x, block=128).
cudaError_t index_key_write_132(int64_t n, void const* src, DType src_dtype, void const* slot, IndexType slot_type,
    uint8_t* cache, cudaStream_t stream);
//! Dequantize n 132-byte keys (rows slot[i], or i when slot is null) into float32 [n, 128].
cudaError_t index_key_read_132(int64_t n, uint8_t const* cache, void const* slot, IndexType slot_type, float* out,
    cudaStream_t stream);

} // namespace hatrt
