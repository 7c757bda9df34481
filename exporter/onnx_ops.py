"""ONNX side of the ``hatrt`` custom-op domain (exporter/custom_ops.py).

Three pieces:

* ``CUSTOM_TRANSLATION_TABLE`` for ``torch.onnx.export(dynamo=True, opset_version=23, ...)``:
  every ``torch.ops.hatrt.*`` op becomes ONE bare node in domain ``hatrt`` (version 1) carrying
  its attributes plus ``plugin_namespace="hatrt"`` and ``plugin_version="1"``, the fields the
  TensorRT ONNX parser uses to pick the plugin. The translations go through an onnxscript ``Op``
  built on an in-memory ``onnx.defs.OpSchema``, not an onnxscript function: the exporter inlines
  model-local functions, which would lose the custom node.
* ``function_protos()``: for each op a model-local ONNX function (domain ``hatrt``, standard ops
  of the model's default opset only) with the SAME numerics as exporter/ops.py: fp32 math, ONNX
  TopK's lower-index-first tie rule, -1 padding, the sink in the softmax denominator, a zero dummy
  entry so that empty entry sets never index out of range, FP8 e4m3 fake-quant via
  QuantizeLinear/DequantizeLinear (float8e4m3fn, power-of-two block scales) and FP4 e2m1 via an
  explicit round-to-nearest-even table after an exact Sylvester-Hadamard butterfly (a Loop).
  ONNX Runtime (and TensorRT when the plugin library is absent) runs these bodies.
* ``attach_functions(model)`` adds the functions of every hatrt op a model uses, plus the
  ``hatrt`` opset import, after export; ``strip_functions(model)`` makes the TensorRT twin (custom
  nodes kept, functions removed, so a missing plugin fails loudly instead of silently building the
  slow function body). Both accept an ``onnx.ModelProto``, an ``onnx_ir.Model`` or a
  ``torch.onnx.ONNXProgram``.

Function attributes: GatedCompress / OverlapGatedCompress ``eps`` (float, required), ``quant``
(int, default 0); IndexerTopK ``ratio``, ``topk`` (int, required), ``bf16_scores`` (int 0/1,
default 0); HybridSparseAttention ``window`` (int), ``scale`` (float), both required;
RoutedExperts ``swiglu_limit`` (float, default 0 = no clamp; its body is dense: every expert on
every token, weighted by the one-hot sum of the picks, see docs/moe.md). Every
function also declares ``plugin_namespace`` / ``plugin_version`` (strings, defaults "hatrt"/"1").

Known numeric differences to the torch reference: summation order inside MatMul / ReduceSum /
ReduceMean and the exp of Softmax differ at ulp level (measured max |error| 4e-6 in fp32); fake
quantization turns such a difference into one FP8/FP4 step when it straddles a rounding boundary
(measured: 1 of 680 random single-op cases, one element). The power-of-two scale is the exact
smallest power of two >= max(amax, 1e-4)/qmax here, in quant.pow2_scale (log2 corrected by two
exact comparisons) and in kernels deriving ue8m0 scales from exponent bits.

Pitfalls (measured with torch 2.13, onnxscript 0.7.2, onnxruntime 1.32):
* ``ONNXProgram.optimize()`` inlines model-local functions, custom nodes included: attach the
  functions last, after export/optimize, and save then.
* ORT's ClipQuantFusion crashes on a Clip feeding a float8 QuantizeLinear ("Unexpected data
  type for QuantizeLinear input y_zero_point of 17"); onnxscript's optimizer rewrites Max/Min
  pairs into Clip. The FP8 path therefore relies on QuantizeLinear's saturation alone.
* Function bodies use the model's default-domain opset (19 to 25 tested in ORT).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto
from onnx import defs as onnx_defs
from onnx import helper

from .custom_ops import NAMESPACE, OPS, QUANT_FP4, QUANT_FP8, QUANT_NONE, quant_code

DOMAIN = NAMESPACE
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = NAMESPACE
PLUGIN_VERSION = "1"
MIN_OPSET = 19  # float8 QuantizeLinear/DequantizeLinear with `saturate`
DEFAULT_OPSET = 23

_FLOAT = TensorProto.FLOAT
_INT64 = TensorProto.INT64
_BIG = 2**62  # "to the end" for Slice


# --------------------------------------------------------------------------- op signatures
# op_type -> (inputs, output, attributes). Attributes: name -> (AttrType, default or None = required).
_A = onnx_defs.OpSchema.AttrType
SIGNATURES: dict[str, tuple[list[str], str, dict[str, tuple[Any, Any]]]] = {
    "GatedCompress": (["kv", "score", "norm_weight", "cos", "sin"], "entries",
                      {"eps": (_A.FLOAT, None), "quant": (_A.INT, QUANT_NONE)}),
    "OverlapGatedCompress": (["kv", "score", "prev_kv", "prev_score", "norm_weight", "cos", "sin"], "entries",
                             {"eps": (_A.FLOAT, None), "quant": (_A.INT, QUANT_NONE)}),
    "IndexerTopK": (["q", "weights", "keys", "q_pos"], "entry_idx",
                    {"ratio": (_A.INT, None), "topk": (_A.INT, None), "bf16_scores": (_A.INT, 0)}),
    "HybridSparseAttention": (["q", "q_pos", "window_kv", "window_pos", "entries", "entry_idx", "sink"], "out",
                              {"window": (_A.INT, None), "scale": (_A.FLOAT, None)}),
    "RoutedExperts": (["x", "expert_idx", "expert_weights", "w1", "w3", "w2"], "out",
                      {"swiglu_limit": (_A.FLOAT, 0.0)}),
}
_PLUGIN_ATTRS = {"plugin_namespace": (_A.STRING, PLUGIN_NAMESPACE), "plugin_version": (_A.STRING, PLUGIN_VERSION)}
_INT_INPUTS = {"q_pos", "window_pos", "entry_idx", "expert_idx"}
_OUTPUT_TYPES = {"GatedCompress": "tensor(float)", "OverlapGatedCompress": "tensor(float)",
                 "IndexerTopK": "tensor(int64)", "HybridSparseAttention": "T_q", "RoutedExperts": "tensor(float)"}
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
_INT_TYPES = ["tensor(int64)", "tensor(int32)"]


def op_schema(op_type: str) -> onnx_defs.OpSchema:
    """An in-memory (unregistered) OpSchema for one hatrt op: what onnxscript needs to emit it."""
    inputs, output, attrs = SIGNATURES[op_type]
    params = [onnx_defs.OpSchema.FormalParameter(name, f"T_{name}") for name in inputs]
    constraints = [(f"T_{name}", _INT_TYPES if name in _INT_INPUTS else _FLOAT_TYPES, "") for name in inputs]
    attributes = []
    for name, (kind, default) in {**attrs, **_PLUGIN_ATTRS}.items():
        if default is None:
            attributes.append(onnx_defs.OpSchema.Attribute(name, kind, "", required=True))
        else:
            attributes.append(onnx_defs.OpSchema.Attribute(name, helper.make_attribute(name, default), ""))
    outputs = [onnx_defs.OpSchema.FormalParameter(output, _OUTPUT_TYPES[op_type])]
    return onnx_defs.OpSchema(op_type, DOMAIN, DOMAIN_VERSION, f"hatrt::{op_type} (see exporter/custom_ops.py)",
                              inputs=params, outputs=outputs, type_constraints=constraints, attributes=attributes)


# --------------------------------------------------------------------------- translations
_onnxscript_ops: dict[str, Any] = {}


def _onnxscript_op(op_type: str):
    if op_type not in _onnxscript_ops:
        from onnxscript import values  # imported lazily: only export needs onnxscript

        _onnxscript_ops[op_type] = values.Op(values.Opset(DOMAIN, DOMAIN_VERSION), op_type, op_schema(op_type))
    return _onnxscript_ops[op_type]


def _emit(op_type: str, *inputs, **attrs):
    return _onnxscript_op(op_type)(*inputs, **attrs, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


def _tr_gated_compress(kv, score, norm_weight, cos, sin, *, eps, quant=QUANT_NONE):
    return _emit("GatedCompress", kv, score, norm_weight, cos, sin, eps=float(eps), quant=quant_code(quant))


def _tr_overlap_gated_compress(kv, score, prev_kv, prev_score, norm_weight, cos, sin, *, eps, quant=QUANT_NONE):
    return _emit("OverlapGatedCompress", kv, score, prev_kv, prev_score, norm_weight, cos, sin, eps=float(eps),
                 quant=quant_code(quant))


def _tr_indexer_topk(q, weights, keys, q_pos, *, ratio, topk, bf16_scores=False):
    if int(ratio) <= 0 or int(topk) <= 0:
        raise ValueError(f"IndexerTopK needs ratio > 0 and topk > 0, got ratio={ratio}, topk={topk}")
    return _emit("IndexerTopK", q, weights, keys, q_pos, ratio=int(ratio), topk=int(topk),
                 bf16_scores=int(bool(bf16_scores)))


def _tr_hybrid_sparse_attention(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, *, window, scale):
    return _emit("HybridSparseAttention", q, q_pos, window_kv, window_pos, entries, entry_idx, sink,
                 window=int(window), scale=float(scale))


def _tr_routed_experts(x, expert_idx, expert_weights, w1, w3, w2, *, swiglu_limit=0.0):
    if not float(swiglu_limit) >= 0:
        raise ValueError(f"RoutedExperts needs swiglu_limit >= 0 (0: no clamp), got {swiglu_limit}")
    return _emit("RoutedExperts", x, expert_idx, expert_weights, w1, w3, w2, swiglu_limit=float(swiglu_limit))


CUSTOM_TRANSLATION_TABLE = {
    OPS["GatedCompress"]: _tr_gated_compress,
    OPS["OverlapGatedCompress"]: _tr_overlap_gated_compress,
    OPS["IndexerTopK"]: _tr_indexer_topk,
    OPS["HybridSparseAttention"]: _tr_hybrid_sparse_attention,
    OPS["RoutedExperts"]: _tr_routed_experts,
}
"""Pass as torch.onnx.export(..., custom_translation_table=CUSTOM_TRANSLATION_TABLE)."""


# --------------------------------------------------------------------------- function bodies
class _Body:
    """Collects the nodes of a function body (or subgraph) with unique value names."""

    def __init__(self, prefix: str, counter: list[int] | None = None):
        self.prefix, self.nodes = prefix, []
        self._counter = counter if counter is not None else [0]

    def sub(self) -> _Body:
        return _Body(self.prefix, self._counter)  # shares the counter: names stay unique

    def name(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{self.prefix}_{hint}_{self._counter[0]}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name("n"), **attrs))
        return outs[0] if n_out == 1 else outs

    def tensor(self, value, dtype: int, dims=None) -> str:
        arr = np.asarray(value)
        dims = list(arr.shape) if dims is None else dims
        return self.op("Constant", value=helper.make_tensor(self.name("c"), dtype, dims, arr.flatten().tolist()))

    def ints(self, *values: int) -> str:  # 1-D int64
        return self.tensor(list(values), _INT64, [len(values)])

    def int0(self, value: int) -> str:  # 0-D int64
        return self.tensor(value, _INT64, [])

    def f0(self, value: float) -> str:  # 0-D float
        return self.tensor(value, _FLOAT, [])

    def attr(self, attr_name: str, kind: int) -> str:
        """A 0-D Constant taken from the function's attribute `attr_name` (INT or FLOAT)."""
        field = {AttributeProto.INT: "value_int", AttributeProto.FLOAT: "value_float"}[kind]
        out = self.name(attr_name)
        node = helper.make_node("Constant", [], [out], name=self.name("n"))
        node.attribute.append(helper.make_attribute_ref(field, kind, ref_attr_name=attr_name))
        self.nodes.append(node)
        return out

    def graph(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[str], out_types: list[int]):
        return helper.make_graph(self.nodes, self.prefix + "_" + name, inputs,
                                 [helper.make_tensor_value_info(o, t, None) for o, t in zip(outputs, out_types)])


