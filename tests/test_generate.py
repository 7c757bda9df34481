"""The generate loop, the KVCache operations, the backends' step contract and `hatrt generate`.

The reference for generation is the most naive loop there is: re-run the full prefill on the
growing sequence for every new token and take the argmax. The batched loop (engines.generate's
Scheduler: prefill each prompt alone in chunks while the other rows decode, merge caches, decode
every row at its own position, grow entry buffers, drop finished rows) must produce exactly the
same tokens. The reference for a chunked prefill is one
full forward of the whole prompt.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engines import cache_ops
from engines.backends import ONNXRUNTIME, Backend, BackendError, TorchBackend, load_backend
from engines.cache_ops import CacheError, KVCache
from engines.cli import main
from engines.generate import LENGTH, STOP, SamplingParams, default_stop_tokens, filter_logits, generate, sample, stream
from exporter import Cache, load_model
from exporter.cache import BATCH, CSA_ENTRIES, HCA_ENTRIES, MIN_CAPACITY, cache_layout, grown_capacity
from exporter.contract import ENTRY_DIMS, entries_needed
from exporter.graph import StepGraph

PRESET = "tiny-flash"  # window, window, CSA (ratio 4), HCA (ratio 128); window 128
# Decoding 12 tokens after these crosses CSA blocks (every 4), the window (128) and the first two
# HCA blocks (128, 256), with three different capacities in one batch.
LENGTHS = (5, 125, 251)
NEW = 12
FP32_REL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not torch.isnan(got).any(), "NaN never passes"
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


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


def cut_at_stops(naive: list[list[int]], stops) -> list[tuple[list[int], str]]:
    """What a generation with these stop tokens makes of the naive tokens: (tokens, finish reason)."""
    out = []
    for toks in naive:
        cut = next((i for i, t in enumerate(toks) if t in stops), None)
        out.append((toks if cut is None else toks[:cut + 1], LENGTH if cut is None else STOP))
    return out


@pytest.fixture(scope="module")
def naive(model, prompts):
    return [naive_greedy(model, p, NEW) for p in prompts]


class Recording(Backend):
    """Wraps a backend: every step goes through Backend.step (capacity growth, positions) and then
    this `_run_step`, which checks the capacity contract, records the step and runs the inner
    backend's `_run_step`. `config` may replace the inner config (e.g. one that names an EOS)."""

    def __init__(self, inner: Backend, config=None):
        self.inner, self.name, self.layout, self.device = inner, inner.name, inner.layout, inner.device
        self.config = inner.config if config is None else config
        self.calls: list[tuple] = []  # (batch, seq, positions before the step, capacities)

    def _run_step(self, input_ids, logits_index, cache, layer_outputs):
        b, s = input_ids.shape
        assert cache.batch == b and isinstance(cache.positions, np.ndarray)
        sizes = cache_ops.validate(cache.tensors, self.layout, "step input")
        caps = cache.capacities()
        assert caps == {d: n for d, n in sizes.items() if d in ENTRY_DIMS}
        need = entries_needed(self.inner.config, int(cache.positions.max()) + s - 1)
        assert all(caps[d] >= n for d, n in need.items()), (caps, need)
        self.calls.append((b, s, cache.positions.tolist(), caps))
        return self.inner._run_step(input_ids, logits_index, cache, layer_outputs)


@pytest.fixture(scope="module")
def greedy_run(backend, prompts):
    rec = Recording(backend)
    return generate(rec, prompts, max_new_tokens=NEW), rec


def schedule(prompt_lengths, n_tokens, chunk=512, max_batch=None):
    """The steps and token order of engines.generate.Scheduler's documented policy: per iteration
    at most one prefill chunk of the first waiting prompt (its first token when the prompt is
    done; the row then joins the batch unless finished), then one decode step of the running rows
    in the order they joined. n_tokens: how many tokens each row makes in the end.
    Returns (steps [(batch, seq, positions)], events [(row, index)])."""
    waiting, running = list(range(len(prompt_lengths))), []
    fed, count = [0] * len(prompt_lengths), [0] * len(prompt_lengths)
    steps, events = [], []
    while waiting or running:
        if waiting and (max_batch is None or len(running) < max_batch):
            r = waiting[0]
            n = min(chunk, prompt_lengths[r] - fed[r])
            steps.append((1, n, [fed[r]]))
            fed[r] += n
            if fed[r] == prompt_lengths[r]:
                waiting.pop(0)
                events.append((r, 0))
                count[r] = 1
                if count[r] < n_tokens[r]:
                    running.append(r)
        if running:
            steps.append((len(running), 1, [prompt_lengths[r] + count[r] - 1 for r in running]))
            for r in running:
                events.append((r, count[r]))
                count[r] += 1
            running = [r for r in running if count[r] < n_tokens[r]]
    return steps, events


