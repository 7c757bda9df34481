"""Faithfulness regressions: the reference and its export compute what DeepSeek's code and
`transformers` compute.

- YaRN applies on compressed layers whenever the config names it, whatever
  max_position_embeddings is (it used to be skipped when max_position_embeddings <= the original
  length).
- The exported MoE adds repeated expert picks like the eager loop (transformers writes an all-zero
  hash table, so every token picks expert 0 twice); it used to scatter them, keeping one.
- The quantization simulation exports to ONNX (torch.copysign lowered to prims.signbit, which has
  none) and ONNX Runtime reproduces it bit for bit (pow2_scale is exact in both).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
import pytest
import torch

from exporter import onnx_ops, preset
from exporter.config import Yarn
from exporter.model import MoE, Transformer
from exporter.quant import (_E2M1, _E2M1_EDGES, _E2M1_TIE_UP, fake_quant_fp4, fake_quant_fp8, hadamard, pow2_scale,
                            round_e2m1)
from exporter.rope import Rotary, inv_freq

OPSET = 23


def _onnx_export(module: torch.nn.Module, args: tuple, dynamic_shapes, path) -> None:
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the hatrt translations: the export branch of MoE is one hatrt RoutedExperts node
        program = onnx_ops.export(module, args, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                                  verbose=False, report=False)
    program.save(str(path))


def _ort_session(path):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _bits(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).view(np.int32)


# --------------------------------------------------------------------------- 1. YaRN
def _yarn_config(original: int, max_positions: int):
    return dataclasses.replace(preset("tiny-flash"), yarn=Yarn(factor=16.0, original_max_position_embeddings=original),
                               max_position_embeddings=max_positions)


@pytest.mark.parametrize("original,max_positions", [(256, 64), (256, 256), (256, 4096), (65536, 32768),
                                                    (65536, 1048576)])
def test_inv_freq_equals_transformers_whatever_max_positions(original, max_positions):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    cfg = _yarn_config(original, max_positions)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # it warns that factor != max / original
    hf = DeepseekV4RotaryEmbedding(transformers.DeepseekV4Config(**cfg.to_hf_dict()))
    assert hf.compress_attention_scaling == 1.0 and hf.main_attention_scaling == 1.0
    compressed, window = Rotary(cfg, compressed=True), Rotary(cfg, compressed=False)
    # Bit for bit: a power-of-two factor (V4's 16) makes freqs / factor and 1 / (factor * base^x) equal.
    assert torch.equal(compressed.inv_freq, hf.compress_inv_freq)
    assert torch.equal(window.inv_freq, hf.main_inv_freq)
    plain = inv_freq(cfg.rope_dim, cfg.compress_rope_theta)
    assert torch.equal(compressed.inv_freq[0], plain[0])  # highest frequency kept ...
    assert torch.equal(compressed.inv_freq[-1], plain[-1] / 16)  # ... lowest interpolated


@torch.no_grad()
def test_logits_match_transformers_when_max_positions_within_yarn_original_length(tmp_path):
    """max_position_embeddings (1024) <= YaRN's original length (4096): YaRN still applies."""
    transformers = pytest.importorskip("transformers")
    from test_transformers_parity import REL_TOL, randomize

    from exporter.checkpoint import load_model

    cfg = _yarn_config(original=4096, max_positions=1024)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg.to_hf_dict())).eval()
    randomize(hf, seed=11)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, quant_sim=False)
    assert ours.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 400), generator=torch.Generator().manual_seed(3))
    want = hf(ids, use_cache=False).logits.float()
    got = ours(ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < min(REL_TOL, 2e-5), rel
    assert (got.argmax(-1) == want.argmax(-1)).all()

    # The test can see the bug: without YaRN on the compressed layers the logits move far more.
    for m in ours.modules():
        if isinstance(m, Rotary) and m.yarn is not None:
            m.inv_freq.copy_(inv_freq(m.dim, m.base))
    wrong = ((ours(ids) - want).abs().max() / want.abs().max()).item()
    assert wrong > 50 * rel and wrong > 1e-4, (wrong, rel)


# --------------------------------------------------------------------------- 2. repeated experts
def _moe(hash_table: str) -> MoE:
    model = Transformer(preset("tiny-flash")).init_random(seed=1).eval()
    moe = model.layers[0].ffn  # layer 0 is a hash layer (num_hash_layers=1)
    assert isinstance(moe, MoE) and moe.gate.bias is None
    t = moe.gate.tid2eid
    if hash_table == "zeros":  # what transformers writes: every token picks expert 0 twice
        t.zero_()
    elif hash_table == "repeats":  # a mix of repeated and distinct picks
        g = torch.Generator().manual_seed(2)
        t.copy_(torch.randint(0, 3, t.shape, generator=g))
    assert (t[:, 0] == t[:, 1]).any()
    return moe


def _moe_by_hand(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """shared(x) + sum over the k picks of w * expert(x): a repeated pick counts every time."""
    flat = x.reshape(-1, x.shape[-1])
    w, idx = moe.gate(flat, ids.reshape(-1))
    out = moe.shared_experts(flat).float()
    for t in range(flat.shape[0]):
        for j in range(idx.shape[1]):
            out[t] += w[t, j] * moe.experts[int(idx[t, j])](flat[t:t + 1]).float()[0]
    return out.view(x.shape)


@pytest.mark.parametrize("hash_table", ["zeros", "repeats"])
@torch.no_grad()
def test_export_path_moe_sums_repeated_experts_like_eager(hash_table, monkeypatch):
    moe = _moe(hash_table)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, moe.gate.weight.shape[1], generator=g)
    ids = torch.randint(0, moe.gate.tid2eid.shape[0], (2, 19), generator=g)
    eager = moe(x, ids)
    torch.testing.assert_close(eager, _moe_by_hand(moe, x, ids), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    exported_branch = moe(x, ids)
    torch.testing.assert_close(exported_branch, eager, rtol=1e-5, atol=1e-6)


class _MoEGraph(torch.nn.Module):
    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.moe(x, input_ids)


@torch.no_grad()
def test_onnx_moe_with_all_zero_hash_table_matches_eager(tmp_path):
    import onnx

    moe = _moe("zeros")
    d, vocab = moe.gate.weight.shape[1], moe.gate.tid2eid.shape[0]
    g = torch.Generator().manual_seed(0)
    trace = (torch.randn(2, 7, d, generator=g), torch.randint(0, vocab, (2, 7), generator=g))
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=4096)
    path = tmp_path / "moe.onnx"
    _onnx_export(_MoEGraph(moe).eval(), trace, ({0: batch, 1: seq}, {0: batch, 1: seq}), path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"ScatterElements", "ScatterND"}, ops  # duplicate scatter indices are undefined in ONNX
    sess = _ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    x, ids = torch.randn(3, 41, d, generator=g), torch.randint(0, vocab, (3, 41), generator=g)
    got = sess.run(None, dict(zip(names, (x.numpy(), ids.numpy()))))[0]
    want = moe(x, ids)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    # A scatter would keep one of the two picks: half the routed output. The sum differs from it.
    assert not torch.allclose(want, moe.shared_experts(x.reshape(-1, d)).view(x.shape), atol=1e-3)


# --------------------------------------------------------------------------- 3. quant-sim export
def _round_e2m1_copysign(y: torch.Tensor) -> torch.Tensor:
    """The previous round_e2m1 (torch.copysign): the bit-level reference of the rewrite."""
    a = y.abs()
    idx = torch.bucketize(a, _E2M1_EDGES)
    on_edge = (idx < len(_E2M1_EDGES)) & (a == _E2M1_EDGES[idx.clamp(max=len(_E2M1_EDGES) - 1)])
    idx = idx + (on_edge & _E2M1_TIE_UP[idx.clamp(max=len(_E2M1_EDGES) - 1)]).long()
    return torch.copysign(_E2M1[idx], y)


def _e2m1_inputs() -> torch.Tensor:
    inf = torch.tensor(float("inf"))
    marks = torch.cat([_E2M1_EDGES, _E2M1, torch.tensor([1e-30, 1e-45, 1e-38, 0.1, 5.999, 6.5, 1e30])])
    near = torch.cat([marks, torch.nextafter(marks, inf), torch.nextafter(marks, -inf)])
    grid = torch.linspace(0, 6, 60001)
    rand = torch.rand(200000, generator=torch.Generator().manual_seed(0)) * 6
    mags = torch.cat([near, grid, rand])
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    return torch.cat([mags, -mags, specials])


def test_round_e2m1_is_bit_identical_to_copysign():
    y = _e2m1_inputs()
    got, want = round_e2m1(y), _round_e2m1_copysign(y)
    assert np.array_equal(_bits(got), _bits(want))
    # signed zeros: -0.0 and tiny negatives keep their sign, as copysign does
    z = round_e2m1(torch.tensor([-0.0, -0.1, -0.25, 0.0, 0.1, 0.25]))
    assert torch.signbit(z).tolist() == [True, True, True, False, False, False]
    # ties to the even mantissa
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert round_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_e2m1(-ties).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]


