"""The hatrt custom-op domain: torch ops (custom_ops.py), their ONNX functions and export (onnx_ops.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from exporter import custom_ops, onnx_ops, ops  # noqa: E402

ATOL = 1e-5
# torch.export names each Dim once; the warnings about reused axis names are noise here.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name")
OP_NAMES = sorted(custom_ops.OPS)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- sample inputs
def compress_inputs(seed, *, batch=2, blocks=3, m=4, dim=128, rope_pairs=32, overlap=True, no_prev=False):
    g = seeded(seed)
    width = 2 * dim if overlap else dim
    kv = torch.randn(batch, blocks, m, width, generator=g)
    score = torch.randn(batch, blocks, m, width, generator=g) * 2
    x = dict(kv=kv, score=score, norm_weight=torch.randn(dim, generator=g),
             cos=torch.randn(batch, blocks, rope_pairs, generator=g),
             sin=torch.randn(batch, blocks, rope_pairs, generator=g))
    if overlap:
        x["prev_kv"] = torch.zeros(batch, m, dim) if no_prev else torch.randn(batch, m, dim, generator=g)
        x["prev_score"] = torch.full((batch, m, dim), -math.inf) if no_prev else torch.randn(batch, m, dim, generator=g)
    return x


def indexer_inputs(seed, *, batch=2, seq=5, heads=4, dim=16, n=6, start=0, ties=False):
    g = seeded(seed)
    q = torch.randn(batch, seq, heads, dim, generator=g)
    w = torch.randn(batch, seq, heads, generator=g)
    keys = torch.randn(batch, n, dim, generator=g)
    if ties:  # exact ties: duplicated keys, integer values, all-zero queries (ReLU -> every score 0)
        q, keys = q.round(), keys.round()
        keys[:, 1::2] = keys[:, :1]
        q[:, ::3] = 0
    q_pos = (torch.arange(seq) + start).expand(batch, seq).contiguous()
    return dict(q=q, weights=w, keys=keys, q_pos=q_pos)


def attention_inputs(seed, *, batch=2, seq=5, heads=3, dim=16, window_len=9, n=4, k=3):
    g = seeded(seed)
    window_pos = torch.arange(window_len).expand(batch, window_len).clone()
    window_pos[:, 0] = -1  # an empty ring slot
    idx = torch.randint(-1, n, (batch, seq, k), generator=g) if n else torch.full((batch, seq, k), -1)
    return dict(q=torch.randn(batch, seq, heads, dim, generator=g),
                q_pos=(torch.arange(seq) + window_len - seq).expand(batch, seq).contiguous(),
                window_kv=torch.randn(batch, window_len, dim, generator=g), window_pos=window_pos,
                entries=torch.randn(batch, n, dim, generator=g), entry_idx=idx, sink=torch.randn(heads, generator=g))


def call(op_type, inputs, **attrs):
    names = onnx_ops.SIGNATURES[op_type][0]
    return custom_ops.OPS[op_type](*[inputs[n] for n in names], **attrs)


def reference(op_type, inputs, **attrs):
    """The same computation through exporter/ops.py directly."""
    x = inputs
    if op_type in ("GatedCompress", "OverlapGatedCompress"):
        quant = {0: None, 1: "fp8", 2: "fp4"}[attrs.get("quant", 0)]
        return ops.compress_blocks(x["kv"], x["score"], x.get("prev_kv"), x.get("prev_score"), x["norm_weight"],
                                   x["cos"], x["sin"], eps=attrs["eps"], quant=quant)
    if op_type == "IndexerTopK":
        return ops.indexer_topk(x["q"], x["weights"], x["keys"], x["q_pos"], ratio=attrs["ratio"], topk=attrs["topk"],
                                bf16_scores=bool(attrs.get("bf16_scores", False)))
    return ops.sparse_attention(x["q"], x["q_pos"], x["window_kv"], x["window_pos"], x["entries"], x["entry_idx"],
                                x["sink"], window=attrs["window"], scale=attrs["scale"])


CASES = [
    ("GatedCompress", dict(overlap=False), dict(eps=1e-6, quant=0)),
    ("GatedCompress", dict(overlap=False, blocks=1, m=8), dict(eps=1e-6, quant=1)),
    ("GatedCompress", dict(overlap=False, dim=64, rope_pairs=8), dict(eps=1e-5, quant=2)),
    ("OverlapGatedCompress", dict(), dict(eps=1e-6, quant=0)),
    ("OverlapGatedCompress", dict(no_prev=True, blocks=1), dict(eps=1e-6, quant=1)),
    ("OverlapGatedCompress", dict(dim=32, rope_pairs=4, blocks=2), dict(eps=1e-6, quant=2)),
    ("OverlapGatedCompress", dict(dim=128, rope_pairs=32, blocks=5, m=2), dict(eps=1e-6, quant=1)),
    ("IndexerTopK", dict(), dict(ratio=4, topk=3, bf16_scores=False)),
    ("IndexerTopK", dict(start=3), dict(ratio=4, topk=8, bf16_scores=True)),  # topk > N
    ("IndexerTopK", dict(n=0, start=10), dict(ratio=4, topk=4, bf16_scores=False)),  # no entries at all
    ("IndexerTopK", dict(seq=3), dict(ratio=4, topk=2, bf16_scores=False)),  # nothing visible yet
    ("IndexerTopK", dict(seq=7, n=9, ties=True, heads=3, dim=8), dict(ratio=1, topk=4, bf16_scores=False)),
    ("IndexerTopK", dict(seq=7, n=9, ties=True, start=5), dict(ratio=2, topk=12, bf16_scores=True)),
    ("HybridSparseAttention", dict(), dict(window=4, scale=0.25)),
    ("HybridSparseAttention", dict(n=0, k=2, seq=3, window_len=3), dict(window=8, scale=0.3)),  # no entries
    ("HybridSparseAttention", dict(k=0), dict(window=3, scale=0.3)),  # empty selection width
    ("HybridSparseAttention", dict(dim=32, heads=4, window_len=12, n=7, k=5, seq=6), dict(window=6, scale=32 ** -0.5)),
]
CASE_IDS = [f"{op}-{i}" for i, (op, _, _) in enumerate(CASES)]


def make_inputs(op_type, kw, seed=0):
    if op_type in ("GatedCompress", "OverlapGatedCompress"):
        return compress_inputs(seed, **kw)
    if op_type == "IndexerTopK":
        return indexer_inputs(seed, **kw)
    return attention_inputs(seed, **kw)


# --------------------------------------------------------------------------- torch side
def test_op_names_collide_with_no_onnx_or_ort_op():
    taken = {s.name for s in onnx.defs.get_all_schemas_with_history()}
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    if hasattr(ort_c, "get_all_operator_schema"):
        taken |= {s.name for s in ort_c.get_all_operator_schema()}
    assert "SparseAttention" in taken  # the ORT contrib op we must not shadow
    for name in OP_NAMES:
        assert name not in taken
        assert str(custom_ops.OPS[name]).startswith("hatrt.")


@pytest.mark.parametrize("op_type,kw,attrs", CASES, ids=CASE_IDS)
def test_eager_kernel_is_ops_py(op_type, kw, attrs):
    x = make_inputs(op_type, kw)
    got, want = call(op_type, x, **attrs), reference(op_type, x, **attrs)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("op_type,kw,attrs", CASES, ids=CASE_IDS)
def test_opcheck(op_type, kw, attrs):
    x = make_inputs(op_type, kw)
    names = onnx_ops.SIGNATURES[op_type][0]
    torch.library.opcheck(custom_ops.OPS[op_type], tuple(x[n] for n in names), attrs)


def test_reduced_precision_inputs_keep_contract_dtypes():
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in attention_inputs(3).items()}
    out = call("HybridSparseAttention", x, window=4, scale=0.25)
    assert out.dtype == torch.bfloat16
    torch.library.opcheck(custom_ops.OPS["HybridSparseAttention"],
                          tuple(x[n] for n in onnx_ops.SIGNATURES["HybridSparseAttention"][0]),
                          dict(window=4, scale=0.25))
    c = {k: v.half() for k, v in compress_inputs(3, overlap=False).items()}
    assert call("GatedCompress", c, eps=1e-6, quant=0).dtype == torch.float32  # compress_blocks returns fp32


def test_quant_codes_and_compress_router():
    assert [custom_ops.quant_code(q) for q in (None, "fp8", "fp4", 0, 1, 2)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError):
        custom_ops.quant_code("int8")
    with pytest.raises(ValueError):
        call("GatedCompress", compress_inputs(0, overlap=False), eps=1e-6, quant=3)
    x = compress_inputs(1)
    got = custom_ops.compress(x["kv"], x["score"], x["prev_kv"], x["prev_score"], x["norm_weight"], x["cos"],
                              x["sin"], eps=1e-6, quant="fp8")
    assert torch.equal(got, reference("OverlapGatedCompress", x, eps=1e-6, quant=1))
    with pytest.raises(ValueError):
        custom_ops.compress(x["kv"], x["score"], x["prev_kv"], None, x["norm_weight"], x["cos"], x["sin"], eps=1e-6)


# --------------------------------------------------------------------------- ONNX functions
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.int64: TensorProto.INT64, torch.float16: TensorProto.FLOAT16}


def single_node_model(op_type, inputs, attrs, out_rank):
    names = onnx_ops.SIGNATURES[op_type][0]
    node = helper.make_node(op_type, names, ["out"], domain=onnx_ops.DOMAIN, name="the_op", **attrs,
                            plugin_namespace="hatrt", plugin_version="1")
    out_type = TensorProto.INT64 if op_type == "IndexerTopK" else TensorProto.FLOAT
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info(n, _ONNX_DTYPE[inputs[n].dtype], [None] * inputs[n].dim())
                               for n in names],
                              [helper.make_tensor_value_info("out", out_type, [None] * out_rank)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def run_ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def assert_fake_quant_close(got, want, quant):
    """Within ATOL, except for rare rounding flips of fake-quantized values.

    Quantization turns an ulp-level difference before rounding (summation order in ReduceMean /
    ReduceSum, exp in Softmax) that straddles a rounding boundary into one FP8/FP4 step (or, for a
    block amax straddling a power of two, a different scale for that block). Allow that in at most
    one vector (or 5% of them), and only by one step: FP8 steps are <= 1/8 of the value, FP4 steps
    <= 2 * scale <= 2/3 of the block maximum.
    """
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = np.abs(got.astype(np.float64) - want)
    if quant == 0:
        assert diff.max() <= ATOL
        return
    flipped = (diff > ATOL).any(-1)
    assert flipped.sum() <= max(1, flipped.size // 20)
    size = np.maximum(np.abs(got), np.abs(want))
    step = 0.125 * size + size.max(-1, keepdims=True) * 2.0 ** -12 if quant == 1 else \
        size.max(-1, keepdims=True) * 0.67
    assert (diff <= np.maximum(step, ATOL)).all()


def assert_matches(op_type, got, want, quant=0):
    want = want.numpy()
    assert got.shape == want.shape and got.dtype == want.dtype
    if op_type == "IndexerTopK":
        np.testing.assert_array_equal(got, want)  # exact, rank order and tie rule included
    else:
        assert_fake_quant_close(got, want, quant)


@pytest.mark.parametrize("op_type,kw,attrs", CASES, ids=CASE_IDS)
def test_function_matches_eager_in_onnxruntime(op_type, kw, attrs):
    x = make_inputs(op_type, kw, seed=5)
    want = call(op_type, x, **attrs)
    onnx_attrs = {k: int(v) if isinstance(v, bool) else v for k, v in attrs.items()}
    model = onnx_ops.attach_functions(single_node_model(op_type, x, onnx_attrs, want.dim()))
    onnx.checker.check_model(model, full_check=True)
    assert onnx_ops.check_hatrt_nodes(model) == []
    assert_matches(op_type, run_ort(model, x)[0], want, attrs.get("quant", 0))


def test_function_attribute_defaults():
    x = compress_inputs(2, overlap=False)
    model = onnx_ops.attach_functions(single_node_model("GatedCompress", x, dict(eps=1e-6), 3))  # quant omitted
    assert_matches("GatedCompress", run_ort(model, x)[0], call("GatedCompress", x, eps=1e-6))
    x = indexer_inputs(2)
    model = onnx_ops.attach_functions(single_node_model("IndexerTopK", x, dict(ratio=2, topk=3), 3))
    assert_matches("IndexerTopK", run_ort(model, x)[0], call("IndexerTopK", x, ratio=2, topk=3))


def test_fp8_and_fp4_functions_hit_quantization_edges():
    """Large and tiny blocks (scale > 1, amax floor), exact powers of two, rounding ties of e2m1."""
    x = compress_inputs(4, overlap=False, dim=128, rope_pairs=32, blocks=4)
    x["kv"][:, 0] *= 1e4
    x["kv"][:, 1] *= 1e-7
    x["norm_weight"] = torch.tensor([2.0 ** (i % 9 - 4) for i in range(128)]) * torch.tensor([1.0, -1.0]).repeat(64)
    for quant in (1, 2):
        want = call("GatedCompress", x, eps=1e-6, quant=quant)
        model = onnx_ops.attach_functions(single_node_model("GatedCompress", x, dict(eps=1e-6, quant=quant), 3))
        assert_matches("GatedCompress", run_ort(model, x)[0], want, quant)


def test_pow2_scale_is_the_exact_smallest_power_of_two():
    """ONNX scale = smallest power of two >= max(amax, 1e-4) / qmax. torch's exp2(ceil(log2(.)))
    agrees except within a few ulps ABOVE a power of two, where its fp32 log2 rounds down."""
    b = onnx_ops._Body("t")
    b.nodes.append(helper.make_node("Identity", [onnx_ops._pow2_scale(b, "amax", 6.0)], ["s"]))
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("amax", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [None])])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    powers = (6.0 * 2.0 ** np.arange(-20, 40)).astype(np.float32)
    amax = np.concatenate([powers, np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf)),
                           np.float32(np.random.RandomState(0).lognormal(0, 8, 5000)), np.float32([0, 1e-9])])
    got = sess.run(None, {"amax": amax})[0]
    y = np.maximum(amax, np.float32(1e-4)) / np.float32(6.0)
    mant, exp = np.frexp(y)
    exact = np.ldexp(np.float32(1), exp - (mant == 0.5)).astype(np.float32)
    np.testing.assert_array_equal(got, exact)
    from exporter.quant import pow2_scale

    torch_s = pow2_scale(torch.from_numpy(amax), 6.0).numpy()
    above = np.isin(amax, np.nextafter(powers, np.float32(np.inf)))
    np.testing.assert_array_equal(got[~above], torch_s[~above])


def test_half_precision_inputs_in_onnxruntime():
    x = {k: v.half() if v.is_floating_point() else v for k, v in attention_inputs(7).items()}
    want = call("HybridSparseAttention", x, window=4, scale=0.25)
    model = onnx_ops.attach_functions(single_node_model("HybridSparseAttention", x, dict(window=4, scale=0.25), 4))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    got = run_ort(model, x)[0]
    assert got.dtype == np.float16 and np.abs(got.astype(np.float32) - want.float().numpy()).max() <= 2e-3
    c = {k: v.half() for k, v in compress_inputs(7, overlap=False).items()}
    model = onnx_ops.attach_functions(single_node_model("GatedCompress", c, dict(eps=1e-6, quant=1), 3))
    assert_matches("GatedCompress", run_ort(model, c)[0], call("GatedCompress", c, eps=1e-6, quant=1), 1)


@pytest.mark.parametrize("opset", [19, 21, 25])
def test_functions_follow_the_model_opset(opset):
    for op_type, kw, attrs in CASES[::4]:
        x = make_inputs(op_type, kw, seed=9)
        want = call(op_type, x, **attrs)
        model = single_node_model(op_type, x, {k: int(v) if isinstance(v, bool) else v for k, v in attrs.items()},
                                  want.dim())
        model.opset_import[0].version = opset
        onnx_ops.attach_functions(model)
        assert {o.domain: o.version for o in model.functions[0].opset_import} == {"": opset}
        onnx.checker.check_model(model, full_check=True)
        assert_matches(op_type, run_ort(model, x)[0], want, attrs.get("quant", 0))
    with pytest.raises(ValueError, match="opset"):
        onnx_ops.function_proto("IndexerTopK", 18)


def test_every_function_passes_the_checker_alone():
    for op_type, proto in onnx_ops.function_protos().items():
        assert proto.domain == "hatrt" and proto.name == op_type
        assert {o.domain: o.version for o in proto.opset_import} == {"": 23}
        model = helper.make_model(helper.make_graph([], "g", [], []), functions=[proto],
                                  opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("hatrt", 1)])
        onnx.checker.check_model(model)
        used = {n.op_type for n in proto.node}
        assert all(onnx.defs.has(t) for t in used - {"Constant"})


def test_attach_is_idempotent_and_strip_keeps_nodes():
    x = attention_inputs(0)
    model = single_node_model("HybridSparseAttention", x, dict(window=4, scale=0.25), 4)
    assert "no model-local function" in " ".join(onnx_ops.check_hatrt_nodes(model))
    onnx_ops.attach_functions(model)
    onnx_ops.attach_functions(model)
    assert [f.name for f in model.functions] == ["HybridSparseAttention"]
    assert [o.domain for o in model.opset_import].count("hatrt") == 1
    twin = onnx_ops.strip_functions(model)
    assert len(model.functions) == 1 and len(twin.functions) == 0
    assert [n.op_type for n in twin.graph.node] == ["HybridSparseAttention"]
    assert onnx_ops.check_hatrt_nodes(twin, require_functions=False) == []
    onnx.checker.check_model(twin)


# --------------------------------------------------------------------------- end-to-end export demo
DIM, ROPE_PAIRS, IDX_DIM, M, TOPK, WINDOW = 128, 32, 32, 4, 3, 4


class Demo(torch.nn.Module):
    """A miniature CSA + HCA layer made of the hatrt ops only."""

    def __init__(self):
        super().__init__()
        g = seeded(123)
        self.norm = torch.nn.Parameter(torch.randn(DIM, generator=g))
        self.index_norm = torch.nn.Parameter(torch.randn(IDX_DIM, generator=g))
        self.sink = torch.nn.Parameter(torch.randn(3, generator=g))
        self.register_buffer("inv_freq", 1.0 / 1000 ** (torch.arange(ROPE_PAIRS) / ROPE_PAIRS))
        self.register_buffer("index_inv_freq", 1.0 / 1000 ** (torch.arange(IDX_DIM // 4) / (IDX_DIM // 4)))

    def forward(self, kv, score, prev_kv, prev_score, ikv, iscore, iprev_kv, iprev_score, block_pos, q, iq, iw, q_pos,
                window_kv, window_pos):
        angles = (block_pos * M).float().unsqueeze(-1)
        cos, sin = (angles * self.inv_freq).cos(), (angles * self.inv_freq).sin()
        icos, isin = (angles * self.index_inv_freq).cos(), (angles * self.index_inv_freq).sin()
        entries = torch.ops.hatrt.OverlapGatedCompress(kv, score, prev_kv, prev_score, self.norm, cos, sin,
                                                       eps=1e-6, quant=custom_ops.QUANT_FP8)
        keys = torch.ops.hatrt.OverlapGatedCompress(ikv, iscore, iprev_kv, iprev_score, self.index_norm, icos, isin,
                                                    eps=1e-6, quant=custom_ops.QUANT_FP4)
        hca = torch.ops.hatrt.GatedCompress(kv[..., :DIM], score[..., DIM:], self.norm, cos, sin, eps=1e-6, quant=0)
        idx = torch.ops.hatrt.IndexerTopK(iq, iw, keys, q_pos, ratio=M, topk=TOPK, bf16_scores=True)
        out = torch.ops.hatrt.HybridSparseAttention(q, q_pos, window_kv, window_pos, entries, idx, self.sink,
                                                    window=WINDOW, scale=DIM ** -0.5)
        return out * 2.0, idx, entries, keys, hca


def demo_inputs(seed, batch, seq, blocks, window_len, start, zero_queries=False):
    g = seeded(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q_pos = (torch.arange(seq) + start).expand(batch, seq).contiguous()
    window_pos = (torch.arange(window_len) + start + seq - window_len).expand(batch, window_len).contiguous()
    iq = r(batch, seq, 4, IDX_DIM)
    if zero_queries:  # every indexer score exactly 0: full ties, broken by the lowest index
        iq[:, ::2] = 0
    return dict(kv=r(batch, blocks, M, 2 * DIM), score=r(batch, blocks, M, 2 * DIM), prev_kv=r(batch, M, DIM),
                prev_score=r(batch, M, DIM), ikv=r(batch, blocks, M, 2 * IDX_DIM),
                iscore=r(batch, blocks, M, 2 * IDX_DIM),
                iprev_kv=torch.zeros(batch, M, IDX_DIM), iprev_score=torch.full((batch, M, IDX_DIM), -math.inf),
                block_pos=torch.arange(blocks).expand(batch, blocks).contiguous(), q=r(batch, seq, 3, DIM),
                iq=iq, iw=r(batch, seq, 4), q_pos=q_pos, window_kv=r(batch, window_len, DIM), window_pos=window_pos)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxscript")
    from torch.export import Dim

    b, s, n, l = Dim("batch"), Dim("seq"), Dim("blocks"), Dim("window_len")
    dims = dict(kv={0: b, 1: n}, score={0: b, 1: n}, prev_kv={0: b}, prev_score={0: b}, ikv={0: b, 1: n},
                iscore={0: b, 1: n}, iprev_kv={0: b}, iprev_score={0: b}, block_pos={0: b, 1: n}, q={0: b, 1: s},
                iq={0: b, 1: s}, iw={0: b, 1: s}, q_pos={0: b, 1: s}, window_kv={0: b, 1: l}, window_pos={0: b, 1: l})
    model = Demo().eval()
    example = demo_inputs(0, batch=2, seq=5, blocks=3, window_len=7, start=8)
    program = onnx_ops.export(model, (), kwargs=example, dynamic_shapes=dims)
    path = tmp_path_factory.mktemp("onnx") / "demo.onnx"
    program.save(str(path))
    twin_path = path.with_name("demo.trt.onnx")
    import onnx_ir as ir

    ir.save(onnx_ops.strip_functions(program), str(twin_path))
    return model, path, twin_path


def test_export_structure(exported):
    _, path, twin_path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    types = sorted(n.op_type for n in onnx_ops.hatrt_nodes(proto))
    assert types == sorted(["OverlapGatedCompress", "OverlapGatedCompress", "GatedCompress", "IndexerTopK",
                            "HybridSparseAttention"])
    assert all(n.domain == "hatrt" for n in onnx_ops.hatrt_nodes(proto))
    assert onnx_ops.check_hatrt_nodes(proto) == []  # plugin fields + a function per node
    assert {(f.domain, f.name) for f in proto.functions} == {("hatrt", t) for t in types}
    assert {o.domain: o.version for o in proto.opset_import}["hatrt"] == 1
    attrs = {n.op_type: {a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in onnx_ops.hatrt_nodes(proto)}
    assert attrs["IndexerTopK"] == {"ratio": M, "topk": TOPK, "bf16_scores": 1, "plugin_namespace": b"hatrt",
                                    "plugin_version": b"1"}
    assert attrs["HybridSparseAttention"]["window"] == WINDOW

    twin = onnx.load(str(twin_path))
    assert len(twin.functions) == 0
    assert sorted(n.op_type for n in onnx_ops.hatrt_nodes(twin)) == types
    assert onnx_ops.check_hatrt_nodes(twin, require_functions=False) == []
    onnx.checker.check_model(twin)
    assert len(onnx.load(str(path)).functions) == len(set(types))  # stripping left the original alone


def test_inlined_export_still_runs(exported):
    """What ONNXProgram.optimize() or any inliner makes of the file (functions expanded into the
    graph) must still load in ONNX Runtime and compute the same: guards ORT's Q/DQ fusions."""
    model, path, _ = exported
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(onnx.load(str(path)))
    assert not onnx_ops.hatrt_nodes(inlined) and not inlined.functions
    x = demo_inputs(4, batch=2, seq=4, blocks=3, window_len=6, start=9)
    check_demo_outputs(model, x, run_ort(inlined, x))


