"""The generate loop, the flat-cache operations, the backends and `hatrt generate`.

The reference for generation is the most naive loop there is: re-run the full prefill on the
growing sequence for every new token and take the argmax. The batched loop (prefill each prompt
alone, merge caches, decode every row at its own position, grow entry buffers, drop finished
rows) must produce exactly the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from engines import cache_ops
from engines.backends import Backend, BackendError, TorchBackend, load_backend
from engines.cli import main
from engines.generate import LENGTH, STOP, SamplingParams, filter_logits, generate, sample, stream
from exporter import Cache, load_model
from exporter.cache import CSA_ENTRIES, HCA_ENTRIES, cache_layout
from exporter.graph import DecodeGraph, PrefillGraph

PRESET = "tiny-flash"  # window, window, CSA (ratio 4), HCA (ratio 128); window 128
# Decoding 12 tokens after these crosses CSA blocks (every 4), the window (128) and the first two
# HCA blocks (128, 256), with three different capacities in one batch.
LENGTHS = (5, 125, 251)
NEW = 12


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    return load_model(PRESET)


@pytest.fixture(scope="module")
def backend(model):
    return TorchBackend(model)


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Full reference prefill of the whole sequence for every new token."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
    return out


@pytest.fixture(scope="module")
def naive(model, prompts):
    return [naive_greedy(model, p, NEW) for p in prompts]


class Recording(Backend):
    """Wraps a backend; records every call and checks the cache contract of each decode step."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.config, self.layout = inner, inner.name, inner.config, inner.layout
        self.calls: list[tuple] = []

    def prefill(self, input_ids):
        assert input_ids.shape[0] == 1
        self.calls.append(("prefill", input_ids.shape[1]))
        logits, cache = self.inner.prefill(input_ids)
        sizes = cache_ops.validate(cache, self.layout, "prefill output")
        s = input_ids.shape[1]
        assert sizes[CSA_ENTRIES] == s // 4 and sizes[HCA_ENTRIES] == s // 128
        return logits, cache

    def decode(self, input_ids, cache):
        sizes = cache_ops.validate(cache, self.layout, "decode input")
        pos = cache_ops.positions(cache, self.layout)
        need = cache_ops.entries_needed(self.config, int(pos.max()))
        assert all(sizes[d] >= n for d, n in need.items()), (sizes, need)
        assert input_ids.shape == (sizes["batch"], 1)
        self.calls.append(("decode", input_ids.shape[0], pos.tolist()))
        return self.inner.decode(input_ids, cache)

    def decode_batches(self) -> list[int]:
        return [c[1] for c in self.calls if c[0] == "decode"]


@pytest.fixture(scope="module")
def greedy_run(backend, prompts):
    rec = Recording(backend)
    return generate(rec, prompts, max_new_tokens=NEW), rec


# --------------------------------------------------------------------------- greedy == naive
def test_greedy_batch_equals_naive_prefill_loop(greedy_run, naive, prompts):
    results, rec = greedy_run
    assert [r.tokens for r in results] == naive
    assert all(r.finish_reason == LENGTH and len(r.tokens) == NEW for r in results)
    assert [r.prompt_length for r in results] == list(LENGTHS)
    # each prompt prefilled alone, then NEW - 1 batched steps, every row at its own position
    assert rec.calls[:3] == [("prefill", n) for n in LENGTHS]
    decodes = [c for c in rec.calls if c[0] == "decode"]
    assert len(decodes) == NEW - 1 and all(c[1] == 3 for c in decodes)
    assert decodes[0][2] == list(LENGTHS) and decodes[-1][2] == [n + NEW - 2 for n in LENGTHS]


def test_stop_tokens_end_rows_and_leave_the_batch(backend, prompts, naive):
    stops = {naive[1][3], naive[2][0]}  # row 2 stops on its first token (before any decode)
    rec = Recording(backend)
    results = generate(rec, prompts, max_new_tokens=NEW, stop_tokens=stops)
    expected = []
    for toks in naive:
        cut = next((i for i, t in enumerate(toks) if t in stops), None)
        expected.append((toks if cut is None else toks[:cut + 1], LENGTH if cut is None else STOP))
    assert [(r.tokens, r.finish_reason) for r in results] == expected
    assert results[1].finish_reason == STOP and results[1].tokens[-1] in stops
    # decode step k makes token k: exactly the rows with more than k tokens take part
    lengths = [len(t) for t, _ in expected]
    want = [sum(n > k for n in lengths) for k in range(1, max(lengths))]
    assert rec.decode_batches() == want
    assert want[0] < len(prompts)


