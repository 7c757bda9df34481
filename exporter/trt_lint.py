"""Static lint of a TensorRT twin (`step.trt.onnx`) for what TensorRT's ONNX parser rejects.

No TensorRT is needed: every rule restates a check of the parser (onnx/onnx-tensorrt) or a type
rule of the TensorRT API (NvInfer.h), and names where it comes from. `lint(model)` returns
`Finding`s; errors are what makes the parse (or the build of a strongly typed TensorRT 11 network)
fail, warnings what slows the build or needs a newer TensorRT than `min_tensorrt`, infos the
oldest TensorRT the graph needs. docs/tensorrt.md lists the rules; `python -m exporter.trt_lint
FILE...` prints the findings (exit status 1 when there is an error).

Sources (onnx-tensorrt at the TensorRT 10.15 release unless a version is named):
- onnxOpImporters.cpp: the op importers (`DEFINE_BUILTIN_OP_IMPORTER(Op)`), `assertIsWeights`;
- importerUtils.cpp: `reduceTensor`, `elementwiseCheck` / `elementwiseHelper`, `identity`;
- ModelImporter.cpp: `parseNode` (dispatch: plugin_namespace -> registered plugin, else the built-in
  importer, else a model-local function, else `FallbackPluginImporter`), `importModel`;
- docs/operators.md (types and restrictions per op, the opset range), docs/Changelog.md;
- TensorRT 11.1 NvInfer.h: `ElementWiseOperation`, `UnaryOperation`, `IEinsumLayer`.

A value is a *constant* for the parser (a `TensorOrWeights` holding weights) when it is an
initializer or the output of a Constant node (`importConstant` returns weights); any other node's
output, Identity included (`importIdentity` adds an IIdentityLayer), is a tensor.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

ERROR, WARNING, INFO = "error", "warning", "info"
# The oldest TensorRT the hatrt twins are for: opset 23 (docs/operators.md of 10.15 covers opsets
# 9-24; 10.6 covers 9-22) and plugin_namespace dispatch (engines/tensorrt_build.py MIN_TENSORRT).
OLDEST_TENSORRT: tuple[int, int] = (10, 15)
TOPK_MAX_K = 3840
STANDARD_DOMAINS = ("", "ai.onnx")
# Domains the parser imports natively (onnx-tensorrt docs/TRT_custom_ops.md: TRT_Attention, ...).
NATIVE_DOMAINS = (*STANDARD_DOMAINS, "trt")

# rule -> (what it checks, the source it comes from)
RULES: dict[str, tuple[str, str]] = {
    "reduce-axes": (
        "Reduce* with an axes input (opset >= 18; ReduceSum >= 13) must take it from a constant",
        "importerUtils.cpp reduceTensor: ONNXTRT_CHECK_NODE(inputAxes.is_weights(), \"Axis input must be an "
        "initializer!\"); docs/operators.md ReduceX: `axes` must be an initializer"),
    "squeeze-axes": (
        "Squeeze/Unsqueeze axes (opset >= 13) must be a constant",
        "onnxOpImporters.cpp importSqueeze: assertIsWeights(inputs.at(1), \"Squeeze axes input must be an "
        "initializer!\"); importUnsqueeze: ShapeTensor axes allValuesKnown(), \"Axes input for unsqueeze operation "
        "should be a constant tensor.\"; docs/operators.md: `axes` must be resolvable to a constant"),
    "slice-axes": (
        "Slice axes computed at run time are accepted from TensorRT 10.3 only",
        "onnxOpImporters.cpp importSlice (10.1): ASSERT_NODE(axes.allValuesKnown(), \"This version of TensorRT does "
        "not support dynamic axes.\"); docs/Changelog.md 10.3: \"Added support for tensor `axes` inputs for `Slice` "
        "nodes\" (importSlice then calls ISliceLayer::setInput(5, axes))"),
    "cumsum-axis": (
        "CumSum axis must be a constant",
        "onnxOpImporters.cpp importCumSum: assertIsWeights(inputs.at(1), \"Axis input for CumSum must be an "
        "initializer!\")"),
    "bool-elementwise": (
        "only And/Or/Xor (binary) and Not (unary) take BOOL; they take nothing else",
        "importerUtils.cpp elementwiseCheck: kAND/kOR/kXOR need BOOL, kSUM/kSUB/kPROD/kDIV/kPOW/kMAX/kMIN/kGREATER/"
        "kLESS/kFLOOR_DIV reject it (\"Elementwise layer does not support operator ... with type BOOL\"); kEQUAL "
        "passes the parser but NvInfer.h ElementWiseOperation: \"Operations kAND, kOR, and kXOR must have inputs of "
        "DataType::kBOOL. All other operations must have inputs of floating-point type, DataType::kINT8, "
        "DataType::kINT32, or DataType::kINT64.\" and docs/operators.md Equal: FP32, FP16, BF16, INT32, INT64; "
        "NvInfer.h UnaryOperation: \"Operations kNOT must have inputs of DataType::kBOOL.\""),
    "einsum-dtype": (
        "Einsum must be float32 in and out",
        "NvInfer.h IEinsumLayer: \"All the inputs must have type DataType::kFLOAT or DataType::kHALF ... There is "
        "one output of type DataType::kFLOAT\" (a strongly typed TensorRT 11 network cannot hand that to an fp16 "
        "consumer); onnxOpImporters.cpp importEinsum: checkNotInvalidType(inputs.at(0), {\"UINT8\", \"INT32\", "
        "\"INT64\"})"),
    "plugin-node": (
        "a custom-domain node must carry plugin_namespace/plugin_version and no model-local function of its name",
        "ModelImporter.cpp parseNode: a node with a plugin_namespace attribute becomes its registered plugin, "
        "otherwise the built-in importer, else a model-local function (localFunctions()), else "
        "FallbackPluginImporter; onnxOpImporters.cpp FallbackPluginImporter: attrs.get(\"plugin_version\", \"1\"), "
        "attrs.get(\"plugin_namespace\", \"\"); a function left in the twin would be built silently when the plugin "
        "library is not loaded"),
    "topk": (
        "TopK needs sorted=1 and a K below 3840",
        "docs/operators.md TopK: `sorted` must be 1. `K` input must be less than 3840."),
    "qdq-zero-point": (
        "QuantizeLinear/DequantizeLinear zero points must be zero",
        "docs/operators.md QuantizeLinear: `y_zero_point` must be 0; DequantizeLinear: `x_zero_point` must be zero"),
    "opset": (
        "the default-domain opset must lie in the range the parser documents",
        "ModelImporter.cpp importModel (only opset < 7 is warned about); docs/operators.md: TensorRT 10.0 opset 9-20, "
        "10.6 opset 9-22, 10.15 opset 9-24"),
    "noop-cast": (
        "Cast/CastLike to the type the input already has (work for the builder, slower builds)",
        "onnxOpImporters.cpp importCast adds an ICastLayer for each; no parser rule, a build-time cost"),
    "int64-reshape": (
        "Reshape of int64 tensors (shape arithmetic the exporter left; slower builds)",
        "onnxOpImporters.cpp importReshape adds an IShuffleLayer for each; no parser rule, a build-time cost"),
    "min-tensorrt": (
        "the oldest TensorRT whose parser takes the graph",
        "docs/operators.md opset ranges (10.0: 9-20, 10.6: 9-22, 10.15: 9-24); docs/Changelog.md (9.0 FP8, 10.0 "
        "IPluginV3, 10.3 Slice tensor axes); TensorRT 11 networks are strongly typed"),
}

_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")
# ops the parser maps to IElementWiseLayer operations other than kAND/kOR/kXOR
_NON_BOOL_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "Greater", "Less",
                         "GreaterOrEqual", "LessOrEqual", "Equal")
_BOOL_ONLY = ("And", "Or", "Xor", "Not")
_INT64 = TensorProto.INT64


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "error", "warning" or "info"
    message: str
    node: str = ""  # node name ("" for findings about the whole graph)
    op_type: str = ""

    @property
    def source(self) -> str:
        return RULES[self.rule][1]

    def __str__(self) -> str:
        where = f"{self.op_type} node {self.node!r}: " if self.node or self.op_type else ""
        return f"{self.severity}: [{self.rule}] {where}{self.message}"


# --------------------------------------------------------------------------- graph facts
def _opset(model: onnx.ModelProto, domain: str = "") -> int | None:
    for o in model.opset_import:
        if o.domain == domain or (domain == "" and o.domain == "ai.onnx"):
            return o.version
    return None


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> Iterator[tuple[onnx.NodeProto, set[str]]]:
    """(node, names of the constants it can see), through subgraphs."""
    consts = set(outer) | {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS for o in n.output}
    for node in graph.node:
        yield node, consts
        for sub in _subgraphs(node):
            yield from _walk(sub, frozenset(consts))


def _types_without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the bytes of large initializers (shape inference needs only their types)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > 1 << 16:
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value="__trt_lint_dropped__")
    return light


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value name the graph declares or ONNX shape inference derives."""
    types: dict[str, int] = {}

    def add(graph: onnx.GraphProto) -> None:
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                types.setdefault(v.name, v.type.tensor_type.elem_type)
        for t in graph.initializer:
            types.setdefault(t.name, t.data_type)
        for n in graph.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        types.setdefault(n.output[0], a.t.data_type)
                    elif a.name in ("value_int", "value_ints"):
                        types.setdefault(n.output[0], _INT64)
                    elif a.name in ("value_float", "value_floats"):
                        types.setdefault(n.output[0], TensorProto.FLOAT)
            for sub in _subgraphs(n):
                add(sub)

    add(model.graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(_types_without_weights(model))
        add(inferred.graph)
    except Exception:  # inference is a help, not a requirement (custom ops, odd models)
        pass
    return types


def _const_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of a constant (initializer or Constant node), when its bytes are in the model."""
    for t in model.graph.initializer:
        if t.name == name:
            if t.data_location == TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_int":
                    return np.array(a.i)
                if a.name == "value_ints":
                    return np.array(list(a.ints))
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _present(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


# --------------------------------------------------------------------------- the lint
def lint(model, *, min_tensorrt: tuple[int, int] = OLDEST_TENSORRT) -> list[Finding]:
    """Findings for a twin (an onnx.ModelProto or a path); errors first, then warnings, then infos.

    min_tensorrt: the oldest TensorRT the graph must parse with; a construct a later parser
    accepts is an error below its version and a warning (with the version) from it on."""
    return _lint(model, min_tensorrt)[0]


def oldest_tensorrt(model) -> tuple[int, int]:
    """The oldest TensorRT whose ONNX parser takes the graph (the `min-tensorrt` finding)."""
    return _lint(model, OLDEST_TENSORRT)[1]


def _lint(model, min_tensorrt: tuple[int, int]) -> tuple[list[Finding], tuple[int, int]]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    opset = _opset(model) or 0
    types = _elem_types(model)
    functions = {(f.domain, f.name) for f in model.functions}
    findings: list[Finding] = []
    need: dict[tuple[int, int], list[str]] = {}  # TensorRT version -> why

    def add(rule: str, severity: str, node: onnx.NodeProto | None, message: str) -> None:
        findings.append(Finding(rule, severity, message, node.name if node is not None else "",
                                node.op_type if node is not None else ""))

    noop_casts, int64_reshapes = [], []
    for node, consts in _walk(model.graph):
        op = node.op_type
        if node.domain not in NATIVE_DOMAINS:
            _plugin_node(node, functions, add)
            need.setdefault((10, 0), []).append("IPluginV3 plugins through the parser (Changelog 10.0)")
            continue
        if node.domain not in STANDARD_DOMAINS:
            continue
        in_types = [types.get(i) if i else None for i in node.input]
        out_type = types.get(node.output[0]) if node.output and node.output[0] else None

        def constant(i: int) -> bool:
            name = _present(node, i)
            return name is None or name in consts

        if op in _REDUCE_OPS and (opset >= 18 or (op == "ReduceSum" and opset >= 13)) and not constant(1):
            add("reduce-axes", ERROR, node, f"axes {node.input[1]!r} are computed, not an initializer/Constant "
                                            "(the parser: \"Axis input must be an initializer!\")")
        elif op in ("Squeeze", "Unsqueeze") and opset >= 13 and not constant(1):
            add("squeeze-axes", ERROR, node, f"axes {node.input[1]!r} are computed, not a constant")
        elif op == "Slice" and not constant(3):
            if min_tensorrt < (10, 3):
                add("slice-axes", ERROR, node, f"axes {node.input[3]!r} are computed: TensorRT < 10.3 rejects them")
            else:
                add("slice-axes", WARNING, node, f"axes {node.input[3]!r} are computed (needs TensorRT >= 10.3)")
            need.setdefault((10, 3), []).append("Slice with computed axes")
        elif op == "CumSum" and not constant(1):
            add("cumsum-axis", ERROR, node, f"axis {node.input[1]!r} is computed, not a constant")
        if op in _NON_BOOL_ELEMENTWISE and TensorProto.BOOL in in_types:
            hint = "; Equal(a, b) on BOOL is Not(Xor(a, b))" if op == "Equal" else ""
            add("bool-elementwise", ERROR, node, f"{op} on BOOL inputs (TensorRT's {op} takes no BOOL{hint})")
        elif op in _BOOL_ONLY and any(t not in (None, TensorProto.BOOL) for t in in_types):
            bad = onnx.helper.tensor_dtype_to_string(next(t for t in in_types if t not in (None, TensorProto.BOOL)))
            add("bool-elementwise", ERROR, node, f"{op} on a {bad} input (TensorRT's {op} takes BOOL only)")
        if op == "Einsum":
            bad = [t for t in [*in_types, out_type] if t not in (None, TensorProto.FLOAT)]
            if bad:
                add("einsum-dtype", ERROR, node,
                    f"Einsum {_attr(node, 'equation', '')!r} on {onnx.helper.tensor_dtype_to_string(bad[0])} "
                    "(IEinsumLayer outputs FLOAT only: rewrite as MatMul or compute it in float32 between Casts)")
        if op == "TopK":
            if _attr(node, "sorted", 1) != 1:
                add("topk", ERROR, node, "sorted=0 is not supported")
            k = _const_array(model, node.input[1]) if len(node.input) > 1 and node.input[1] in consts else None
            if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= TOPK_MAX_K:
                add("topk", ERROR, node, f"K = {int(k.reshape(-1)[0])} >= {TOPK_MAX_K}")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            zp = _present(node, 2)
            value = _const_array(model, zp) if zp in consts else None
            if value is not None and np.any(value.astype(np.float64) != 0):
                add("qdq-zero-point", ERROR, node, f"zero point {zp!r} is not zero")
            if TensorProto.FLOAT8E4M3FN in in_types + [out_type, types.get(zp or "")]:
                need.setdefault((9, 0), []).append("FP8 (Changelog 9.0: FP8 and BF16 data types)")
        if op in ("Cast", "CastLike") and in_types and in_types[0] is not None:
            target = _attr(node, "to") if op == "Cast" else (in_types[1] if len(in_types) > 1 else None)
            if target == in_types[0]:
                noop_casts.append(node.name)
        if op == "Reshape" and in_types and in_types[0] == _INT64:
            int64_reshapes.append(node.name)

    if noop_casts:
        add("noop-cast", WARNING, None, f"{len(noop_casts)} Cast/CastLike nodes to the type their input already has "
                                        f"(first: {noop_casts[0]!r}); fold the graph")
    if int64_reshapes:
        add("int64-reshape", WARNING, None, f"{len(int64_reshapes)} Reshape nodes on int64 tensors "
                                            f"(first: {int64_reshapes[0]!r})")
    _opset_findings(opset, need, add)
    version, reasons = _oldest(need)
    add("min-tensorrt", INFO, None, f"needs TensorRT >= {version[0]}.{version[1]}: {'; '.join(reasons)}")
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return sorted(findings, key=lambda f: order[f.severity]), version


def _plugin_node(node: onnx.NodeProto, functions: set, add) -> None:
    from .onnx_ops import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION

    ns, ver = _attr(node, "plugin_namespace"), _attr(node, "plugin_version")
    if ns is None or ver is None:
        missing = [n for n, v in (("plugin_namespace", ns), ("plugin_version", ver)) if v is None]
        add("plugin-node", ERROR, node, f"custom node without {' and '.join(missing)}: the parser looks the plugin "
                                        "up by op_type, plugin_version (default \"1\") and plugin_namespace "
                                        "(default \"\")")
    elif node.domain == DOMAIN and (ns, ver) != (PLUGIN_NAMESPACE, PLUGIN_VERSION):
        add("plugin-node", ERROR, node, f"plugin_namespace/plugin_version {ns!r}/{ver!r}, the hatrt plugins are "
                                        f"{PLUGIN_NAMESPACE!r}/{PLUGIN_VERSION!r}")
    if (node.domain, node.op_type) in functions:
        add("plugin-node", ERROR, node, "a model-local function of this name is left in the twin: without the plugin "
                                        "library TensorRT would build the slow decomposition instead of failing")


def _opset_findings(opset: int, need: dict, add) -> None:
    if opset > 24:
        add("opset", ERROR, None, f"opset {opset}: no TensorRT release documents opsets above 24")
        need.setdefault((99, 0), []).append(f"opset {opset}")
    elif opset < 9:
        add("opset", WARNING, None, f"opset {opset}: the parser documents opsets 9 and later")
    if opset >= 23:
        need.setdefault((10, 15), []).append(f"opset {opset} (operators.md: 10.6 covers opsets 9-22, 10.15 9-24)")
    elif opset >= 21:
        need.setdefault((10, 6), []).append(f"opset {opset} (operators.md: 10.0 covers opsets 9-20, 10.6 9-22)")


def _oldest(need: dict[tuple[int, int], list[str]]) -> tuple[tuple[int, int], list[str]]:
    if not need:
        return (10, 0), ["nothing newer than TensorRT 10.0 used"]
    version = max(need)
    return version, sorted(set(need[version]))


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def main(argv: list[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m exporter.trt_lint FILE.trt.onnx [...]", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        findings = lint(Path(path))
        print(f"{path}: {len(errors(findings))} errors, "
              f"{sum(f.severity == WARNING for f in findings)} warnings")
        for f in findings:
            print(f"  {f}")
            if f.severity != INFO:
                print(f"      source: {f.source}")
        counts = Counter(f.rule for f in findings)
        if counts and len(findings) > 20:
            print(f"  by rule: {dict(counts)}")
        status = max(status, 1 if errors(findings) else 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