def _f32(b: _Body, x: str) -> str:
    return b.op("Cast", x, to=_FLOAT)


def _i64(b: _Body, x: str) -> str:
    return b.op("Cast", x, to=_INT64)


def _floor_div(b: _Body, a: str, d: str) -> str:
    """Python // for int64 tensors (ONNX Div truncates toward zero)."""
    return b.op("Div", b.op("Sub", a, b.op("Mod", a, d, fmod=0)), d)


def _rms_norm(b: _Body, x: str, weight: str, eps: str) -> str:
    ms = b.op("ReduceMean", b.op("Mul", x, x), b.ints(-1), keepdims=1)
    y = b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", ms, eps))))
    return b.op("Mul", y, _f32(b, weight))


def _split_rope(b: _Body, x: str, cos: str) -> tuple[str, str]:
    """(x[..., :-r], x[..., -r:]) with r = 2 * cos.shape[-1]."""
    r = b.op("Mul", b.op("Shape", cos, start=-1), b.ints(2))
    nope_end = b.op("Sub", b.op("Shape", x, start=-1), r)
    return (b.op("Slice", x, b.ints(0), nope_end, b.ints(-1)),
            b.op("Slice", x, nope_end, b.ints(_BIG), b.ints(-1)))


def _apply_rope(b: _Body, x: str, cos: str, sin: str) -> str:
    """exporter/rope.py apply_rope: interleaved pairs of the last 2*cos.shape[-1] dims."""
    nope, rope = _split_rope(b, x, cos)
    a = b.op("Slice", rope, b.ints(0), b.ints(_BIG), b.ints(-1), b.ints(2))
    c = b.op("Slice", rope, b.ints(1), b.ints(_BIG), b.ints(-1), b.ints(2))
    cosf, sinf = _f32(b, cos), _f32(b, sin)
    ra = b.op("Sub", b.op("Mul", a, cosf), b.op("Mul", c, sinf))
    rb = b.op("Add", b.op("Mul", a, sinf), b.op("Mul", c, cosf))
    last = b.ints(-1)
    pairs = b.op("Concat", b.op("Unsqueeze", ra, last), b.op("Unsqueeze", rb, last), axis=-1)
    return b.op("Concat", nope, b.op("Reshape", pairs, b.op("Shape", rope)), axis=-1)


