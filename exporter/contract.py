"""The export contract: what an export directory holds and how its graph is wired.

One module says it for the exporter that writes the directory and for every runtime that reads it
(engines/), so names, dtypes, the cache tensor order and the capacity rule cannot drift apart:

- files: `step.onnx` (ONNX Runtime; the `hatrt` nodes carry their functions), `step.trt.onnx`
  (the TensorRT twin without them), `manifest.json`, tokenizer files when the source has them;
- the one graph, a *step*: `input_ids [batch, seq]` (seq >= 1: a prefill chunk or one decoding
  token per sequence), `logits_index [n_logits]` (which of the seq positions get logits; usually the
  last one), then the cache `cache.<name>` in `cache_layout` order -> `logits [batch, n_logits,
  vocab]`, the updated cache `new_cache.<name>` (same shapes: entry buffers keep their capacity)
  and, in a per-layer export, every layer's output streams `layer<i>.streams`;
- entry capacity: before a step the runtime makes every entry buffer hold every block the step
  touches (`entries_needed`), growing by `grown_capacity` (amortized, +25% at least; exporter/cache.py,
  which the eager reference uses too);
- the manifest: `read_manifest` checks every key a runtime reads, and the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .cache import BATCH, CSA_ENTRIES, HCA_ENTRIES, MIN_CAPACITY, TensorSpec, cache_layout, grown_capacity
from .config import CSA, HCA, ConfigError, ModelConfig

MANIFEST = "manifest.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "hatrt-export", 2
STEP = "step"  # the graph's key in manifest["graphs"]
STEP_FILE, STEP_TRT_FILE = "step.onnx", "step.trt.onnx"
OPSET = 23

INPUT_IDS, LOGITS_INDEX, LOGITS = "input_ids", "logits_index", "logits"
CACHE_IN, CACHE_OUT = "cache.", "new_cache."
SEQ, N_LOGITS = "seq", "n_logits"
POS = "pos"  # the cache tensor holding each sequence's next position

# dtype tables: export dtypes, and every dtype a graph input/output or cache tensor may have.
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
                "uint8": np.uint8}

ENTRY_DIMS = {CSA_ENTRIES: CSA, HCA_ENTRIES: HCA}  # dynamic entry dim -> its compression ratio
# Files up to this size are hashed in full when an export is loaded; above it (multi-GB weights)
# the fast check compares sizes and hashes the first and last MiB (verify="full" hashes everything).
FULL_HASH_BYTES = 1 << 30


class ExportError(ValueError):
    """An export cannot be written or read as asked; the message names the argument, file or key."""


# ============================================================================ names
def layer_output_name(i: int) -> str:
    return f"layer{i}.streams"


def cache_input_names(layout: Sequence[TensorSpec]) -> list[str]:
    return [CACHE_IN + s.name for s in layout]


def cache_output_names(layout: Sequence[TensorSpec]) -> list[str]:
    return [CACHE_OUT + s.name for s in layout]


def step_input_names(layout: Sequence[TensorSpec]) -> list[str]:
    return [INPUT_IDS, LOGITS_INDEX] + cache_input_names(layout)


def step_output_names(layout: Sequence[TensorSpec], num_layers: int = 0, per_layer: bool = False) -> list[str]:
    names = [LOGITS] + cache_output_names(layout)
    return names + ([layer_output_name(i) for i in range(num_layers)] if per_layer else [])


def step_dims(config: ModelConfig, layout: Sequence[TensorSpec], per_layer: bool) -> dict[str, list]:
    """Every graph input/output name -> its dims (ints, or names of dynamic dims)."""
    dims: dict[str, list] = {INPUT_IDS: [BATCH, SEQ], LOGITS_INDEX: [N_LOGITS],
                             LOGITS: [BATCH, N_LOGITS, config.vocab_size]}
    for spec in layout:
        dims[CACHE_IN + spec.name] = dims[CACHE_OUT + spec.name] = list(spec.dims)
    if per_layer:
        for i in range(config.num_layers):
            dims[layer_output_name(i)] = [BATCH, SEQ, config.hc_mult, config.hidden_size]
    return dims


# ============================================================================ capacity
def entries_needed(config: ModelConfig, last_pos: int) -> dict[str, int]:
    """Entry capacity per dynamic entry dim for a step whose last token sits at `last_pos`.

    A step touches the blocks from its first token's to the one after its last token's (the
    compressor writes every complete one and rewrites the others in place, exporter/model.py
    scatter_rows), so the capacity must exceed last_pos // ratio + 1."""
    ratios = set(config.compress_ratios)
    return {dim: last_pos // ratio + 2 for dim, ratio in ENTRY_DIMS.items() if ratio in ratios}


# ============================================================================ manifest
def sha256(path: Path, fast: bool = False) -> str:
    """Hex sha256 of a file; fast: of its size, first and last MiB (for multi-GB weight files)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        if fast:
            size = path.stat().st_size
            h.update(str(size).encode())
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """What the manifest records of a file: size, sha256 and, when large, the fast hash too."""
    size = path.stat().st_size
    rec = {"bytes": size, "sha256": sha256(path)}
    if size > FULL_HASH_BYTES:
        rec["fast_sha256"] = sha256(path, fast=True)
    return rec


def file_records(root: Path) -> dict[str, dict]:
    """The manifest's `files`: a record of every file in an output directory, by name."""
    return {p.name: file_record(p) for p in sorted(root.iterdir()) if p.is_file()}


def verify_file(path: Path, rec: dict, where: str | os.PathLike, full: bool = False, redo: str = "export again") -> None:
    """Check one file against its record (bytes, sha256, fast_sha256): ExportError naming it."""
    if not path.is_file():
        raise ExportError(f"{path}: file missing (listed under 'files' in {where})")
    size = path.stat().st_size
    if size != rec.get("bytes"):
        raise ExportError(f"{path}: {size} bytes, the manifest says {rec.get('bytes')} ({where}): the file was "
                          f"changed or truncated after it was written; {redo}")
    fast = size > FULL_HASH_BYTES and not full and "fast_sha256" in rec
    if sha256(path, fast=fast) != rec["fast_sha256" if fast else "sha256"]:
        raise ExportError(f"{path}: sha256 differs from the manifest's ({where}): the file was modified after it "
                          f"was written (corrupted or replaced); {redo}")


def verify_files(root: Path, manifest: dict, full: bool = False) -> None:
    """Check every file the manifest lists against its size and hash (ExportError naming the file).

    Files up to FULL_HASH_BYTES are hashed in full; larger ones by their size, first and last MiB
    unless `full`."""
    where = root / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{where}: missing key 'files' (the sha256 of every file)")
    for name, rec in files.items():
        verify_file(root / name, rec, where, full)


def read_manifest(artifact_dir: str | os.PathLike, verify: str = "fast") -> dict:
    """The manifest of an export directory, checked for every key the runtimes read.

    verify: "fast" (default) checks every file's size and hash (full hashes up to 1 GiB), "full"
    hashes everything, "none" skips it. Errors name the file and the key (ExportError)."""
    root = Path(artifact_dir)
    if not root.exists():
        raise ExportError(f"{root}: no such export directory")
    if not root.is_dir():
        raise ExportError(f"{root}: not a directory (an export directory holds {MANIFEST} and {STEP_FILE})")
    path = root / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path}: no manifest (is {root} a hatrt export directory?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: top level must be a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        hint = " (an export by an older hatrt with prefill/decode graphs: export it again)" \
            if manifest.get("format") == MANIFEST_FORMAT and manifest.get("version") == 1 else ""
        raise ExportError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                          f"expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}{hint}")
    for key, kind in (("config", dict), ("dtype", str), ("cache_layout", list), ("graphs", dict)):
        if key not in manifest:
            raise ExportError(f"{path}: missing key {key!r}")
        if not isinstance(manifest[key], kind):
            raise ExportError(f"{path}: key {key!r} must be a JSON {kind.__name__}")
    if manifest["dtype"] not in EXPORT_DTYPES:
        raise ExportError(f"{path}: dtype {manifest['dtype']!r} is not one hatrt exports ({', '.join(EXPORT_DTYPES)})")

    def entries(items, where: str) -> None:
        if not isinstance(items, list):
            raise ExportError(f"{path}: key {where!r} must be a JSON list")
        for i, item in enumerate(items):
            for key in ("name", "dims", "dtype"):
                if not isinstance(item, dict) or key not in item:
                    raise ExportError(f"{path}: {where}[{i}] has no key {key!r}")
            if item["dtype"] not in TORCH_DTYPES:
                raise ExportError(f"{path}: {where}[{i}] ({item['name']!r}) has dtype {item['dtype']!r} "
                                  f"(supported: {', '.join(TORCH_DTYPES)})")

    entries(manifest["cache_layout"], "cache_layout")
    info = manifest["graphs"].get(STEP)
    if not isinstance(info, dict):
        raise ExportError(f"{path}: missing key 'graphs.{STEP}'")
    for key in ("file", "inputs", "outputs"):
        if key not in info:
            raise ExportError(f"{path}: missing key 'graphs.{STEP}.{key}'")
    entries(info["inputs"], f"graphs.{STEP}.inputs")
    entries(info["outputs"], f"graphs.{STEP}.outputs")
    if not (root / info["file"]).is_file():
        raise ExportError(f"{root / info['file']}: graph file missing (named by graphs.{STEP}.file in {path})")
    layout = manifest_layout(manifest)
    want_in = step_input_names(layout)
    got_in = [io["name"] for io in info["inputs"]]
    if got_in != want_in:
        raise ExportError(f"{path}: graphs.{STEP}.inputs are {short(got_in)}, expected {short(want_in)} "
                          "(input_ids, logits_index, then cache.<name> in cache_layout order)")
    want_out = step_output_names(layout)
    got_out = [io["name"] for io in info["outputs"]]
    if got_out[:len(want_out)] != want_out:
        raise ExportError(f"{path}: graphs.{STEP}.outputs start with {short(got_out[:len(want_out)])}, "
                          f"expected {short(want_out)}")
    if verify != "none":
        verify_files(root, manifest, full=verify == "full")
    return manifest


