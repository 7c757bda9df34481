"""Text in and out (engines/text.py): finding a SOURCE's tokenizer, BOS/EOS, streaming decode, and
`hatrt generate --prompt TEXT` (streaming == non-streaming, @FILE and stdin, EOS, bad input).

The model is the tiny-flash preset (random weights) saved as a checkpoint together with a
byte-level BPE tokenizer trained here in a fraction of a second (`make_checkpoint`, also used by
tests/test_eval.py)."""

from __future__ import annotations

import inspect
import json
import random
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from engines.cli import main
from engines.text import REPLACEMENT, StreamDecoder, TokenizerError, find_tokenizer_file, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

PRESET = "tiny-flash"  # vocab 512
BOS, EOS = "<|bos|>", "<|eos|>"
TOKENIZER_VOCAB = 400  # 256 bytes + 2 specials + merges: multi-byte characters stay split over tokens
UNICODE = "héllo wörld ☃ naïve café 日本語 "


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE like scripts/train_tiny.py's, on a few KB of deterministic text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [inspect.getsource(textwrap), UNICODE * 20]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_tokenizer_files(tok, out: Path, generation_config: bool = True, eos_id: int | None = None) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": False}))
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS) if eos_id is None else eos_id}))


def make_checkpoint(out: Path, preset: str = PRESET) -> Path:
    """A checkpoint directory: the preset's (seeded random) weights + a trained tokenizer."""
    from exporter import load_model
    from exporter.checkpoint import save_checkpoint

    model = load_model(preset)
    save_checkpoint(model, model.config, out)
    write_tokenizer_files(train_tokenizer(), out)
    return out


def eval_text() -> str:
    """A text with ASCII code and multi-byte characters (1.5 KB)."""
    return inspect.getsource(textwrap)[:1400] + "\n# " + UNICODE + "\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-text")


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


# --------------------------------------------------------------------------- finding the tokenizer
def test_tokenizer_of_a_checkpoint(ckpt):
    tok = load_tokenizer(ckpt)
    assert tok.path == ckpt / "tokenizer.json"
    assert tok.bos_id == tok.tokenizer.token_to_id(BOS) and tok.eos_ids == [tok.tokenizer.token_to_id(EOS)]
    assert set(tok.special_tokens.values()) == {BOS, EOS}
    assert tok.vocab_size == TOKENIZER_VOCAB