def check_demo_outputs(model, x, got):
    """Every stage against eager: the compressors on the same inputs, the indexer and the attention
    on ONNX Runtime's own upstream results (so that a rare fake-quant rounding flip upstream
    cannot cascade), and the whole chain end to end whenever no flip happened."""
    out, idx, entries, keys, hca = got
    with torch.no_grad():
        want = model(**x)
    assert_fake_quant_close(entries, want[2].numpy(), custom_ops.QUANT_FP8)
    assert_fake_quant_close(keys, want[3].numpy(), custom_ops.QUANT_FP4)
    assert_fake_quant_close(hca, want[4].numpy(), custom_ops.QUANT_NONE)
    stage_idx = torch.ops.hatrt.IndexerTopK(x["iq"], x["iw"], torch.from_numpy(keys), x["q_pos"], ratio=M, topk=TOPK,
                                            bf16_scores=True)
    np.testing.assert_array_equal(idx, stage_idx.numpy())
    with torch.no_grad():
        stage_out = 2.0 * torch.ops.hatrt.HybridSparseAttention(
            x["q"], x["q_pos"], x["window_kv"], x["window_pos"], torch.from_numpy(entries), torch.from_numpy(idx),
            model.sink, window=WINDOW, scale=DIM ** -0.5)
    assert out.dtype == np.float32 and np.abs(out - stage_out.numpy()).max() <= ATOL
    if np.array_equal(keys, want[3].numpy()) and np.abs(entries - want[2].numpy()).max() <= ATOL:
        np.testing.assert_array_equal(idx, want[1].numpy())
        assert np.abs(out - want[0].numpy()).max() <= ATOL
    return want


@pytest.mark.parametrize("shape", [
    dict(seed=1, batch=3, seq=7, blocks=5, window_len=12, start=20),
    dict(seed=2, batch=1, seq=3, blocks=2, window_len=4, start=0),  # no entry visible to any query
    dict(seed=3, batch=2, seq=6, blocks=4, window_len=9, start=13, zero_queries=True),  # forced score ties
], ids=["large", "zero-visible", "ties"])
def test_export_runs_in_onnxruntime(exported, shape):
    model, path, _ = exported
    x = demo_inputs(**shape)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})
    want = check_demo_outputs(model, x, got)
    idx = want[1]
    if shape["start"] == 0:
        assert (idx == -1).all()
    if shape.get("zero_queries"):  # all-zero rows tie everywhere: the lowest visible indices, in order
        visible = (x["q_pos"][:, ::2] + 1) // M
        expect = torch.where(torch.arange(TOPK) < visible.unsqueeze(-1), torch.arange(TOPK), -1)
        assert torch.equal(idx[:, ::2], expect)