_POW2_LO, _POW2_HI = -126, 127
_POW2_TABLE = np.ldexp(np.float32(1), np.arange(_POW2_LO, _POW2_HI + 1)).astype(np.float32)


def _pow2_scale(b: _Body, amax: str, qmax: float) -> str:
    """quant.pow2_scale: the smallest power of two s with max(amax, 1e-4) / qmax <= s (exact)."""
    y = b.op("Div", b.op("Max", amax, b.f0(1e-4)), b.f0(qmax))
    k = b.op("Ceil", b.op("Mul", b.op("Log", y), b.f0(1.0 / math.log(2.0))))
    idx = b.op("Clip", b.op("Sub", _i64(b, k), b.int0(_POW2_LO)), b.int0(0), b.int0(_POW2_HI - _POW2_LO))
    s = b.op("Gather", b.tensor(_POW2_TABLE, _FLOAT), idx, axis=0)
    half = b.op("Mul", s, b.f0(0.5))  # Log rounding may overshoot by one power ...
    s = b.op("Where", b.op("GreaterOrEqual", half, y), half, s)
    double = b.op("Mul", s, b.f0(2.0))  # ... or undershoot by one
    return b.op("Where", b.op("Less", s, y), double, s)


_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M1_EDGES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
_E2M1_TIE_UP = [False, True, False, True, False, True, False]


def _round_e2m1(b: _Body, v: str) -> str:
    """quant.round_e2m1: nearest e2m1 value, ties to the even mantissa (values already in [-6, 6])."""
    a = b.op("Unsqueeze", b.op("Abs", v), b.ints(-1))
    edges = b.tensor(np.array(_E2M1_EDGES, np.float32), _FLOAT)
    tie_up = b.tensor(np.array(_E2M1_TIE_UP), TensorProto.BOOL)
    up = b.op("Or", b.op("Greater", a, edges), b.op("And", b.op("Equal", a, edges), tie_up))
    idx = b.op("ReduceSum", _i64(b, up), b.ints(-1), keepdims=0)
    mag = b.op("Gather", b.tensor(np.array(_E2M1, np.float32), _FLOAT), idx, axis=0)
    return b.op("Where", b.op("Less", v, b.f0(0.0)), b.op("Neg", mag), mag)


def _fake_quant(b: _Body, x: str, block: int, fmt: str) -> str:
    """quant.fake_quant_fp8 / fake_quant_fp4 on fp32 x: per-block power-of-two scales along the last dim."""
    qmax = {"fp8": 448.0, "fp4": 6.0}[fmt]
    xb = b.op("Reshape", x, b.op("Concat", b.op("Shape", x, end=-1), b.ints(-1, block), axis=0))
    scale = _pow2_scale(b, b.op("ReduceMax", b.op("Abs", xb), b.ints(-1), keepdims=1), qmax)
    v = b.op("Div", xb, scale)  # exact: the scale is a power of two
    if fmt == "fp8":
        # No explicit clamp to +-448: |v| <= 448 by construction and QuantizeLinear saturates,
        # which equals torch's clamp-then-round. (A Clip, or a Max/Min pair that onnxscript's
        # optimizer turns into a Clip, feeding a float8 QuantizeLinear crashes ONNX Runtime 1.32's
        # ClipQuantFusion: "Unexpected data type for QuantizeLinear input y_zero_point of 17".)
        one = b.f0(1.0)
        zero = b.op("Constant", value=helper.make_tensor(b.name("zp"), TensorProto.FLOAT8E4M3FN, [], [0.0]))
        q = b.op("DequantizeLinear", b.op("QuantizeLinear", v, one, zero, saturate=1), one)
    else:
        q = _round_e2m1(b, b.op("Clip", v, b.f0(-qmax), b.f0(qmax)))
    return b.op("Reshape", b.op("Mul", q, scale), b.op("Shape", x))


