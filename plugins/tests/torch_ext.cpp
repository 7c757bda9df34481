// Torch bindings of the plain C++ kernel launchers (plugins/csrc), for the kernel tests and the
// benchmark only: torch.utils.cpp_extension.load builds this file with csrc/kernels/*.cu on a GPU
// machine, or with the same kernels compiled for the CPU emulator (HATRT_CUDA_EMU, plugins/emu:
// CPU tensors, no stream). See plugins/tests/kernels_ext.py. Outputs are passed in (the tests
// poison them first).
#include "hatrt/kernels.h"

#include <torch/extension.h>

#include <tuple>
#include <utility>
#ifndef HATRT_CUDA_EMU
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define HATRT_DEVICE_GUARD(t) c10::cuda::CUDAGuard guard((t).device())
#else
#define HATRT_DEVICE_GUARD(t) (void) (t)
#endif

namespace
{

hatrt::DType fdtype(at::Tensor const& t)
{
    switch (t.scalar_type())
    {
    case at::kFloat: return hatrt::DType::kFloat32;
    case at::kHalf: return hatrt::DType::kFloat16;
    case at::kBFloat16: return hatrt::DType::kBFloat16;
    default: TORCH_CHECK(false, "expected a float32/float16/bfloat16 tensor, got ", t.scalar_type());
    }
    return hatrt::DType::kFloat32;
}

hatrt::IndexType idtype(at::Tensor const& t)
{
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "expected int32/int64, got ",
        t.scalar_type());
    return t.scalar_type() == at::kLong ? hatrt::IndexType::kInt64 : hatrt::IndexType::kInt32;
}

