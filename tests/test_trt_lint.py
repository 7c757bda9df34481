"""The TensorRT twins against what TensorRT's ONNX parser rejects (exporter/trt_lint.py).

Every twin an export writes (fp32, fp16, and the FP8 graph of `hatrt quantize`) lints without
errors; every rule fires on a small hand-built graph that breaks it; prepare_trt_twin repairs what
it claims to repair; and the folded twin computes what step.onnx computes (ONNX Runtime, with the
functions re-attached): bit for bit without the Einsum -> MatMul rewrite, to float rounding with it.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T  # noqa: E402
from onnx import helper  # noqa: E402

from exporter import onnx_ops  # noqa: E402
from exporter.trt_lint import ERROR, INFO, OLDEST_TENSORRT, RULES, WARNING, errors, lint, oldest_tensorrt  # noqa: E402

F32, F16, I64, BOOL = T.FLOAT, T.FLOAT16, T.INT64, T.BOOL


# --------------------------------------------------------------------------- helpers
def vi(name: str, dtype: int, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name: str, values, dtype: int = I64, dims=None):
    arr = np.asarray(values)
    return helper.make_node("Constant", [], [name], name=f"c_{name}",
                            value=helper.make_tensor(f"t_{name}", dtype, list(arr.shape) if dims is None else dims,
                                                     arr.reshape(-1).tolist()))


def model(nodes, inputs, outputs, initializers=(), opset: int = 23, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                          + [helper.make_opsetid(d, 1) for d in domains])
    m.ir_version = 10
    return m


def run(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def rules(findings, severity=ERROR) -> set[str]:
    return {f.rule for f in findings if f.severity == severity}


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


# --------------------------------------------------------------------------- the exported twins
@pytest.mark.parametrize("fixture", ["flash_export", "dense_fp16_export"])
def test_export_twins_lint_clean(fixture, request):
    export = request.getfixturevalue(fixture)
    twin = onnx.load(str(export / "step.trt.onnx"))
    findings = lint(twin)
    assert errors(findings) == [], "\n".join(map(str, errors(findings)))
    # folding removed the no-op Casts and left no computed Slice axes, no Constant nodes, no Einsum
    assert rules(findings, WARNING) <= {"int64-reshape"}
    assert {"Constant", "Einsum", "CastLike", "Identity"}.isdisjoint(ops(twin))
    assert len(twin.functions) == 0 and onnx_ops.check_hatrt_nodes(twin, require_functions=False) == []
    assert {n.op_type for n in onnx_ops.hatrt_nodes(twin)} >= {"HybridSparseAttention", "IndexerTopK"}
    assert oldest_tensorrt(twin) == OLDEST_TENSORRT == (10, 15)
    onnx.checker.check_model(twin)


def test_unfolded_twin_has_the_audited_problems(flash_export):
    """What strip_functions alone gave (the audit of the issue): the lint sees each problem."""
    raw = onnx_ops.strip_functions(onnx.load(str(flash_export / "step.onnx")))
    findings = lint(raw)
    assert {"reduce-axes", "bool-elementwise"} <= rules(findings)
    assert sum(f.rule == "reduce-axes" for f in findings) >= 30  # every RMSNorm's ReduceMean
    assert {"slice-axes", "noop-cast", "int64-reshape"} <= rules(findings, WARNING)
    assert "slice-axes" in rules(lint(raw, min_tensorrt=(10, 2)))


def _backend_pair(export, twin: onnx.ModelProto):
    """ONNX Runtime on step.onnx, and on the twin with the functions re-attached."""
    from engines.backends import OnnxRuntimeBackend

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref = OnnxRuntimeBackend(export, providers=["CPUExecutionProvider"], session_options=so)
    alt = OnnxRuntimeBackend(export, providers=["CPUExecutionProvider"], session_options=so, verify="none")
    full = onnx_ops.attach_functions(twin)
    alt.session = ort.InferenceSession(full.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ref, alt


def _compare_runs(ref, alt, atol: float) -> float:
    """Prefill two prompts in chunks (crossing CSA and HCA blocks), then decode; max |diff|."""
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ref.config.vocab_size, (2, 150), generator=g)
    caches = [b.new_cache(2) for b in (ref, alt)]
    worst = 0.0
    steps = [prompt[:, :64], prompt[:, 64:135], prompt[:, 135:]] + [prompt[:, i:i + 1] for i in range(2)]
    for ids in steps:
        logits = [b.step(ids, c, logits_index=list(range(ids.shape[1]))) for b, c in zip((ref, alt), caches)]
        pairs = [(logits[0], logits[1])] + list(zip(caches[0].tensors, caches[1].tensors))
        for x, y in pairs:
            x, y = x.double(), y.double()
            same = (x == y) | (x.isnan() & y.isnan())  # equal infinities (empty slots) included
            diff = (x - y).abs()[~same]
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        assert worst <= atol, f"twin differs from step.onnx by {worst} (> {atol})"
    return worst


def test_fp32_twin_computes_what_step_onnx_computes(flash_export):
    # folding and the BOOL Equal rewrite change nothing, bit for bit
    exact = onnx_ops.prepare_trt_twin(onnx.load(str(flash_export / "step.onnx")), einsum_to_matmul=False)
    assert _compare_runs(*_backend_pair(flash_export, exact), atol=0.0) == 0.0
    # the twin as written (Einsum -> MatMul: another summation order, ulp-level differences)
    twin = onnx.load(str(flash_export / "step.trt.onnx"))
    _compare_runs(*_backend_pair(flash_export, twin), atol=1e-4)


def test_fp16_twin_computes_what_step_onnx_computes(dense_fp16_export, monkeypatch):
    twin = onnx.load(str(dense_fp16_export / "step.trt.onnx"))
    # MatMul for the fp16 Einsum rounds differently by about one fp16 step here and there
    # (measured: 0.022 at most on logits of a few units over these five steps)
    _compare_runs(*_backend_pair(dense_fp16_export, twin), atol=0.05)
    # without the Einsum rewrite (float32 Casts around an fp16 Einsum would round differently too)
    # the folded graph is the same, bit for bit
    monkeypatch.setattr(onnx_ops, "_rewrite_einsum", lambda graph, to_matmul=True: 0)
    exact = onnx_ops.prepare_trt_twin(onnx.load(str(dense_fp16_export / "step.onnx")))
    assert _compare_runs(*_backend_pair(dense_fp16_export, exact), atol=0.0) == 0.0


def test_fp8_graph_twin_lints_clean(flash_export, tmp_path):
    """The FP8 export (`hatrt quantize`): its twin keeps every Q/DQ pair and lints clean."""
    import torch

    from engines.quantize import QuantizeError, quantize_export

    g = torch.Generator().manual_seed(0)
    out = tmp_path / "fp8"
    try:
        quantize_export(flash_export, out, calib_tokens=torch.randint(0, 512, (300,), generator=g).tolist())
    except QuantizeError as e:  # tests/test_quantize.py owns that failure
        pytest.skip(f"hatrt quantize cannot quantize this export: {e}")
    step = onnx.load(str(out / "step.onnx"))
    twin = onnx_ops.prepare_trt_twin(step)
    assert errors(lint(twin)) == []
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert ops(twin).count(op) == ops(step).count(op) > 0
    assert any(i.data_type == T.FLOAT8E4M3FN for i in twin.graph.initializer)


# --------------------------------------------------------------------------- every rule fires
def test_reduce_axes_from_a_reshape_of_constants():
    nodes = [const("a", [-1], dims=[1]), const("shape", [1]),
             helper.make_node("Reshape", ["a", "shape"], ["axes"], name="reshape"),
             helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=1)]
    m = model(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, [2, 1])])
    found = lint(m)
    assert rules(found) == {"reduce-axes"} and found[0].node == "mean"
    assert "Axis input must be an initializer" in found[0].source and "reduceTensor" in found[0].source
    fixed = onnx_ops.prepare_trt_twin(m)
    assert errors(lint(fixed)) == [] and ops(fixed) == ["ReduceMean"]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(fixed, {"x": x})[0], run(m, {"x": x})[0])


@pytest.mark.parametrize("op", ["Squeeze", "Unsqueeze"])
def test_squeeze_axes_computed(op):
    nodes = [const("a", [0]), const("b", [0]), helper.make_node("Add", ["a", "b"], ["axes"], name="add"),
             helper.make_node(op, ["x", "axes"], ["y"], name="sq")]
    m = model(nodes, [vi("x", F32, [1, 3])], [vi("y", F32, None)])
    assert rules(lint(m)) == {"squeeze-axes"}
    assert errors(lint(onnx_ops.prepare_trt_twin(m))) == []


def test_slice_axes_computed_needs_10_3():
    nodes = [const("s", [0]), const("e", [1]), const("a0", [1]),
             helper.make_node("Identity", ["a0"], ["axes"], name="id"),  # Identity makes a tensor, not weights
             helper.make_node("Slice", ["x", "s", "e", "axes"], ["y"], name="slice")]
    m = model(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, None)], opset=20)
    assert rules(lint(m)) == set() and rules(lint(m), WARNING) == {"slice-axes"}
    assert rules(lint(m, min_tensorrt=(10, 2))) == {"slice-axes"}
    assert oldest_tensorrt(m) == (10, 3)
    fixed = onnx_ops.prepare_trt_twin(m)
    assert "slice-axes" not in rules(lint(fixed, min_tensorrt=(10, 0)), ERROR) | rules(lint(fixed), WARNING)


def test_cumsum_axis_computed():
    nodes = [const("a0", 0, dims=[]), helper.make_node("Identity", ["a0"], ["axis"], name="id"),
             helper.make_node("CumSum", ["x", "axis"], ["y"], name="cumsum")]
    assert rules(lint(model(nodes, [vi("x", F32, [4])], [vi("y", F32, [4])]))) == {"cumsum-axis"}


def test_equal_on_bool_is_rewritten_to_not_xor():
    """torch's integer floor division compares two sign tests with Equal: BOOL inputs."""
    zero = helper.make_tensor("zero", I64, [], [0])
    nodes = [helper.make_node("Less", ["a", "zero"], ["na"], name="lt"),
             helper.make_node("Greater", ["b", "zero"], ["pb"], name="gt"),
             helper.make_node("Equal", ["na", "pb"], ["y"], name="eq")]
    m = model(nodes, [vi("a", I64, [4]), vi("b", I64, [4])], [vi("y", BOOL, [4])], [zero])
    found = errors(lint(m))
    assert [(f.rule, f.node) for f in found] == [("bool-elementwise", "eq")]
    assert "ElementWiseOperation" in found[0].source and "elementwiseCheck" in found[0].source
    fixed = onnx_ops.prepare_trt_twin(m)
    assert errors(lint(fixed)) == [] and ops(fixed)[-2:] == ["Xor", "Not"]
    feeds = {"a": np.array([-2, -2, 3, 3]), "b": np.array([-1, 5, -1, 5])}  # every sign combination
    np.testing.assert_array_equal(run(fixed, feeds)[0], run(m, feeds)[0])