def manifest_layout(manifest: dict) -> list[TensorSpec]:
    return [TensorSpec(s["name"], tuple(s["dims"]), s["dtype"]) for s in manifest["cache_layout"]]


def manifest_config(manifest: dict, where: str | os.PathLike = MANIFEST) -> ModelConfig:
    try:
        return ModelConfig.from_hf_dict(manifest["config"], name=str(manifest.get("model") or "custom"))
    except ConfigError as e:
        raise ExportError(f"{where}: key 'config': {e}") from None


def check_layout(config: ModelConfig, layout: Sequence[TensorSpec], dtype: str, where: str | os.PathLike) -> None:
    """The manifest's cache layout must be the one this hatrt derives from its config."""
    if list(cache_layout(config, EXPORT_DTYPES[dtype])) != list(layout):
        raise ExportError(f"{where}: key 'cache_layout' differs from the layout of its config "
                          "(an export by another hatrt version?); export it again")


def short(names: Sequence[str], limit: int = 6) -> str:
    names = list(names)
    text = ", ".join(repr(n) for n in names[:limit])
    return f"[{text}{', ...' if len(names) > limit else ''}] ({len(names)})"


__all__ = ["CACHE_IN", "CACHE_OUT", "ENTRY_DIMS", "EXPORT_DTYPES", "ExportError", "INPUT_IDS", "LOGITS", "LOGITS_INDEX",
           "MANIFEST", "MIN_CAPACITY", "NUMPY_DTYPES", "OPSET", "POS", "STEP", "STEP_FILE", "STEP_TRT_FILE",
           "TORCH_DTYPES", "cache_input_names", "cache_output_names", "check_layout", "entries_needed", "file_record",
           "file_records",
           "grown_capacity", "layer_output_name", "manifest_config", "manifest_layout", "read_manifest", "sha256",
           "step_dims", "step_input_names", "step_output_names", "verify_file", "verify_files"]