void check_cuda(at::Tensor const& t, char const* name)
{
#ifdef HATRT_CUDA_EMU
    TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor (CUDA emulator build)");
#else
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
#endif
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void finish(char const* what, char const* msg, cudaError_t err)
{
    TORCH_CHECK(msg == nullptr, what, ": ", msg ? msg : "");
    TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

//! (data, type) of an optional index tensor; (nullptr, int64) when absent.
std::pair<void const*, hatrt::IndexType> optional_index(c10::optional<at::Tensor> const& t, char const* name)
{
    if (!t.has_value())
        return {nullptr, hatrt::IndexType::kInt64};
    check_cuda(*t, name);
    return {t->data_ptr(), idtype(*t)};
}

cudaStream_t stream()
{
#ifdef HATRT_CUDA_EMU
    return nullptr;
#else
    return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

// out[B, S, H, D] (q dtype) <- HybridSparseAttention. window_kv / entries: float tensors [B, L|N, D]
// or uint8 [B, L|N, 584] (the FP8 entry).
void sparse_attention(at::Tensor out, at::Tensor q, at::Tensor q_pos, at::Tensor window_kv, at::Tensor window_pos,
    at::Tensor entries, at::Tensor entry_idx, at::Tensor sink, int64_t window, double scale, int64_t num_sms,
    bool use_workspace, bool tensor_cores)
{
    for (auto* t : {&out, &q, &q_pos, &window_kv, &window_pos, &entries, &entry_idx, &sink})
        check_cuda(*t, "sparse_attention input");
    HATRT_DEVICE_GUARD(q);
    TORCH_CHECK(q.dim() == 4 && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "bad q/out");
    bool const packed = window_kv.scalar_type() == at::kByte;
    hatrt::SparseAttentionParams p;
    p.B = q.size(0), p.S = q.size(1), p.H = int32_t(q.size(2)), p.D = int32_t(q.size(3));
    p.L = window_kv.size(1), p.N = entries.size(1), p.K = entry_idx.size(2);
    p.window = int32_t(window), p.scale = float(scale);
    p.q = q.data_ptr(), p.q_dtype = fdtype(q);
    p.q_pos = q_pos.data_ptr(), p.q_pos_type = idtype(q_pos);
    p.window_kv = window_kv.data_ptr(), p.window_pos = window_pos.data_ptr(), p.window_pos_type = idtype(window_pos);
    p.entries = entries.data_ptr(), p.entry_idx = entry_idx.data_ptr(), p.entry_idx_type = idtype(entry_idx);
    p.kv_dtype = packed ? hatrt::DType::kEntry584 : fdtype(window_kv);
    p.sink = sink.data_ptr(), p.sink_dtype = fdtype(sink);
    p.out = out.data_ptr();
    p.num_sms = int32_t(num_sms);
    p.tensor_cores = tensor_cores;
    at::Tensor ws;
    if (use_workspace)
    {
        size_t const bytes = hatrt::sparse_attention_workspace_bytes(p.H, p.D, p.num_sms);
        ws = at::empty({int64_t(bytes)}, q.options().dtype(at::kByte));
        p.workspace = ws.data_ptr(), p.workspace_bytes = bytes;
    }
    char const* msg = hatrt::sparse_attention_check(p);
    finish("sparse_attention", msg, msg ? cudaSuccess : hatrt::sparse_attention(p, stream()));
}

bool uses_tensor_cores(at::Tensor q, int64_t head_dim, bool tensor_cores)
{
    hatrt::SparseAttentionParams p;
    p.D = int32_t(head_dim), p.q_dtype = fdtype(q), p.tensor_cores = tensor_cores;
    return hatrt::use_tensor_cores(p);
}

// out[B, S, topk] int64 <- IndexerTopK
//! Float keys, or uint8 [..., 68] (FP4) / [..., 132] (FP8) packed index keys.
hatrt::DType key_dtype(at::Tensor const& keys)
{
    if (keys.scalar_type() != at::kByte)
        return fdtype(keys);
    TORCH_CHECK(keys.size(-1) == 68 || keys.size(-1) == 132, "packed keys must be uint8 [.., 68] or [.., 132]");
    return keys.size(-1) == 68 ? hatrt::DType::kIndexKey68 : hatrt::DType::kIndexKey132;
}

// keys: float [B, N, Di] or uint8 [B, N, 68 | 132] (packed FP4 / FP8 index keys, Di == 128).
void indexer_topk(at::Tensor out, at::Tensor q, at::Tensor weights, at::Tensor keys, at::Tensor q_pos, int64_t ratio,
    int64_t topk, bool bf16_scores, int64_t num_sms, int64_t workspace_bytes, bool tensor_cores)
{
    for (auto* t : {&out, &q, &weights, &keys, &q_pos})
        check_cuda(*t, "indexer_topk input");
    HATRT_DEVICE_GUARD(q);
    TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 3 && out.size(2) == topk, "bad out");
    hatrt::IndexerTopKParams p;
    p.B = q.size(0), p.S = q.size(1), p.Hi = int32_t(q.size(2)), p.Di = int32_t(q.size(3)), p.N = keys.size(1);
    p.ratio = int32_t(ratio), p.topk = int32_t(topk), p.bf16_scores = bf16_scores;
    p.q = q.data_ptr(), p.q_dtype = fdtype(q);
    p.weights = weights.data_ptr(), p.weights_dtype = fdtype(weights);
    p.keys = keys.data_ptr();
    p.keys_dtype = key_dtype(keys);
    p.tensor_cores = tensor_cores;
    p.q_pos = q_pos.data_ptr(), p.q_pos_type = idtype(q_pos);
    p.out = out.data_ptr<int64_t>();
    p.num_sms = int32_t(num_sms);
    at::Tensor ws;
    size_t const bytes = workspace_bytes < 0 ? hatrt::indexer_topk_workspace_bytes(p.B * p.S, p.N)
                                             : size_t(workspace_bytes);
    if (bytes > 0)
    {
        ws = at::empty({int64_t(bytes)}, q.options().dtype(at::kByte));
        p.workspace = ws.data_ptr(), p.workspace_bytes = bytes;
    }
    char const* msg = hatrt::indexer_topk_check(p);
    finish("indexer_topk", msg, msg ? cudaSuccess : hatrt::indexer_topk(p, stream()));
}

bool indexer_uses_tensor_cores(at::Tensor q, at::Tensor keys, bool tensor_cores)
{
    hatrt::IndexerTopKParams p;
    p.Di = int32_t(q.size(-1)), p.q_dtype = fdtype(q), p.tensor_cores = tensor_cores;
    p.keys_dtype = key_dtype(keys);
    return hatrt::indexer_uses_tensor_cores(p);
}

// cache[rows, 68 | 132] (uint8, in place) <- FP4 / FP8-quantized src[n, 128]; slot optional.
void index_key_write(at::Tensor cache, at::Tensor src, c10::optional<at::Tensor> slot)
{
    check_cuda(cache, "cache");
    check_cuda(src, "src");
    HATRT_DEVICE_GUARD(src);
    TORCH_CHECK(cache.scalar_type() == at::kByte && (cache.size(-1) == 68 || cache.size(-1) == 132),
        "cache must be uint8 [.., 68] or [.., 132]");
    TORCH_CHECK(src.size(-1) == 128, "src must be [..., 128]");
    auto const [sl, st] = optional_index(slot, "slot");
    auto write = cache.size(-1) == 68 ? hatrt::index_key_write_68 : hatrt::index_key_write_132;
    finish("index_key_write", nullptr,
        write(src.numel() / 128, src.data_ptr(), fdtype(src), sl, st, cache.data_ptr<uint8_t>(), stream()));
}

// out[n, 128] float32 <- dequantized packed keys (slot optional).
void index_key_read(at::Tensor out, at::Tensor cache, c10::optional<at::Tensor> slot)
{
    check_cuda(cache, "cache");
    check_cuda(out, "out");
    HATRT_DEVICE_GUARD(cache);
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.size(-1) == 128, "out must be float32 [n, 128]");
    TORCH_CHECK(cache.scalar_type() == at::kByte && (cache.size(-1) == 68 || cache.size(-1) == 132),
        "cache must be uint8 [.., 68] or [.., 132]");
    auto const [sl, st] = optional_index(slot, "slot");
    auto read = cache.size(-1) == 68 ? hatrt::index_key_read_68 : hatrt::index_key_read_132;
    finish("index_key_read", nullptr,
        read(out.numel() / 128, cache.data_ptr<uint8_t>(), sl, st, out.data_ptr<float>(), stream()));
}

// out[B, N, D] float32 (optional) and/or cache[rows, 584] (optional) <- GatedCompress /
// OverlapGatedCompress (prev_kv / prev_score given = CSA).
void compress(c10::optional<at::Tensor> out, at::Tensor kv, at::Tensor score, c10::optional<at::Tensor> prev_kv,
    c10::optional<at::Tensor> prev_score, at::Tensor norm_weight, at::Tensor cos, at::Tensor sin, double eps,
    int64_t quant, c10::optional<at::Tensor> cache, c10::optional<at::Tensor> cache_slot)
{
    for (auto* t : {&kv, &score, &norm_weight, &cos, &sin})
        check_cuda(*t, "compress input");
    HATRT_DEVICE_GUARD(kv);
    bool const overlap = prev_kv.has_value();
    hatrt::CompressParams p;
    p.B = kv.size(0), p.N = kv.size(1), p.m = int32_t(kv.size(2));
    p.D = int32_t(overlap ? prev_kv->size(2) : kv.size(3));
    p.r = int32_t(2 * cos.size(-1));
    p.overlap = overlap, p.eps = float(eps), p.quant = int32_t(quant);
    p.kv = kv.data_ptr(), p.kv_dtype = fdtype(kv), p.score = score.data_ptr(), p.score_dtype = fdtype(score);
    if (overlap)
    {
        TORCH_CHECK(prev_score.has_value(), "prev_score needed with prev_kv");
        check_cuda(*prev_kv, "prev_kv");
        check_cuda(*prev_score, "prev_score");
        p.prev_kv = prev_kv->data_ptr(), p.prev_kv_dtype = fdtype(*prev_kv);
        p.prev_score = prev_score->data_ptr(), p.prev_score_dtype = fdtype(*prev_score);
    }
    p.norm_weight = norm_weight.data_ptr(), p.norm_weight_dtype = fdtype(norm_weight);
    p.cos = cos.data_ptr(), p.cos_dtype = fdtype(cos), p.sin = sin.data_ptr(), p.sin_dtype = fdtype(sin);
    if (out.has_value())
    {
        check_cuda(*out, "out");
        TORCH_CHECK(out->scalar_type() == at::kFloat, "out must be float32");
        p.out = out->data_ptr<float>();
    }
    if (cache.has_value())
    {
        check_cuda(*cache, "cache");
        TORCH_CHECK(cache->scalar_type() == at::kByte && (cache->size(-1) == 584 || cache->size(-1) == 68),
            "cache must be uint8 [.., 584] or [.., 68]");
        p.cache = cache->data_ptr<uint8_t>();
        std::tie(p.cache_slot, p.cache_slot_type) = optional_index(cache_slot, "cache_slot");
    }
    char const* msg = hatrt::compress_check(p);
    finish("compress", msg, msg ? cudaSuccess : hatrt::compress(p, stream()));
}

// cache[rows, 584] (uint8, in place) <- quantized src[n, 512]; slot optional.
void kv_write_584(at::Tensor cache, at::Tensor src, c10::optional<at::Tensor> slot)
{
    check_cuda(cache, "cache");
    check_cuda(src, "src");
    HATRT_DEVICE_GUARD(src);
    TORCH_CHECK(cache.scalar_type() == at::kByte && cache.size(-1) == 584, "cache must be uint8 [.., 584]");
    TORCH_CHECK(src.size(-1) == 512, "src must be [..., 512]");
    hatrt::KvWriteParams p;
    p.n = src.numel() / 512;
    p.src = src.data_ptr(), p.src_dtype = fdtype(src);
    std::tie(p.slot, p.slot_type) = optional_index(slot, "slot");
    p.cache = cache.data_ptr<uint8_t>();
    char const* msg = hatrt::kv_write_584_check(p);
    finish("kv_write_584", msg, msg ? cudaSuccess : hatrt::kv_write_584(p, stream()));
}

// out[n, 512] float32 <- dequantized cache rows (slot optional).
void kv_read_584(at::Tensor out, at::Tensor cache, c10::optional<at::Tensor> slot)
{
    check_cuda(cache, "cache");
    check_cuda(out, "out");
    HATRT_DEVICE_GUARD(cache);
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.size(-1) == 512, "out must be float32 [n, 512]");
    auto const [s, st] = optional_index(slot, "slot");
    finish("kv_read_584", nullptr,
        hatrt::kv_read_584(out.numel() / 512, cache.data_ptr<uint8_t>(), s, st, out.data_ptr<float>(), stream()));
}