def test_max_new_tokens(backend, prompts, naive):
    rec = Recording(backend)
    results = generate(rec, prompts, max_new_tokens=0)
    assert [r.tokens for r in results] == [[], [], []] and rec.calls == []
    one = generate(rec, prompts, max_new_tokens=1)
    assert [r.tokens for r in one] == [t[:1] for t in naive]
    assert all(r.finish_reason == LENGTH for r in one)
    assert rec.decode_batches() == []  # the first token comes from the prefill


def test_streaming_order(backend, prompts, naive):
    stops = {naive[0][4]}
    seen = []
    results = generate(backend, prompts, max_new_tokens=6, stop_tokens=stops, on_token=lambda r, t: seen.append((r, t)))
    # after each prefill its first token; then per step the running rows in prompt order
    want = [(r, res.tokens[k]) for k in range(6) for r, res in enumerate(results) if k < len(res.tokens)]
    assert seen == want
    events = list(stream(backend, prompts, max_new_tokens=6, stop_tokens=stops))
    assert [(e.row, e.token) for e in events] == want
    for r, res in enumerate(results):
        mine = [e for e in events if e.row == r]
        assert [e.index for e in mine] == list(range(len(res.tokens)))
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + [res.finish_reason]


def test_bad_arguments(backend, prompts):
    v = backend.config.vocab_size
    for bad, match in [(dict(prompts=[]), "non-empty"), (dict(prompts=[[]]), "empty"),
                       (dict(prompts=[[1, v]]), "token 1"), (dict(prompts=[[-1]]), r"\[0, 512\)"),
                       (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
                       (dict(prompts=[[1] * 4000], max_new_tokens=200), "max_position_embeddings")]:
        args = dict(prompts=prompts[:1], max_new_tokens=2) | bad
        with pytest.raises(ValueError, match=match):
            stream(backend, args.pop("prompts"), **args)  # checked before the first token


# --------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed(backend, prompts):
    kw = dict(max_new_tokens=NEW, temperature=0.9, top_k=40, top_p=0.95)
    a = generate(backend, prompts, seed=7, **kw)
    b = generate(backend, prompts, seed=7, **kw)
    c = generate(backend, prompts, seed=8, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    assert all(0 <= t < backend.config.vocab_size for r in a for t in r.tokens)


def test_top_k_1_and_tiny_top_p_are_greedy(greedy_run, backend, prompts):
    results, _ = greedy_run
    greedy = [r.tokens for r in results]
    assert [r.tokens for r in generate(backend, prompts, max_new_tokens=NEW, temperature=1.5, top_k=1, seed=0)] == greedy
    assert [r.tokens for r in generate(backend, prompts, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=0)] == greedy


def test_filter_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(1.0, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, False, False, False, True]
    assert kept(top_k=0) == [True] * 5 and kept(top_k=9) == [True] * 5
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    nucleus = lambda p: torch.isfinite(filter_logits(probs, SamplingParams(1.0, top_p=p)))[0].tolist()  # noqa: E731
    assert nucleus(0.5) == [True, False, False, False]
    assert nucleus(0.79) == [True, True, False, False]
    assert nucleus(0.81) == [True, True, True, False]
    assert nucleus(1e-9) == [True, False, False, False]
    assert torch.allclose(filter_logits(logits, SamplingParams(2.0)), logits / 2)
    # draws stay inside the kept set and follow the generator
    many = logits.expand(2000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    draws = sample(many, SamplingParams(1.0, top_k=2), gens)
    assert set(draws.tolist()) == {0, 4}
    again = sample(many, SamplingParams(1.0, top_k=2), [torch.Generator().manual_seed(i) for i in range(2000)])
    assert torch.equal(draws, again)
    assert sample(logits, SamplingParams()).tolist() == [4]


# --------------------------------------------------------------------------- cache_ops
@pytest.fixture(scope="module")
def prefilled(model):
    g = torch.Generator().manual_seed(5)
    out = []
    with torch.no_grad():
        for n in (3, 9, 130):
            res = PrefillGraph(model)(torch.randint(0, model.config.vocab_size, (1, n), generator=g))
            out.append(list(res[1:]))
    return out


def test_merge_matches_reference_cache_merge(model, prefilled):
    layout = cache_layout(model.config, model.dtype)
    merged = cache_ops.merge(prefilled, layout)
    ref = Cache.merge([Cache.from_tensors(model.config, [t.clone() for t in c]) for c in prefilled]).to_tensors()
    assert len(merged) == len(ref) == len(layout)
    for spec, a, b in zip(layout, merged, ref):
        assert torch.equal(a, b), spec.name
    sizes = cache_ops.validate(merged, layout)
    assert sizes == {"batch": 3, CSA_ENTRIES: 130 // 4, HCA_ENTRIES: 1}
    assert cache_ops.positions(merged, layout).tolist() == [3, 9, 130]
    e = cache_ops.spec_index(layout, "layer2.entries")
    assert torch.count_nonzero(merged[e][0, 0]) == 0  # padding (3 tokens: no complete block) is zeros
    assert torch.equal(merged[e][1, :2], prefilled[1][e][0])


def test_select_and_nbytes(model, prefilled):
    layout = cache_layout(model.config, model.dtype)
    merged = cache_ops.merge(prefilled, layout)
    picked = cache_ops.select(merged, layout, [2, 0])
    assert cache_ops.batch_size(picked, layout) == 2
    for a, b in zip(picked, merged):
        assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0])
    assert cache_ops.batch_size(cache_ops.select(merged, layout, []), layout) == 0
    with pytest.raises(cache_ops.CacheError, match="out of range"):
        cache_ops.select(merged, layout, [3])
    assert cache_ops.nbytes(merged) == sum(t.numel() * t.element_size() for t in merged)
    ref = Cache.from_tensors(model.config, merged)
    assert cache_ops.nbytes(merged) == ref.nbytes() + ref.pos.numel() * 8


def test_ensure_capacity(model, prefilled):
    layout = cache_layout(model.config, model.dtype)
    cache = prefilled[2]  # 32 CSA entries, 1 HCA entry
    same = cache_ops.ensure_capacity(cache, layout, csa_needed=32, hca_needed=1)
    assert all(a is b for a, b in zip(same, cache))  # nothing to do: no copies
    grown = cache_ops.ensure_capacity(cache, layout, csa_needed=33, hca_needed=2)
    sizes = cache_ops.validate(grown, layout)
    assert sizes[CSA_ENTRIES] >= 40 and sizes[HCA_ENTRIES] == 16  # +25% at least, 16 at least
    for spec, a, b in zip(layout, grown, cache):
        if CSA_ENTRIES in spec.dims or HCA_ENTRIES in spec.dims:
            n = b.shape[1]
            assert torch.equal(a[:, :n], b) and torch.count_nonzero(a[:, n:]) == 0, spec.name
        else:
            assert a is b
    # amortized: growing one entry at a time reallocates O(log n) times
    c, reallocs = cache_ops.empty(model.config, layout), 0
    for n in range(1, 2000):
        before = cache_ops.capacities(c, layout)[CSA_ENTRIES]
        c = cache_ops.ensure_capacity(c, layout, csa_needed=n)
        reallocs += cache_ops.capacities(c, layout)[CSA_ENTRIES] != before
    assert reallocs <= 25
    assert cache_ops.entries_needed(model.config, 127) == {CSA_ENTRIES: 32, HCA_ENTRIES: 1}
    assert cache_ops.entries_needed(model.config, 126) == {CSA_ENTRIES: 31, HCA_ENTRIES: 0}


def test_empty_and_validate(model):
    layout = cache_layout(model.config, model.dtype)
    fresh = cache_ops.empty(model.config, layout, batch=2)
    for a, b in zip(fresh, Cache(model.config, 2).to_tensors()):
        assert torch.equal(a, b)
    with torch.no_grad():  # decoding from an empty cache == prefill of one token
        logits = DecodeGraph(model)(torch.tensor([[7], [9]]), *fresh)[0]
        ref = PrefillGraph(model)(torch.tensor([[7], [9]]))[0]
    torch.testing.assert_close(logits, ref)
    with pytest.raises(cache_ops.CacheError, match="tensors"):
        cache_ops.validate(fresh[:-1], layout)
    bad = list(fresh)
    bad[0] = bad[0].half()
    with pytest.raises(cache_ops.CacheError, match="layer0.window_kv.*dtype"):
        cache_ops.validate(bad, layout)
    bad = list(fresh)
    i = cache_ops.spec_index(layout, "layer2.index_keys")
    bad[i] = torch.zeros(2, 3, bad[i].shape[2])
    with pytest.raises(cache_ops.CacheError, match="csa_entries"):
        cache_ops.validate(bad, layout)
    with pytest.raises(cache_ops.CacheError, match="layout"):
        cache_ops.empty(model.config, cache_layout(model.config, torch.float16)[1:])


# --------------------------------------------------------------------------- backends
def _fake_export(tmp_path, model, **changes) -> None:
    """A manifest as exporter/export.py writes it (no graph files)."""
    layout = cache_layout(model.config, model.dtype)
    io = lambda names: [{"name": n, "dims": [], "dtype": "float32"} for n in names]  # noqa: E731
    pre, dec = PrefillGraph(model), DecodeGraph(model)
    manifest = {"format": "hatrt-export", "version": 1, "config": model.config.to_hf_dict(), "dtype": "float32",
                "quant_sim": False, "source": {"kind": "preset", "value": PRESET},
                "cache_layout": [s.to_dict() for s in layout],
                "graphs": {"prefill": {"file": "prefill.onnx", "inputs": io(pre.input_names()),
                                       "outputs": io(pre.output_names())},
                           "decode": {"file": "decode.onnx", "inputs": io(dec.input_names()),
                                      "outputs": io(dec.output_names())}}}
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))


