"""The TensorRT builder and backend, everything that runs without TensorRT or a GPU (docs/tensorrt.md).

- profile planning from a real export's manifest (and from the contract's helpers for quick cases),
  including that the entry-capacity range covers every capacity the runtime's growth can reach;
- every refusal of `hatrt build` and of the backend, reached for real in the order they fire;
- the `hatrt` nodes of the real step.trt.onnx against plugin registries and parsed-layer lists;
- the engine manifest (engine.json) written, read back, and tampered with;
- the trtexec / polygraphy command text, parsed back;
- pyright over engines/tensorrt_build.py and engines/tensorrt_backend.py against `tensorrt-stubs`
  (kept OUT of the runtime environment: see test_stubs_not_in_runtime_env), with a negative control.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engines import tensorrt_build as tb
from engines.backends import BackendError
from engines.tensorrt_build import (DECODE, PREFILL, LayerInfo, Limits, TensorRTError, check_build_environment,
                                    check_plugin_layers, check_plugins_registered, max_entry_capacity, plan_profiles)
from engines.tensorrt_cli import build_cmd
from exporter import contract
from exporter.cache import BATCH, CSA_ENTRIES, HCA_ENTRIES, MIN_CAPACITY, cache_layout
from exporter.presets import preset

REPO = Path(__file__).resolve().parent.parent


def _have_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import tensorrt

    return hasattr(tensorrt, "Builder")


HAVE_TENSORRT = _have_tensorrt()


def hand_manifest(name: str = "tiny-flash", dtype: str = "float32", **extra) -> dict:
    """An export manifest built from the contract's helpers (no export): what plan_profiles reads."""
    config = preset(name)
    layout = cache_layout(config, contract.EXPORT_DTYPES[dtype])
    dims = contract.step_dims(config, layout, per_layer=False)
    dtypes = {contract.INPUT_IDS: "int64", contract.LOGITS_INDEX: "int64", contract.LOGITS: "float32"}
    dtypes.update({contract.CACHE_IN + s.name: s.dtype for s in layout})
    dtypes.update({contract.CACHE_OUT + s.name: s.dtype for s in layout})
    io = lambda names: [{"name": n, "dims": dims[n], "dtype": dtypes[n]} for n in names]  # noqa: E731
    return {"format": contract.MANIFEST_FORMAT, "version": contract.MANIFEST_VERSION, "model": config.name,
            "source": {"kind": "preset", "value": name}, "config": config.to_hf_dict(), "dtype": dtype,
            "quant_sim": False, "per_layer": False, "cache_layout": [s.to_dict() for s in layout],
            "graphs": {contract.STEP: {"file": contract.STEP_FILE, "trt_file": contract.STEP_TRT_FILE,
                                       "inputs": io(contract.step_input_names(layout)),
                                       "outputs": io(contract.step_output_names(layout))}},
            "tokenizer": [], **extra}


# ============================================================================ profiles
def test_plan_profiles_from_real_export(flash_export):
    manifest = contract.read_manifest(flash_export, verify="none")
    config = contract.manifest_config(manifest)
    limits = Limits(max_batch=4, max_context=2048, prefill_chunk=256)
    plan = plan_profiles(manifest, limits)
    assert [p.name for p in plan.profiles] == [DECODE, PREFILL] and [p.index for p in plan.profiles] == [0, 1]
    inputs = manifest["graphs"][contract.STEP]["inputs"]
    assert plan.inputs == [io["name"] for io in inputs]
    caps = max_entry_capacity(config, 2048)
    assert set(caps) == {CSA_ENTRIES, HCA_ENTRIES}
    for p in plan.profiles:
        assert list(p.shapes) == plan.inputs  # every input, graph order
        for io in inputs:
            r = p.shapes[io["name"]]
            assert len(r.min) == len(r.opt) == len(r.max) == len(io["dims"])
            for d, lo, opt, hi in zip(io["dims"], r.min, r.opt, r.max):
                assert 1 <= lo <= opt <= hi
                if isinstance(d, int):
                    assert lo == opt == hi == d
                elif d in caps:
                    assert (lo, hi) == (MIN_CAPACITY, caps[d])
                elif d == BATCH:
                    assert (lo, hi) == (1, 4)
    dec, pre = plan.profiles
    assert dec.dims[contract.SEQ] == (1, 1, 1) and dec.dims[contract.N_LOGITS] == (1, 1, 1)
    assert dec.dims[BATCH] == (1, 4, 4)  # decode tuned for the full batch
    assert dec.shapes[contract.INPUT_IDS] == tb.ShapeRange((1, 1), (4, 1), (4, 1))
    assert pre.dims[contract.SEQ] == (1, 256, 256) and pre.dims[contract.N_LOGITS] == (1, 1, 256)
    assert pre.dims[BATCH] == (1, 1, 4)
    assert pre.shapes[contract.LOGITS_INDEX] == tb.ShapeRange((1,), (1,), (256,))
    # the same planning from the contract's helpers gives the same profiles (one source of truth)
    assert plan_profiles(hand_manifest(), limits) == plan