def _hadamard(b: _Body, x: str) -> str:
    """quant.hadamard: the same fp32 butterflies (one Loop iteration per stage), then * 1/sqrt(n)."""
    n = b.op("Cast", b.op("Shape", x, start=-1), to=_FLOAT)
    stages = b.op("Squeeze", _i64(b, b.op("Round", b.op("Div", b.op("Log", n), b.f0(math.log(2.0))))))
    body = b.sub()
    it, cond_in, y_in, h_in = (body.name(s) for s in ("iter", "cond", "y", "h"))
    y4 = body.op("Reshape", y_in, body.op("Concat", body.op("Shape", y_in, end=-1), body.ints(-1, 2), h_in, axis=0))
    y0 = body.op("Gather", y4, body.int0(0), axis=-2)
    y1 = body.op("Gather", y4, body.int0(1), axis=-2)
    merged = body.op("Concat", body.op("Add", y0, y1), body.op("Sub", y0, y1), axis=-1)
    outs = [body.op("Identity", cond_in), body.op("Reshape", merged, body.op("Shape", y_in)),
            body.op("Mul", h_in, body.ints(2))]
    graph = body.graph("hadamard_stage", [
        helper.make_tensor_value_info(it, _INT64, []), helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
        helper.make_tensor_value_info(y_in, _FLOAT, None), helper.make_tensor_value_info(h_in, _INT64, [1])],
        outs, [TensorProto.BOOL, _FLOAT, _INT64])
    true = b.tensor(True, TensorProto.BOOL, [])
    y, _ = b.op("Loop", stages, true, x, b.ints(1), n_out=2, body=graph)
    # 1/sqrt(n) for a power of two n: 1/n is exact and Sqrt is correctly rounded, so this is the
    # float32 value of 1/sqrt(n) that torch multiplies by.
    return b.op("Mul", y, b.op("Sqrt", b.op("Reciprocal", n)))


def _quantize_entry(b: _Body, entry: str, cos: str) -> str:
    """compress_blocks's quant step, selected at run time by the `quant` attribute (If nodes)."""
    quant = b.attr("quant", AttributeProto.INT)
    fp8 = b.sub()
    nope, rope = _split_rope(fp8, entry, cos)
    fp8_out = fp8.op("Concat", _fake_quant(fp8, nope, 64, "fp8"), rope, axis=-1)
    fp4 = b.sub()
    fp4_out = _fake_quant(fp4, _hadamard(fp4, entry), 32, "fp4")
    plain = b.sub()
    plain_out = plain.op("Identity", entry)
    is_fp4 = b.op("Equal", quant, b.int0(QUANT_FP4))
    inner = b.sub()
    inner_out = inner.op("If", is_fp4, then_branch=fp4.graph("fp4", [], [fp4_out], [_FLOAT]),
                         else_branch=plain.graph("none", [], [plain_out], [_FLOAT]))
    return b.op("If", b.op("Equal", quant, b.int0(QUANT_FP8)), then_branch=fp8.graph("fp8", [], [fp8_out], [_FLOAT]),
                else_branch=inner.graph("not_fp8", [], [inner_out], [_FLOAT]))


def _pool_and_finish(b: _Body, kv: str, score: str, norm_weight: str, cos: str, sin: str) -> str:
    """Softmax per channel over the slots (axis 2), sum, RMSNorm, RoPE, fake-quant."""
    pooled = b.op("ReduceSum", b.op("Mul", kv, b.op("Softmax", score, axis=2)), b.ints(2), keepdims=0)
    entry = _apply_rope(b, _rms_norm(b, pooled, norm_weight, b.attr("eps", AttributeProto.FLOAT)), cos, sin)
    return _quantize_entry(b, entry, cos)


def _body_gated_compress(b: _Body) -> str:
    return _pool_and_finish(b, _f32(b, "kv"), _f32(b, "score"), "norm_weight", "cos", "sin")


def _body_overlap_gated_compress(b: _Body) -> str:
    d = b.op("Div", b.op("Shape", "kv", start=-1), b.ints(2))

    def slots(x: str, prev: str) -> str:  # [prev block's first halves ; this block's second halves]
        xf = _f32(b, x)
        earlier = b.op("Slice", xf, b.ints(0, 0), b.op("Concat", b.ints(-1), d, axis=0), b.ints(1, 3))
        prev_blocks = b.op("Concat", b.op("Unsqueeze", _f32(b, prev), b.ints(1)), earlier, axis=1)
        current = b.op("Slice", xf, d, b.ints(_BIG), b.ints(3))
        return b.op("Concat", prev_blocks, current, axis=2)

    return _pool_and_finish(b, slots("kv", "prev_kv"), slots("score", "prev_score"), "norm_weight", "cos", "sin")


