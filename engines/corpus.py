"""The bundled model's data: the Python standard library of the running interpreter.

Every machine has it without a download. Files are split deterministically by path: a file is held
out when sha1(its relative posix path) mod 20 == 0 (about 5%); directories named in EXCLUDED_DIRS
(tests, site-packages) are not used. The training script (scripts/train_tiny.py), the evaluation
of the bundled model and FP8 calibration (engines/quantize.py, training split) all read it here.

A split as one string is, for each file in sorted path order, BOS + text + EOS; tokenized with the
shipped tokenizer (special tokens are recognized in the text) it is exactly the token stream the
model is trained or evaluated on.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
HELD_OUT_MOD = 20
BOS, EOS = "<|bos|>", "<|eos|>"
SPLITS = ("train", "held_out")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every *.py file under the stdlib root, sorted by the relative
    path; files under a directory named in EXCLUDED_DIRS are skipped."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    return sorted(out)


def is_held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest(), 16) % HELD_OUT_MOD == 0


def documents(split: str, root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the split ("train" or "held_out") in sorted path order. A file's
    text is its bytes decoded as strict UTF-8, unchanged; files that are not UTF-8 are skipped."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    docs = []
    for rel, p in stdlib_files(root):
        if is_held_out(rel) != (split == "held_out"):
            continue
        try:
            docs.append((rel, p.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return docs


def split_text(split: str, root: Path | None = None) -> str:
    """The split as one string: BOS + text + EOS per file, in sorted path order."""
    return "".join(BOS + text + EOS for _, text in documents(split, root))


def held_out_text(root: Path | None = None) -> str:
    return split_text("held_out", root)


def held_out_bytes(root: Path | None = None) -> int:
    """UTF-8 bytes of the held-out files' contents (markers not counted): bits-per-byte's denominator."""
    return sum(len(t.encode("utf-8")) for _, t in documents("held_out", root))


def calibration_text(n_chars: int, root: Path | None = None) -> str:
    """About n_chars of the training split, taken evenly across it (every k-th file), for FP8
    calibration: never the held-out text that measures what quantization costs."""
    docs = documents("train", root)
    total = sum(len(t) for _, t in docs)
    step = max(1, round(total / max(n_chars, 1) / 2))
    out, size = [], 0
    for _, text in docs[::step]:
        out.append(BOS + text + EOS)
        size += len(text)
        if size >= n_chars:
            break
    return "".join(out)


__all__ = ["BOS", "EOS", "EXCLUDED_DIRS", "HELD_OUT_MOD", "calibration_text", "documents", "held_out_bytes",
           "held_out_text", "is_held_out", "split_text", "stdlib_files", "stdlib_root"]