def test_bool_only_ops_on_other_types():
    nodes = [helper.make_node("Not", ["x"], ["y"], name="not")]
    m = model(nodes, [vi("x", F32, [2])], [vi("y", F32, [2])])  # invalid ONNX, as a typo would make it
    assert rules(lint(m)) == {"bool-elementwise"}


@pytest.mark.parametrize("equation,shapes", [
    ("bsgi,goi->bsgo", [(2, 3, 4, 8), (4, 5, 8)]),  # the grouped output projection
    ("bsjk,bsjd->bskd", [(2, 3, 4, 4), (2, 3, 4, 6)]),  # the hyper-connection post mix
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ik,kj->ji", [(3, 4), (4, 5)]),  # a transposed output
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 5, 8)]),
    ("axk,bk->abx", [(2, 3, 4), (5, 4)]),
    ("prk,pqsk->pqrs", [(2, 3, 4), (2, 5, 6, 4)]),  # a batch label missing inside: Unsqueeze
])
def test_einsum_to_matmul(equation, shapes):
    rng = np.random.default_rng(len(equation))
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    nodes = [helper.make_node("Einsum", ["x0", "x1"], ["y"], name="einsum", equation=equation)]
    m = model(nodes, [vi("x0", F32, list(shapes[0])), vi("x1", F32, list(shapes[1]))], [vi("y", F32, None)])
    fixed = onnx_ops.prepare_trt_twin(m)
    assert "Einsum" not in ops(fixed) and "MatMul" in ops(fixed)
    want = np.einsum(equation, *[x.astype(np.float64) for x in xs])
    got = run(fixed, {"x0": xs[0], "x1": xs[1]})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fp16_einsum_fires_and_is_fixed():
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", F16, [4, 5, 8], rng.standard_normal((4, 5, 8)).astype(np.float16).tobytes(), raw=True)
    nodes = [helper.make_node("Einsum", ["x", "w"], ["y"], name="proj", equation="bsgi,goi->bsgo")]
    m = model(nodes, [vi("x", F16, [2, 3, 4, 8])], [vi("y", F16, [2, 3, 4, 5])], [w])
    found = errors(lint(m))
    assert [f.rule for f in found] == ["einsum-dtype"] and "IEinsumLayer" in found[0].source
    fixed = onnx_ops.prepare_trt_twin(m)
    assert errors(lint(fixed)) == [] and "Einsum" not in ops(fixed)
    x = rng.standard_normal((2, 3, 4, 8)).astype(np.float16)
    np.testing.assert_allclose(run(fixed, {"x": x})[0].astype(np.float32), run(m, {"x": x})[0].astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    # a form MatMul cannot take: computed in float32 between Casts
    nodes = [helper.make_node("Einsum", ["x", "x"], ["y"], name="gram", equation="ij,ij->i")]
    m = model(nodes, [vi("x", F16, [3, 4])], [vi("y", F16, [3])])
    fixed = onnx_ops.prepare_trt_twin(m)
    assert errors(lint(fixed)) == [] and ops(fixed) == ["Cast", "Cast", "Einsum", "Cast"]


def _plugin_model(**attrs):
    node = helper.make_node("IndexerTopK", ["q", "w", "k", "p"], ["idx"], name="topk", domain="hatrt",
                            ratio=4, topk=8, **attrs)
    return model([node], [vi(n, F32, None) for n in "qwk"] + [vi("p", I64, None)], [vi("idx", I64, None)],
                 domains=["hatrt"])


def test_plugin_node_rules():
    good = _plugin_model(plugin_namespace="hatrt", plugin_version="1")
    assert errors(lint(good)) == []
    bare = _plugin_model()
    assert [f.rule for f in errors(lint(bare))] == ["plugin-node"]
    assert "plugin_namespace and plugin_version" in str(errors(lint(bare))[0])
    wrong = _plugin_model(plugin_namespace="other", plugin_version="1")
    assert [f.rule for f in errors(lint(wrong))] == ["plugin-node"]
    with_function = onnx_ops.attach_functions(_plugin_model(plugin_namespace="hatrt", plugin_version="1"))
    found = errors(lint(with_function))
    assert [f.rule for f in found] == ["plugin-node"] and "function" in found[0].message
    assert "parseNode" in found[0].source
    assert errors(lint(onnx_ops.prepare_trt_twin(with_function))) == []  # the twin drops the function


def test_topk_rules():
    inits = [helper.make_tensor("k", I64, [1], [4096]), helper.make_tensor("k8", I64, [1], [8])]
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="big"),
             helper.make_node("TopK", ["x", "k8"], ["v2", "i2"], name="unsorted", sorted=0),
             helper.make_node("TopK", ["x", "k8"], ["v3", "i3"], name="fine")]
    outs = [vi(f"{c}{j}", F32 if c == "v" else I64, None) for j in ("", "2", "3") for c in "vi"]
    m = model(nodes, [vi("x", F32, [8192])], outs, inits)
    assert sorted(f.node for f in errors(lint(m))) == ["big", "unsorted"]