// out[T, d] float32 <- RoutedExperts (x [T, d], expert_idx / expert_weights [T, k], w1 / w3 [E, I, d],
// w2 [E, d, I]); workspace_bytes < 0: exactly routed_experts_workspace_bytes.
void routed_experts(at::Tensor out, at::Tensor x, at::Tensor expert_idx, at::Tensor expert_weights, at::Tensor w1,
    at::Tensor w3, at::Tensor w2, double swiglu_limit, int64_t workspace_bytes, bool tensor_cores)
{
    for (auto* t : {&out, &x, &expert_idx, &expert_weights, &w1, &w3, &w2})
        check_cuda(*t, "routed_experts input");
    HATRT_DEVICE_GUARD(x);
    TORCH_CHECK(x.dim() == 2 && expert_idx.dim() == 2 && expert_weights.sizes() == expert_idx.sizes()
            && expert_idx.size(0) == x.size(0),
        "x must be [T, d], expert_idx / expert_weights [T, k]");
    TORCH_CHECK(w1.dim() == 3 && w3.sizes() == w1.sizes() && w2.dim() == 3 && w2.size(0) == w1.size(0)
            && w1.size(2) == x.size(1) && w2.size(1) == x.size(1) && w2.size(2) == w1.size(1),
        "w1, w3 must be [E, I, d], w2 [E, d, I]");
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.sizes() == x.sizes(), "out must be float32 [T, d]");
    hatrt::RoutedExpertsParams p;
    p.T = x.size(0), p.k = int32_t(expert_idx.size(1)), p.E = int32_t(w1.size(0));
    p.d = int32_t(x.size(1)), p.I = int32_t(w1.size(1));
    p.swiglu_limit = float(swiglu_limit);
    p.x = x.data_ptr(), p.x_dtype = fdtype(x);
    p.expert_idx = expert_idx.data_ptr(), p.expert_idx_type = idtype(expert_idx);
    p.expert_weights = expert_weights.data_ptr(), p.expert_weights_dtype = fdtype(expert_weights);
    p.w1 = w1.data_ptr(), p.w1_dtype = fdtype(w1);
    p.w3 = w3.data_ptr(), p.w3_dtype = fdtype(w3);
    p.w2 = w2.data_ptr(), p.w2_dtype = fdtype(w2);
    p.out = out.data_ptr<float>();
    p.tensor_cores = tensor_cores;
    size_t const bytes = workspace_bytes < 0 ? hatrt::routed_experts_workspace_bytes(p.T, p.k, p.E, p.d, p.I)
                                             : size_t(workspace_bytes);
    at::Tensor ws;
    if (bytes > 0)
    {
        ws = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
        p.workspace = ws.data_ptr(), p.workspace_bytes = bytes;
    }
    char const* msg = hatrt::routed_experts_check(p);
    finish("routed_experts", msg, msg ? cudaSuccess : hatrt::routed_experts(p, stream()));
}

