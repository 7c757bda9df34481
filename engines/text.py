"""Text in and out: the tokenizer of a SOURCE, BOS/EOS ids, and streaming decode.

Where the tokenizer comes from (`find_tokenizer_file`):

- a checkpoint directory: its `tokenizer.json` (a Hugging Face `tokenizers` file: what the tiny
  trained model and the real DeepSeek-V4 checkpoints ship);
- an export directory: the `tokenizer.json` that `hatrt export` copied into it, else the one of
  the checkpoint named by the manifest's `source`;
- a preset name: none (random weights, no vocabulary): `TokenizerError` "SOURCE has no
  tokenizer; use --prompt-ids".

BOS / EOS ids (`special_ids`), first found wins: generation_config.json (`bos_token_id`,
`eos_token_id`, which may be a list), then config.json (or the export manifest's config), then
tokenizer_config.json / special_tokens_map.json (`bos_token` / `eos_token`, a string or
{"content": ...}, looked up in the tokenizer).

The BOS rule (one rule for `hatrt generate`, `hatrt check` and `hatrt eval`): when the model has a
BOS id, it is put in front of the encoded text unless the encoding already starts with it (the
text began with the BOS marker, or the tokenizer's post-processor added it). Models of this family
are trained on documents that each start with BOS (`scripts/train_tiny.py`: BOS + text + EOS), so
a prompt without it is out of distribution; `tokenizer_config.json`'s `add_bos_token` is not
consulted (the tiny model sets it false only so that `AutoTokenizer` reproduces the raw
`Tokenizer.encode`). `add_bos=False` (`--no-bos`) turns it off.

Special tokens written in the text (e.g. "<|bos|>") are recognized as the special token.
Decoding skips special tokens (a generated EOS prints nothing).

Streaming (`StreamDecoder`): the growing token list is decoded after each token and the new
suffix is printed, except trailing U+FFFD replacement characters, which are held back until the
bytes that complete the character arrive (or the stream ends): a multi-byte UTF-8 character split
over several byte-level tokens is never printed broken, and the concatenation of everything
printed equals the decoding of the whole list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CONFIG = "config.json"
MANIFEST = "manifest.json"
REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """A SOURCE has no usable tokenizer, or a tokenizer file is broken; the message names it."""


# ============================================================================ finding the files
def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when absent; TokenizerError naming the file when broken."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _manifest_checkpoint(export_dir: Path) -> Path | None:
    """The checkpoint directory an export was made from (manifest source), when it still exists."""
    manifest = _read_json(export_dir / MANIFEST) or {}
    src = manifest.get("source")
    if isinstance(src, dict) and src.get("kind") == "checkpoint" and src.get("value"):
        path = Path(str(src["value"]))
        if path.is_dir():
            return path
    return None


def tokenizer_dirs(source: str | os.PathLike) -> list[Path]:
    """The directories that may describe SOURCE's tokenizer, most specific first: the SOURCE
    directory itself and, for an export directory, the checkpoint named by its manifest."""
    path = Path(source)
    if not path.is_dir():
        return []
    dirs = [path]
    if (path / MANIFEST).is_file():
        ckpt = _manifest_checkpoint(path)
        if ckpt is not None and ckpt.resolve() != path.resolve():
            dirs.append(ckpt)
    return dirs


def find_tokenizer_file(source: str | os.PathLike) -> Path | None:
    """SOURCE's tokenizer.json (see the module docstring), or None."""
    for d in tokenizer_dirs(source):
        if (d / TOKENIZER_JSON).is_file():
            return d / TOKENIZER_JSON
    return None


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value) -> list[int] | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        return [int(v) for v in value]
    return None