def test_bos_eos_fall_back_to_tokenizer_config(ckpt, tmp_path):
    """Without generation_config.json (and no ids in config.json) the token strings of
    tokenizer_config.json are looked up in the tokenizer."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, d / name)
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_ids) == (tok.tokenizer.token_to_id(BOS), [tok.tokenizer.token_to_id(EOS)])
    # generation_config.json wins over tokenizer_config.json, and may list several EOS ids
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [5, 6]}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_ids) == (7, [5, 6])


def test_export_dir_falls_back_to_the_manifest_source(ckpt, tmp_path):
    """An export directory without its own tokenizer.json uses the checkpoint it was exported from."""
    d = tmp_path / "export"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"source": {"kind": "checkpoint", "value": str(ckpt)}}))
    assert find_tokenizer_file(d) == ckpt / "tokenizer.json"
    assert load_tokenizer(d).bos_id == load_tokenizer(ckpt).bos_id
    shutil.copy(ckpt / "tokenizer.json", d / "tokenizer.json")  # its own copy wins
    assert find_tokenizer_file(d) == d / "tokenizer.json"


@pytest.mark.parametrize("kind", ["preset", "missing", "empty-dir", "preset-export"])
def test_no_tokenizer(kind, tmp_path):
    source = {"preset": PRESET, "missing": tmp_path / "nope", "empty-dir": tmp_path, "preset-export": tmp_path}[kind]
    if kind == "preset-export":
        (tmp_path / "manifest.json").write_text(json.dumps({"source": {"kind": "preset", "value": PRESET}}))
    with pytest.raises(TokenizerError, match=r"has no tokenizer.*; use --prompt-ids"):
        load_tokenizer(source)


def test_broken_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- encode / decode
def test_encode_puts_bos_in_front_once(ckpt):
    tok = load_tokenizer(ckpt)
    ids = tok.encode("def f(x):")
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.encode("def f(x):", add_bos=False) == ids[1:]
    assert tok.encode(BOS + "def f(x):") == ids  # a text starting with the marker: not doubled
    assert tok.decode(ids) == "def f(x):"  # special tokens are not printed
    assert tok.decode(ids, skip_special_tokens=False) == BOS + "def f(x):"


def test_text_bytes_excludes_special_markers(ckpt):
    tok = load_tokenizer(ckpt)
    text = BOS + "naïve ☃" + EOS + BOS + "x" + EOS
    assert tok.text_bytes(text) == len("naïve ☃x".encode())


def test_stream_decoder_never_breaks_a_character(ckpt):
    tok = load_tokenizer(ckpt)
    text = "déjà vu ☃ 日本語 🙂 ok"  # the emoji is not in the tokenizer's merges: four byte tokens
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.split())  # characters really are split over several tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)
    assert pieces[-1] == ""  # nothing was held back at the end


@pytest.mark.parametrize("seed", range(5))
def test_stream_decoder_equals_full_decode_on_any_ids(ckpt, seed):
    """Random ids (invalid UTF-8 byte sequences, special tokens included): the printed pieces
    always add up to the decoding of the whole list."""
    tok = load_tokenizer(ckpt)
    rng = random.Random(seed)
    ids = [rng.randrange(tok.vocab_size) for _ in range(60)]
    dec = tok.stream_decoder()
    pieces = [dec.push(t) for t in ids]
    assert all(not p.endswith(REPLACEMENT) for p in pieces)
    assert "".join(pieces) + dec.flush() == tok.decode(ids)


# --------------------------------------------------------------------------- hatrt generate --prompt
def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_generate_text_streaming_equals_non_streaming(ckpt):
    args = ["generate", ckpt, "--prompt", "def wrap(text, width", "-n", 24, "--ignore-eos"]
    plain = run(*args)
    streamed = run(*args, "--stream")
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.output + streamed.output
    assert streamed.output == plain.output
    data = _json(run(*args, "--json"))
    (res,) = data["results"]
    tok = load_tokenizer(ckpt)
    assert res["prompt_ids"] == tok.encode("def wrap(text, width") and res["prompt_length"] == len(res["prompt_ids"])
    assert len(res["tokens"]) == 24 and res["finish_reason"] == "length"
    assert res["text"] == tok.decode(res["tokens"]) and plain.output == res["text"] + "\n"
    # the same tokens as the id interface on the encoded prompt
    ids = run("generate", ckpt, "--prompt-ids", " ".join(map(str, res["prompt_ids"])), "-n", 24, "--ignore-eos")
    assert ids.output.split() == [str(t) for t in res["tokens"]]


def test_generate_text_batch_stream(ckpt):
    prompts = ["import re", "class TextWrapper:\n    def __init__(self"]
    args = ["generate", ckpt, "-n", 10, "--ignore-eos"] + [a for p in prompts for a in ("--prompt", p)]
    data = _json(run(*args, "--json"))
    streamed = run(*args, "--stream")
    assert streamed.exit_code == 0, streamed.output
    got = ["", ""]
    for line in streamed.output.splitlines():
        row, piece = line.split(" ", 1)
        got[int(row)] += json.loads(piece)
    assert got == [r["text"] for r in data["results"]]
    plain = run(*args)
    assert plain.output == "".join(f"--- {i} ---\n{r['text']}\n" for i, r in enumerate(data["results"]))


def test_generate_prompt_from_file_and_stdin(ckpt, tmp_path):
    prompt = "# naïve ☃\ndef dedent(text):\n"
    f = tmp_path / "prompt.txt"
    f.write_text(prompt, encoding="utf-8")
    base = ["generate", ckpt, "-n", 8, "--json", "--ignore-eos"]
    inline = _json(run(*base, "--prompt", prompt))
    from_file = _json(run(*base, "--prompt", f"@{f}"))
    from_stdin = _json(run(*base, "--prompt", "-", input=prompt))
    assert inline == from_file == from_stdin
    missing = run(*base, "--prompt", f"@{tmp_path / 'nope.txt'}")
    assert missing.exit_code == 2 and "nope.txt" in missing.output


def test_generate_stops_at_eos(ckpt, tmp_path):
    """EOS from generation_config.json ends a text generation unless --ignore-eos."""
    free = _json(run("generate", ckpt, "--prompt", "def", "-n", 6, "--json", "--ignore-eos"))["results"][0]["tokens"]
    eos = free[2]
    k = free.index(eos)  # the first time the model produces it
    d = tmp_path / "ckpt-eos"
    shutil.copytree(ckpt, d)
    write_tokenizer_files(load_tokenizer(ckpt).tokenizer, d, eos_id=eos)
    stopped = _json(run("generate", d, "--prompt", "def", "-n", 6, "--json"))["results"][0]
    assert stopped["tokens"] == free[:k + 1] and stopped["finish_reason"] == "stop"
    ignored = _json(run("generate", d, "--prompt", "def", "-n", 6, "--json", "--ignore-eos"))["results"][0]
    assert ignored["tokens"] == free
    # the id interface stops at the same EOS (generation_config.json of the SOURCE)
    ids = " ".join(map(str, load_tokenizer(d).encode("def")))
    stopped_ids = _json(run("generate", d, "--prompt-ids", ids, "-n", 6, "--json"))["results"][0]
    assert stopped_ids["tokens"] == free[:k + 1]


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of the two"),
    (["--prompt", "x", "--prompt-ids", "1 2"], "exactly one of the two"),
])
def test_generate_needs_exactly_one_prompt_kind(ckpt, args, message):
    result = run("generate", ckpt, *args)
    assert result.exit_code == 2 and message in result.output


def test_generate_text_on_a_preset_is_refused():
    result = run("generate", PRESET, "--prompt", "hello")
    assert result.exit_code == 2
    assert "tiny-flash has no tokenizer" in result.output and "--prompt-ids" in result.output
