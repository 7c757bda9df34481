"""The `hatrt` command line: one click group; each command stays thin and calls library code.

Commands: `inspect` (KV-cache and FLOP accounting, exporter/costs.py), `export` (exporter/export.py),
`generate` (engines/generate.py on any backend; text through engines/text.py), `check` (engines/check.py),
`eval` (perplexity and bits per byte, engines/evaluate.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from exporter.config import ConfigError, ModelConfig

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class TokenCount(click.ParamType):
    """A positive token count: 1048576, 1,048,576, 1M, 128K, 1.5M, 2^20 or 2**20 (K/M/G = 2^10/20/30)."""

    name = "N"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            text = str(value).strip().replace(",", "").replace("_", "")
            n = None
            power = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", text)
            plain = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)\s*([kKmMgG]?)", text)
            if power:
                n = int(power.group(1)) ** int(power.group(2))
            elif plain:
                x = float(plain.group(1)) * _SUFFIX[plain.group(2).upper()]
                if x == int(x):
                    n = int(x)
            if n is None:
                self.fail(f"{value!r} is not a token count (try 1048576, 1M, 128K or 2^20)", param, ctx)
        if n <= 0:
            self.fail(f"{value!r}: the context must be a positive number of tokens", param, ctx)
        return n


def load_model_config(preset_name: str | None, config_path: str | None) -> ModelConfig:
    """Exactly one of --preset / --config -> ModelConfig; click usage errors (exit code 2)."""
    from exporter.presets import preset

    if preset_name is not None and config_path is not None:
        raise click.UsageError(f"give either --preset or --config, not both (got --preset "
                               f"{preset_name!r} and --config {config_path!r})")
    if preset_name is None and config_path is None:
        raise click.UsageError("give a model: --preset NAME or --config PATH (config.json)")
    try:
        if preset_name is not None:
            return preset(preset_name)
        return ModelConfig.from_json(config_path)  # type: ignore[arg-type]
    except ConfigError as e:
        hint = "'--preset'" if preset_name is not None else "'--config'"
        raise click.BadParameter(str(e), param_hint=hint) from None


class BadInput(click.ClickException):
    """Bad input named in the message (a missing file, an unsupported value): exit code 2."""

    exit_code = 2


def model_options(f):
    """--preset / --config, shared by every command that needs a model configuration."""
    f = click.option("--config", "config_path", metavar="PATH",
                     help="A Hugging Face config.json of a DeepSeek-V4 model.")(f)
    f = click.option("--preset", "preset_name", metavar="NAME",
                     help="A built-in configuration (v4-flash, v4-pro, tiny-*).")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hatrt: tools for DeepSeek-V4 hybrid-attention models."""


@main.command()
@model_options
@click.option("--context", "-n", type=TokenCount(), default=2**20, show_default="1048576 (1M)",
              help="Context length N in tokens: 1048576, 1M, 128K, 2^20.")
@click.option("--indexer-format", type=click.Choice(["fp4", "fp8"]), default="fp4",
              show_default=True, help="Storage format of the CSA indexer keys.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(preset_name: str | None, config_path: str | None, context: int, indexer_format: str,
            as_json: bool) -> None:
    """KV-cache bytes and FLOPs per generated token at context N, vs DeepSeek-V3.2 and a dense
    GQA-8 baseline (one sequence; method: docs/cost-model.md). --config takes a config.json or a
    checkpoint directory holding one."""
    from pathlib import Path

    from exporter.costs import format_report, model_costs

    if config_path is not None and Path(config_path).is_dir():
        if not (Path(config_path) / "config.json").is_file():
            raise click.BadParameter(f"{config_path} is a directory without a config.json (give a "
                                     "config.json or a checkpoint directory that holds one)",
                                     param_hint="'--config'")
        config_path = str(Path(config_path) / "config.json")
    cfg = load_model_config(preset_name, config_path)
    costs = model_costs(cfg, context, indexer_format)
    if as_json:
        click.echo(json.dumps(costs.to_dict(), indent=2))
    else:
        click.echo(format_report(costs))


@main.command("export")
@click.argument("source", metavar="CHECKPOINT")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write step.onnx, its step.trt.onnx twin, the tokenizer files and manifest.json.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Weight and activation dtype of the graph (bfloat16 is refused: "
                                      "ONNX Runtime cannot run it).")
