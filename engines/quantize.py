"""`hatrt quantize EXPORT -o OUT --precision fp8`: an FP8 export from an export.

1. Calibrate: the reference (the export's source) runs the calibration tokens in prefill chunks;
   a hook records the amax of the input of every linear the FP8 policy picks
   (exporter/fp8.py: is_fp8_linear). The recipe = input scale per tensor (amax / 448) and weight
   scale per output channel (row amax / 448).
2. Rewrite the graph (onnx-ir): for each picked MatMul/Gemm, the weight becomes a float8e4m3fn
   initializer (stored pre-transposed for MatMul) behind a DequantizeLinear with per-channel
   scales that feeds the GEMM directly, and the activation gets a QuantizeLinear /
   DequantizeLinear pair with its per-tensor scale: the pattern TensorRT fuses into an FP8 GEMM.
   Nothing else changes: norms, residual adds, the router, the compressors, the indexer, the
   grouped output projection and the LM head stay in the export's precision; the `hatrt` nodes
   keep their functions, and the `.trt.onnx` twin is written from the result as for any export.
3. The output is an export directory like any other, with `quantization` in its manifest (the
   recipe file `fp8_recipe.json`, its sha256, the calibration); the torch backend applies the same
   recipe to the reference, so `hatrt check` compares like with like and `hatrt eval` on the
   unquantized export shows what FP8 costs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from exporter import contract, fp8
from exporter.atomic import OutputDirError, atomic_output_dir
from exporter.contract import MANIFEST, STEP_FILE, STEP_TRT_FILE, ExportError

RECIPE_FILE = "fp8_recipe.json"
PRECISIONS = ("fp8",)
DEFAULT_CALIB_TOKENS = 4096
CALIB_SEQ = 1024  # calibration windows (tokens each)


class QuantizeError(ValueError):
    """Quantization cannot be done as asked; the message names the file, tensor or argument."""


def _log(progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


# ============================================================================ graph rewrite
def _weight_of(node, ir):
    """The weight initializer a MatMul (through a Transpose) or Gemm (transB=1) multiplies by,
    with the layout it is used in: ('matmul_t', value, transpose) / ('gemm_t', value, None)."""
    b = node.inputs[1] if len(node.inputs) > 1 else None
    if b is None:
        return None
    if node.op_type == "MatMul":
        prod = b.producer()
        if prod is None or prod.op_type != "Transpose" or not prod.inputs[0].is_initializer():
            return None
        perm = prod.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            return None
        return "matmul_t", prod.inputs[0], prod
    if node.op_type == "Gemm":
        attrs = node.attributes
        if not b.is_initializer() or attrs.get("transB") is None or attrs["transB"].as_int() != 1:
            return None
        if attrs.get("transA") is not None and attrs["transA"].as_int() != 0:
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return None
        return "gemm_t", b, None
    return None


def gemm_weights(model) -> set[str]:
    """Linear names (parameter prefixes) whose weight feeds a MatMul/Gemm of the main graph: what the
    rewrite can turn into FP8 GEMMs (experts inside a hatrt RoutedExperts node are not among them)."""
    import onnx_ir as ir

    names = set()
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            found = _weight_of(node, ir)
            if found is not None:
                names.add(found[1].name.removeprefix("model.").removesuffix(".weight"))
    return names


def rewrite_fp8(model, recipe: fp8.Fp8Recipe, dtype: str) -> dict:
    """Insert FP8 Q/DQ into an onnx-ir model in place. Returns counts (linears, nodes added)."""
    import ml_dtypes
    import onnx_ir as ir

    g = model.graph
    np_float = {"float32": np.float32, "float16": np.float16}[dtype]
    zero = ir.Value(name="fp8.zero_point", const_value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn),
                                                                name="fp8.zero_point"))
    g.register_initializer(zero)
    done: set[str] = set()
    errors: dict[str, float] = {}  # relative Frobenius error of each FP8 weight
    added = 0
    for node in list(g):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        found = _weight_of(node, ir)
        if found is None:
            continue
        kind, w, transpose = found
        name = w.name.removeprefix("model.").removesuffix(".weight")
        scales = recipe.scales.get(name)
        if scales is None:
            continue
        if name in done:
            raise QuantizeError(f"the weight {w.name!r} feeds more than one GEMM; hatrt quantizes each once")
        done.add(name)
        weight = torch.from_numpy(np.array(w.const_value.numpy(), dtype=np.float32))  # [out, in]
        if weight.shape[0] != scales.weight_scale.numel():
            raise QuantizeError(f"recipe {name!r}: {scales.weight_scale.numel()} weight scales for a weight of "
                                f"shape {tuple(weight.shape)}")
        q = fp8.quantize_fp8(weight, scales.weight_scale.unsqueeze(1))  # [out, in] float8
        deq = q.float() * scales.weight_scale.unsqueeze(1)
        errors[name] = float((deq - weight).norm() / weight.norm().clamp(min=1e-30))
        q_np = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        if kind == "matmul_t":  # MatMul(x, W^T): store W^T [in, out] as FP8, channels on axis 1
            q_np, axis = np.ascontiguousarray(q_np.T), 1
        else:  # Gemm(x, W, transB=1): keep [out, in], channels on axis 0
            axis = 0
        wq = ir.Value(name=f"{w.name}.fp8", const_value=ir.tensor(q_np, name=f"{w.name}.fp8"))
        ws = ir.Value(name=f"{w.name}.fp8_scale", const_value=ir.tensor(
            scales.weight_scale.numpy().astype(np_float), name=f"{w.name}.fp8_scale"))
        xs = ir.Value(name=f"{w.name}.input_scale", const_value=ir.tensor(
            np.asarray(scales.input_scale, dtype=np_float), name=f"{w.name}.input_scale"))
        for v in (wq, ws, xs):
            g.register_initializer(v)
        # per-axis DQ takes no scalar zero point (the FP8 input fixes the type)
        w_dq = ir.Node("", "DequantizeLinear", [wq, ws], attributes={"axis": ir.AttrInt64("axis", axis)},
                       name=f"{node.name}.weight_dq")
        x_q = ir.Node("", "QuantizeLinear", [node.inputs[0], xs, zero], attributes={
            "saturate": ir.AttrInt64("saturate", 1)}, name=f"{node.name}.input_q")
        x_dq = ir.Node("", "DequantizeLinear", [x_q.outputs[0], xs, zero], name=f"{node.name}.input_dq")
        g.insert_before(node, [w_dq, x_q, x_dq])
        node.replace_input_with(0, x_dq.outputs[0])
        node.replace_input_with(1, w_dq.outputs[0])
        added += 3
        if transpose is not None and not transpose.outputs[0].uses():
            g.remove(transpose, safe=True)
        if not w.uses():
            g.initializers.pop(w.name, None)
    missing = sorted(set(recipe.scales) - done)
    if missing:
        raise QuantizeError(f"the graph has no GEMM for the recipe's linears {missing[:5]} "
                            f"({len(missing)} in all): was the export made from another model?")
    worst = max(errors, key=errors.get) if errors else None
    return {"linears": len(done), "nodes_added": added,
            "weight_error": {"mean": float(np.mean(list(errors.values()))) if errors else 0.0,
                             "max": errors[worst] if worst else 0.0, "max_at": worst}}


# ============================================================================ calibration data
def calibration_batches(tokens: Sequence[int], seq: int = CALIB_SEQ) -> list[torch.Tensor]:
    ids = torch.tensor(list(tokens), dtype=torch.long)
    return [ids[i:i + seq].view(1, -1) for i in range(0, len(ids), seq) if len(ids[i:i + seq]) > 1]


def default_calibration_tokens(backend, export_dir: Path, n_tokens: int = DEFAULT_CALIB_TOKENS,
                               text: str | None = None) -> tuple[list[int], dict]:
    """Calibration tokens: `text` (the user's --calib) or the bundled corpus's training split,
    tokenized with the export's tokenizer; without a tokenizer, seeded random token ids."""
    vocab = backend.config.vocab_size
    try:
        from engines import text as text_mod

        tok = text_mod.load_tokenizer(export_dir)
    except Exception:  # no tokenizer (a preset): random ids are all there is
        tok = None
    if text is not None:
        if tok is None:
            raise QuantizeError(f"{export_dir}: --calib text needs a tokenizer, and the export has none")
        ids = tok.encode(text)[:n_tokens]
        return ids, {"source": "user text", "tokens": len(ids)}
    if tok is not None:
        try:
            from engines.corpus import calibration_text

            ids = tok.encode(calibration_text(n_tokens * 8))[:n_tokens]
            return ids, {"source": "bundled corpus (training split of the stdlib sources)", "tokens": len(ids)}
        except ImportError:
            pass
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n_tokens,), generator=g).tolist()
    return ids, {"source": "random token ids (seed 0; the export has no tokenizer)", "tokens": len(ids)}