def test_plan_defaults_and_limits():
    manifest = hand_manifest()
    config = contract.manifest_config(manifest)
    plan = plan_profiles(manifest)  # defaults: max_batch 8, max_context = max_position_embeddings, chunk 512
    assert plan.limits == Limits(8, config.max_position_embeddings, 512, 8, config.max_position_embeddings)
    # a chunk longer than the context is clamped; chunk 1 leaves only the decode profile
    assert plan_profiles(manifest, Limits(max_context=100, prefill_chunk=512)).limits.prefill_chunk == 100
    only = plan_profiles(manifest, Limits(prefill_chunk=1))
    assert [p.name for p in only.profiles] == [DECODE]
    assert tb.profile_for_seq(only.profiles, 1).name == DECODE
    with pytest.raises(TensorRTError, match="needs the prefill profile"):
        tb.profile_for_seq(only.profiles, 2)
    assert tb.profile_for_seq(plan.profiles, 1).name == DECODE
    assert tb.profile_for_seq(plan.profiles, 7).name == PREFILL
    # opt values inside the ranges
    opt = plan_profiles(manifest, Limits(max_batch=8, opt_batch=2, max_context=4096, opt_context=1024))
    dec = opt.profile(DECODE)
    assert dec is not None and dec.dims[BATCH] == (1, 2, 8)
    assert dec.dims[CSA_ENTRIES][1] == max_entry_capacity(config, 1024)[CSA_ENTRIES] < dec.dims[CSA_ENTRIES][2]


@pytest.mark.parametrize("limits, match", [
    (Limits(max_batch=0), "--max-batch must be >= 1"),
    (Limits(max_context=5000), "exceeds the model's max_position_embeddings=4096"),
    (Limits(max_context=0), "--max-context must be >= 1"),
    (Limits(prefill_chunk=0), "--prefill-chunk must be >= 1"),
    (Limits(max_batch=4, opt_batch=5), r"--opt-batch 5 must lie in \[1, --max-batch 4\]"),
    (Limits(max_context=1000, opt_context=2000), r"--opt-context 2000 must lie in \[1, --max-context 1000\]"),
])
def test_plan_refuses_bad_limits(limits, match):
    with pytest.raises(TensorRTError, match=match):
        plan_profiles(hand_manifest(), limits)


def test_plan_refuses_unknown_dim():
    manifest = hand_manifest()
    manifest["graphs"][contract.STEP]["inputs"][2]["dims"] = ["batch", "mystery", 80]
    with pytest.raises(TensorRTError, match=r"input 'cache.layer0.window_kv' has dim 'mystery'"):
        plan_profiles(manifest)


@pytest.mark.parametrize("max_context", [1, 100, 129, 700, 4096])
def test_entry_range_covers_runtime_growth(max_context):
    """The profiles' max entry capacity bounds every capacity KVCache.ensure_capacity (the runtime's
    growth rule, run for real on a real cache) reaches for positions < max_context, with chunks of
    random sizes, and merged caches too."""
    from engines import cache_ops

    config = preset("tiny-flash")
    layout = cache_layout(config)
    bound = max_entry_capacity(config, max_context)
    rng = random.Random(max_context)
    caches = []
    for trial in range(4):
        cache = cache_ops.empty(config, layout, 1)
        pos = 0
        while pos < max_context:
            s = min(rng.choice([1, 1, 1, 3, 17, 128, 512]), max_context - pos)
            cache.ensure_capacity(config, pos + s - 1)
            for dim, cap in cache.capacities().items():
                assert cap <= bound[dim], (dim, cap, bound[dim], pos + s - 1)
            pos += s
            cache.positions += s
        caches.append(cache)
    merged = cache_ops.KVCache.merge(caches)
    assert all(cap <= bound[d] for d, cap in merged.capacities().items())
    # and the bound is needed: growing one entry short of the last block's need reaches it
    from exporter.cache import grown_capacity

    need = contract.entries_needed(config, max_context - 1)
    assert all(bound[d] == max(MIN_CAPACITY, grown_capacity(need[d] - 1, need[d])) for d in need)