def special_ids(source: str | os.PathLike, tokenizer=None) -> tuple[int | None, list[int]]:
    """(bos_id or None, eos_ids) of SOURCE from generation_config.json, config.json (or an export
    manifest's config), then tokenizer_config.json / special_tokens_map.json (token strings looked
    up in `tokenizer`, a tokenizers.Tokenizer, when given). Needs no tokenizer library."""
    bos: int | None = None
    eos: list[int] | None = None
    for d in tokenizer_dirs(source):
        configs = [_read_json(d / GENERATION_CONFIG), _read_json(d / CONFIG)]
        manifest = _read_json(d / MANIFEST) if (d / MANIFEST).is_file() else None
        if manifest and isinstance(manifest.get("config"), dict):
            configs.append(manifest["config"])
        for cfg in configs:
            if not cfg:
                continue
            if bos is None:
                b = _ids(cfg.get("bos_token_id"))
                bos = b[0] if b else None
            if eos is None:
                eos = _ids(cfg.get("eos_token_id"))
        if tokenizer is not None:
            for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
                cfg = _read_json(d / name) or {}
                if bos is None and _token_text(cfg.get("bos_token")) is not None:
                    bos = tokenizer.token_to_id(_token_text(cfg["bos_token"]))
                if eos is None and _token_text(cfg.get("eos_token")) is not None:
                    e = tokenizer.token_to_id(_token_text(cfg["eos_token"]))
                    eos = [e] if e is not None else None
    return bos, list(eos or [])


# ============================================================================ the tokenizer
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the model's BOS/EOS ids and hatrt's encode/decode rules."""

    def __init__(self, tokenizer, path: Path | None = None, bos_id: int | None = None,
                 eos_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.path = path
        self.bos_id = bos_id
        self.eos_ids = [int(t) for t in eos_ids]
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {i: tok.content for i, tok in added.items() if tok.special}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` (special-token markers in it recognized); BOS in front when the
        model has one, `add_bos`, and the encoding does not already start with it."""
        ids = list(self.tokenizer.encode(text).ids)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=skip_special_tokens)

    def text_bytes(self, text: str) -> int:
        """UTF-8 bytes of `text` without the special-token markers it contains (they carry no
        content: the denominator of bits per byte)."""
        ids = self.tokenizer.encode(text).ids
        markers = sum(len(self.special_tokens[i].encode("utf-8")) for i in ids if i in self.special_tokens)
        return len(text.encode("utf-8")) - markers

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.path)!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"


def load_tokenizer(source: str | os.PathLike) -> TextTokenizer:
    """The tokenizer of SOURCE (a checkpoint or export directory); TokenizerError otherwise."""
    path = find_tokenizer_file(source)
    if path is None:
        where = Path(source)
        if where.is_dir() and (where / MANIFEST).is_file():
            why = f" (no {TOKENIZER_JSON} in the export, nor in a checkpoint named by its manifest's source)"
        elif where.is_dir():
            why = f" (no {TOKENIZER_JSON} in the directory)"
        elif not where.exists():
            why = " (a preset: random weights, no vocabulary)" if _is_preset(str(source)) else \
                " (no such directory)"
        else:
            why = ""
        raise TokenizerError(f"{source} has no tokenizer{why}; use --prompt-ids")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("text prompts need the tokenizers package (pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise TokenizerError(f"{path}: cannot load the tokenizer: {e}") from None
    bos, eos = special_ids(source, tok)
    return TextTokenizer(tok, path, bos, eos)


def _is_preset(name: str) -> bool:
    try:
        from exporter.presets import PRESETS
    except ImportError:  # pragma: no cover
        return False
    return name in PRESETS


# ============================================================================ streaming
class StreamDecoder:
    """Decode tokens as they arrive: `push(token)` returns the text to print now, `flush()` the
    rest at the end. See the module docstring for the rule."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.printed = ""

    def _emit(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if not final:
            text = text.rstrip(REPLACEMENT)
        if len(text) <= len(self.printed):
            return ""
        new = text[len(self.printed):]  # decoders of this kind only ever append to the text
        self.printed = text
        return new

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)


__all__ = ["StreamDecoder", "TextTokenizer", "TokenizerError", "find_tokenizer_file", "load_tokenizer",
           "special_ids", "tokenizer_dirs"]
