"""Quality per backend (engines/evaluate.py, `hatrt eval`), and text prompts on an export
(`hatrt check --prompt`, `hatrt generate --backend onnxruntime --prompt`).

- the numbers equal a direct computation: the reference model run on each window's full sequence
  (`model(ids)`) and `F.cross_entropy`;
- torch and an fp32 ONNX export give the same bits per byte within 0.1%;
- the JSON keys, and exit code 2 on bad input.

One ONNX export (about a minute): tiny-flash weights saved as a checkpoint with a tokenizer
trained in the test (tests/test_text.py: make_checkpoint), so the export carries the tokenizer."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_text import BOS, EOS, eval_text, make_checkpoint

from engines.backends import load_backend
from engines.cli import main
from engines.evaluate import EvalError, encode_for_eval, evaluate_text, score_ids, window_spans
from engines.text import load_tokenizer

pytest.importorskip("tokenizers")

KEYS = {"tokens", "bytes", "nll", "perplexity", "bits_per_byte"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-text")


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from exporter.export import export_model

    return export_model(ckpt, tmp_path_factory.mktemp("export") / "tiny-text", dtype="float32").out_dir


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(eval_text(), encoding="utf-8")
    return path


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def reference_nll(model, ids: list[int], context: int) -> float:
    """Sum of F.cross_entropy over windows of the full-sequence reference logits."""
    total = 0.0
    with torch.no_grad():
        for s, e in window_spans(len(ids), context):
            x = torch.tensor([ids[s:e]])
            total += float(F.cross_entropy(model(x)[0, :-1].double(), x[0, 1:], reduction="sum"))
    return total


# --------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("n, context", [(2, 2), (10, 2), (10, 4), (10, 9), (10, 10), (10, 64), (1000, 256)])
def test_windows_predict_every_token_once(n, context):
    spans = window_spans(n, context)
    predicted = [i for s, e in spans for i in range(s + 1, e)]
    assert predicted == list(range(1, n))
    assert all(2 <= e - s <= context for s, e in spans)
    assert all(b[0] == a[1] - 1 for a, b in zip(spans, spans[1:]))  # one shared boundary token


def test_bytes_and_bos(ckpt):
    tok = load_tokenizer(ckpt)
    ids, nbytes, bos = encode_for_eval(tok, "naïve ☃ x")
    assert bos and ids[0] == tok.bos_id and nbytes == len("naïve ☃ x".encode())
    # markers in the text: recognized, not counted as bytes, BOS not doubled
    ids2, nbytes2, bos2 = encode_for_eval(tok, BOS + "naïve ☃ x" + EOS)
    assert not bos2 and ids2 == ids + tok.eos_ids and nbytes2 == nbytes
    # without BOS the first text token is not predicted: its bytes are not scored
    ids3, nbytes3, bos3 = encode_for_eval(tok, "naïve ☃ x", add_bos=False)
    assert not bos3 and ids3 == ids[1:]
    assert nbytes3 == nbytes - len(tok.decode(ids3[:1]).encode())


@pytest.mark.parametrize("context", [4096, 100])
def test_eval_equals_reference_cross_entropy(ckpt, context):
    """One window over the whole text, and several: the backend's chunked prefill with all
    logits gives the numbers of F.cross_entropy on the model's full-sequence logits."""
    backend = load_backend(ckpt, "torch")
    tok = load_tokenizer(ckpt)
    text = eval_text()
    res = evaluate_text(backend, tok, text, context=context, chunk_size=64)
    ids = tok.encode(text)
    assert res.tokens == len(ids) - 1 and res.text_tokens == len(ids) and res.bos
    assert res.bytes == len(text.encode("utf-8"))
    assert res.windows == len(window_spans(len(ids), context)) == (1 if context >= len(ids) else res.windows)
    ref = reference_nll(backend.model, ids, context)
    assert res.nll == pytest.approx(ref, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref / (len(ids) - 1)), rel=1e-5)
    assert res.bits_per_byte == pytest.approx(ref / math.log(2) / len(text.encode()), rel=1e-5)


def test_score_ids_rejects_foreign_ids(ckpt):
    backend = load_backend(ckpt, "torch")
    with pytest.raises(EvalError, match="vocabulary"):
        score_ids(backend, [1, 2, backend.config.vocab_size], 16)
    with pytest.raises(EvalError, match="nothing to predict"):
        score_ids(backend, [1], 16)