def test_load_backend_errors(tmp_path, model):
    with pytest.raises(BackendError, match="backend"):
        load_backend(PRESET, "tensorrt-someday")
    with pytest.raises(BackendError, match="no such checkpoint"):
        load_backend(str(tmp_path / "missing"))
    with pytest.raises(BackendError, match="neither a checkpoint"):
        load_backend(tmp_path)
    with pytest.raises(BackendError, match="export directory"):
        load_backend(PRESET, "onnxruntime")
    with pytest.raises(BackendError, match="no manifest.json"):
        load_backend(tmp_path, "onnxruntime")
    pytest.importorskip("exporter.export")
    pytest.importorskip("onnxruntime")
    _fake_export(tmp_path, model, version=99)
    with pytest.raises(BackendError, match="manifest.json.*version"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model, cache_layout=None)
    with pytest.raises(BackendError, match="cache_layout"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model)
    with pytest.raises(BackendError, match="prefill.onnx: graph file missing"):
        load_backend(tmp_path, "onnxruntime")
    for graph in ("prefill", "decode"):  # placeholders: the manifest is checked before any graph is loaded
        (tmp_path / f"{graph}.onnx").write_bytes(b"")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["graphs"]["decode"]["inputs"].reverse()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="graphs.decode.inputs"):
        load_backend(tmp_path, "onnxruntime")
    # torch + export directory: the weights come from the manifest's source ...
    _fake_export(tmp_path, model)
    b = load_backend(tmp_path, "torch")
    assert isinstance(b, TorchBackend) and b.config.name == PRESET
    assert torch.equal(b.model.head.weight, model.head.weight)
    # ... and without one the error says what to pass
    _fake_export(tmp_path, model, source=None)
    with pytest.raises(BackendError, match="pass the checkpoint"):
        load_backend(tmp_path, "torch")