def _body_indexer_topk(b: _Body) -> str:
    q, w, keys = _f32(b, "q"), _f32(b, "weights"), _f32(b, "keys")
    # keys @ q^T, not q @ keys^T: only the small q is transposed, never the [B, N, Di] key buffer
    # (a copy per step that grows with the context), and the head sum runs over the last axis.
    q_t = b.op("Transpose", q, perm=[0, 1, 3, 2])  # [B, S, Di, Hi]
    scores = b.op("Relu", b.op("MatMul", b.op("Unsqueeze", keys, b.ints(1)), q_t))  # [B, S, N, Hi]
    scores = b.op("ReduceSum", b.op("Mul", scores, b.op("Unsqueeze", w, b.ints(2))), b.ints(-1), keepdims=0)
    rounded = b.op("Cast", b.op("Cast", scores, to=TensorProto.BFLOAT16), to=_FLOAT)
    use_bf16 = b.op("Cast", b.attr("bf16_scores", AttributeProto.INT), to=TensorProto.BOOL)
    scores = b.op("Where", use_bf16, rounded, scores)
    n = b.op("Shape", "keys", start=1, end=2)
    entry = b.op("Range", b.int0(0), b.op("Squeeze", n), b.int0(1))  # [N]
    pos = _i64(b, "q_pos")
    limit = _floor_div(b, b.op("Add", pos, b.int0(1)), b.attr("ratio", AttributeProto.INT))
    visible = b.op("Less", entry, b.op("Unsqueeze", limit, b.ints(-1)))  # [B, S, N]
    neg_inf = b.f0(-math.inf)
    scores = b.op("Where", visible, scores, neg_inf)
    topk = b.op("Reshape", b.attr("topk", AttributeProto.INT), b.ints(1))
    pad = b.op("Max", b.op("Sub", topk, n), b.ints(0))  # fixed width: pad with never-visible candidates
    scores = b.op("Pad", scores, b.op("Concat", b.ints(0), pad, axis=0), neg_inf, b.ints(-1))
    best, idx = b.op("TopK", scores, topk, axis=-1, largest=1, sorted=1, n_out=2)  # ties: lower index first
    return b.op("Where", b.op("Equal", best, neg_inf), b.int0(-1), idx)


def _body_hybrid_sparse_attention(b: _Body) -> str:
    q, kv, entries = _f32(b, "q"), _f32(b, "window_kv"), _f32(b, "entries")
    q_pos, w_pos, idx = _i64(b, "q_pos"), _i64(b, "window_pos"), _i64(b, "entry_idx")
    scale = b.attr("scale", AttributeProto.FLOAT)
    neg_inf = b.f0(-math.inf)

    w_pos_row = b.op("Unsqueeze", w_pos, b.ints(1))  # [B, 1, L]
    dist = b.op("Sub", b.op("Unsqueeze", q_pos, b.ints(-1)), w_pos_row)  # [B, S, L]
    zero = b.int0(0)
    in_window = b.op("And", b.op("And", b.op("GreaterOrEqual", w_pos_row, zero), b.op("GreaterOrEqual", dist, zero)),
                     b.op("Less", dist, b.attr("window", AttributeProto.INT)))
    kv_t = b.op("Unsqueeze", b.op("Transpose", kv, perm=[0, 2, 1]), b.ints(1))  # [B, 1, D, L]
    logits_w = b.op("Mul", b.op("MatMul", q, kv_t), scale)  # [B, S, H, L]
    logits_w = b.op("Where", b.op("Unsqueeze", in_window, b.ints(2)), logits_w, neg_inf)

    # A zero dummy entry at index N: entry_idx clamped at 0 always lands inside, even when N == 0.
    dummy_shape = b.op("Concat", b.op("Shape", entries, end=1), b.ints(1), b.op("Shape", entries, start=2), axis=0)
    dummy = b.op("ConstantOfShape", dummy_shape, value=helper.make_tensor(b.name("z"), _FLOAT, [1], [0.0]))
    padded = b.op("Concat", entries, dummy, axis=1)  # [B, N + 1, D]
    picked = b.op("GatherND", padded, b.op("Unsqueeze", b.op("Max", idx, zero), b.ints(-1)), batch_dims=1)  # [B,S,K,D]
    logits_c = b.op("Mul", b.op("MatMul", q, b.op("Transpose", picked, perm=[0, 1, 3, 2])), scale)  # [B, S, H, K]
    valid = b.op("GreaterOrEqual", idx, zero)
    logits_c = b.op("Where", b.op("Unsqueeze", valid, b.ints(2)), logits_c, neg_inf)

    sink_shape = b.op("Concat", b.op("Shape", logits_w, end=3), b.ints(1), axis=0)
    sink = b.op("Expand", b.op("Reshape", _f32(b, "sink"), b.ints(1, 1, -1, 1)), sink_shape)
    probs = b.op("Softmax", b.op("Concat", logits_w, logits_c, sink, axis=-1), axis=-1)
    n_w = b.op("Shape", logits_w, start=-1)
    n_c = b.op("Shape", logits_c, start=-1)
    p_w = b.op("Slice", probs, b.ints(0), n_w, b.ints(-1))
    p_c = b.op("Slice", probs, n_w, b.op("Add", n_w, n_c), b.ints(-1))
    out = b.op("Add", b.op("MatMul", p_w, b.op("Unsqueeze", kv, b.ints(1))), b.op("MatMul", p_c, picked))
    return b.op("CastLike", out, "q")