# ============================================================================ refusals
OK_ENV = dict(trt_version="10.15.1.29", cuda=True, capability=(9, 0), fp8=True)


def test_build_environment_refusals_in_order(tmp_path):
    lib = tmp_path / "libhatrt_plugins.so"
    lib.write_bytes(b"\x7fELF not really")
    check_build_environment(**OK_ENV, plugin_library=lib)  # all good: no refusal
    check_build_environment(**{**OK_ENV, "trt_version": "11.1.0"}, plugin_library=lib)
    # no TensorRT wins over everything else (nothing else can be known)
    with pytest.raises(TensorRTError, match="TensorRT is not installed"):
        check_build_environment(trt_version=None, cuda=False, capability=None, fp8=True, plugin_library=None)
    with pytest.raises(TensorRTError, match=r"TensorRT 10.8.0 is too old: hatrt needs >= 10.15"):
        check_build_environment(**{**OK_ENV, "trt_version": "10.8.0"}, plugin_library=lib)
    with pytest.raises(TensorRTError, match=r"no CUDA GPU is visible \(torch.cuda.is_available\(\) is False\)"):
        check_build_environment(**{**OK_ENV, "cuda": False, "capability": None}, plugin_library=lib)
    # FP8 export on a GPU without FP8 (A100: 8.0, A10: 8.6); not refused for a non-FP8 export
    for cc in [(8, 0), (8, 6), (7, 5)]:
        with pytest.raises(TensorRTError, match=rf"FP8 export and the GPU A100 \(compute capability {cc[0]}.{cc[1]}\)"):
            check_build_environment(**{**OK_ENV, "capability": cc}, plugin_library=lib, gpu_name="A100")
        check_build_environment(**{**OK_ENV, "capability": cc, "fp8": False}, plugin_library=lib)
    check_build_environment(**{**OK_ENV, "capability": (8, 9)}, plugin_library=lib)  # Ada has FP8
    with pytest.raises(TensorRTError, match=r"plugin library .*nope.so not found: build it"):
        check_build_environment(**OK_ENV, plugin_library=tmp_path / "nope.so")


def test_fp8_export_detection():
    assert not tb.is_fp8_export(hand_manifest())
    assert tb.is_fp8_export(hand_manifest(quantization={"format": "fp8", "weights": "per-channel"}))


def test_parse_version():
    assert tb.parse_version("10.15.1.29") == (10, 15, 1, 29)
    assert tb.parse_version("11.1.0rc1") == (11, 1, 0)
    assert tb.parse_version(None) is None and tb.parse_version("") is None