# --------------------------------------------------------------------------- CLI
def test_cli_generate(backend, prompts, naive):
    runner = CliRunner()
    ids = lambda p: " ".join(map(str, p))  # noqa: E731
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", ids(prompts[0]), "--prompt-ids", ids(prompts[1]),
                               "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [ids(naive[0][:4]), ids(naive[1][:4])]
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", ",".join(map(str, prompts[0])), "-n", "4",
                               "--stream"])
    assert res.exit_code == 0 and res.output == ids(naive[0][:4]) + "\n"
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", ids(prompts[0]), "--prompt-ids", "1", "-n", "2",
                               "--stream", "--stop", str(naive[0][0])])
    assert res.exit_code == 0 and res.output.splitlines()[0] == f"0 {naive[0][0]}"
    assert res.output.splitlines()[1].startswith("1 ") and len(res.output.splitlines()) == 3
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", ids(prompts[0]), "-n", "3", "--json",
                               "--stop", str(naive[0][1]), "--temperature", "0"])
    assert res.exit_code == 0
    out = json.loads(res.output)
    assert out["results"] == [{"tokens": naive[0][:2], "finish_reason": "stop", "prompt_length": LENGTHS[0]}]
    a = runner.invoke(main, ["generate", PRESET, "--prompt-ids", "1 2 3", "--temperature", "1", "--top-k", "20",
                             "--top-p", "0.9", "--seed", "3", "-n", "6"])
    b = runner.invoke(main, ["generate", PRESET, "--prompt-ids", "1 2 3", "--temperature", "1", "--top-k", "20",
                             "--top-p", "0.9", "--seed", "3", "-n", "6"])
    assert a.exit_code == 0 and a.output == b.output and len(a.output.split()) == 6