def _body_routed_experts(b: _Body) -> str:
    """Dense: every expert on every token ([E, T, .] batched MatMuls), then the sum over experts
    weighted by the one-hot sum of the picks ([T, E]; repeated picks add up, indices outside
    [0, E) match no expert). fp32 math; the clamp bound is +inf when swiglu_limit == 0."""
    x = b.op("Unsqueeze", _f32(b, "x"), b.ints(0))  # [1, T, d]
    w1, w3, w2 = (b.op("Transpose", _f32(b, w), perm=[0, 2, 1]) for w in ("w1", "w3", "w2"))
    gate = b.op("MatMul", x, w1)  # [E, T, I]
    up = b.op("MatMul", x, w3)
    limit = b.attr("swiglu_limit", AttributeProto.FLOAT)
    bound = b.op("Where", b.op("Greater", limit, b.f0(0.0)), limit, b.f0(math.inf))
    gate = b.op("Min", gate, bound)
    up = b.op("Max", b.op("Min", up, bound), b.op("Neg", bound))
    h = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    y = b.op("MatMul", h, w2)  # [E, T, d]
    n_experts = b.op("Squeeze", b.op("Shape", "w1", end=1), b.ints(0))
    experts = b.op("Range", b.int0(0), n_experts, b.int0(1))  # [E]
    picks = b.op("Equal", b.op("Unsqueeze", _i64(b, "expert_idx"), b.ints(-1)), experts)  # [T, k, E]
    weighted = b.op("Mul", _f32(b, picks), b.op("Unsqueeze", _f32(b, "expert_weights"), b.ints(-1)))
    dense = b.op("ReduceSum", weighted, b.ints(1), keepdims=0)  # [T, E]
    dense = b.op("Unsqueeze", b.op("Transpose", dense, perm=[1, 0]), b.ints(-1))  # [E, T, 1]
    return b.op("ReduceSum", b.op("Mul", y, dense), b.ints(0), keepdims=0)  # [T, d]


_BODIES = {
    "GatedCompress": _body_gated_compress,
    "OverlapGatedCompress": _body_overlap_gated_compress,
    "IndexerTopK": _body_indexer_topk,
    "HybridSparseAttention": _body_hybrid_sparse_attention,
    "RoutedExperts": _body_routed_experts,
}


def function_proto(op_type: str, opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """The model-local function (domain hatrt) that decomposes one op into standard ONNX ops."""
    if opset < MIN_OPSET:
        raise ValueError(f"hatrt functions need default-domain opset >= {MIN_OPSET}, got {opset}")
    inputs, output, attrs = SIGNATURES[op_type]
    b = _Body(op_type)
    result = _BODIES[op_type](b)
    b.nodes.append(helper.make_node("Identity", [result], [output], name=b.name("n")))
    all_attrs = {**attrs, **_PLUGIN_ATTRS}
    return helper.make_function(
        DOMAIN, op_type, inputs, [output], b.nodes, [helper.make_opsetid("", opset)],
        attributes=[name for name, (_, default) in all_attrs.items() if default is None],
        attribute_protos=[helper.make_attribute(name, default) for name, (_, default) in all_attrs.items()
                          if default is not None],
        doc_string=f"Reference decomposition of hatrt::{op_type} (exporter/ops.py numerics, fp32).")


def function_protos(opset: int = DEFAULT_OPSET) -> dict[str, onnx.FunctionProto]:
    return {op_type: function_proto(op_type, opset) for op_type in SIGNATURES}


# --------------------------------------------------------------------------- model surgery
def _as_model(model):
    """ModelProto or onnx_ir.Model (unwrapping a torch ONNXProgram)."""
    if isinstance(model, onnx.ModelProto):
        return model
    inner = getattr(model, "model", None)  # torch.onnx.ONNXProgram
    if inner is not None and not isinstance(model, onnx.ModelProto):
        model = inner
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        raise TypeError(f"expected an onnx.ModelProto, onnx_ir.Model or torch.onnx.ONNXProgram, got {type(model)}")
    return model


def _proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _proto_nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _proto_nodes(g)


def hatrt_nodes(model) -> list:
    """Every node of domain hatrt in the main graph and its subgraphs (NodeProto or onnx_ir.Node)."""
    model = _as_model(model)
    if isinstance(model, onnx.ModelProto):
        return [n for n in _proto_nodes(model.graph) if n.domain == DOMAIN]
    import onnx_ir as ir

    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN]


def _default_opset(model) -> int:
    if isinstance(model, onnx.ModelProto):
        versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        return versions[0] if versions else DEFAULT_OPSET
    return model.opset_imports.get("", DEFAULT_OPSET)


def attach_functions(model):
    """Add the function of every hatrt op the model uses and the `hatrt` opset import (in place).

    Accepts an onnx.ModelProto, an onnx_ir.Model or a torch.onnx.ONNXProgram (its .model is
    edited, so ONNXProgram.save(..., external_data=True) keeps working). Call it AFTER export
    and after any ONNXProgram.optimize(): the exporter's passes inline model-local functions.
    Function bodies use the model's default-domain opset (>= 19; tested with 23). Returns the
    edited model.
    """
    target = _as_model(model)
    used = sorted({n.op_type for n in hatrt_nodes(target)})
    unknown = [t for t in used if t not in SIGNATURES]
    if unknown:
        raise ValueError(f"unknown hatrt ops {unknown}; known: {sorted(SIGNATURES)}")
    opset = _default_opset(target)
    protos = [function_proto(t, opset) for t in used]
    if isinstance(target, onnx.ModelProto):
        keep = [f for f in target.functions if not (f.domain == DOMAIN and f.name in used)]
        del target.functions[:]
        target.functions.extend(keep + protos)
        if used and not any(o.domain == DOMAIN for o in target.opset_import):
            target.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    else:
        import onnx_ir as ir

        for proto in protos:
            fn = ir.serde.deserialize_function(proto)
            target.functions[fn.identifier()] = fn
        if used:
            target.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    return model


def strip_functions(model):
    """The TensorRT twin: the same graph with hatrt custom nodes kept and their functions removed.

    Without the functions TensorRT cannot silently fall back to the (slow) decomposition when the
    plugin library is not loaded: the build fails loudly. A ModelProto is copied; an onnx_ir.Model
    (or ONNXProgram) yields a new onnx_ir.Model that SHARES the graph (and so the weights) with
    the original, which itself is left unchanged.
    """
    source = _as_model(model)
    if isinstance(source, onnx.ModelProto):
        twin = onnx.ModelProto()
        twin.CopyFrom(source)
        keep = [f for f in twin.functions if f.domain != DOMAIN]
        del twin.functions[:]
        twin.functions.extend(keep)
        return twin
    import onnx_ir as ir

    return ir.Model(source.graph, ir_version=source.ir_version, producer_name=source.producer_name,
                    producer_version=source.producer_version, domain=source.domain,
                    model_version=source.model_version, doc_string=source.doc_string,
                    functions=[f for f in source.functions.values() if f.domain != DOMAIN],
                    metadata_props=dict(source.metadata_props))