# --------------------------------------------------------------------------- greedy == naive
def test_greedy_batch_equals_naive_prefill_loop(greedy_run, naive, prompts):
    results, rec = greedy_run
    assert [r.tokens for r in results] == naive
    assert all(r.finish_reason == LENGTH and len(r.tokens) == NEW for r in results)
    assert [r.prompt_length for r in results] == list(LENGTHS)
    # each prompt prefilled alone (one chunk: shorter than the default 512) from position 0, the
    # rows decoding meanwhile, each at its own position; NEW - 1 decode steps per row in all
    steps, _ = schedule(LENGTHS, [NEW] * 3)
    assert [c[:3] for c in rec.calls] == steps
    assert [c[:3] for c in rec.calls if c[2] == [0]] == [(1, n, [0]) for n in LENGTHS]
    decodes = [c for c in rec.calls if c[2] != [0]]
    assert sum(c[0] for c in decodes) == 3 * (NEW - 1) and all(c[1] == 1 for c in decodes)
    assert decodes[-1][:3] == (1, 1, [LENGTHS[2] + NEW - 2])
    full = [c for c in decodes if c[0] == 3]
    assert full[0][2] == [LENGTHS[0] + 2, LENGTHS[1] + 1, LENGTHS[2]]
    # the prompts' caches had different entry capacities; merged, they are padded to the largest
    csa = [c[3][CSA_ENTRIES] for c in rec.calls if c[2] == [0]]
    assert len(set(csa)) > 1
    assert full[0][3][CSA_ENTRIES] >= max(csa)


def test_prefill_chunk_and_max_batch_give_the_same_tokens(backend, prompts, naive):
    rec = Recording(backend)
    results = generate(rec, prompts, max_new_tokens=4, prefill_chunk=100)
    assert [r.tokens for r in results] == [t[:4] for t in naive]
    prefill = [c[:3] for c in rec.calls if c[0] == 1 and c[1] > 1]
    assert prefill == [(1, 5, [0]), (1, 100, [0]), (1, 25, [100]), (1, 100, [0]), (1, 100, [100]), (1, 51, [200])]
    assert [c[:3] for c in rec.calls] == schedule(LENGTHS, [4] * 3, chunk=100)[0]
    rec = Recording(backend)
    results = generate(rec, prompts, max_new_tokens=4, max_batch=2)
    assert [r.tokens for r in results] == [t[:4] for t in naive]
    assert max(c[0] for c in rec.calls) == 2
    assert [c[:3] for c in rec.calls] == schedule(LENGTHS, [4] * 3, max_batch=2)[0]


def test_stop_tokens_end_rows_and_leave_the_batch(backend, prompts, naive):
    stops = {naive[1][3], naive[2][0]}  # row 2 stops on its first token (before any decode)
    rec = Recording(backend)
    results = generate(rec, prompts, max_new_tokens=NEW, stop_tokens=stops)
    expected = cut_at_stops(naive, stops)
    assert [(r.tokens, r.finish_reason) for r in results] == expected
    assert results[1].finish_reason == STOP and results[1].tokens[-1] in stops
    assert results[2].tokens == naive[2][:1] and results[2].finish_reason == STOP
    # finished rows leave the batch (select); the rows that stay keep their own positions
    lengths = [len(t) for t, _ in expected]
    steps, _ = schedule(LENGTHS, lengths)
    assert [c[:3] for c in rec.calls] == steps
    decodes = [c for c in rec.calls if c[2] != [0]]
    assert sum(c[0] for c in decodes) == sum(n - 1 for n in lengths)
    assert max(c[0] for c in decodes) == 2  # row 2 never joined
    assert decodes[-1][:3] == (1, 1, [LENGTHS[0] + NEW - 2])  # row 0 alone, after row 1 stopped


def test_max_new_tokens(backend, prompts, naive):
    rec = Recording(backend)
    results = generate(rec, prompts, max_new_tokens=0)
    assert [r.tokens for r in results] == [[], [], []] and rec.calls == []
    one = generate(rec, prompts, max_new_tokens=1)
    assert [r.tokens for r in one] == [t[:1] for t in naive]
    assert all(r.finish_reason == LENGTH for r in one)
    assert [c[:3] for c in rec.calls] == [(1, n, [0]) for n in LENGTHS]  # the first token comes from the prefill