@pytest.mark.parametrize("args, message", [
    (["generate", PRESET, "--prompt-ids", "1 x 3"], "'x' is not a token id"),
    (["generate", PRESET, "--prompt-ids", "1 -2"], "not a token id"),
    (["generate", PRESET, "--prompt-ids", " "], "at least one token"),
    (["generate", PRESET, "--prompt-ids", "1 512"], "vocabulary size 512"),
    (["generate", PRESET, "--prompt-ids", "1", "--stop", "9999"], "--stop"),
    (["generate", PRESET], "--prompt-ids"),
    (["generate", PRESET, "--prompt-ids", "1", "--backend", "tensorrt"], "'--backend'"),
    (["generate", PRESET, "--prompt-ids", "1", "--backend", "onnxruntime"], "export directory"),
    (["generate", "/no/such/export", "--prompt-ids", "1", "--backend", "onnxruntime"], "no such export directory"),
    (["generate", "/no/such/ckpt", "--prompt-ids", "1"], "no such checkpoint"),
    (["generate", PRESET, "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
    (["generate", PRESET, "--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
    (["generate", PRESET, "--prompt-ids", "1", "--stream", "--json"], "--stream or --json"),
    (["generate", PRESET, "--prompt-ids", "1 " * 4000, "-n", "200"], "max_position_embeddings"),
])
def test_cli_generate_errors(args, message):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.output


# --------------------------------------------------------------------------- ONNX Runtime
@pytest.fixture(scope="module")
def exported(flash_export):
    """The session's shared tiny-flash export (tests/conftest.py)."""
    assert PRESET == "tiny-flash"
    return flash_export


@pytest.mark.slow
def test_onnxruntime_greedy_equals_torch(exported, greedy_run, prompts, model):
    from engines.backends import OnnxRuntimeBackend

    ort_backend = load_backend(exported, "onnxruntime", providers=["CPUExecutionProvider"])
    assert isinstance(ort_backend, OnnxRuntimeBackend) and ort_backend.layout == cache_layout(model.config)
    torch_backend = TorchBackend(model)
    ids = torch.tensor([prompts[1]])
    (lo, co), (lt, ct) = ort_backend.prefill(ids), torch_backend.prefill(ids)
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-4)
    for spec, a, b in zip(ort_backend.layout, co, ct):
        assert a.dtype == b.dtype and a.shape == b.shape, spec.name
    rec = Recording(ort_backend)
    results = generate(rec, prompts, max_new_tokens=NEW)
    assert [r.tokens for r in results] == [r.tokens for r in greedy_run[0]]
    # the torch backend rebuilt from the export directory (manifest "source") is the same model
    from_export = load_backend(exported, "torch")
    assert [r.tokens for r in generate(from_export, prompts[:1], max_new_tokens=4)] == [greedy_run[0][0].tokens[:4]]


@pytest.mark.slow
def test_cli_generate_onnxruntime(exported, greedy_run, prompts):
    ids = " ".join(map(str, prompts[0]))
    res = CliRunner().invoke(main, ["generate", str(exported), "--backend", "onnxruntime", "--prompt-ids", ids,
                                    "-n", "5"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == [str(t) for t in greedy_run[0][0].tokens[:5]]
    res = CliRunner().invoke(main, ["generate", str(exported), "--backend", "onnxruntime", "--prompt-ids", ids,
                                    "--dtype", "float16"])
    assert res.exit_code == 2 and "--dtype" in res.output