# --------------------------------------------------------------------------- the TensorRT twin
# What TensorRT's ONNX parser (onnx/onnx-tensorrt) needs beyond strip_functions; the rules, with the
# parser source each comes from, are in exporter/trt_lint.py and docs/tensorrt.md.
_EINSUM_LETTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def prepare_trt_twin(model, *, base_dir: str | os.PathLike = "", einsum_to_matmul: bool = True) -> onnx.ModelProto:
    """The TensorRT twin of an export: strip_functions, then constant folding and small rewrites.

    1. onnxscript's constant folding (it keeps the hatrt nodes and their attributes as they are):
       axes of Reduce*/Squeeze/Unsqueeze/Slice computed from constants (Reshape of a Constant...)
       become constants, as the parser demands ("Axis input must be an initializer!"); no-op
       Casts and shape arithmetic on constants disappear.
    2. Equal on BOOL inputs (torch's integer floor division compares the signs of its operands
       with one) becomes Not(Xor(a, b)): TensorRT's elementwise layer takes BOOL only for
       AND/OR/XOR.
    3. Einsum with two operands and one summed label becomes Transpose/Unsqueeze + MatMul (+
       Transpose): TensorRT's IEinsumLayer outputs FLOAT only, which a strongly typed fp16 network
       cannot use (and an FP8 DequantizeLinear fuses into a MatMul, not an Einsum); an Einsum of
       another form that is not float32 is computed in float32 between Casts. With
       einsum_to_matmul=False only the non-float32 Einsums change (by the Casts).
    4. Every Constant becomes an initializer.

    The ONNX Runtime graph is never changed: a ModelProto is copied, an onnx_ir.Model (or
    ONNXProgram) is serialized first. Weights that are external data stay external (pass the
    directory of the model file as base_dir so that small external tensors can be folded).
    Returns a ModelProto whose graph computes the same as the input's (tests/test_trt_lint.py
    runs it in ONNX Runtime with the functions re-attached).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import fold_constants_ir

    twin = strip_functions(model)
    if not isinstance(twin, onnx.ModelProto):
        twin = ir.serde.serialize_model(twin)
    model_ir = ir.serde.deserialize_model(twin)
    if base_dir:
        for value in model_ir.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.base_dir = base_dir
    fold_constants_ir(model_ir, onnx_shape_inference=True)
    common_passes.RemoveUnusedNodesPass()(model_ir)
    changed = _rewrite_bool_equal(model_ir.graph) + _rewrite_einsum(model_ir.graph, einsum_to_matmul)
    if changed:  # fold what the rewrites made foldable (e.g. the Transpose of a small constant)
        fold_constants_ir(model_ir, onnx_shape_inference=False)
        common_passes.RemoveUnusedNodesPass()(model_ir)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model_ir)
    return ir.serde.serialize_model(model_ir)


def save_trt_twin(step_path: str | os.PathLike, trt_path: str | os.PathLike, *, big: bool = False) -> None:
    """Write the TensorRT twin of the graph at step_path (prepare_trt_twin) to trt_path.

    big: the graph keeps its weights as external data; the twin then refers to the same data file
    (only tensors made by folding go to `<trt_path>.data`)."""
    from pathlib import Path

    step_path, trt_path = Path(step_path), Path(trt_path)
    twin = prepare_trt_twin(onnx.load(str(step_path), load_external_data=not big), base_dir=str(step_path.parent))
    if big:
        onnx.save(twin, str(trt_path), save_as_external_data=True, location=trt_path.name + ".data")
    else:
        onnx.save(twin, str(trt_path))


def _new_node(graph, before, op_type: str, inputs: list, attrs: dict | None = None, name: str = ""):
    import onnx_ir as ir

    node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attrs or {}),
                   name=f"{before.name or 'node'}_{name or op_type.lower()}")
    graph.insert_before(before, node)
    return node.outputs[0]


def _ints_initializer(graph, values: list[int], hint: str):
    import onnx_ir as ir

    name = hint
    i = 0
    while name in graph.initializers:
        i += 1
        name = f"{hint}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(values, dtype=np.int64), name=name))
    graph.register_initializer(value)
    return value


_BOOL_PRODUCERS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN",
                   "IsInf")


def _is_bool(value) -> bool:
    """A BOOL value: typed so, or (untyped) the output of a comparison or logical op."""
    import onnx_ir as ir

    if value is None:
        return False
    if value.dtype is not None:
        return value.dtype == ir.DataType.BOOL
    producer = value.producer()
    return producer is not None and producer.domain in ("", "ai.onnx") and producer.op_type in _BOOL_PRODUCERS


def _rewrite_bool_equal(graph) -> int:
    """Equal(a, b) on BOOL -> Not(Xor(a, b)) (the same truth table). Returns the number rewritten."""
    import onnx_ir as ir

    count = 0
    for node in list(graph):
        if node.op_type != "Equal" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if not (_is_bool(a) and _is_bool(b)):
            continue
        xor = ir.Node("", "Xor", [a, b], name=f"{node.name}_xor")
        neg = ir.Node("", "Not", [xor.outputs[0]], name=f"{node.name}_not")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [xor, neg], [node.outputs[0]], [neg.outputs[0]])
        count += 1
    return count


def _einsum_plan(equation: str):
    """For 'A,B->O' with one summed label: (perm_a, unsq_a, perm_b, unsq_b, perm_out) for
    MatMul(Unsqueeze(Transpose(a)), Unsqueeze(Transpose(b))) -> Transpose, or None.

    The MatMul's rows are the last label of A that B lacks, its columns the last label of B that A
    lacks, every other output label a (broadcast) batch dim in output order."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if any(len(set(t)) != len(t) or not set(t) <= _EINSUM_LETTERS for t in (a, b, out)):
        return None
    summed = [c for c in a if c in b and c not in out]
    if len(summed) != 1 or any(c not in out for c in a + b if c not in summed) or not set(out) <= set(a + b):
        return None  # one contracted label; no label summed within a single operand
    rows = [c for c in a if c not in b]
    cols = [c for c in b if c not in a]
    if not rows or not cols:
        return None
    row, col, k = rows[-1], cols[-1], summed[0]
    batch = [c for c in out if c not in (row, col)]

    def operand(term: str, last_two: list[str]):
        present = [c for c in batch if c in term]
        perm = [term.index(c) for c in present + last_two]
        full = batch + last_two
        unsq = [i for i, c in enumerate(full) if c not in term and c not in last_two]
        # leading missing batch dims broadcast by themselves in MatMul
        lead = 0
        while lead < len(unsq) and unsq[lead] == lead:
            lead += 1
        unsq = unsq[lead:]
        if unsq:  # positions counted in the rank after the leading ones are dropped
            unsq = [i - lead for i in unsq]
        return perm, unsq

    perm_a, unsq_a = operand(a, [row, k])
    perm_b, unsq_b = operand(b, [k, col])
    mm = batch + [row, col]
    perm_out = [mm.index(c) for c in out]
    return perm_a, unsq_a, perm_b, unsq_b, perm_out


