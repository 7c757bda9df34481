"""`hatrt build`: the click command over engines/tensorrt_build.py (engines/cli.py adds it to `main`).

Kept out of engines/cli.py so that module stays free of TensorRT concerns; this module imports
nothing from engines/cli.py either (no import cycle whatever the order of registration).
"""

from __future__ import annotations

import re
import time

import click

from .tensorrt_build import (DEFAULT_MAX_BATCH, DEFAULT_OPTIMIZATION_LEVEL, DEFAULT_PREFILL_CHUNK, ENGINE_FILE, Limits,
                             TensorRTError, build_engine, default_plugin_library, plan_profiles, polygraphy_command,
                             trtexec_command)

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class Refusal(click.ClickException):
    """A build that cannot work as asked (no TensorRT, no GPU, no FP8, no plugin...): exit code 2."""

    exit_code = 2


class Size(click.ParamType):
    """A count with an optional binary suffix: 4096, 128K, 1M, 8G (K/M/G/T = 2^10/20/30/40)."""

    name = "N"

    def __init__(self, what: str = "value"):
        self.what = what

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            text = str(value).replace(",", "").replace("_", "")
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
            if not m:
                self.fail(f"{value!r} is not a {self.what} (try 4096, 128K, 1M or 8G)", param, ctx)
            x = float(m.group(1)) * _UNITS[m.group(2).upper()]
            if x != int(x):
                self.fail(f"{value!r} is not a whole {self.what}", param, ctx)
            n = int(x)
        if n <= 0:
            self.fail(f"{value!r}: must be positive", param, ctx)
        return n


@click.command("build")
@click.argument("export_dir", metavar="EXPORT")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Engine folder to write (step.engine, engine.json, the plugin library, tokenizer files).")
@click.option("--plugins", "plugins", metavar="LIB", default=None,
              help="The hatrt plugin library (default: build/plugins/libhatrt_plugins.so under the current "
                   "directory or the repository, as plugins/README.md builds it).")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH, show_default=True,
              help="Most sequences per step (both profiles).")
@click.option("--max-context", type=Size("token count"), default=None,
              help="Most tokens per sequence (default: the model's max_position_embeddings); sizes the "
                   "entry-capacity range of the cache inputs.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=DEFAULT_PREFILL_CHUNK, show_default=True,
              help="Most tokens per prefill step (the prefill profile's seq range is 1..chunk; 1: decode "
                   "profile only).")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None,
              help="Batch the decode profile is tuned for (default: --max-batch).")
@click.option("--opt-context", type=Size("token count"), default=None,
              help="Context the entry capacities are tuned for (default: --max-context).")
@click.option("--workspace", type=Size("byte count"), default=None,
              help="Workspace memory pool limit, e.g. 8G (default: TensorRT's, the GPU's memory).")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=DEFAULT_OPTIMIZATION_LEVEL, show_default=True,
              help="Builder optimization level (higher: longer build, maybe faster engine).")
@click.option("--timing-cache", metavar="PATH", default=None,
              help="Timing cache file to load and update (default: timing.cache in the engine folder, "
                   "reused when the folder is rebuilt with --force).")
@click.option("--no-layer-outputs", is_flag=True,
              help="Drop a per-layer export's layer outputs from the engine (faster; `hatrt check` then "
                   "cannot name the first diverging layer).")
@click.option("--extra-weight-memory", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="How much extra weight memory the prefill profile may take, as a fraction of an unconstrained "
                   "build (a hint to TensorRT; 0: share the decode profile's weights, 1: TensorRT's default).")
@click.option("--tf32", is_flag=True,
              help="Allow TF32 in fp32 layers (faster; ~1e-3 relative error, so `hatrt check` of an fp32 export "
                   "fails its 1e-5 tolerance). Off: exact fp32.")
@click.option("--print-command", is_flag=True,
              help="Only print the equivalent trtexec and polygraphy commands (needs no TensorRT, no GPU).")
@click.option("--force", is_flag=True, help="Replace a non-empty engine folder.")
@click.option("--verbose", is_flag=True, help="TensorRT's INFO log.")
def build_cmd(export_dir: str, out_dir: str, plugins: str | None, max_batch: int, max_context: int | None,
              prefill_chunk: int, opt_batch: int | None, opt_context: int | None, workspace: int | None,
              optimization_level: int, timing_cache: str | None, no_layer_outputs: bool, extra_weight_memory: float,
              tf32: bool, print_command: bool,
              force: bool, verbose: bool) -> None:
    """Build a TensorRT engine folder from the export in EXPORT (its step.trt.onnx).

    One engine with two optimization profiles that share device memory: decode (seq 1, batch
    1..--max-batch) and prefill (seq 1..--prefill-chunk); entry capacities up to what --max-context
    needs. Strongly typed (FP8 from the export's Q/DQ); every hatrt node must become a plugin layer.
    Exit 2 when the build cannot work: no TensorRT, no CUDA GPU, an FP8 export on a GPU without FP8,
    a missing plugin library or plugin, a bad export or option."""
    from pathlib import Path

    from exporter import contract

    limits = Limits(max_batch=max_batch, max_context=max_context, prefill_chunk=prefill_chunk, opt_batch=opt_batch,
                    opt_context=opt_context)
    start = time.monotonic()

    def log(msg: str) -> None:
        click.echo(f"[{time.monotonic() - start:7.1f}s] {msg}", err=True)

    try:
        if print_command:
            manifest = contract.read_manifest(export_dir, verify="none")
            plan = plan_profiles(manifest, limits)
            onnx_path = Path(export_dir) / manifest["graphs"][contract.STEP].get("trt_file", contract.STEP_TRT_FILE)
            library = Path(plugins) if plugins else default_plugin_library()
            engine = Path(out_dir) / ENGINE_FILE
            cache = Path(timing_cache) if timing_cache else Path(out_dir) / "timing.cache"
            for command in (trtexec_command, polygraphy_command):
                click.echo(command(plan, onnx_path, library, engine, workspace=workspace,
                                   optimization_level=optimization_level, timing_cache=cache, tf32=tf32))
            return
        result = build_engine(export_dir, out_dir, limits=limits, plugins=plugins, workspace=workspace,
                              optimization_level=optimization_level, timing_cache=timing_cache,
                              layer_outputs=not no_layer_outputs, extra_weight_memory=extra_weight_memory, tf32=tf32,
                              overwrite=force, verbose=verbose, log=log)
    except (TensorRTError, contract.ExportError) as e:
        raise Refusal(str(e)) from None
    m = result.manifest
    click.echo(f"engine: {result.engine_dir / ENGINE_FILE} ({m['engine']['bytes'] / 2**20:.1f} MiB, TensorRT "
               f"{m['tensorrt']['version']}, {m['gpu']['name']})")
    for p in m["profiles"]:
        dims = ", ".join(f"{d} {lo}..{hi}" for d, (lo, _, hi) in p["dims"].items())
        click.echo(f"profile {p['index']} {p['name']}: {dims}")
    click.echo(f"manifest: {result.engine_dir / 'engine.json'}")


__all__ = ["Refusal", "Size", "build_cmd"]
