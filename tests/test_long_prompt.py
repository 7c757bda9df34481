"""Prompts longer than one prefill chunk, through ONNX Runtime: exact logits, bounded memory, and the
benchmark scripts' smoke modes (scripts/bench_decode.py, scripts/bench_prefill.py --quick).

All of it runs on the session's tiny-flash export (conftest.flash_export: window, CSA and HCA layers,
max_position_embeddings 4096), so no test here exports anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT, CHUNK = 700, 128  # crosses the window (128), CSA blocks (4) and 5 HCA blocks (128), 6 chunks
RSS_PROMPT, RSS_CHUNK = 2048, 128


@pytest.fixture(scope="module")
def backends(flash_export):
    from engines.backends import OnnxRuntimeBackend, load_backend

    ort = OnnxRuntimeBackend(flash_export, providers=["CPUExecutionProvider"])
    ref = load_backend(flash_export, "torch")  # the manifest's source: the tiny-flash preset, seed 0
    return ort, ref


def _prompt(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_chunked_ort_prefill_equals_full_sequence_reference(backends):
    ort, ref = backends
    ids = _prompt(2, PROMPT, ort.config.vocab_size)
    want, ref_cache = ref.prefill(ids, chunk_size=PROMPT, all_logits=True)  # one step: the whole prompt
    got, cache = ort.prefill(ids, chunk_size=CHUNK, all_logits=True)  # 6 steps, the last one partial
    assert got.shape == want.shape == (2, PROMPT, ort.config.vocab_size)
    assert cache.positions.tolist() == ref_cache.positions.tolist() == [PROMPT, PROMPT]
    assert torch.isfinite(got).all()
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-5, f"chunked ORT prefill vs one-step reference: max |diff| / max |logit| = {err:.2e}"
    # the last-position logits (what prefill returns by default) are the same rows
    last, _ = ort.prefill(ids, chunk_size=CHUNK)
    torch.testing.assert_close(last, got[:, -1:], rtol=1e-5, atol=1e-5)


def test_chunked_ort_generation_equals_chunked_reference(backends):
    from engines.generate import generate

    ort, ref = backends
    ids = _prompt(1, PROMPT, ort.config.vocab_size, seed=1)[0].tolist()
    got = generate(ort, [ids], max_new_tokens=6, stop_tokens=(), prefill_chunk=CHUNK)
    want = generate(ref, [ids], max_new_tokens=6, stop_tokens=(), prefill_chunk=256)
    assert got[0].tokens == want[0].tokens


_RSS_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from engines.backends import OnnxRuntimeBackend

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    backend = OnnxRuntimeBackend(sys.argv[2], providers=["CPUExecutionProvider"])
    n, chunk = int(sys.argv[3]), int(sys.argv[4])
    ids = torch.randint(0, backend.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    backend.prefill(ids[:, :8], chunk_size=8)  # first-run allocations, outside the measured growth
    loaded = status("VmHWM")
    logits, cache = backend.prefill(ids, chunk_size=chunk)
    assert torch.isfinite(logits).all()
    print(json.dumps({"loaded": loaded, "peak": status("VmHWM"), "cache": cache.nbytes()}))
""")


def _peak_rss(export_dir: Path, runs: list[tuple[int, int]]) -> list[dict]:
    """Peak RSS of fresh processes, one per (tokens, chunk), run side by side."""
    procs = [subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(ROOT), str(export_dir), str(n), str(c)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, c in runs]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_chunked_prefill_peak_memory_is_bounded_by_the_chunk(flash_export):
    """A 2048-token prompt in chunks of 128 grows the process far less than the same prompt fed as
    one chunk (whose attention and indexer scores grow like S x S)."""
    chunked, whole = _peak_rss(flash_export, [(RSS_PROMPT, RSS_CHUNK), (RSS_PROMPT, RSS_PROMPT)])
    grow_chunked, grow_whole = chunked["peak"] - chunked["loaded"], whole["peak"] - whole["loaded"]
    msg = (f"peak RSS growth over the loaded session: chunks of {RSS_CHUNK} {grow_chunked / 2**20:.0f} MiB, "
           f"one chunk {grow_whole / 2**20:.0f} MiB")
    assert chunked["peak"] < 1.5e9, msg  # generous: torch + onnxruntime + the session are most of it
    assert grow_chunked < 200 * 2**20, msg
    assert grow_chunked * 4 < grow_whole, msg


def _run_script(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--quick", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_bench_decode_quick(flash_export, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "decode.json", tmp_path / "decode.png"
    _run_script("bench_decode.py", "--export-dir", flash_export, "--out-json", out, "--out-png", png)
    res = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert {(r["series"], r["batch"], r["context"]) for r in res["results"]} == {
        (s, b, n) for s in ("hybrid/eager", "hybrid/onnxruntime", "dense/eager") for b in (1, 2) for n in (512, 2048)}
    for v in res["parity_on_synthetic_cache"].values():
        assert v["finite"] and v["max_abs_logit_diff"] < 1e-4 * max(1.0, v["max_abs_logit"])
    assert res["load"]["loadavg_start"] and res["profile"]["batch1"]["growth_top_nodes"]


@pytest.mark.slow
def test_bench_prefill_quick(flash_export, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "prefill.json", tmp_path / "prefill.png"
    _run_script("bench_prefill.py", "--export-dir", flash_export, "--out-json", out, "--out-png", png)
    res = json.loads(out.read_text())
    assert png.stat().st_size > 0
    tp = res["throughput"]
    assert set(tp["ort_tokens_per_s"]) == set(tp["eager_tokens_per_s"]) == {"512", "1024", "2048"}
    assert all(r["last_logits_finite"] for r in tp["runs"])
    rss = res["peak_rss"]
    ort = rss["onnxruntime"]["arena, chunk 256"]
    assert rss["greedy_tokens_equal"]["arena, chunk 256"], (ort["new_tokens"], rss["reference_eager"]["new_tokens"])
    assert 0 < ort["peak_rss_bytes"] < 2.5e9