def test_qdq_zero_point_must_be_zero():
    def qdq(zp_value):
        inits = [helper.make_tensor("s", F32, [], [0.5]), helper.make_tensor("zp", T.INT8, [], [zp_value])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")]
        return model(nodes, [vi("x", F32, [4])], [vi("y", F32, [4])], inits)

    assert errors(lint(qdq(0))) == []
    assert [f.node for f in errors(lint(qdq(3)))] == ["q", "dq"]


def test_opset_and_oldest_tensorrt():
    ident = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    io = ([vi("x", F32, [2])], [vi("y", F32, [2])])
    assert oldest_tensorrt(model(ident, *io, opset=23)) == (10, 15)
    assert oldest_tensorrt(model(ident, *io, opset=22)) == (10, 6)
    assert oldest_tensorrt(model(ident, *io, opset=20)) == (10, 0)
    assert rules(lint(model(ident, *io, opset=25))) == {"opset"}
    info = [f for f in lint(model(ident, *io, opset=23)) if f.severity == INFO]
    assert [f.rule for f in info] == ["min-tensorrt"] and "10.15" in info[0].message


def test_build_time_warnings():
    nodes = [helper.make_node("Cast", ["x"], ["c"], name="noop", to=F32),
             helper.make_node("Reshape", ["i", "shape"], ["r"], name="int_reshape")]
    m = model(nodes, [vi("x", F32, [2]), vi("i", I64, [2])], [vi("c", F32, [2]), vi("r", I64, [2, 1])],
              [helper.make_tensor("shape", I64, [2], [2, 1])])
    found = lint(m)
    assert errors(found) == [] and rules(found, WARNING) == {"noop-cast", "int64-reshape"}
    assert "noop-cast" not in rules(lint(onnx_ops.prepare_trt_twin(m)), WARNING)


def test_every_rule_cites_a_source():
    for rule, (what, source) in RULES.items():
        assert what and any(s in source for s in (".cpp", ".md", "NvInfer.h")), rule


def test_cli_prints_findings_and_fails_on_errors(tmp_path, capsys):
    from exporter.trt_lint import main

    nodes = [const("a", [-1], dims=[1]), helper.make_node("Identity", ["a"], ["axes"], name="id"),
             helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")]
    path = tmp_path / "bad.trt.onnx"
    onnx.save(model(nodes, [vi("x", F32, [2, 3])], [vi("y", F32, None)]), str(path))
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "1 errors" in out and "[reduce-axes]" in out and "source: importerUtils.cpp" in out