def _pow2_exact(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest power of two >= max(amax, 1e-4) / qmax, from the exponent (as ue8m0 kernels)."""
    y = amax.clamp(min=1e-4) / qmax
    mant, exp = torch.frexp(y)  # y = mant * 2^exp, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(y), torch.where(mant == 0.5, exp - 1, exp))


def _pow2_edges(qmax: float) -> torch.Tensor:
    inf = torch.tensor(float("inf"))
    exact = qmax * torch.exp2(torch.arange(-13, 20, dtype=torch.float32))
    up1 = torch.nextafter(exact, inf)
    up2, up3 = torch.nextafter(up1, inf), torch.nextafter(torch.nextafter(up1, inf), inf)
    rand = torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 1000
    return torch.cat([exact, up1, up2, up3, torch.nextafter(exact, -inf), rand, torch.tensor([0.0, 1e-4, 1e-5])])


@pytest.mark.parametrize("qmax", [448.0, 6.0])
def test_pow2_scale_is_the_exact_smallest_power_of_two(qmax):
    amax = _pow2_edges(qmax)
    got = pow2_scale(amax, qmax)
    assert torch.equal(got, _pow2_exact(amax, qmax))
    assert (amax.clamp(min=1e-4) / got <= qmax).all()


class _QuantSim(torch.nn.Module):
    def forward(self, x: torch.Tensor, a: torch.Tensor):
        return (fake_quant_fp8(x), fake_quant_fp4(hadamard(x)), pow2_scale(a, 448.0), pow2_scale(a, 6.0),
                round_e2m1(a.clamp(-6.0, 6.0)))


def test_quant_sim_functions_export_and_onnxruntime_matches_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    trace = (torch.randn(2, 3, 128, generator=g), torch.rand(50, generator=g))
    dims = ({0: torch.export.Dim("b"), 1: torch.export.Dim("s")}, {0: torch.export.Dim("n")})
    path = tmp_path / "quant_sim.onnx"
    _onnx_export(_QuantSim().eval(), trace, dims, path)  # used to fail: no ONNX for prims.signbit
    sess = _ort_session(path)
    # blocks of very different magnitudes, some with amax exactly qmax * 2^k (scale edges)
    x = torch.randn(48, 5, 128, generator=g) * torch.exp2(torch.randint(-12, 12, (48, 5, 1), generator=g).float())
    x[0, 0, :64] *= 448 * 2.0 ** -3 / x[0, 0, :64].abs().max()
    x[0, 1, :32] *= 6 * 2.0 ** 2 / x[0, 1, :32].abs().max()
    x[1, :, :] = 0.0
    x[2, 0, :5] = torch.tensor([-0.0, -1e-9, 1e-9, 0.25, -0.75])
    a = torch.cat([_pow2_edges(448.0), _pow2_edges(6.0), -_e2m1_inputs()[:5000], _e2m1_inputs()[:5000]])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (x.numpy(), a.numpy()))))
    want = _QuantSim()(x, a)
    for name, o, w in zip(["fp8", "fp4", "pow2_scale fp8", "pow2_scale fp4", "round_e2m1"], got, want):
        assert np.array_equal(_bits(o), _bits(w.numpy())), name