# --------------------------------------------------------------------------- hatrt eval
def test_eval_json(ckpt, text_file):
    result = run("eval", ckpt, "--text", text_file, "--context", 200, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])  # progress goes to stderr (mixed in here)
    assert KEYS <= set(data)
    assert data["bytes"] == len(eval_text().encode()) and data["context"] == 200 and data["backend"] == "torch"
    assert data["bits_per_byte"] == pytest.approx(data["nll"] / math.log(2) / data["bytes"])
    assert data["perplexity"] == pytest.approx(math.exp(data["nll"] / data["tokens"]))
    # stdin gives the same numbers; the human-readable report names them
    piped = run("eval", ckpt, "--text", "-", "--context", 200, "--json", input=eval_text())
    assert json.loads(piped.output[piped.output.index("{"):])["nll"] == data["nll"]
    human = run("eval", ckpt, "--text", text_file, "--context", 200)
    assert human.exit_code == 0 and f"{data['bits_per_byte']:.4f}" in human.output


@pytest.mark.parametrize("case", ["missing", "empty", "markers-only", "not-utf8", "context-1", "context-too-long",
                                  "preset", "ort-on-checkpoint"])
def test_eval_bad_input_exit_2(ckpt, tmp_path, case):
    path = tmp_path / "t.txt"
    content = {"empty": b"", "markers-only": (BOS + EOS).encode(), "not-utf8": b"ab\xff\xfe"}
    path.write_bytes(content.get(case, b"def f(): pass\n"))
    args = {"missing": ["--text", tmp_path / "nope.txt"], "context-1": ["--text", path, "--context", 1],
            "context-too-long": ["--text", path, "--context", 4097],
            "ort-on-checkpoint": ["--text", path, "--backend", "onnxruntime"]}.get(case, ["--text", path])
    source = "tiny-flash" if case == "preset" else ckpt
    result = run("eval", source, *args)
    assert result.exit_code == 2, result.output
    expect = {"missing": "nope.txt", "empty": "empty", "markers-only": "no bytes", "not-utf8": "UTF-8",
              "context-1": "[2, 4096]", "context-too-long": "[2, 4096]", "preset": "has no tokenizer",
              "ort-on-checkpoint": "manifest.json"}[case]
    assert expect in result.output


# --------------------------------------------------------------------------- an export
def test_export_carries_the_tokenizer(ckpt, export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["tokenizer"]
    tok = load_tokenizer(export_dir)
    assert tok.path == export_dir / "tokenizer.json" and tok.bos_id == load_tokenizer(ckpt).bos_id


def test_torch_and_onnxruntime_agree_on_bits_per_byte(export_dir, text_file):
    out = {}
    for backend in ("torch", "onnxruntime"):
        result = run("eval", export_dir, "--backend", backend, "--text", text_file, "--context", 300, "--json")
        assert result.exit_code == 0, result.output
        out[backend] = json.loads(result.output[result.output.index("{"):])
    t, o = out["torch"], out["onnxruntime"]
    assert (t["tokens"], t["bytes"], t["windows"]) == (o["tokens"], o["bytes"], o["windows"])
    assert o["bits_per_byte"] == pytest.approx(t["bits_per_byte"], rel=1e-3)
    assert o["nll"] == pytest.approx(t["nll"], rel=1e-5)  # fp32: far tighter than the 0.1% asked


def test_check_with_text_prompts(export_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("class TextWrapper:\n    ", encoding="utf-8")
    result = run("check", export_dir, "--prompt", "def dedent(text):", "--prompt", f"@{f}", "--steps", 4,
                 "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    tok = load_tokenizer(export_dir)
    assert report["prompt_lengths"] == [len(tok.encode("def dedent(text):")),
                                        len(tok.encode("class TextWrapper:\n    "))]


def test_check_text_prompt_needs_a_tokenizer(tmp_path, export_dir):
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "tokenizer.json").unlink()
    manifest["files"].pop("tokenizer.json")
    manifest["source"] = {"kind": "preset", "value": "tiny-flash"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    result = run("check", d, "--prompt", "x", "--steps", 1)
    assert result.exit_code == 2 and "has no tokenizer" in result.output


def test_generate_text_on_onnxruntime(export_dir):
    args = ["generate", export_dir, "--backend", "onnxruntime", "--prompt", "def wrap(", "-n", 12, "--ignore-eos"]
    plain, streamed = run(*args), run(*args, "--stream")
    assert plain.exit_code == 0 and streamed.output == plain.output, plain.output + streamed.output
    ort = json.loads(run(*args, "--json").output)["results"][0]
    ref = json.loads(run("generate", export_dir, "--prompt", "def wrap(", "-n", 12, "--ignore-eos", "--json")
                     .output)["results"][0]
    assert ort["prompt_ids"] == ref["prompt_ids"] and ort["tokens"] == ref["tokens"]