# ============================================================================ the command
def quantize_export(export_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "fp8",
                    calib_tokens: Sequence[int] | None = None, calib_text: str | None = None,
                    n_calib_tokens: int = DEFAULT_CALIB_TOKENS, overwrite: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Quantize the export in `export_dir` into a new export directory `out_dir`; returns its manifest."""
    import onnx
    import onnx_ir as ir

    from engines.backends import BackendError, load_backend
    from exporter import onnx_ops

    if precision not in PRECISIONS:
        raise QuantizeError(f"unsupported precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    export_dir = Path(export_dir)
    try:
        manifest = contract.read_manifest(export_dir)
    except ExportError as e:
        raise QuantizeError(str(e)) from None
    if manifest.get("quantization"):
        raise QuantizeError(f"{export_dir / MANIFEST}: the export is already quantized "
                            f"({manifest['quantization'].get('precision')}); quantize the unquantized export")
    dtype = manifest["dtype"]
    t0 = time.monotonic()
    try:
        _log(progress, "loading the reference for calibration")
        ref = load_backend(export_dir, "torch")
    except BackendError as e:
        raise QuantizeError(str(e)) from None
    if calib_tokens is None:
        calib_tokens, calib_info = default_calibration_tokens(ref, export_dir, n_calib_tokens, calib_text)
    else:
        calib_tokens = [int(t) for t in calib_tokens]
        calib_info = {"source": "given token ids", "tokens": len(calib_tokens)}
    bad = [t for t in calib_tokens if not 0 <= t < ref.config.vocab_size]
    if len(calib_tokens) < 2 or bad:
        raise QuantizeError(f"calibration needs at least 2 token ids in [0, {ref.config.vocab_size}); got "
                            f"{len(calib_tokens)} ({len(bad)} out of range)")
    src_step = export_dir / manifest["graphs"][contract.STEP]["file"]
    model_ir = ir.load(str(src_step))
    in_graph = gemm_weights(model_ir)
    wanted = [n for n in fp8.linear_modules(ref.model) if fp8.is_fp8_linear(n)]
    names = [n for n in wanted if n in in_graph]
    # Linears the policy picks that are not plain GEMMs of the graph: the routed experts when they
    # run inside one hatrt RoutedExperts node (its plugin has no FP8 path yet): they stay as exported.
    not_gemms = sorted(set(wanted) - set(names))
    _log(progress, f"calibrating on {len(calib_tokens)} tokens ({calib_info['source']})")
    amax = fp8.calibrate(ref.model, calibration_batches(calib_tokens), names)
    recipe = fp8.make_recipe(ref.model, amax, {**calib_info, "statistic": "max |x| per tensor",
                                               "weights": "max |w| per output channel"})
    _log(progress, f"rewriting {STEP_FILE}: {len(recipe.scales)} linears to FP8 GEMMs"
                   + (f" ({len(not_gemms)} inside hatrt nodes stay as exported)" if not_gemms else ""))
    counts = rewrite_fp8(model_ir, recipe, dtype)
    try:
        with atomic_output_dir(Path(out_dir), overwrite=overwrite, report=progress) as tmp:
            proto = ir.to_proto(model_ir)
            big = proto.ByteSize() > 1_800_000_000
            step_path, trt_path = tmp / STEP_FILE, tmp / STEP_TRT_FILE
            onnx.save(proto, str(step_path), save_as_external_data=big,
                      **({"location": STEP_FILE + ".data"} if big else {}))
            onnx_ops.save_trt_twin(step_path, trt_path, big=big)
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=1) + "\n")
            for name in manifest.get("tokenizer") or []:
                shutil.copyfile(export_dir / name, tmp / name)
            out = dict(manifest)
            out["created"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            out["quantization"] = {
                "precision": precision, "format": "float8e4m3fn QuantizeLinear/DequantizeLinear",
                "weights": "per output channel, static", "activations": "per tensor, static (calibrated)",
                "recipe": RECIPE_FILE, "recipe_sha256": recipe.sha256(), "linears": counts["linears"],
                "kept_high_precision": list(fp8.KEEP_HIGH), "not_plain_gemms": not_gemms,
                "calibration": calib_info,
                "weight_error": counts["weight_error"], "source_weights": _source_weights(manifest),
                "source_export": str(export_dir.resolve()),
                "source_export_manifest_sha256": contract.sha256(export_dir / MANIFEST),
            }
            graph = dict(manifest["graphs"][contract.STEP])
            graph.update(file=STEP_FILE, trt_file=STEP_TRT_FILE)
            out["graphs"] = {contract.STEP: graph}
            out["files"] = contract.file_records(tmp)
            (tmp / MANIFEST).write_text(json.dumps(out, indent=2) + "\n")
    except OutputDirError as e:
        raise QuantizeError(str(e)) from None
    _log(progress, f"wrote {out_dir} in {time.monotonic() - t0:.1f} s")
    return out


def _source_weights(manifest: dict) -> str:
    """How the source checkpoint stored its weights: block-scaled FP8 ones are requantized per
    channel here, and the manifest's weight_error says what that costs."""
    src = manifest.get("source") or {}
    if src.get("kind") == "checkpoint":
        try:
            cfg = json.loads((Path(src["value"]) / "config.json").read_text())
        except (OSError, ValueError):
            return "unknown"
        q = cfg.get("quantization_config") or {}
        if q:
            return f"{q.get('quant_method', 'quantized')} {q.get('fmt', '')} block {q.get('weight_block_size', '')}".strip() \
                + " (dequantized on load, requantized per channel)"
    return f"{manifest.get('dtype')} (from the {src.get('kind', 'unknown')} {src.get('value', '')})"


def load_recipe(export_dir: str | os.PathLike, manifest: dict) -> fp8.Fp8Recipe | None:
    """The FP8 recipe of a quantized export (checked against the manifest's hash), else None."""
    q = manifest.get("quantization")
    if not q:
        return None
    path = Path(export_dir) / q.get("recipe", RECIPE_FILE)
    try:
        recipe = fp8.Fp8Recipe.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as e:
        raise QuantizeError(f"{path}: cannot read the FP8 recipe: {e}") from None
    if recipe.sha256() != q.get("recipe_sha256"):
        raise QuantizeError(f"{path}: the recipe's hash differs from the manifest's recipe_sha256")
    return recipe


__all__ = ["PRECISIONS", "QuantizeError", "RECIPE_FILE", "calibration_batches", "load_recipe", "quantize_export",
           "rewrite_fp8"]