def _rewrite_einsum(graph, to_matmul: bool = True) -> int:
    """Einsum -> MatMul where _einsum_plan applies; other non-float32 Einsums get float32 Casts."""
    import onnx_ir as ir

    count = 0
    for node in list(graph):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx"):
            continue
        attr = node.attributes.get("equation")
        plan = _einsum_plan(attr.value) if to_matmul and attr is not None and len(node.inputs) == 2 else None
        y = node.outputs[0]
        if plan is not None:
            perm_a, unsq_a, perm_b, unsq_b, perm_out = plan
            ops = []
            for side, x, perm, unsq in (("a", node.inputs[0], perm_a, unsq_a), ("b", node.inputs[1], perm_b, unsq_b)):
                if perm != sorted(perm):
                    x = _new_node(graph, node, "Transpose", [x], {"perm": perm}, f"transpose_{side}")
                if unsq:
                    axes = _ints_initializer(graph, unsq, f"{node.name}_axes_{side}")
                    x = _new_node(graph, node, "Unsqueeze", [x, axes], name=f"unsqueeze_{side}")
                ops.append(x)
            out = _new_node(graph, node, "MatMul", ops)
            if perm_out != sorted(perm_out):
                out = _new_node(graph, node, "Transpose", [out], {"perm": perm_out}, "transpose_out")
        elif y.dtype not in (ir.DataType.FLOAT, None):
            casts = [_new_node(graph, node, "Cast", [x], {"to": ir.DataType.FLOAT}, f"cast{i}")
                     for i, x in enumerate(node.inputs)]
            out = _new_node(graph, node, "Einsum", casts, {"equation": attr.value}, "einsum_fp32")
            out = _new_node(graph, node, "Cast", [out], {"to": y.dtype}, "cast_out")
        else:
            continue
        ir.convenience.replace_all_uses_with(y, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name, out.type, out.shape = y.name, y.type, y.shape
        count += 1
    return count


def check_hatrt_nodes(model, *, require_functions: bool = True) -> list[str]:
    """Problems with the model's hatrt nodes (empty list = fine): missing plugin fields, missing
    functions (when require_functions) or functions present (when not)."""
    model = _as_model(model)
    if isinstance(model, onnx.ModelProto):
        funcs = {(f.domain, f.name) for f in model.functions}
        imports = {o.domain for o in model.opset_import}
    else:
        funcs = {(f.domain, f.name) for f in model.functions.values()}
        imports = set(model.opset_imports)
    problems = []
    for node in hatrt_nodes(model):
        if isinstance(node, onnx.NodeProto):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        else:
            attrs = {k: a.value for k, a in node.attributes.items()}
        label = f"{node.op_type} node {node.name!r}"
        if attrs.get("plugin_namespace") != PLUGIN_NAMESPACE or attrs.get("plugin_version") != PLUGIN_VERSION:
            problems.append(f"{label}: plugin_namespace/plugin_version missing or wrong")
        has = (DOMAIN, node.op_type) in funcs
        if require_functions and not has:
            problems.append(f"{label}: no model-local function")
        if not require_functions and has:
            problems.append(f"{label}: function still attached")
    if hatrt_nodes(model) and DOMAIN not in imports:
        problems.append(f"opset import for domain {DOMAIN!r} missing")
    return problems


def export(module, args, *, opset_version: int = DEFAULT_OPSET, **kwargs):
    """torch.onnx.export(dynamo=True) with the hatrt translations, then attach_functions.

    Returns the torch.onnx.ONNXProgram; save it with .save(path) (functions included) and
    save strip_functions(program) separately for TensorRT.
    """
    import torch

    table = {**CUSTOM_TRANSLATION_TABLE, **kwargs.pop("custom_translation_table", {})}
    program = torch.onnx.export(module, args, dynamo=True, opset_version=opset_version,
                                custom_translation_table=table, **kwargs)
    attach_functions(program)
    return program


__all__ = ["CUSTOM_TRANSLATION_TABLE", "DOMAIN", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "SIGNATURES", "attach_functions",
           "check_hatrt_nodes", "export", "function_proto", "function_protos", "hatrt_nodes", "op_schema",
           "prepare_trt_twin", "save_trt_twin", "strip_functions", "QUANT_FP4", "QUANT_FP8", "QUANT_NONE"]