def test_streaming_order(backend, prompts, naive):
    stops = {naive[0][4]}
    seen = []
    results = generate(backend, prompts, max_new_tokens=6, stop_tokens=stops, on_token=lambda r, t: seen.append((r, t)))
    assert [(r.tokens, r.finish_reason) for r in results] == cut_at_stops([t[:6] for t in naive], stops)
    # a prompt's first token when its prefill ends, then per decode step the running rows in order
    _, order = schedule(LENGTHS, [len(r.tokens) for r in results])
    want = [(r, results[r].tokens[i]) for r, i in order]
    assert seen == want
    events = list(stream(backend, prompts, max_new_tokens=6, stop_tokens=stops))
    assert [(e.row, e.token) for e in events] == want
    for r, res in enumerate(results):
        mine = [e for e in events if e.row == r]
        assert [e.index for e in mine] == list(range(len(res.tokens)))
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + [res.finish_reason]


def test_numpy_and_tensor_prompts(backend, prompts, naive):
    """Token ids from numpy (np.int64 lists, int arrays) and torch tensors are accepted as ints."""
    as_np = [np.array(prompts[0], dtype=np.int64), [np.int64(t) for t in prompts[1]],
             np.array(prompts[2], dtype=np.int32)]
    results = generate(backend, as_np, max_new_tokens=3)
    assert [r.tokens for r in results] == [t[:3] for t in naive]
    assert all(type(t) is int for r in results for t in r.tokens)
    assert [r.prompt_length for r in results] == list(LENGTHS)
    tensors = generate(backend, [torch.tensor(prompts[0])], max_new_tokens=3)
    assert tensors[0].tokens == naive[0][:3]
    stops = generate(backend, prompts[:1], max_new_tokens=NEW, stop_tokens=[np.int64(naive[0][2])])
    assert stops[0].tokens == naive[0][:3] and stops[0].finish_reason == STOP


def test_stops_at_the_models_eos_by_default(backend, prompts, naive):
    """stop_tokens=None means the config's eos_token_id (config.json: an int or a list); () means none."""
    assert backend.config.eos_token_id is None and default_stop_tokens(backend) == []  # presets name no EOS
    eos = naive[1][3]
    rec = Recording(backend, config=backend.config.replace(eos_token_id=(eos,)))
    assert default_stop_tokens(rec) == [eos]
    results = generate(rec, prompts, max_new_tokens=NEW)
    assert [(r.tokens, r.finish_reason) for r in results] == cut_at_stops(naive, {eos})
    assert results[1].finish_reason == STOP
    everything = generate(rec, prompts, max_new_tokens=NEW, stop_tokens=())
    assert [r.tokens for r in everything] == naive
    eos_list = [naive[0][1], naive[2][5]]
    both = Recording(backend, config=backend.config.replace(eos_token_id=tuple(eos_list)))
    assert default_stop_tokens(both) == eos_list
    results = generate(both, prompts, max_new_tokens=NEW)
    assert [(r.tokens, r.finish_reason) for r in results] == cut_at_stops(naive, set(eos_list))
    assert results[0].finish_reason == STOP
    explicit = generate(both, prompts, max_new_tokens=NEW, stop_tokens=[naive[1][3]])  # replaces the EOS
    assert [(r.tokens, r.finish_reason) for r in explicit] == cut_at_stops(naive, {naive[1][3]})


