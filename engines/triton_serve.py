"""`hatrt triton`: the same runtime served through Triton Inference Server (nvidia-pytriton).

pytriton starts the real `tritonserver` binary; our model is a Python-backend proxy whose
inference callable runs in this process. It is bound as a *decoupled* model (Triton's streaming
mode): a request gets one response per generated token, the last one flagged final.

Batching: ours, not Triton's. Triton's dynamic batcher groups whole requests that arrive close
together and runs them to the end as one batch; an LLM needs continuous batching at token
granularity (requests join and leave the running batch between decode steps, prompts are
prefilled in chunks between them), which is what `engines.generate.Scheduler` does. So the model
is bound with batching off (max_batch_size 0): Triton hands every request over at once (a
decoupled model's execute returns immediately) and the inference callable, an async generator on
pytriton's event loop, submits it to the same `Engine` (one Scheduler, one stepping thread) that
`hatrt serve` uses, and yields a response per token event.

Inputs (all optional but one of prompt / prompt_ids; no batch dimension):
  prompt BYTES [1] (text, tokenized with SOURCE's tokenizer and the BOS rule), prompt_ids INT64 [-1],
  max_tokens INT32 [1] (default 16), temperature FP32 [1] (default 0: greedy), top_p FP32 [1],
  top_k INT32 [1], seed INT64 [1], ignore_eos BOOL [1], stop BYTES [-1] (stop strings).
Outputs per response: token_ids INT64 [-1] (this step's token), text BYTES [1] (its text piece),
  finish_reason BYTES [1] ("" until the last token, then "stop" / "length").

Clients: tritonclient.grpc (start_stream / async_stream_infer) or HTTP
POST /v2/models/NAME/generate_stream (server-sent events). docs/serving.md has both.

Known environment issue (shared/docs/toolchain-facts.md "Serving"): the Python backend stub links
libpython by soname and may find another build of the same Python; LD_LIBRARY_PATH is set to this
interpreter's LIBDIR before tritonserver starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sysconfig
import threading
import time

import numpy as np

from .generate import ERROR
from .server import APIError, ChoiceText, Plan, ServerState

LOG = logging.getLogger("hatrt.triton")


class TritonUnavailable(RuntimeError):
    pass


def check_pytriton() -> None:
    import importlib.util

    if importlib.util.find_spec("pytriton") is None:
        raise TritonUnavailable("hatrt triton needs nvidia-pytriton (pip install 'hatrt[triton]'); it ships "
                                "the tritonserver binary")


def fix_libpython_path(env: dict | None = None) -> None:
    """Put this interpreter's LIBDIR first on LD_LIBRARY_PATH (inherited by tritonserver and its
    Python backend stub), so the stub loads the libpython of the running Python."""
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if not parts or parts[0] != libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + [p for p in parts if p != libdir])


def _scalar(req: dict, name: str, cast, default):
    v = req.get(name)
    if v is None:
        return default
    arr = np.asarray(v).reshape(-1)
    if arr.size == 0:
        return default
    x = arr[0]
    if isinstance(x, bytes):
        x = x.decode("utf-8")
    return cast(x)


def plan_from_inputs(state: ServerState, req: dict) -> Plan:
    """A Triton request's tensors -> the same validated Plan as an HTTP /v1/completions body."""
    body: dict = {"temperature": 0.0}
    if req.get("prompt_ids") is not None and np.asarray(req["prompt_ids"]).size:
        body["prompt"] = [int(t) for t in np.asarray(req["prompt_ids"]).reshape(-1)]
    elif req.get("prompt") is not None:
        body["prompt"] = _scalar(req, "prompt", str, "")
    for name, cast in (("max_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int),
                       ("seed", int), ("ignore_eos", bool)):
        v = _scalar(req, name, cast, None)
        if v is not None:
            body[name] = v
    if req.get("stop") is not None:
        stops = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in np.asarray(req["stop"]).reshape(-1)]
        if stops:
            body["stop"] = stops
    return state.plan_completion(body)


def _response(token: int | None, piece: str = "", finish: str | None = None) -> dict:
    if token is None:  # nothing for this request in this step (several requests in one call)
        return {"token_ids": np.zeros((0,), np.int64), "text": np.array([b""], dtype=np.object_),
                "finish_reason": np.array([b""], dtype=np.object_)}
    return {"token_ids": np.array([token], np.int64), "text": np.array([piece.encode("utf-8")], dtype=np.object_),
            "finish_reason": np.array([(finish or "").encode()], dtype=np.object_)}