def test_build_cli_refuses_without_tensorrt(flash_export, tmp_path):
    """Here (no TensorRT) `hatrt build` on a real export stops with exit 2 and says why; nothing is written."""
    if HAVE_TENSORRT:
        pytest.skip("TensorRT is installed here: the refusal under test cannot fire")
    out = tmp_path / "engine"
    r = CliRunner().invoke(build_cmd, [str(flash_export), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "TensorRT is not installed" in r.output
    assert not out.exists()


def test_build_cli_refuses_bad_input(flash_export, tmp_path):
    r = CliRunner().invoke(build_cmd, [str(tmp_path / "nothing"), "-o", str(tmp_path / "e")])
    assert r.exit_code == 2 and "no such export directory" in r.output
    r = CliRunner().invoke(build_cmd, [str(flash_export), "-o", str(tmp_path / "e"), "--max-context", "1M"])
    assert r.exit_code == 2 and "exceeds the model's max_position_embeddings=4096" in r.output
    r = CliRunner().invoke(build_cmd, [str(flash_export), "-o", str(tmp_path / "e"), "--workspace", "lots"])
    assert r.exit_code == 2 and "is not a byte count" in r.output


def test_build_refuses_tampered_export(flash_export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(flash_export, copy)
    with open(copy / contract.STEP_TRT_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(TensorRTError, match=r"step.trt.onnx: \d+ bytes, the manifest says"):
        tb.build_engine(copy, tmp_path / "engine")


# ============================================================================ hatrt nodes -> plugins
def test_hatrt_nodes_of_real_graph(flash_export):
    nodes = tb.hatrt_nodes(flash_export / contract.STEP_TRT_FILE)
    manifest = contract.read_manifest(flash_export, verify="none")
    assert {n.op_type for n in nodes} == set(manifest["custom_ops"]["ops"])
    assert all(n.plugin_namespace == "hatrt" and n.plugin_version == "1" and n.outputs for n in nodes)
    assert len({n.name for n in nodes}) == len(nodes)


def test_plugins_registered_check(flash_export):
    nodes = tb.hatrt_nodes(flash_export / contract.STEP_TRT_FILE)
    every = {(n.op_type, n.plugin_version, n.plugin_namespace) for n in nodes}
    check_plugins_registered(nodes, every, "lib.so")
    gone = next(n for n in nodes if n.op_type == "IndexerTopK")
    with pytest.raises(TensorRTError, match=rf"node '{gone.name}' \(hatrt::IndexerTopK version 1\) has no registered "
                                            r"plugin after loading lib.so"):
        check_plugins_registered(nodes, every - {("IndexerTopK", "1", "hatrt")}, "lib.so")
    with pytest.raises(TensorRTError, match=r"registered: none"):
        check_plugins_registered(nodes, set())


def test_plugin_layers_check(flash_export):
    nodes = tb.hatrt_nodes(flash_export / contract.STEP_TRT_FILE)
    layers = [LayerInfo(n.name, "PLUGIN_V3", n.outputs) for n in nodes]
    layers.append(LayerInfo("node_MatMul_1", "MATRIX_MULTIPLY", ("matmul_1",)))
    check_plugin_layers(nodes, layers)
    # renamed layers are matched by their output tensors
    renamed = [LayerInfo(f"{{ForeignNode[{i}]}}", "PLUGIN_V3", n.outputs) for i, n in enumerate(nodes)]
    check_plugin_layers(nodes, renamed)
    bad = nodes[1]
    expanded = [LayerInfo(n.name, "ELEMENTWISE" if n is bad else "PLUGIN_V3", n.outputs) for n in nodes]
    with pytest.raises(TensorRTError, match=rf"node '{bad.name}' \({bad.op_type}\) became a ELEMENTWISE layer.*not a "
                                            r"PLUGIN_V3 plugin layer"):
        check_plugin_layers(nodes, expanded)
    with pytest.raises(TensorRTError, match=rf"node '{bad.name}' \({bad.op_type}\) produced no layer"):
        check_plugin_layers(nodes, [layer for layer in layers if layer.name != bad.name])


# ============================================================================ engine folder
def fake_engine_dir(export_dir: Path, tmp_path: Path, *, plan_limits: Limits = Limits(max_batch=2, max_context=1024,
                                                                                          prefill_chunk=64)) -> Path:
    """An engine folder as build_engine writes it, with a stand-in engine blob and plugin library
    (the manifest logic under test does not look inside them)."""
    manifest = contract.read_manifest(export_dir, verify="none")
    plan = plan_profiles(manifest, plan_limits)
    out = tmp_path / "engine"
    out.mkdir()
    (out / tb.ENGINE_FILE).write_bytes(os.urandom(4096))
    lib_src = tmp_path / "build" / "libhatrt_plugins.so"
    lib_src.parent.mkdir(parents=True)
    lib_src.write_bytes(b"\x7fELF plugin bytes")
    shutil.copyfile(lib_src, out / tb.PLUGIN_FILE)
    tokenizer = tb.copy_runtime_files(export_dir, manifest, out)
    doc = tb.engine_manifest(export_dir=export_dir, export_manifest=manifest, plan=plan, plugin_source=lib_src,
                             plugin_sha256=contract.sha256(out / tb.PLUGIN_FILE), trt_version="10.15.1.29",
                             gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0),
                             engine_record=contract.file_record(out / tb.ENGINE_FILE),
                             builder={"optimization_level": 3}, outputs=manifest["graphs"]["step"]["outputs"],
                             tokenizer=tokenizer)
    tb.write_engine_manifest(out, doc)
    return out


def test_engine_manifest_roundtrip(flash_export, tmp_path):
    out = fake_engine_dir(flash_export, tmp_path)
    doc = tb.read_engine_manifest(out)
    export_manifest = contract.read_manifest(flash_export, verify="none")
    assert doc["format"] == "hatrt-engine" and doc["tensorrt"]["version"] == "10.15.1.29"
    assert doc["tensorrt"]["strongly_typed"] == "NetworkDefinitionCreationFlag.STRONGLY_TYPED"  # 10.x sets the flag
    assert doc["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    assert doc["export"]["manifest_sha256"] == contract.sha256(flash_export / contract.MANIFEST)
    assert doc["export"]["path"] == str(flash_export.resolve())
    assert doc["plugins"]["sha256"] == contract.sha256(out / tb.PLUGIN_FILE)
    for key in ("config", "dtype", "cache_layout", "source", "quant_sim", "per_layer"):
        assert doc[key] == export_manifest[key]
    assert doc["limits"] == {"max_batch": 2, "max_context": 1024, "prefill_chunk": 64, "opt_batch": 2,
                             "opt_context": 1024}
    profiles = tb.engine_profiles(doc)
    assert profiles == plan_profiles(export_manifest, Limits(max_batch=2, max_context=1024, prefill_chunk=64)).profiles
    view = tb.engine_export_manifest(doc)  # what `hatrt check` / the tokenizer code read
    assert view["graphs"]["step"]["inputs"] == export_manifest["graphs"]["step"]["inputs"]
    assert contract.manifest_layout(view) == contract.manifest_layout(export_manifest)
    assert tb.is_engine_dir(out) and not tb.is_engine_dir(flash_export)
    json.loads((out / tb.EXPORT_MANIFEST_COPY).read_text())


def test_runtime_files_copied(tmp_path):
    """The engine folder gets the export manifest, the tokenizer files and an FP8 export's recipe."""
    src = tmp_path / "export"
    src.mkdir()
    manifest = hand_manifest(quantization={"precision": "fp8", "recipe": "fp8_recipe.json", "recipe_sha256": "x"})
    manifest["tokenizer"] = ["tokenizer.json", "generation_config.json"]
    (src / contract.MANIFEST).write_text(json.dumps(manifest))
    (src / "tokenizer.json").write_text("{}")
    (src / "fp8_recipe.json").write_text('{"scales": {}}')
    dest = tmp_path / "engine"
    dest.mkdir()
    assert tb.copy_runtime_files(src, manifest, dest) == ["tokenizer.json"]  # generation_config.json absent
    assert sorted(p.name for p in dest.iterdir()) == ["export_manifest.json", "fp8_recipe.json", "tokenizer.json"]
    (src / "fp8_recipe.json").unlink()
    with pytest.raises(TensorRTError, match="fp8_recipe.json: the FP8 recipe named by the manifest's quantization"):
        tb.copy_runtime_files(src, manifest, dest)


def test_engine_manifest_refusals(flash_export, tmp_path):
    out = fake_engine_dir(flash_export, tmp_path)
    with pytest.raises(TensorRTError, match="no such engine folder"):
        tb.read_engine_manifest(tmp_path / "missing")
    with pytest.raises(TensorRTError, match="an export directory: build an engine from it"):
        tb.read_engine_manifest(flash_export)
    engine = out / tb.ENGINE_FILE
    data = engine.read_bytes()
    engine.write_bytes(data[:-1])
    with pytest.raises(TensorRTError, match="changed or truncated after it was written; build it again"):
        tb.read_engine_manifest(out)
    engine.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(TensorRTError, match="modified after it was written.*build it again"):
        tb.read_engine_manifest(out)
    tb.read_engine_manifest(out, verify="none")
    doc = json.loads((out / tb.ENGINE_MANIFEST).read_text())
    (out / tb.ENGINE_MANIFEST).write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(TensorRTError, match="expected 'hatrt-engine' version 1"):
        tb.read_engine_manifest(out, verify="none")
    del doc["profiles"]
    (out / tb.ENGINE_MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(TensorRTError, match="key 'profiles' missing"):
        tb.read_engine_manifest(out, verify="none")
    (out / tb.ENGINE_MANIFEST).write_text("{not json")
    with pytest.raises(TensorRTError, match="not valid JSON"):
        tb.read_engine_manifest(out, verify="none")


def test_plugin_library_verified_at_load(flash_export, tmp_path):
    out = fake_engine_dir(flash_export, tmp_path)
    doc = tb.read_engine_manifest(out)
    assert tb.verify_plugin_library(doc, out) == out / tb.PLUGIN_FILE  # the copy in the folder first
    (out / tb.PLUGIN_FILE).unlink()
    source = Path(doc["plugins"]["source"])
    assert tb.verify_plugin_library(doc, out) == source  # then the path it was built with
    source.write_bytes(b"\x7fELF rebuilt plugins")
    with pytest.raises(TensorRTError, match=r"sha256 .* differs .* the engine was built with another build"):
        tb.verify_plugin_library(doc, out)
    source.unlink()
    with pytest.raises(TensorRTError, match="plugin library missing"):
        tb.verify_plugin_library(doc, out)
    other = tmp_path / "other.so"
    other.write_bytes(b"\x7fELF plugin bytes")  # same bytes as built: accepted from anywhere
    assert tb.verify_plugin_library(doc, out, other) == other


def test_backend_refusals_before_tensorrt(flash_export, tmp_path):
    """TensorRTBackend refuses, in order and without TensorRT: no folder, an export directory, a
    tampered engine, a plugin library with another sha256; then (here) TensorRT missing."""
    from engines.tensorrt_backend import TensorRTBackend, load_tensorrt_backend

    with pytest.raises(BackendError, match="an export directory; the tensorrt backend runs an engine folder"):
        load_tensorrt_backend(flash_export)
    with pytest.raises(BackendError, match="no engine.json"):
        load_tensorrt_backend(tmp_path)
    out = fake_engine_dir(flash_export, tmp_path)
    (out / tb.PLUGIN_FILE).write_bytes(b"\x7fELF another build")
    with pytest.raises(TensorRTError, match="differs from .* recorded"):
        TensorRTBackend(out)
    assert isinstance(TensorRTError("x"), BackendError)  # the CLI's `except BackendError` catches refusals
    shutil.copyfile(tmp_path / "build" / "libhatrt_plugins.so", out / tb.PLUGIN_FILE)
    if HAVE_TENSORRT:
        pytest.skip("TensorRT is installed here: the next refusal cannot fire")
    with pytest.raises(TensorRTError, match="TensorRT is not installed"):
        TensorRTBackend(out)


# ============================================================================ equivalent commands
def _parse_trtexec(text: str) -> dict:
    args = shlex.split(text)
    assert args[0] == "trtexec"
    profiles: dict[int, dict[str, dict[str, list[int]]]] = {}
    current = None
    flags = {}
    for a in args[1:]:
        key, _, value = a.lstrip("-").partition("=")
        if key == "profile":
            current = profiles.setdefault(int(value), {})
        elif key in ("minShapes", "optShapes", "maxShapes"):
            assert current is not None, "shapes before --profile"
            pairs = (kv.rsplit(":", 1) for kv in value.split(","))
            current[key] = {n: [int(d) for d in s.split("x")] for n, s in pairs}
        else:
            flags[key] = value
    return {"profiles": profiles, "flags": flags}


def test_trtexec_command(flash_export):
    manifest = contract.read_manifest(flash_export, verify="none")
    plan = plan_profiles(manifest, Limits(max_batch=4, max_context=2048, prefill_chunk=256))
    text = tb.trtexec_command(plan, "exp dir/step.trt.onnx", "build/plugins/libhatrt_plugins.so", "eng/step.engine",
                              workspace=4 << 30, optimization_level=4, timing_cache="eng/timing.cache")
    parsed = _parse_trtexec(text)
    assert parsed["flags"]["onnx"] == "exp dir/step.trt.onnx"  # quoted, survives the shell
    assert parsed["flags"]["dynamicPlugins"] == "build/plugins/libhatrt_plugins.so"
    assert parsed["flags"]["saveEngine"] == "eng/step.engine"
    assert parsed["flags"]["memPoolSize"] == "workspace:4096M"
    assert parsed["flags"]["builderOptimizationLevel"] == "4"
    assert parsed["flags"]["timingCacheFile"] == "eng/timing.cache"
    assert "skipInference" in parsed["flags"] and "noTF32" in parsed["flags"]  # exact fp32 unless --tf32
    assert not {"fp8", "fp16", "bf16", "int8", "best", "stronglyTyped"} & set(parsed["flags"])  # TRT 11: no flags
    assert sorted(parsed["profiles"]) == [0, 1]
    for p in plan.profiles:
        shapes = parsed["profiles"][p.index]
        for which in ("min", "opt", "max"):
            assert shapes[f"{which}Shapes"] == {n: list(getattr(r, which)) for n, r in p.shapes.items()}
    assert parsed["profiles"][0]["maxShapes"]["input_ids"] == [4, 1]
    assert parsed["profiles"][1]["maxShapes"]["input_ids"] == [4, 256]
    assert "stronglyTyped" in _parse_trtexec(tb.trtexec_command(plan, "a", "b", "c", strongly_typed_flag=True))["flags"]
    assert "noTF32" not in _parse_trtexec(tb.trtexec_command(plan, "a", "b", "c", tf32=True))["flags"]


def test_polygraphy_command(flash_export):
    manifest = contract.read_manifest(flash_export, verify="none")
    plan = plan_profiles(manifest, Limits(max_batch=2, max_context=512, prefill_chunk=64))
    args = shlex.split(tb.polygraphy_command(plan, "m.onnx", "lib.so", "e.engine", workspace=1 << 30,
                                             timing_cache="t.cache", strongly_typed_flag=True))
    assert args[:7] == ["polygraphy", "convert", "m.onnx", "--plugins", "lib.so", "-o", "e.engine"]
    assert args.count("--trt-min-shapes") == args.count("--trt-opt-shapes") == args.count("--trt-max-shapes") == 2
    first = args.index("--trt-min-shapes")
    assert args[first + 1] == "input_ids:[1,1]"
    assert "workspace:1073741824" in args and "--strongly-typed" in args and "--fp8" not in args
    assert "--tf32" not in args and "--tf32" in tb.polygraphy_command(plan, "m", "l", "e", tf32=True)
    assert args[args.index("--load-timing-cache") + 1] == "t.cache"


def test_build_cli_print_command(flash_export, tmp_path):
    r = CliRunner().invoke(build_cmd, [str(flash_export), "-o", str(tmp_path / "e"), "--print-command",
                                       "--max-batch", "2", "--max-context", "1K", "--prefill-chunk", "128",
                                       "--plugins", "/opt/hatrt/libhatrt_plugins.so"])
    assert r.exit_code == 0, r.output
    trtexec, polygraphy = r.output.strip().splitlines()
    parsed = _parse_trtexec(trtexec)
    assert parsed["flags"]["dynamicPlugins"] == "/opt/hatrt/libhatrt_plugins.so"
    assert parsed["profiles"][1]["maxShapes"]["input_ids"] == [2, 128]
    assert polygraphy.startswith("polygraphy convert ")


def test_default_plugin_library(tmp_path):
    assert tb.default_plugin_library(tmp_path) in (tmp_path / "build/plugins/libhatrt_plugins.so",
                                                   REPO / "build/plugins/libhatrt_plugins.so")
    lib = tmp_path / "build" / "plugins" / "libhatrt_plugins.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"x")
    assert tb.default_plugin_library(tmp_path) == lib


# ============================================================================ type checking
def _stubs_dir() -> Path | None:
    for d in (os.environ.get("HATRT_TRT_STUBS"), REPO / ".typecheck" / "tensorrt-stubs"):
        if d and (Path(d) / "tensorrt" / "__init__.pyi").is_file():
            return Path(d)
    return None


def test_stubs_not_in_runtime_env():
    """tensorrt-stubs make `import tensorrt` succeed as an empty namespace: they must never be in the
    environment that runs hatrt (install them with pip --target into .typecheck/tensorrt-stubs)."""
    spec = importlib.util.find_spec("tensorrt")
    if spec is None:
        return
    import tensorrt

    assert hasattr(tensorrt, "Builder"), (f"`import tensorrt` finds {spec.submodule_search_locations or spec.origin}, "
                                          "which has no TensorRT in it (tensorrt-stubs installed into the runtime "
                                          "environment?): uninstall it and use pip install --target")


def test_pyright_against_tensorrt_stubs(tmp_path):
    """pyright (standard mode) finds no error in the builder and the backend against tensorrt-stubs,
    and does flag a call the stubs do not have (the check is not vacuous)."""
    stubs = _stubs_dir()
    if stubs is None:
        pytest.skip("tensorrt-stubs not found: pip install --no-deps --target .typecheck/tensorrt-stubs "
                    "tensorrt-stubs (or set HATRT_TRT_STUBS)")
    pyright = shutil.which("pyright")
    if pyright is None:
        pytest.skip("pyright not installed (pip install -e '.[typecheck]')")
    control = tmp_path / "control.py"
    control.write_text("import tensorrt as trt\n"
                       "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                       "config = builder.create_builder_config()\n"
                       "config.set_flag(trt.BuilderFlag.NOT_A_FLAG)\n")
    config = tmp_path / "pyrightconfig.json"
    config.write_text(json.dumps({"extraPaths": [str(REPO), str(stubs)], "pythonVersion": "3.10",
                                  "typeCheckingMode": "standard", "reportMissingModuleSource": "none"}))
    files = [REPO / "engines" / "tensorrt_build.py", REPO / "engines" / "tensorrt_backend.py",
             REPO / "engines" / "tensorrt_cli.py", control]
    proc = subprocess.run([pyright, "-p", str(config), "--pythonpath", sys.executable, "--outputjson",
                           *map(str, files)], capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not run: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    diags = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    ours = [f"{Path(d['file']).name}:{d['range']['start']['line'] + 1}: {d['message']}" for d in diags
            if Path(d["file"]) != control]
    assert not ours, "\n".join(ours)
    assert any("NOT_A_FLAG" in d["message"] for d in diags if Path(d["file"]) == control), diags
    assert report["summary"]["filesAnalyzed"] >= 4


# ============================================================================ the FP8 GEMM check script
def test_fp8_gemm_check_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script runs for real (scripts/trt_check.sh)")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fp8_gemm_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no CUDA" in proc.stdout


def test_fp8_gemm_reference_math():
    """The script's dequantized reference (per-row / per-column scales, e4m3 rounding) on the CPU."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import fp8_gemm_check as f
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 64, generator=g) * 3
    b = torch.randn(64, 48, generator=g)
    qa, sa = f.quantize_rows(a)
    qb, sb = f.quantize_cols(b)
    assert qa.dtype == torch.float8_e4m3fn and sa.shape == (32, 1) and sb.shape == (1, 48)
    assert float(qa.float().abs().max()) <= 448.0
    ref = f.dequantized_matmul(qa, sa, qb, sb)
    rel = float((ref - a @ b).norm() / (a @ b).norm())
    assert rel < 0.08, rel  # e4m3 (3 mantissa bits) on both operands
    assert np.isfinite(ref.numpy()).all()


# ============================================================================ the backend's own logic
def test_backend_splits_long_steps_like_one_step():
    """TensorRTBackend.step / prefill logic that is plain Python (splitting a step longer than the
    engine's prefill chunk, mapping logits_index into the pieces, concatenating layer outputs, clamping
    prefill chunks) runs here on the reference model's step: it must equal one unsplit step."""
    from engines.backends import TorchBackend
    from engines.tensorrt_backend import TensorRTBackend
    from exporter.checkpoint import load_model

    ref = TorchBackend(load_model("tiny-flash"))
    be = TensorRTBackend.__new__(TensorRTBackend)  # no engine: the pure-Python layer over _run_step
    be.config, be.layout, be.device = ref.config, ref.layout, ref.device
    be.limits, be._max_seq, be.engine_dir = {"max_batch": 2, "max_context": 4096}, 64, Path("engine")
    be._run_step = ref._run_step  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 150), generator=g)
    idx = [0, 70, 149, 64, 63]
    want_layers: list[torch.Tensor] = []
    want = ref.step(ids, ref.new_cache(2), logits_index=idx, layer_outputs=want_layers)
    got_layers: list[torch.Tensor] = []
    cache = be.new_cache(2)
    got = be.step(ids, cache, logits_index=idx, layer_outputs=got_layers)
    assert got.shape == want.shape == (2, len(idx), ref.config.vocab_size)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert [t.shape for t in got_layers] == [t.shape for t in want_layers]
    assert all(float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) for a, b in zip(got_layers, want_layers))
    assert list(cache.positions) == [150, 150]
    # prefill chunks are clamped to the engine's chunk (here 64), whatever the caller asks
    logits, c2 = be.prefill(ids[:1], chunk_size=512)
    assert float((logits[0, -1] - want[0, 2]).abs().max()) <= 1e-5 * scale
    with pytest.raises(BackendError, match="batch 3 exceeds the engine's max batch 2"):
        be.new_cache(3)
    with pytest.raises(BackendError, match=r"logits_index must be a non-empty list of positions in \[0, 150\)"):
        be.step(ids, be.new_cache(2), logits_index=[150])


def test_wired_into_load_backend_and_cli(flash_export, tmp_path):
    """Once engines/backends.py and engines/cli.py register the backend and `hatrt build` (the lead's
    edits, docs/tensorrt.md), an engine folder works through the shared entry points."""
    from engines import backends

    if "tensorrt" not in backends.BACKENDS:
        pytest.skip("the tensorrt backend is not registered in engines/backends.py yet")
    from engines.backends import load_backend
    from engines.cli import main

    out = fake_engine_dir(flash_export, tmp_path)
    assert "build" in main.commands
    ref = load_backend(out, "torch")  # the reference, from engine.json's source (the preset)
    assert ref.config.name == contract.manifest_config(tb.read_engine_manifest(out)).name
    with pytest.raises(BackendError, match="an export directory; the tensorrt backend runs an engine folder"):
        load_backend(flash_export, "tensorrt")
    if not HAVE_TENSORRT:
        with pytest.raises(TensorRTError, match="TensorRT is not installed"):
            load_backend(out, "tensorrt")
        r = CliRunner().invoke(main, ["generate", str(out), "--backend", "tensorrt", "--prompt-ids", "1 2 3"])
        assert r.exit_code == 2 and "TensorRT is not installed" in r.output