def test_bad_arguments(backend, prompts):
    v = backend.config.vocab_size
    for bad, match in [(dict(prompts=[]), "non-empty"), (dict(prompts=[[]]), "empty"),
                       (dict(prompts=[[1, v]]), "token 1"), (dict(prompts=[[-1]]), r"\[0, 512\)"),
                       (dict(prompts=[[1, 2.0]]), "token 1"), (dict(prompts=[[True]]), "token 0"),
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
    # a row's draws come from its own generator (seed + row): they do not depend on the other rows
    alone = generate(backend, prompts[:1], seed=7, **kw)
    assert alone[0].tokens == a[0].tokens


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


# --------------------------------------------------------------------------- KVCache
@pytest.fixture(scope="module")
def prefilled(backend):
    """Caches of 3, 9 and 130 tokens, each prefilled alone (different entry capacities)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (3, 9, 130):
        _, cache = backend.prefill(torch.randint(0, backend.config.vocab_size, (1, n), generator=g))
        out.append(cache)
    return out


def _entry_axis(spec) -> int | None:
    return next((i for i, d in enumerate(spec.dims) if d in ENTRY_DIMS), None)


def test_merge_pads_capacities_like_the_reference(backend, model, prefilled):
    layout = backend.layout
    caps = [c.capacities()[CSA_ENTRIES] for c in prefilled]
    assert caps[0] == caps[1] == MIN_CAPACITY < caps[2]  # different capacities in one batch
    merged = KVCache.merge(prefilled)
    assert merged.batch == 3 and merged.positions.tolist() == [3, 9, 130]
    assert merged.capacities() == {d: max(c.capacities()[d] for c in prefilled) for d in ENTRY_DIMS}
    ref = Cache.merge([Cache.from_tensors(model.config, [t.clone() for t in c.tensors]) for c in prefilled])
    for spec, a, b in zip(layout, merged.tensors, ref.to_tensors()):
        assert torch.equal(a, b), spec.name
    assert merged.tensors[cache_ops.spec_index(layout, "pos")].tolist() == [3, 9, 130]
    for spec, t in zip(layout, merged.tensors):  # each row: its own tensor, then zeros
        axis = _entry_axis(spec)
        i = cache_ops.spec_index(layout, spec.name)
        for row, c in enumerate(prefilled):
            own = c.tensors[i][0]
            if axis is None:
                assert torch.equal(t[row], own), spec.name
            else:
                n = own.shape[axis - 1]
                assert torch.equal(t[row, :n], own) and torch.count_nonzero(t[row, n:]) == 0, spec.name
    assert KVCache.merge(prefilled[:1]) is prefilled[0]
    with pytest.raises(CacheError, match="at least one"):
        KVCache.merge([])
    # decoding the merged batch == decoding each cache alone
    tokens = torch.tensor([[7], [8], [9]])
    together = backend.decode(tokens, KVCache.merge(prefilled))
    for row, c in enumerate(prefilled):
        alone = backend.decode(tokens[row:row + 1], KVCache(layout, [t.clone() for t in c.tensors], c.positions))
        assert rel_err(together[row], alone[0]) < FP32_REL


def test_select_and_nbytes(model, prefilled):
    merged = KVCache.merge(prefilled)
    merged.scratch["backend"] = object()
    picked = merged.select([2, 0])
    assert picked.batch == 2 and picked.positions.tolist() == [130, 3] and picked.scratch == {}
    assert picked.capacities() == merged.capacities()
    for a, b in zip(picked.tensors, merged.tensors):
        assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0])
    assert picked.tensors[cache_ops.spec_index(picked.layout, "pos")].tolist() == [130, 3]
    assert merged.select(torch.tensor([1])).positions.tolist() == [9]
    assert merged.select([]).batch == 0
    with pytest.raises(CacheError, match="out of range"):
        merged.select([3])
    with pytest.raises(CacheError, match="out of range"):
        merged.select([-1])
    assert merged.nbytes() == sum(t.numel() * t.element_size() for t in merged.tensors)
    ref = Cache.from_tensors(model.config, merged.tensors)
    assert merged.nbytes() == ref.nbytes() + ref.pos.numel() * 8


def test_grown_capacity_rule():
    assert grown_capacity(0, 1) == MIN_CAPACITY == 16
    assert grown_capacity(5, 6) == 16  # at least 16
    assert grown_capacity(16, 17) == 20 and grown_capacity(32, 33) == 40  # +25%
    assert grown_capacity(17, 18) == 22  # +25% rounded up
    assert grown_capacity(100, 300) == 300  # at least what is needed


def test_ensure_capacity_grows_amortized_and_zero_filled(model, prefilled):
    config = model.config
    cache = KVCache(prefilled[2].layout, [t.clone() for t in prefilled[2].tensors], prefilled[2].positions)
    caps = cache.capacities()
    last = int(cache.positions.max()) - 1
    assert all(caps[d] >= n for d, n in entries_needed(config, last).items())
    before = list(cache.tensors)
    assert cache.ensure_capacity(config, last) is False
    assert all(a is b for a, b in zip(cache.tensors, before))  # nothing to do: no copies
    # the first position whose step needs one more CSA entry than there is
    last = next(p for p in range(last, 10_000) if entries_needed(config, p)[CSA_ENTRIES] > caps[CSA_ENTRIES])
    need = entries_needed(config, last)
    cache.scratch["backend"] = object()
    assert cache.ensure_capacity(config, last) is True
    assert cache.scratch == {}  # backend buffers of the old shapes are dropped
    grown = cache.capacities()
    assert grown[CSA_ENTRIES] == grown_capacity(caps[CSA_ENTRIES], need[CSA_ENTRIES])
    assert grown[CSA_ENTRIES] >= caps[CSA_ENTRIES] * 5 / 4
    assert grown[HCA_ENTRIES] == caps[HCA_ENTRIES]  # enough already: unchanged
    for spec, a, b in zip(cache.layout, cache.tensors, before):
        axis = _entry_axis(spec)
        if axis is not None and spec.dims[axis] == CSA_ENTRIES:
            n = b.shape[axis]
            assert a.shape[axis] == grown[CSA_ENTRIES]
            assert torch.equal(a[:, :n], b) and torch.count_nonzero(a[:, n:]) == 0, spec.name
        else:
            assert a is b, spec.name
    assert cache.positions.tolist() == [130]  # growing moves no position
    # amortized: a generation to max_position_embeddings reallocates O(log T) times
    c, growths = cache_ops.empty(config, cache.layout), {d: 0 for d in ENTRY_DIMS}
    for p in range(config.max_position_embeddings):
        old = c.capacities()
        grew = c.ensure_capacity(config, p)
        new, need = c.capacities(), entries_needed(config, p)
        assert grew == (new != old)
        for d in new:
            assert new[d] >= need[d], (p, d)
            if new[d] != old[d]:
                assert new[d] == grown_capacity(old[d], need[d]), (p, d)
                growths[d] += 1
    final = c.capacities()
    for d, n in growths.items():  # each growth is by 25% at least: O(log T) reallocations
        assert 0 < n <= math.ceil(math.log(final[d] / MIN_CAPACITY, 1.25)), (d, n, final[d])
    assert growths[CSA_ENTRIES] < 25
    assert all(torch.count_nonzero(c.tensors[i]) == 0 for i, s in enumerate(c.layout) if _entry_axis(s) is not None)


def test_positions_are_host_side_and_advance_by_the_step(backend, prefilled):
    cache = backend.new_cache(2)
    assert isinstance(cache.positions, np.ndarray) and cache.positions.dtype == np.int64
    assert cache.positions.tolist() == [0, 0]
    backend.step(torch.tensor([[1, 2, 3, 4, 5]] * 2), cache)
    assert cache.positions.tolist() == [5, 5]
    backend.step(torch.tensor([[6], [7]]), cache)
    assert cache.positions.tolist() == [6, 6]
    assert cache.tensors[cache_ops.spec_index(cache.layout, "pos")].tolist() == [6, 6]  # the graph agrees
    merged = KVCache.merge([KVCache(c.layout, [t.clone() for t in c.tensors], c.positions) for c in prefilled])
    backend.decode(torch.tensor([[1], [2], [3]]), merged)
    assert merged.positions.tolist() == [4, 10, 131]
    # a cache made from tensors alone reads its positions from the `pos` tensor once
    assert KVCache(merged.layout, merged.tensors).positions.tolist() == [4, 10, 131]


def test_empty_and_validation_errors(model, backend):
    layout = backend.layout
    fresh = cache_ops.empty(model.config, layout, batch=2)
    assert fresh.batch == 2 and fresh.positions.tolist() == [0, 0]
    assert fresh.capacities() == {CSA_ENTRIES: MIN_CAPACITY, HCA_ENTRIES: MIN_CAPACITY}
    for spec, a, b in zip(layout, fresh.tensors, Cache(model.config, 2).to_tensors()):
        axis = _entry_axis(spec)
        if axis is None:
            assert torch.equal(a, b), spec.name  # the reference's initial values (-1, -inf, 0)
        else:
            assert a.shape[axis] == MIN_CAPACITY and torch.count_nonzero(a) == 0, spec.name
    # one step from an empty cache == the full forward of those tokens
    logits = backend.step(torch.tensor([[7], [9]]), fresh)
    with torch.no_grad():
        ref = model(torch.tensor([[7], [9]]))
    assert rel_err(logits, ref[:, -1:]) < FP32_REL

    tensors = cache_ops.empty(model.config, layout, batch=2).tensors
    with pytest.raises(CacheError, match="tensors"):
        KVCache(layout, tensors[:-1])
    bad = list(tensors)
    bad[0] = bad[0].half()
    with pytest.raises(CacheError, match="'layer0.window_kv'.*dtype float16.*float32"):
        KVCache(layout, bad)
    bad = list(tensors)
    i = cache_ops.spec_index(layout, "layer2.index_keys")
    bad[i] = torch.zeros(2, 3, bad[i].shape[2])
    with pytest.raises(CacheError, match="dim 'csa_entries' is 16 in 'layer2.entries' but 3 in 'layer2.index_keys'"):
        KVCache(layout, bad)
    bad = list(tensors)
    bad[i] = torch.zeros(2, 16, bad[i].shape[2] + 1)
    with pytest.raises(CacheError, match="'layer2.index_keys' has shape .*dim 2 must be 32"):
        KVCache(layout, bad)
    bad = list(tensors)
    bad[1] = bad[1][0]
    with pytest.raises(CacheError, match="'layer0.window_pos' has shape"):
        KVCache(layout, bad)
    bad = list(tensors)
    bad[3] = bad[3][:1]
    with pytest.raises(CacheError, match="dim 'batch' is 2 in 'layer0.window_kv' but 1 in 'layer1.window_pos'"):
        KVCache(layout, bad)
    bad = list(tensors)
    bad[2] = bad[2].numpy()
    with pytest.raises(CacheError, match="'layer1.window_kv' is a ndarray"):
        KVCache(layout, bad)
    with pytest.raises(CacheError, match="3 positions for a batch of 2"):
        KVCache(layout, tensors, np.zeros(3, np.int64))
    with pytest.raises(CacheError, match="layout"):
        cache_ops.empty(model.config, layout[1:])
    half = cache_ops.empty(model.config, cache_layout(model.config, torch.float16))  # dtypes from the layout
    assert [str(t.dtype).removeprefix("torch.") for t in half.tensors] == [s.dtype for s in half.layout]
    with pytest.raises(CacheError, match="no tensor named 'nope'"):
        cache_ops.spec_index(layout, "nope")
    assert BATCH in fresh.sizes and fresh.sizes[BATCH] == 2


# --------------------------------------------------------------------------- the step contract
@pytest.fixture(scope="module")
def ort_backend(flash_export):
    from engines.backends import OnnxRuntimeBackend

    return OnnxRuntimeBackend(flash_export, providers=["CPUExecutionProvider"])


@pytest.fixture(params=["torch", ONNXRUNTIME])
def any_backend(request, backend):
    return backend if request.param == "torch" else request.getfixturevalue("ort_backend")


CHUNK_PROMPT, CHUNK_DECODE = 301, 4  # 301 tokens: past the window, two HCA blocks, 75 CSA blocks


@pytest.fixture(scope="module")
def chunk_reference(model):
    """Two rows of CHUNK_PROMPT + CHUNK_DECODE tokens and the full forward's logits at every position."""
    ids = torch.randint(0, model.config.vocab_size, (2, CHUNK_PROMPT + CHUNK_DECODE),
                        generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        return ids, model(ids)


@pytest.mark.parametrize("chunk", [1, 7, 128, 300, 1000])
def test_chunked_prefill_equals_the_full_forward(any_backend, chunk_reference, chunk):
    """Backend.prefill in chunks of 1 (a decode step per token), 7, 128 (the window), 300 (a 1-token
    tail) and 1000 (> the prompt): logits at every position within fp32 tolerance of one full
    forward; then decoding from the chunked cache continues the sequence."""
    ids, want = chunk_reference
    # single-token chunks: one row, 136 tokens (past the window and the first HCA block) keep it quick
    rows, n = (ids[:1], 136) if chunk == 1 else (ids, CHUNK_PROMPT)
    want = want[:rows.shape[0]]
    seen = []
    logits, cache = any_backend.prefill(rows[:, :n], chunk_size=chunk, all_logits=True,
                                        progress=lambda done, total: seen.append((done, total)))
    assert logits.shape == (rows.shape[0], n, any_backend.config.vocab_size) and logits.dtype == torch.float32
    assert rel_err(logits, want[:, :n]) < FP32_REL
    assert seen == [(min((k + 1) * chunk, n), n) for k in range(-(-n // chunk))]
    assert cache.positions.tolist() == [n] * rows.shape[0]
    for p in range(n, n + CHUNK_DECODE):
        out = any_backend.decode(rows[:, p:p + 1], cache)
        assert rel_err(out[:, 0], want[:, p]) < FP32_REL, f"position {p}"
    if chunk == 128:  # default logits: the last position only
        last, _ = any_backend.prefill(rows[:, :CHUNK_PROMPT], chunk_size=chunk)
        assert last.shape == (rows.shape[0], 1, any_backend.config.vocab_size)
        assert rel_err(last[:, 0], want[:, CHUNK_PROMPT - 1]) < FP32_REL


def test_logits_index_selects_positions(any_backend, chunk_reference):
    ids, want = chunk_reference
    cache = any_backend.new_cache(2)
    logits = any_backend.step(ids[:, :10], cache, logits_index=[0, 3, 9, 3])
    assert logits.shape == (2, 4, any_backend.config.vocab_size)
    assert rel_err(logits, want[:, [0, 3, 9, 3]]) < FP32_REL
    logits = any_backend.step(ids[:, 10:15], cache, logits_index=torch.tensor([2]))
    assert rel_err(logits[:, 0], want[:, 12]) < FP32_REL
    logits = any_backend.step(ids[:, 15:20], cache)  # default: the last position
    assert logits.shape == (2, 1, any_backend.config.vocab_size) and rel_err(logits[:, 0], want[:, 19]) < FP32_REL


def test_step_errors(any_backend):
    cache = any_backend.new_cache(1)
    ids = torch.tensor([[1, 2, 3]])
    for index in ([], [-1], [3], [0, 5]):
        with pytest.raises(BackendError, match=r"logits_index .*\[0, 3\)"):
            any_backend.step(ids, cache, logits_index=index)
    with pytest.raises(BackendError, match="input_ids has batch 2, the cache holds 1"):
        any_backend.step(torch.tensor([[1], [2]]), cache)
    with pytest.raises(BackendError, match=r"\[batch, seq\]"):
        any_backend.step(torch.tensor([1, 2]), cache)
    with pytest.raises(BackendError, match=r"\[batch, seq\]"):
        any_backend.step(torch.zeros(1, 0, dtype=torch.long), cache)
    with pytest.raises(BackendError, match="chunk_size"):
        any_backend.prefill(ids, chunk_size=0)
    assert cache.positions.tolist() == [0]  # nothing ran
    max_pos = any_backend.config.max_position_embeddings
    cache.positions[:] = max_pos - 2  # host-side: the position check reads no device tensor
    with pytest.raises(BackendError, match=f"position {max_pos} exceeds max_position_embeddings={max_pos}"):
        any_backend.step(ids, cache)
    assert cache.positions.tolist() == [max_pos - 2]


def test_onnxruntime_io_binding_ping_pong(ort_backend, chunk_reference, model):
    """The cache is bound in place: a step's outputs go into the spare set of buffers, which becomes
    the cache; the previous cache becomes the spare. Two sets alternate while the capacity holds."""
    ids, want = chunk_reference
    row = ids[:1]
    logits, cache = ort_backend.prefill(row[:, :50])
    caps = cache.capacities()
    ptrs = lambda ts: tuple(t.data_ptr() for t in ts)  # noqa: E731
    seen, p = [], 50
    while all(caps[d] >= n for d, n in entries_needed(model.config, p).items()):
        spare = cache.scratch[ONNXRUNTIME]
        before, spare_ptrs = ptrs(cache.tensors), ptrs(spare)
        assert not set(before) & set(spare_ptrs)  # two distinct sets
        out = ort_backend.decode(row[:, p:p + 1], cache)
        assert rel_err(out[:, 0], want[:1, p]) < FP32_REL
        assert ptrs(cache.tensors) == spare_ptrs and ptrs(cache.scratch[ONNXRUNTIME]) == before
        seen.append(ptrs(cache.tensors))
        p += 1
    assert len(seen) >= 4 and len(set(seen)) == 2  # no new allocation per step at fixed capacity
    assert seen[0::2] == [seen[0]] * len(seen[0::2]) and seen[1::2] == [seen[1]] * len(seen[1::2])
    # the step that needs more entries grows the cache: a new pair of buffer sets, of the new shapes
    for _ in range(2):
        spare = cache.scratch.get(ONNXRUNTIME)
        out = ort_backend.decode(row[:, p:p + 1], cache)
        assert rel_err(out[:, 0], want[:1, p]) < FP32_REL
        assert [t.shape for t in cache.scratch[ONNXRUNTIME]] == [t.shape for t in cache.tensors]
        if spare is not None and [t.shape for t in spare] == [t.shape for t in cache.tensors]:
            assert ptrs(cache.tensors) == ptrs(spare)  # ping-pong again
        p += 1
    need = entries_needed(model.config, p - 2)[CSA_ENTRIES]
    assert cache.capacities()[CSA_ENTRIES] == grown_capacity(caps[CSA_ENTRIES], need)
    assert cache.positions.tolist() == [p]


# --------------------------------------------------------------------------- loading
def _fake_export(tmp_path, model, **changes) -> None:
    """A version-2 manifest as exporter/export.py writes it, with a placeholder step.onnx."""
    from exporter import contract

    layout = cache_layout(model.config, model.dtype)
    io = lambda names: [{"name": n, "dims": [], "dtype": "float32"} for n in names]  # noqa: E731
    step = StepGraph(model)
    (tmp_path / "step.onnx").write_bytes(b"placeholder")
    manifest = {"format": "hatrt-export", "version": 2, "config": model.config.to_hf_dict(), "dtype": "float32",
                "quant_sim": False, "source": {"kind": "preset", "value": PRESET},
                "cache_layout": [s.to_dict() for s in layout],
                "graphs": {"step": {"file": "step.onnx", "trt_file": "step.trt.onnx",
                                    "inputs": io(step.input_names()), "outputs": io(step.output_names())}},
                "files": {"step.onnx": contract.file_record(tmp_path / "step.onnx")}}
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
    with pytest.raises(BackendError, match="preset name, not an export directory"):
        load_backend(PRESET, "onnxruntime")
    with pytest.raises(BackendError, match="no manifest.json"):
        load_backend(tmp_path, "onnxruntime")
    pytest.importorskip("onnxruntime")
    _fake_export(tmp_path, model, version=99)
    with pytest.raises(BackendError, match="manifest.json.*version 99"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model, version=1)
    with pytest.raises(BackendError, match="prefill/decode graphs: export it again"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model, cache_layout=None)
    with pytest.raises(BackendError, match="missing key 'cache_layout'"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model, files=None)
    with pytest.raises(BackendError, match="missing key 'files'"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["graphs"]["step"]["inputs"].reverse()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="graphs.step.inputs"):
        load_backend(tmp_path, "onnxruntime")
    _fake_export(tmp_path, model)  # the manifest is checked before the graph is loaded ...
    with pytest.raises(BackendError, match="step.onnx: onnxruntime cannot load the graph"):
        load_backend(tmp_path, "onnxruntime")
    (tmp_path / "step.onnx").unlink()
    with pytest.raises(BackendError, match="step.onnx: graph file missing"):
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


def test_cli_generate_prompt_from_file_and_stdin(prompts, naive, tmp_path):
    runner = CliRunner()
    path = tmp_path / "prompt.txt"
    path.write_text("\n".join(map(str, prompts[2])) + "\n")  # one id per line: whitespace separates
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", f"@{path}", "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["results"] == [{"tokens": naive[2][:4], "finish_reason": "length",
                                                  "prompt_length": LENGTHS[2]}]
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", "-", "--prompt-ids", f"@{path}", "-n", "4",
                               "--prefill-chunk", "7"], input=", ".join(map(str, prompts[1])))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [" ".join(map(str, naive[1][:4])), " ".join(map(str, naive[2][:4]))]
    missing = tmp_path / "missing.txt"
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", f"@{missing}"])
    assert res.exit_code == 2 and f"cannot read {missing}" in res.output
    (tmp_path / "empty.txt").write_text("\n")
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", f"@{tmp_path / 'empty.txt'}"])
    assert res.exit_code == 2 and "at least one token" in res.output
    res = runner.invoke(main, ["generate", PRESET, "--prompt-ids", "-"], input="1 2 x")
    assert res.exit_code == 2 and "('x') is not a token id" in res.output


@pytest.mark.parametrize("args, message", [
    (["generate", PRESET, "--prompt-ids", "1 x 3"], "('x') is not a token id"),
    (["generate", PRESET, "--prompt-ids", "1 -2"], "not a token id"),
    (["generate", PRESET, "--prompt-ids", " "], "at least one token"),
    (["generate", PRESET, "--prompt-ids", "1 512"], "vocabulary size 512"),
    (["generate", PRESET, "--prompt-ids", "1", "--stop", "9999"], "--stop"),
    (["generate", PRESET], "--prompt-ids"),
    (["generate", PRESET, "--prompt-ids", "1", "--backend", "vllm"], "'--backend'"),
    (["generate", PRESET, "--prompt-ids", "1", "--backend", "onnxruntime"], "export directory"),
    (["generate", "/no/such/export", "--prompt-ids", "1", "--backend", "onnxruntime"], "no such export directory"),
    (["generate", "/no/such/ckpt", "--prompt-ids", "1"], "no such checkpoint"),
    (["generate", PRESET, "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
    (["generate", PRESET, "--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
    (["generate", PRESET, "--prompt-ids", "1", "--prefill-chunk", "0"], "--prefill-chunk"),
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
def test_onnxruntime_greedy_equals_torch(exported, ort_backend, greedy_run, prompts, model, backend):
    from engines.backends import OnnxRuntimeBackend

    assert isinstance(ort_backend, OnnxRuntimeBackend) and ort_backend.layout == cache_layout(model.config)
    ids = torch.tensor([prompts[1]])
    (lo, co), (lt, ct) = ort_backend.prefill(ids), backend.prefill(ids)
    assert rel_err(lo, lt) < FP32_REL
    assert co.positions.tolist() == ct.positions.tolist() == [LENGTHS[1]]
    for spec, a, b in zip(ort_backend.layout, co.tensors, ct.tensors):
        assert a.dtype == b.dtype and a.shape == b.shape, spec.name
    rec = Recording(ort_backend)
    results = generate(rec, prompts, max_new_tokens=NEW)
    assert [r.tokens for r in results] == [r.tokens for r in greedy_run[0]]
    assert [c[:3] for c in rec.calls] == [c[:3] for c in greedy_run[1].calls]  # the same steps
    # the torch backend rebuilt from the export directory (manifest "source") is the same model
    from_export = load_backend(exported, "torch")
    assert [r.tokens for r in generate(from_export, prompts[:1], max_new_tokens=4)] == [greedy_run[0][0].tokens[:4]]


@pytest.mark.slow
def test_cli_generate_onnxruntime(exported, greedy_run, prompts, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(" ".join(map(str, prompts[0])))
    res = CliRunner().invoke(main, ["generate", str(exported), "--backend", "onnxruntime", "--prompt-ids", f"@{path}",
                                    "-n", "5", "--prefill-chunk", "2"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == [str(t) for t in greedy_run[0][0].tokens[:5]]
    res = CliRunner().invoke(main, ["generate", str(exported), "--backend", "onnxruntime", "--prompt-ids", "1 2",
                                    "--dtype", "float16"])
    assert res.exit_code == 2 and "--dtype" in res.output