@click.option("--opset", type=int, default=23, show_default=True, help="ONNX opset (hatrt writes 23).")
@click.option("--quant-sim", is_flag=True, help="Bake the FP8/FP4 quantization simulation into the graph.")
@click.option("--per-layer", is_flag=True, help="Also output every layer's streams (for `hatrt check`).")
@click.option("--optimize", is_flag=True, help="Run onnxscript's graph optimizer (slower export).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def export_cmd(source: str, out_dir: str, dtype: str, opset: int, quant_sim: bool, per_layer: bool,
               optimize: bool, force: bool) -> None:
    """Export CHECKPOINT (a checkpoint directory or a preset name) to ONNX with hatrt custom ops."""
    import time

    from exporter.checkpoint import CheckpointError
    from exporter.config import ConfigError
    from exporter.export import ExportError, export_model

    start = time.monotonic()

    def progress(msg: str) -> None:
        click.echo(f"[{time.monotonic() - start:6.1f}s] {msg}", err=True)

    try:
        result = export_model(source, out_dir, dtype=dtype, opset=opset, quant_sim=quant_sim, per_layer=per_layer,
                              optimize=optimize, overwrite=force, progress=progress)
    except (ExportError, CheckpointError, ConfigError) as e:
        raise BadInput(str(e)) from None
    for name, info in result.manifest["graphs"].items():
        click.echo(f"{name}: {result.out_dir / info['file']} (+ {info['trt_file']})")
    click.echo(f"manifest: {result.out_dir / 'manifest.json'}")


