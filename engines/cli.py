"""The `hatrt` command line: one click group; each command stays thin and calls library code.

Commands: `inspect` (KV-cache and FLOP accounting, exporter/costs.py), `generate` (token
generation with any backend, engines/generate.py). Others (export, check) are added to the
`main` group.
"""

from __future__ import annotations

import json
import re

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
    GQA-8 baseline (one sequence; method: docs/cost-model.md)."""
    from exporter.costs import format_report, model_costs

    cfg = load_model_config(preset_name, config_path)
    costs = model_costs(cfg, context, indexer_format)
    if as_json:
        click.echo(json.dumps(costs.to_dict(), indent=2))
    else:
        click.echo(format_report(costs))


@main.command("export")
@click.argument("source", metavar="CHECKPOINT")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write prefill.onnx, decode.onnx, their .trt.onnx twins and manifest.json.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Weight and activation dtype of the graphs (bfloat16 is refused: "
                                      "ONNX Runtime cannot run it).")
@click.option("--opset", type=int, default=23, show_default=True, help="ONNX opset (hatrt writes 23).")
@click.option("--quant-sim", is_flag=True, help="Bake the FP8/FP4 quantization simulation into the graphs.")
@click.option("--per-layer", is_flag=True, help="Also output every layer's streams (for `hatrt check`).")
@click.option("--optimize", is_flag=True, help="Run onnxscript's graph optimizer (slower export).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Processes for the two graphs (default 2 on 2+ cores; 1 for very large checkpoints).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def export_cmd(source: str, out_dir: str, dtype: str, opset: int, quant_sim: bool, per_layer: bool,
               optimize: bool, jobs: int | None, force: bool) -> None:
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
                              optimize=optimize, jobs=jobs, overwrite=force, progress=progress)
    except (ExportError, CheckpointError, ConfigError) as e:
        raise BadInput(str(e)) from None
    for name, info in result.manifest["graphs"].items():
        click.echo(f"{name}: {result.out_dir / info['file']} (+ {info['trt_file']})")
    click.echo(f"manifest: {result.out_dir / 'manifest.json'}")


class TokenIds(click.ParamType):
    """A prompt as token ids: "1 2 3" or "1,2,3" (non-negative integers; checked against the vocab later)."""

    name = "IDS"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, (list, tuple)):
            return list(value)
        parts = [p for p in re.split(r"[\s,]+", str(value).strip()) if p]
        if not parts:
            self.fail(f"{value!r}: a prompt needs at least one token id (e.g. \"1 2 3\")", param, ctx)
        ids = []
        for p in parts:
            if not re.fullmatch(r"\d+", p):
                self.fail(f"{value!r}: {p!r} is not a token id (non-negative integer)", param, ctx)
            ids.append(int(p))
        return ids


@main.command()
@click.argument("source", metavar="SOURCE")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="torch: the reference model (SOURCE a preset, checkpoint or export directory); "
                   "onnxruntime: the exported graphs (SOURCE an export directory).")
@click.option("--prompt-ids", "prompts", type=TokenIds(), multiple=True, required=True,
              help='A prompt as token ids, "1 2 3". Repeat for a batch.')
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tokens to generate per prompt at most.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: the most likely tokens holding probability p.")
@click.option("--stop", "stop_tokens", type=click.IntRange(min=0), multiple=True, metavar="ID",
              help="A token id that ends a sequence (kept in the output). Repeatable.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="torch backend: weight dtype (default float32, or the export's dtype).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (tokens, finish reasons).")
def generate(source: str, backend: str, prompts: tuple[list[int], ...], max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, stop_tokens: tuple[int, ...], seed: int | None, dtype: str | None,
             stream: bool, as_json: bool) -> None:
    """Generate token ids from SOURCE: a preset name, a checkpoint directory or an export directory.

    Prints one line of generated ids per prompt. With --stream, ids are printed as they come: on
    one line for a single prompt, as "ROW ID" lines for a batch (ROW counts prompts from 0)."""
    from engines.backends import BackendError, load_backend
    from engines.generate import generate as run_generate

    if stream and as_json:
        raise click.UsageError("give either --stream or --json, not both")
    if backend == "onnxruntime" and dtype is not None:
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
            raise click.BadParameter(f"prompt {r}: token ids {bad[:8]} are >= the vocabulary size {vocab}",
                                     param_hint="'--prompt-ids'")
    bad_stops = [t for t in stop_tokens if t >= vocab]
    if bad_stops:
        raise click.BadParameter(f"{bad_stops} >= the vocabulary size {vocab}", param_hint="'--stop'")

    single = len(prompts) == 1
    started = False

    def on_token(row: int, token: int) -> None:
        nonlocal started
        if single:
            click.echo(f"{' ' if started else ''}{token}", nl=False)
        else:
            click.echo(f"{row} {token}")
        started = True

    try:
        results = run_generate(runtime, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                               on_token=on_token if stream else None)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if stream:
        if single:
            click.echo()
    elif as_json:
        click.echo(json.dumps({"backend": runtime.name, "results": [
            {"tokens": r.tokens, "finish_reason": r.finish_reason, "prompt_length": r.prompt_length}
            for r in results]}, indent=2))
    else:
        for r in results:
            click.echo(" ".join(map(str, r.tokens)))


@main.command("check")
@click.argument("artifact_dir", metavar="DIR")
@click.option("--steps", type=click.IntRange(min=0), default=32, show_default=True,
              help="Decode steps after each prompt.")
@click.option("--prompt-ids", "prompts", type=TokenIds(), multiple=True,
              help='A prompt as token ids, "1 2 3". Repeatable. Default: random prompts of 200 and 300 tokens.')
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random prompts.")
@click.option("--rtol", type=click.FloatRange(min=0.0), default=None,
              help="Element-wise relative tolerance (default by precision: fp32 1e-5, fp16 1e-2).")
@click.option("--atol", type=click.FloatRange(min=0.0), default=None,
              help="Absolute tolerance relative to max|ref| per step (default: fp32 1e-5, fp16 1e-2).")
@click.option("--json", "json_path", metavar="PATH", default=None, help="Also write the results as JSON to PATH.")
def check_command(artifact_dir: str, steps: int, prompts: tuple[list[int], ...], seed: int, rtol: float | None,
                  atol: float | None, json_path: str | None) -> None:
    """Compare the export in DIR (ONNX Runtime) with the PyTorch reference, output by output.

    Prefill on each prompt, then --steps decode steps, each side from its own cache, tokens chosen
    greedily from the reference. Exit 0: all outputs within tolerance; 1: outside; 2: usage error."""
    from engines.check import CheckError, format_report, write_json
    from engines.check import check as run_check

    try:
        report = run_check(artifact_dir, steps=steps, prompts=list(prompts) or None, seed=seed, rtol=rtol,
                           atol=atol, progress=lambda msg: click.echo(msg, err=True))
    except CheckError as e:
        raise click.UsageError(str(e)) from None
    click.echo(format_report(report))
    if json_path is not None:
        try:
            write_json(report, json_path)
        except OSError as e:
            raise click.BadParameter(f"cannot write {json_path}: {e.strerror or e}", param_hint="'--json'") from None
    click.get_current_context().exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