def make_infer(state: ServerState):
    """The decoupled inference callable: an async generator over pytriton's requests."""

    async def infer(requests):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        plans, reqs = [], []
        for r in requests:
            try:
                plan = plan_from_inputs(state, r.data if hasattr(r, "data") else r)
            except APIError as e:
                raise ValueError(f"{e.status} {e.type}: {e.message}") from None
            plans.append(plan)
            reqs.extend(state.requests(plan))  # one prompt per Triton request
        choices = [ChoiceText(state.text.tokenizer, p.stop_strings) for p in plans]
        try:
            rids = state.engine.submit(reqs, lambda i, ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))
        except APIError as e:  # overloaded / draining
            raise RuntimeError(f"{e.status} {e.type}: {e.message}") from None
        open_ = set(range(len(rids)))
        try:
            while open_:
                i, ev = await queue.get()
                if i not in open_:
                    continue
                if ev.finish_reason == ERROR:
                    raise RuntimeError(f"generation failed: {ev.error}")
                piece, stopped = choices[i].push(ev.token)
                finish = "stop" if stopped else ev.finish_reason
                if finish is not None:
                    open_.discard(i)
                    if stopped:
                        state.engine.cancel([rids[i]], outcome="stop")
                    choices[i].finish_reason = finish
                    piece += choices[i].finish()
                out = [_response(None) for _ in rids]
                out[i] = _response(ev.token, piece, finish)
                yield out
        finally:  # error, cancelled task, server stopping: free the rows
            state.engine.cancel([rids[i] for i in open_])

    return infer


def bind_model(triton, state: ServerState, model_name: str = "hatrt") -> None:
    from pytriton.model_config import ModelConfig, Tensor

    inputs = [
        Tensor(name="prompt", dtype=bytes, shape=(1,), optional=True),
        Tensor(name="prompt_ids", dtype=np.int64, shape=(-1,), optional=True),
        Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
        Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True),
        Tensor(name="top_p", dtype=np.float32, shape=(1,), optional=True),
        Tensor(name="top_k", dtype=np.int32, shape=(1,), optional=True),
        Tensor(name="seed", dtype=np.int64, shape=(1,), optional=True),
        Tensor(name="ignore_eos", dtype=np.bool_, shape=(1,), optional=True),
        Tensor(name="stop", dtype=bytes, shape=(-1,), optional=True),
    ]
    outputs = [
        Tensor(name="token_ids", dtype=np.int64, shape=(-1,)),
        Tensor(name="text", dtype=bytes, shape=(1,)),
        Tensor(name="finish_reason", dtype=bytes, shape=(1,)),
    ]
    triton.bind(model_name=model_name, infer_func=make_infer(state), inputs=inputs, outputs=outputs,
                config=ModelConfig(batching=False, decoupled=True), strict=False)


def serve_triton(state: ServerState, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_name: str = "hatrt", drain_timeout: float | None = None,
                 log_verbose: int = 0, ready: threading.Event | None = None,
                 stop: threading.Event | None = None) -> None:
    """Start Triton with the model bound and block until SIGINT/SIGTERM (or `stop` is set): then
    refuse new requests, let the active ones finish (up to drain_timeout), stop Triton and the
    engine. `ready` is set once the model is loaded."""
    check_pytriton()
    fix_libpython_path()
    from pytriton.triton import Triton, TritonConfig

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, f: stop.set())
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, log_verbose=log_verbose,
                          exit_timeout_secs=5)
    state.engine.start()
    triton = Triton(config=config)
    try:
        bind_model(triton, state, model_name)
        triton.run()
        LOG.info("Triton serves model %r (gRPC %s:%d, HTTP %s:%d)", model_name, host, grpc_port, host, http_port)
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            if not triton.is_alive():
                LOG.error("tritonserver is no longer alive")
                break
        state.engine.start_drain()
        LOG.info("draining %d active request(s)", state.engine.active)
        state.engine.wait_idle(drain_timeout)
        time.sleep(0.2)  # let the last responses leave the proxy
    finally:
        triton.stop()
        state.engine.stop()


__all__ = ["TritonUnavailable", "bind_model", "check_pytriton", "fix_libpython_path", "make_infer",
           "plan_from_inputs", "serve_triton"]