def read_text_arg(value: str, what: str) -> str:
    """A command-line value that may be "@FILE" (the file's text) or "-" (standard input)."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return path.read_text()
        except OSError as e:
            raise click.BadParameter(f"cannot read {path}: {e.strerror or e}", param_hint=what) from None
    return value


class TokenIds(click.ParamType):
    """A prompt as token ids: "1 2 3" or "1,2,3", "@FILE" (ids in a file) or "-" (ids on stdin).

    Non-negative integers; checked against the vocabulary later. A 32K-token prompt does not fit in
    one command-line argument: pass it as a file."""

    name = "IDS"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, (list, tuple)):
            return list(value)
        text = read_text_arg(str(value), f"'--{param.name.replace('_', '-')}'" if param and param.name else "IDS")
        source = value if text is value else f"{value} ({len(text)} characters)"
        parts = [p for p in re.split(r"[\s,\[\]]+", text.strip()) if p]
        if not parts:
            self.fail(f"{source!r}: a prompt needs at least one token id (e.g. \"1 2 3\")", param, ctx)
        ids = []
        for i, p in enumerate(parts):
            if not re.fullmatch(r"\d+", p):
                self.fail(f"{source!r}: item {i} ({p[:20]!r}) is not a token id (non-negative integer)", param, ctx)
            ids.append(int(p))
        return ids


@main.command()
@click.argument("source", metavar="SOURCE")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True,
              help="torch: the reference model (SOURCE a preset, checkpoint or export directory); "
                   "onnxruntime: the exported graph (SOURCE an export directory); "
                   "tensorrt: an engine (SOURCE a hatrt build folder).")
@click.option("--prompt", "text_prompts", metavar="TEXT", multiple=True,
              help="A text prompt, tokenized with SOURCE's tokenizer (BOS in front): TEXT, @FILE or - (stdin). "
                   "Repeat for a batch. Output is text.")
@click.option("--prompt-ids", "prompts", type=TokenIds(), multiple=True,
              help='A prompt as token ids: "1 2 3", @FILE or - (stdin). Repeat for a batch. Output is ids.')
@click.option("--no-bos", is_flag=True, help="--prompt: do not put the model's BOS token in front.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tokens to generate per prompt at most.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: the most likely tokens holding probability p.")
@click.option("--stop", "stop_tokens", type=click.IntRange(min=0), multiple=True, metavar="ID",
              help="A token id that ends a sequence (kept in the output). Repeatable. Default: the model's EOS.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's EOS (only at --stop ids).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=256, show_default=True,
              help="Feed prompts in chunks of this many tokens (memory is bounded by the chunk).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="torch backend: weight dtype (default float32, or the export's dtype).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (tokens, finish reasons).")
def generate(source: str, backend: str, text_prompts: tuple[str, ...], prompts: tuple[list[int], ...], no_bos: bool,
             max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_tokens: tuple[int, ...],
             ignore_eos: bool, prefill_chunk: int, seed: int | None, dtype: str | None, stream: bool,
             as_json: bool) -> None:
    """Generate from SOURCE: a preset name, a checkpoint directory or an export directory.

    --prompt TEXT (SOURCE needs a tokenizer: a checkpoint's tokenizer.json, or the copy in its
    export): prints the generated text (special tokens such as EOS are not printed), one block per
    prompt; with --stream as it comes (a multi-byte character is printed once complete), for a
    batch as "ROW <JSON string>" lines; --json gives "text" and the token ids.

    --prompt-ids: prints one line of generated ids per prompt; with --stream, on one line for a
    single prompt, as "ROW ID" lines for a batch (ROW counts prompts from 0).

    Generation stops at the model's EOS (generation_config.json / config.json), at any --stop id,
    or after --max-new-tokens."""
    from engines.backends import BackendError, load_backend
    from engines.generate import default_stop_tokens
    from engines.generate import generate as run_generate
    from engines.text import TokenizerError, load_tokenizer, special_ids

    if stream and as_json:
        raise click.UsageError("give either --stream or --json, not both")
    if bool(text_prompts) == bool(prompts):
        raise click.UsageError("give the prompt(s) either as text (--prompt) or as token ids (--prompt-ids), "
                               "exactly one of the two")
    tokenizer = None
    if text_prompts:
        try:
            tokenizer = load_tokenizer(source)
        except TokenizerError as e:
            raise BadInput(str(e)) from None
        prompts = tuple(tokenizer.encode(read_text_arg(p, "'--prompt'"), add_bos=not no_bos) for p in text_prompts)
        empty = [r for r, ids in enumerate(prompts) if not ids]
        if empty:
            raise click.BadParameter(f"prompt {empty[0]} is empty (and the model has no BOS token to start from)",
                                     param_hint="'--prompt'")
    if backend in ("onnxruntime", "tensorrt") and dtype is not None:
        raise click.BadParameter("the onnxruntime backend runs the export's dtype; drop --dtype",
                                 param_hint="'--dtype'")
    try:
        runtime = load_backend(source, backend, dtype=dtype)
    except BackendError as e:
        raise click.BadParameter(str(e), param_hint="SOURCE") from None
    vocab = runtime.config.vocab_size
    for r, ids in enumerate(prompts):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise click.BadParameter(f"prompt {r}: token ids {bad[:8]} are >= the vocabulary size {vocab}"
                                     + (f" (the tokenizer {tokenizer.path} does not belong to this model)"
                                        if tokenizer is not None else ""),
                                     param_hint="'--prompt'" if tokenizer is not None else "'--prompt-ids'")
    bad_stops = [t for t in stop_tokens if t >= vocab]
    if bad_stops:
        raise click.BadParameter(f"{bad_stops} >= the vocabulary size {vocab}", param_hint="'--stop'")

    single = len(prompts) == 1
    started = False
    decoders = [tokenizer.stream_decoder() for _ in prompts] if tokenizer is not None else []

    def emit_text(row: int, piece: str) -> None:
        if not piece:
            return
        if single:
            click.echo(piece, nl=False)
        else:
            click.echo(f"{row} {json.dumps(piece, ensure_ascii=False)}")

    def on_token(row: int, token: int) -> None:
        nonlocal started
        if tokenizer is not None:
            emit_text(row, decoders[row].push(token))
        elif single:
            click.echo(f"{' ' if started else ''}{token}", nl=False)
        else:
            click.echo(f"{row} {token}")
        started = True

    try:
        eos = [] if ignore_eos else default_stop_tokens(runtime)
        if not ignore_eos and not eos:  # the model config names no EOS: the tokenizer files may
            try:
                eos = special_ids(source)[1] if tokenizer is None else tokenizer.eos_ids
            except TokenizerError:
                eos = []
        stops = list(dict.fromkeys(list(stop_tokens) + [t for t in eos if t < vocab]))
        results = run_generate(runtime, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, stop_tokens=stops, seed=seed, prefill_chunk=prefill_chunk,
                               on_token=on_token if stream else None)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if stream:
        if tokenizer is not None:
            for row, d in enumerate(decoders):
                emit_text(row, d.flush())
        if single:
            click.echo()
    elif as_json:
        out = []
        for r, ids in zip(results, prompts):
            item = {"tokens": r.tokens, "finish_reason": r.finish_reason, "prompt_length": r.prompt_length}
            if tokenizer is not None:
                item = {"text": tokenizer.decode(r.tokens), **item, "prompt_ids": list(ids)}
            out.append(item)
        click.echo(json.dumps({"backend": runtime.name, "results": out}, indent=2, ensure_ascii=False))
    elif tokenizer is not None:
        for row, r in enumerate(results):
            if not single:
                click.echo(f"--- {row} ---")
            click.echo(tokenizer.decode(r.tokens))
    else:
        for r in results:
            click.echo(" ".join(map(str, r.tokens)))


@main.command("check")
@click.argument("artifact_dir", metavar="DIR")
@click.option("--steps", type=click.IntRange(min=0), default=32, show_default=True,
              help="Decode steps after each prompt.")
@click.option("--prompt-ids", "prompts", type=TokenIds(), multiple=True,
              help='A prompt as token ids: "1 2 3", @FILE or - (stdin). Repeatable. '
                   'Default: random prompts of 200 and 300 tokens.')
@click.option("--prompt", "text_prompts", metavar="TEXT", multiple=True,
              help="A text prompt, tokenized with the export's tokenizer (BOS in front): TEXT, @FILE or - "
                   "(stdin). Repeatable; checked after the --prompt-ids prompts.")
@click.option("--no-bos", is_flag=True, help="--prompt: do not put the model's BOS token in front.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prefill chunk: prompts are fed in chunks of this many tokens.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="The backend checked against the reference.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random prompts.")
@click.option("--rtol", type=click.FloatRange(min=0.0), default=None,
              help="Element-wise relative tolerance (default by precision: fp32 1e-5, fp16 1e-2).")
@click.option("--atol", type=click.FloatRange(min=0.0), default=None,
              help="Absolute tolerance relative to max|ref| per step (default: fp32 1e-5, fp16 1e-2).")
@click.option("--json", "json_path", metavar="PATH", default=None, help="Also write the results as JSON to PATH.")
def check_command(artifact_dir: str, steps: int, prompts: tuple[list[int], ...], text_prompts: tuple[str, ...],
                  no_bos: bool, chunk_size: int, backend: str, seed: int, rtol: float | None, atol: float | None,
                  json_path: str | None) -> None:
    """Compare the export in DIR (run by --backend) with the PyTorch reference, output by output.

    Each prompt in prefill chunks, then --steps decode steps, each side from its own cache, tokens
    chosen greedily from the reference. Exit 0: all outputs within tolerance; 1: outside; 2: bad input."""
    from engines.check import CheckError, format_report, write_json
    from engines.check import check as run_check
    from engines.text import TokenizerError, load_tokenizer

    if text_prompts:
        try:
            tokenizer = load_tokenizer(artifact_dir)
        except TokenizerError as e:
            raise BadInput(str(e)) from None
        encoded = [tokenizer.encode(read_text_arg(p, "'--prompt'"), add_bos=not no_bos) for p in text_prompts]
        if not all(encoded):
            raise click.BadParameter("a text prompt is empty (and the model has no BOS token to start from)",
                                     param_hint="'--prompt'")
        prompts = tuple(prompts) + tuple(encoded)
    try:
        report = run_check(artifact_dir, steps=steps, prompts=list(prompts) or None, seed=seed, rtol=rtol,
                           atol=atol, chunk_size=chunk_size, backend=backend,
                           progress=lambda msg: click.echo(msg, err=True))
    except CheckError as e:
        raise BadInput(str(e)) from None
    click.echo(format_report(report))
    if json_path is not None:
        try:
            write_json(report, json_path)
        except OSError as e:
            raise click.BadParameter(f"cannot write {json_path}: {e.strerror or e}", param_hint="'--json'") from None
    click.get_current_context().exit(0 if report.passed else 1)


@main.command("eval")
@click.argument("source", metavar="SOURCE")
@click.option("--text", "text_path", required=True, metavar="FILE",
              help="The UTF-8 text to score (a file, or - for standard input).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True,
              help="torch: the reference model (SOURCE a checkpoint or export directory); "
                   "onnxruntime: the exported graph (SOURCE an export directory).")
@click.option("--context", type=TokenCount(), default=None,
              help="Tokens per window (each from a fresh cache); 2 .. max_position_embeddings. "
                   "Default: 1024, or max_position_embeddings when smaller.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None,
              help="Feed each window in chunks of this many tokens (default 512).")
@click.option("--no-bos", is_flag=True, help="Do not put the model's BOS token in front of the text.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="torch backend: weight dtype (default float32, or the export's dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def eval_command(source: str, text_path: str, backend: str, context: int | None, prefill_chunk: int | None,
                 no_bos: bool, dtype: str | None, as_json: bool) -> None:
    """Perplexity and bits per byte of SOURCE on the text in FILE, on one backend.

    The text is encoded with SOURCE's tokenizer, BOS in front (unless --no-bos or the text starts
    with it); every token after the first is predicted once, in windows of --context tokens that
    share one boundary token, each run from a fresh cache. tokens = tokens predicted; bytes = UTF-8
    bytes of the text (special-token markers excluded); nll in nats, summed;
    perplexity = exp(nll / tokens); bits_per_byte = nll / ln 2 / bytes (engines/evaluate.py).
    Progress goes to stderr. Exit 2 on bad input."""
    import math

    from engines.backends import BackendError, load_backend
    from engines.evaluate import DEFAULT_CONTEXT, EvalError, evaluate_text
    from engines.text import TokenizerError, load_tokenizer

    if backend in ("onnxruntime", "tensorrt") and dtype is not None:
        raise click.BadParameter("the onnxruntime backend runs the export's dtype; drop --dtype",
                                 param_hint="'--dtype'")
    try:
        if text_path == "-":
            stdin = sys.stdin
            raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
        else:
            raw = Path(text_path).read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read --text {text_path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"--text {text_path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text:
        raise BadInput(f"--text {text_path}: the text is empty")
    try:
        tokenizer = load_tokenizer(source)
    except TokenizerError as e:
        raise BadInput(str(e).replace("use --prompt-ids", "hatrt eval needs one to encode the text")) from None
    try:
        runtime = load_backend(source, backend, dtype=dtype)
    except BackendError as e:
        raise BadInput(str(e)) from None
    max_pos = runtime.config.max_position_embeddings
    if context is None:
        context = min(DEFAULT_CONTEXT, max_pos)
    if not 2 <= context <= max_pos:
        raise BadInput(f"--context {context}: must lie in [2, {max_pos}] (max_position_embeddings of {source})")

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=f"eval ({runtime.name})", file=sys.stderr,
                                    show_pos=True, item_show_func=None)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        result = evaluate_text(runtime, tokenizer, text, context=context, chunk_size=prefill_chunk,
                               add_bos=not no_bos, progress=progress)
    except EvalError as e:
        raise BadInput(f"--text {text_path}: {e}") from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps({"source": source, **result.to_dict()}, indent=2))
        return
    click.echo(f"backend        {result.backend}")
    click.echo(f"tokens         {result.tokens} predicted ({result.windows} window(s) of <= {result.context} tokens"
               f"{', BOS in front' if result.bos else ''})")
    click.echo(f"bytes          {result.bytes}")
    click.echo(f"nll            {result.nll:.4f} nats ({result.nll_per_token:.4f} per token, "
               f"{result.nll_per_token / math.log(2):.4f} bits)")
    click.echo(f"perplexity     {result.perplexity:.4f}")
    click.echo(f"bits per byte  {result.bits_per_byte:.4f}")
    rate = result.tokens / result.seconds if result.seconds > 0 else float("inf")
    click.echo(f"time           {result.seconds:.1f} s ({rate:.0f} tokens/s)")


@main.command("quantize")
@click.argument("export_dir", metavar="EXPORT")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write the quantized export to (an export directory like any other).")
@click.option("--precision", type=click.Choice(["fp8"]), default="fp8", show_default=True,
              help="fp8: E4M3 GEMMs, weights per output channel, activations per tensor (calibrated).")
@click.option("--calib", "calib", metavar="TEXT|@FILE|-", default=None,
              help="Calibration text (default: the bundled corpus's training split; a preset without a "
                   "tokenizer calibrates on random token ids).")
@click.option("--calib-tokens", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Calibration tokens at most.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def quantize_command(export_dir: str, out_dir: str, precision: str, calib: str | None, calib_tokens: int,
                     force: bool) -> None:
    """Quantize EXPORT (a hatrt export directory) to FP8 explicit Q/DQ for TensorRT."""
    import time

    from engines.quantize import QuantizeError, quantize_export

    start = time.monotonic()
    text = None if calib is None else read_text_arg(calib, "'--calib'")
    try:
        manifest = quantize_export(export_dir, out_dir, precision=precision, calib_text=text,
                                   n_calib_tokens=calib_tokens, overwrite=force,
                                   progress=lambda m: click.echo(f"[{time.monotonic() - start:6.1f}s] {m}", err=True))
    except QuantizeError as e:
        raise BadInput(str(e)) from None
    q = manifest["quantization"]
    click.echo(f"{q['linears']} linears as FP8 GEMMs (weight error: mean {q['weight_error']['mean']:.2%}, "
               f"max {q['weight_error']['max']:.2%} at {q['weight_error']['max_at']}); "
               f"calibration: {q['calibration']['tokens']} tokens, {q['calibration']['source']}")
    click.echo(f"wrote {out_dir} (recipe sha256 {q['recipe_sha256'][:16]})")


def _add_optional_commands() -> None:
    """Commands in their own modules (they import nothing heavy until they run)."""
    from engines.serve_cli import serve_cmd, triton_cmd
    from engines.tensorrt_cli import build_cmd

    main.add_command(build_cmd)
    main.add_command(serve_cmd)
    main.add_command(triton_cmd)


_add_optional_commands()


if __name__ == "__main__":
    main()
