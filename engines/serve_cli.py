"""`hatrt serve` (OpenAI-compatible HTTP, engines/server.py) and `hatrt triton` (Triton Inference
Server, engines/triton_serve.py): thin click commands over library code.

engines/cli.py registers them on the `hatrt` group (main.add_command(serve_cmd) / (triton_cmd));
`python -m engines.serve_cli serve|triton ...` runs them without it.
"""

from __future__ import annotations

import importlib.util
import logging

import click

BACKEND_CHOICES = ("torch", "onnxruntime", "tensorrt")


def _common_options(f):
    """Options shared by `serve` and `triton`: the runtime and the scheduler's limits."""
    opts = [
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="torch", show_default=True,
                     help="torch: the reference model (SOURCE a preset, checkpoint or export directory); "
                          "onnxruntime: the exported graph (SOURCE an export directory); tensorrt: TensorRT "
                          "engines (SOURCE an engine folder written by hatrt build)."),
        click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Sequences decoded together at most (the running batch)."),
        click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
                     help="Requests waiting for a place in the batch at most; beyond it requests are refused "
                          "(HTTP 429 with Retry-After)."),
        click.option("--prefill-chunk", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Prompts are prefilled in chunks of this many tokens, one chunk between two decode "
                          "steps (a long prompt delays running streams by one chunk at most)."),
        click.option("--max-context", type=click.IntRange(min=1), default=None,
                     help="Context limit: prompt + max_tokens of one request at most "
                          "(default: the model's max_position_embeddings)."),
        click.option("--model-name", default=None, help="The model id clients name (default: SOURCE's name)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="torch backend: weight dtype (default float32, or the export's dtype)."),
        click.option("--device", default=None, help="torch backend: device, e.g. cuda:0 (default cpu)."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="CPU threads of torch / ONNX Runtime intra-op work."),
        click.option("--drain-timeout", type=click.FloatRange(min=0), default=None,
                     help="On SIGTERM, seconds to let in-flight requests finish before they are cut "
                          "(default: no limit)."),
        click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
                     default="info", show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _build(source, backend, max_batch, max_queue, prefill_chunk, max_context, model_name, dtype, device, threads):
    from engines.backends import BACKENDS, BackendError
    from engines.server import build_state

    if backend not in BACKENDS:
        raise click.BadParameter(f"the {backend} backend is not available in this build of hatrt "
                                 f"(engines.backends offers: {', '.join(BACKENDS)})", param_hint="'--backend'")
    if backend == "onnxruntime" and dtype is not None:
        raise click.BadParameter("the onnxruntime backend runs the export's dtype; drop --dtype",
                                 param_hint="'--dtype'")
    if device is not None and backend != "torch":
        raise click.BadParameter("--device is for the torch backend (onnxruntime picks CUDA when it has it)",
                                 param_hint="'--device'")
    try:
        return build_state(source, backend, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                           context_limit=max_context, model_id=model_name, dtype=dtype, device=device,
                           threads=threads)
    except BackendError as e:
        raise click.BadParameter(str(e), param_hint="SOURCE") from None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--max-context'" if "context" in str(e) else None) from None


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.command("serve")
@click.argument("source", metavar="SOURCE")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@_common_options
def serve_cmd(source: str, host: str, port: int, backend: str, max_batch: int, max_queue: int, prefill_chunk: int,
              max_context: int | None, model_name: str | None, dtype: str | None, device: str | None, threads: int,
              drain_timeout: float | None, log_level: str) -> None:
    """Serve SOURCE over an OpenAI-compatible HTTP API with continuous batching.

    Endpoints: POST /v1/completions (prompt as text or token ids; max_tokens, temperature, top_p,
    seed, stop, stream), POST /v1/chat/completions (when the tokenizer has a chat template),
    GET /v1/models, /health, /metrics (Prometheus). SIGTERM stops admitting requests (503), lets
    the running ones finish, then exits 0. See docs/serving.md."""
    from engines.server import serve

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"hatrt serve needs {' and '.join(missing)}: pip install 'hatrt[serve]'")
    _logging(log_level)
    state = _build(source, backend, max_batch, max_queue, prefill_chunk, max_context, model_name, dtype, device,
                   threads)
    click.echo(f"serving {state.model_id!r} ({state.backend_name}, max batch {max_batch}, max queue {max_queue}, "
               f"context {state.context_limit}) on http://{host}:{port}/v1", err=True)
    serve(state, host, port, log_level=log_level, drain_timeout=drain_timeout)


@click.command("triton")
@click.argument("source", metavar="SOURCE")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address Triton listens on (HTTP, gRPC, metrics).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@_common_options
def triton_cmd(source: str, host: str, http_port: int, grpc_port: int, metrics_port: int, backend: str,
               max_batch: int, max_queue: int, prefill_chunk: int, max_context: int | None, model_name: str | None,
               dtype: str | None, device: str | None, threads: int, drain_timeout: float | None,
               log_level: str) -> None:
    """Serve SOURCE through Triton Inference Server (nvidia-pytriton) as a decoupled (streaming)
    model: one response per generated token. Batching is hatrt's own Scheduler (continuous, at
    token granularity), not Triton's dynamic batcher. Stream over gRPC (tritonclient.grpc) or
    HTTP POST /v2/models/NAME/generate_stream. See docs/serving.md."""
    from engines.triton_serve import TritonUnavailable, serve_triton

    _logging(log_level)
    try:
        from engines.triton_serve import check_pytriton

        check_pytriton()
    except TritonUnavailable as e:
        raise click.ClickException(str(e)) from None
    state = _build(source, backend, max_batch, max_queue, prefill_chunk, max_context, model_name, dtype, device,
                   threads)
    name = model_name or "hatrt"
    click.echo(f"serving {state.model_id!r} ({state.backend_name}) as Triton model {name!r}: HTTP {host}:{http_port}, "
               f"gRPC {host}:{grpc_port}, metrics {host}:{metrics_port}", err=True)
    serve_triton(state, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                 model_name=name, drain_timeout=drain_timeout, log_verbose=1 if log_level == "debug" else 0)


@click.group()
def cli() -> None:
    """hatrt serving commands (also registered as `hatrt serve` / `hatrt triton`)."""


cli.add_command(serve_cmd)
cli.add_command(triton_cmd)

if __name__ == "__main__":
    cli()