bool routed_experts_uses_tensor_cores(at::Tensor x, at::Tensor w, bool tensor_cores)
{
    hatrt::RoutedExpertsParams p;
    p.x_dtype = fdtype(x), p.w1_dtype = p.w3_dtype = p.w2_dtype = fdtype(w), p.tensor_cores = tensor_cores;
    return hatrt::routed_experts_uses_tensor_cores(p);
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("sparse_attention", &sparse_attention, "HybridSparseAttention into out", py::arg("out"), py::arg("q"),
        py::arg("q_pos"), py::arg("window_kv"), py::arg("window_pos"), py::arg("entries"), py::arg("entry_idx"),
        py::arg("sink"), py::arg("window"), py::arg("scale"), py::arg("num_sms") = 0, py::arg("use_workspace") = true,
        py::arg("tensor_cores") = true);
    m.def("uses_tensor_cores", &uses_tensor_cores, "whether sparse_attention runs on the tensor-core kernel",
        py::arg("q"), py::arg("head_dim"), py::arg("tensor_cores") = true);
    m.def("indexer_topk", &indexer_topk, "IndexerTopK into out", py::arg("out"), py::arg("q"), py::arg("weights"),
        py::arg("keys"), py::arg("q_pos"), py::arg("ratio"), py::arg("topk"), py::arg("bf16_scores") = false,
        py::arg("num_sms") = 0, py::arg("workspace_bytes") = -1, py::arg("tensor_cores") = true);
    m.def("indexer_uses_tensor_cores", &indexer_uses_tensor_cores, "whether indexer_topk scores on tensor cores",
        py::arg("q"), py::arg("keys"), py::arg("tensor_cores") = true);
    m.def("index_key_write", &index_key_write, "quantize indexer keys into packed entries (68 B FP4 / 132 B FP8)",
        py::arg("cache"), py::arg("src"), py::arg("slot") = py::none());
    m.def("index_key_read", &index_key_read, "dequantize packed index keys (68 B FP4 / 132 B FP8)", py::arg("out"),
        py::arg("cache"), py::arg("slot") = py::none());
    m.def("compress", &compress, "GatedCompress / OverlapGatedCompress", py::arg("out"), py::arg("kv"),
        py::arg("score"), py::arg("prev_kv"), py::arg("prev_score"), py::arg("norm_weight"), py::arg("cos"),
        py::arg("sin"), py::arg("eps"), py::arg("quant") = 0, py::arg("cache") = py::none(),
        py::arg("cache_slot") = py::none());
    m.def("kv_write_584", &kv_write_584, "quantize vectors into 584-byte entries", py::arg("cache"), py::arg("src"),
        py::arg("slot") = py::none());
    m.def("routed_experts", &routed_experts, "RoutedExperts into out (grouped GEMM over the picked experts)",
        py::arg("out"), py::arg("x"), py::arg("expert_idx"), py::arg("expert_weights"), py::arg("w1"), py::arg("w3"),
        py::arg("w2"), py::arg("swiglu_limit") = 0.0, py::arg("workspace_bytes") = -1, py::arg("tensor_cores") = true);
    m.def("routed_experts_uses_tensor_cores", &routed_experts_uses_tensor_cores,
        "whether routed_experts runs on the tensor-core kernels (x and all experts of dtype w)", py::arg("x"),
        py::arg("w"), py::arg("tensor_cores") = true);
    m.def("kv_read_584", &kv_read_584, "dequantize 584-byte entries", py::arg("out"), py::arg("cache"),
        py::arg("slot") = py::none());
}
