"""hatrt::RoutedExperts (docs/moe.md): the routed experts of a MoE layer as one op.

- the eager op equals the reference loop of exporter/model.py MoE bit for bit (top-k and hash
  layers, repeated picks, indices outside [0, E));
- the exported MoE layer has one RoutedExperts node, and its exported program equals eager;
- ONNX Runtime on the function body (dense) equals the eager op;
- a tiny-flash export has one RoutedExperts node per MoE layer and passes `hatrt check`;
- the plugin library (with the RoutedExperts plugin) compiles against the TensorRT headers and its
  harness passes (CPU part), when nvcc and the headers are there.
The kernel itself is compared with the eager op in plugins/tests/test_kernels.py (test_routed_experts,
on the CUDA emulator and on a GPU).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import custom_ops, onnx_ops
from exporter.model import MoE
from exporter.presets import preset

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:# The axis name")
ROOT = Path(__file__).resolve().parents[1]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_moe(layer_id: int, *, seed: int = 0, experts: int = 8, topk: int = 2, repeated: bool = False,
             shared_clamp: bool = True) -> MoE:
    """A tiny-flash MoE layer with random weights (layer 0 is a hash layer there)."""
    import dataclasses

    c = dataclasses.replace(preset("tiny-flash"), n_routed_experts=experts, num_experts_per_tok=topk)
    moe = MoE(c, layer_id, shared_clamp)
    g = seeded(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1))
        if moe.gate.bias is None:
            tid = torch.randint(0, experts, moe.gate.tid2eid.shape, generator=g)
            if repeated:  # transformers writes an all-zero tid2eid: every token picks expert 0 k times
                tid[::2] = 0
            moe.gate.tid2eid.copy_(tid)
    return moe


def stacked(moe: MoE):
    return [torch.stack([getattr(e, w).weight for e in moe.experts]) for w in ("w1", "w3", "w2")]


def op_inputs(seed: int, *, T=11, d=16, I=8, E=5, k=3, dtype=torch.float32, repeated=False, out_of_range=False):
    g = seeded(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    idx = torch.randint(0, E, (T, k), generator=g)
    if repeated:
        idx[::2, 1] = idx[::2, 0]
    if out_of_range:
        idx[1, 0], idx[3, -1] = -1, E
    w = torch.rand(T, k, generator=g)
    w1 = (torch.randn(E, I, d, generator=g) * d ** -0.5).to(dtype)
    w3 = (torch.randn(E, I, d, generator=g) * d ** -0.5).to(dtype)
    w2 = (torch.randn(E, d, I, generator=g) * I ** -0.5).to(dtype)
    return dict(x=x, expert_idx=idx, expert_weights=w, w1=w1, w3=w3, w2=w2)


def call(inputs, **attrs):
    names = onnx_ops.SIGNATURES["RoutedExperts"][0]
    return torch.ops.hatrt.RoutedExperts(*[inputs[n] for n in names], **attrs)


# --------------------------------------------------------------------------- eager
@pytest.mark.parametrize("layer_id,repeated", [(0, False), (0, True), (2, False)], ids=["hash", "hash-repeated", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_op_is_the_reference_moe_loop(layer_id, repeated, dtype):
    moe = make_moe(layer_id, repeated=repeated).to(dtype)
    assert (moe.gate.bias is None) == (layer_id == 0)
    g = seeded(1)
    x = torch.randn(2, 7, 64, generator=g).to(dtype)
    ids = torch.randint(0, 512, (2, 7), generator=g)
    want = moe(x, ids)  # eager branch: the loop over picked experts
    flat = x.reshape(-1, 64)
    weights, idx = moe.gate(flat, ids.reshape(-1))
    if repeated:
        assert (idx[:, 0] == idx[:, 1]).any()
    routed = custom_ops.routed_experts(flat, idx, weights, *stacked(moe), swiglu_limit=moe.experts[0].limit)
    got = (routed + moe.shared_experts(flat).float()).to(dtype).view(x.shape)
    assert routed.dtype == torch.float32
    assert torch.equal(got, want)


def test_repeated_picks_add_up_and_out_of_range_picks_are_skipped():
    x = op_inputs(0, k=2)
    x["expert_idx"][:, 1] = x["expert_idx"][:, 0]
    once = dict(x, expert_idx=x["expert_idx"][:, :1].contiguous(),
                expert_weights=(x["expert_weights"].sum(1, keepdim=True)).contiguous())
    torch.testing.assert_close(call(x, swiglu_limit=10.0), call(once, swiglu_limit=10.0), rtol=1e-6, atol=1e-6)
    y = op_inputs(1, out_of_range=True)
    keep = (y["expert_idx"] >= 0) & (y["expert_idx"] < y["w1"].shape[0])
    z = dict(y, expert_idx=y["expert_idx"].clamp(0, y["w1"].shape[0] - 1),
             expert_weights=torch.where(keep, y["expert_weights"], 0.0))
    torch.testing.assert_close(call(y), call(z), rtol=1e-6, atol=1e-6)


def test_clamp_and_opcheck():
    x = op_inputs(2)
    x["x"] = x["x"] * 30  # gate/up far beyond the limit
    clamped, free = call(x, swiglu_limit=1.0), call(x, swiglu_limit=0.0)
    assert not torch.allclose(clamped, free)
    with pytest.raises(ValueError):
        call(x, swiglu_limit=-1.0)
    torch.library.opcheck(torch.ops.hatrt.RoutedExperts.default,
                          tuple(x[n] for n in onnx_ops.SIGNATURES["RoutedExperts"][0]), dict(swiglu_limit=10.0))


@pytest.mark.parametrize("layer_id", [0, 2])
def test_export_branch_uses_one_node_and_matches_eager(layer_id):
    moe = make_moe(layer_id, repeated=layer_id == 0)
    g = seeded(3)
    x = torch.randn(2, 5, 64, generator=g)
    ids = torch.randint(0, 512, (2, 5), generator=g)
    prog = torch.export.export(moe, (x, ids))
    targets = [str(n.target) for n in prog.graph.nodes if n.op == "call_function"]
    assert targets.count("hatrt.RoutedExperts.default") == 1
    # the router's linear and the shared expert's three remain; no per-expert chains
    assert sum("linear" in t for t in targets) == 4
    assert torch.equal(prog.module()(x, ids), moe(x, ids))


# --------------------------------------------------------------------------- ONNX function
_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.int64: TensorProto.INT64,
         torch.int32: TensorProto.INT32}


def single_node_model(inputs, attrs):
    names = onnx_ops.SIGNATURES["RoutedExperts"][0]
    node = helper.make_node("RoutedExperts", names, ["out"], domain=onnx_ops.DOMAIN, name="the_op", **attrs,
                            plugin_namespace="hatrt", plugin_version="1")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info(n, _ONNX[inputs[n].dtype], [None] * inputs[n].dim())
                               for n in names],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, None])])
    return onnx_ops.attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def run_ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


@pytest.mark.parametrize("kw,attrs", [
    (dict(), dict(swiglu_limit=10.0)),
    (dict(repeated=True, out_of_range=True), dict(swiglu_limit=0.5)),
    (dict(T=1, k=1, E=3), dict()),  # decode-sized, default attribute (no clamp)
    (dict(T=9, E=16, k=6, I=24, d=32), dict(swiglu_limit=0.0)),
], ids=["clamp", "repeated-out-of-range", "decode-default", "wider"])
def test_function_matches_eager_in_onnxruntime(kw, attrs):
    x = op_inputs(5, **kw)
    want = call(x, **attrs).numpy()
    model = single_node_model(x, attrs)
    onnx.checker.check_model(model, full_check=True)
    assert onnx_ops.check_hatrt_nodes(model) == []
    got = run_ort(model, x)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_function_with_half_inputs_and_int32_indices():
    x = op_inputs(6, dtype=torch.float16)
    x["expert_idx"] = x["expert_idx"].int()
    want = call(x, swiglu_limit=10.0).numpy()
    got = run_ort(single_node_model(x, dict(swiglu_limit=10.0)), x)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # fp32 body vs fp16 intermediates


# --------------------------------------------------------------------------- export + check
@pytest.fixture(scope="module")
def moe_export(tmp_path_factory):
    from exporter.export import export_model

    out = tmp_path_factory.mktemp("moe_export") / "tiny-flash"
    return export_model("tiny-flash", out, dtype="float32").out_dir


def test_export_has_one_routed_experts_node_per_moe_layer_and_passes_check(moe_export):
    from engines.check import check

    c = preset("tiny-flash")
    n_moe = c.num_layers if c.ffn_type == "moe" else 0
    for name in ("step.onnx", "step.trt.onnx"):
        m = onnx.load(str(moe_export / name), load_external_data=False)
        nodes = [n for n in m.graph.node if n.domain == "hatrt" and n.op_type == "RoutedExperts"]
        assert len(nodes) == n_moe, name
        assert all({a.name for a in n.attribute} >= {"swiglu_limit", "plugin_namespace", "plugin_version"}
                   for n in nodes)
        # no per-expert chains left: the only MatMuls with expert weights are gone
        assert not any("experts." in i and ".w1" in i for n in m.graph.node if n.op_type == "MatMul"
                       for i in n.input)
    twin = onnx.load(str(moe_export / "step.trt.onnx"), load_external_data=False)
    assert not [f for f in twin.functions if f.domain == "hatrt"]
    report = check(moe_export)
    assert report.passed, report.first_failure


# --------------------------------------------------------------------------- plugin build
TRT_INCLUDE = Path(os.environ.get("TENSORRT_INCLUDE_DIR", ROOT / "third_party" / "TensorRT" / "include"))
if not (TRT_INCLUDE / "NvInferRuntime.h").exists():
    TRT_INCLUDE = ROOT.parent / "shared" / "third_party" / "TensorRT" / "include"


@pytest.mark.skipif(not (TRT_INCLUDE / "NvInferRuntime.h").exists(), reason="TensorRT headers not found")
def test_plugin_library_with_routed_experts_builds_and_harness_passes(tmp_path):
    """The whole plugin library (RoutedExperts included) compiles against the TensorRT headers with
    -Wall -Wextra clean and links with --no-undefined and no libnvinfer, getCreators returns five
    creators, and the plugin harness's CPU part passes (RoutedExperts: fields, types, shapes,
    serialization). Built with CMake so that plugins/CMakeLists.txt is what is checked."""
    import shutil

    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc / cmake not found")
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="1")
    subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DTENSORRT_INCLUDE_DIR={TRT_INCLUDE}", "-DHATRT_CUDA_ARCHS=90a"],
                   check=True, capture_output=True, env=env, timeout=300)
    proc = subprocess.run(["cmake", "--build", str(build), "-j1"], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = subprocess.run([str(build / "hatrt_plugin_harness")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
