"""FP8 quantization: the recipe's simulation equals ONNX Q/DQ, the rewritten graph has the pattern
TensorRT fuses, ONNX Runtime runs it, and `hatrt check` passes it against the reference under the
same recipe (while the unquantized reference shows what FP8 costs)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from engines.backends import BackendError, load_backend
from engines.check import check
from engines.cli import main
from engines.quantize import QuantizeError, quantize_export
from exporter import fp8

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def fp8_export(flash_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "tiny-flash-fp8"
    g = torch.Generator().manual_seed(0)
    quantize_export(flash_export, out, calib_tokens=torch.randint(0, 512, (600,), generator=g).tolist())
    return out


def _ort_qdq(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX Runtime's QuantizeLinear -> DequantizeLinear to float8e4m3fn on x."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0])
    if axis is None:  # per tensor: the scalar zero point sets the FP8 type
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    else:  # per axis: no zero point, the type from output_dtype
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=axis,
                                  output_dtype=TensorProto.FLOAT8E4M3FN),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
                                             helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], [zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "s": scale})[0]


def test_fake_quant_equals_onnx_qdq_per_tensor_and_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * torch.logspace(-3, 3, 48)  # wide range, saturation included
    x[0, :4] = torch.tensor([0.0, -0.0, 1e9, -1e9])
    s = 0.01
    ours = fp8.fake_quant(x, s).numpy()
    np.testing.assert_array_equal(ours, _ort_qdq(x.numpy(), np.asarray(s, np.float32), None))
    ws = fp8.weight_scale(x)  # per row
    ours = fp8.fake_quant(x, ws.unsqueeze(1)).numpy()
    np.testing.assert_array_equal(ours, _ort_qdq(x.numpy(), ws.numpy(), 0))
    assert np.abs(ours).max() <= x.abs().max().item()  # saturates at 448 * scale, never inf


def test_policy_quantizes_the_gemms_and_keeps_the_rest(fp8_export):
    recipe = json.loads((fp8_export / "fp8_recipe.json").read_text())["linears"]
    assert recipe and all(fp8.is_fp8_linear(n) for n in recipe)
    assert not any(k in n for n in recipe for k in ("head", "indexer", "gate", "compressor"))
    kinds = {n.split(".")[-1] for n in recipe}
    assert {"wq_a", "wq_b", "wkv", "wo_b", "w1", "w2", "w3"} <= kinds


def test_graph_has_fusable_qdq_and_fp8_weights(fp8_export):
    m = onnx.load(str(fp8_export / "step.onnx"))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    recipe = json.loads((fp8_export / "fp8_recipe.json").read_text())["linears"]
    gemms = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in prod
             and prod[n.input[1]].op_type == "DequantizeLinear"]
    assert len(gemms) == len(recipe)
    for n in gemms:
        w_dq, x_dq = prod[n.input[1]], prod[n.input[0]]
        assert x_dq.op_type == "DequantizeLinear"  # DQ feeds the GEMM directly: no Cast between
        assert prod[x_dq.input[0]].op_type == "QuantizeLinear"
        w = inits[w_dq.input[0]]
        assert w.data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert inits[w_dq.input[1]].dims == [w.dims[1] if n.op_type == "MatMul" else w.dims[0]]  # per channel
        assert len(inits[x_dq.input[1]].dims) == 0  # per tensor
    # the fp32 originals of quantized weights are gone; the kept ones remain
    assert not any(name.removeprefix("model.").removesuffix(".weight") in recipe for name in inits
                   if name.endswith(".weight"))
    assert "model.head.weight" in inits
    twin = onnx.load(str(fp8_export / "step.trt.onnx"))
    assert not twin.functions and any(n.op_type == "QuantizeLinear" for n in twin.graph.node)
    from exporter.trt_lint import errors, lint

    assert errors(lint(twin)) == []  # the FP8 twin is prepared for TensorRT's parser like any twin


def test_manifest_records_the_recipe(fp8_export, flash_export):
    m = json.loads((fp8_export / "manifest.json").read_text())
    q = m["quantization"]
    assert q["precision"] == "fp8" and q["recipe"] == "fp8_recipe.json" and len(q["recipe_sha256"]) == 64
    assert q["linears"] == len(json.loads((fp8_export / "fp8_recipe.json").read_text())["linears"])
    assert 0 < q["weight_error"]["mean"] <= q["weight_error"]["max"] < 0.1
    assert q["calibration"]["tokens"] == 600
    assert set(m["files"]) >= {"step.onnx", "step.trt.onnx", "fp8_recipe.json"}


def test_check_passes_against_the_same_recipe_and_fp8_costs_against_none(fp8_export):
    report = check(fp8_export, steps=4, prompts=[list(range(1, 150))])
    assert report.passed, report.failed_outputs
    assert report.outputs["logits"].max_rel < 2e-2 and report.logits.min_cosine > 0.999
    assert report.logits.top1_agreement == 1.0
    # the unquantized reference: FP8's real cost (random weights, 600 random calibration tokens),
    # far above the simulation's disagreement
    plain = load_backend("tiny-flash", "torch").model
    cost = check(fp8_export, steps=4, prompts=[list(range(1, 150))], reference=plain)
    assert cost.outputs["logits"].max_rel > 10 * report.outputs["logits"].max_rel
    assert cost.logits.min_cosine < report.logits.min_cosine


def test_tampered_recipe_and_requantizing_are_refused(fp8_export, tmp_path):
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_export(fp8_export, tmp_path / "again", calib_tokens=[1, 2, 3])
    bad = tmp_path / "bad"
    shutil.copytree(fp8_export, bad)
    recipe = json.loads((bad / "fp8_recipe.json").read_text())
    first = next(iter(recipe["linears"]))
    recipe["linears"][first]["input_scale"] *= 2
    (bad / "fp8_recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(BackendError, match="fp8_recipe.json"):
        load_backend(bad, "onnxruntime")  # the manifest's sha256 of the file
    with pytest.raises(BackendError, match="recipe"):
        load_backend(bad, "torch")  # the recipe's own hash


def test_cli_quantize_bad_input(flash_export, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "nope" in r.output
    r = CliRunner().invoke(main, ["quantize", str(flash_export), "-o", str(tmp_path / "out"), "--calib", "some text"])
    assert r.exit_code == 2 and "tokenizer" in r.output
    assert not (tmp_path / "out").exists()
