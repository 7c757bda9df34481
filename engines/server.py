"""`hatrt serve`: an OpenAI-compatible HTTP server over the one generate loop (engines/generate.py).

Threading model (docs/serving.md):

- `Engine` owns the backend and one `Scheduler` (continuous batching: a request's prompt is
  prefilled in chunks, one chunk per iteration, and merged into the running batch between decode
  steps; finished and cancelled rows leave the batch). ONE background thread ("hatrt-scheduler")
  calls `Scheduler.step()` while there is work and sleeps on a `threading.Condition` when idle;
  `submit` and `cancel` notify it. The scheduler runs with `isolate_errors=True`: a backend
  exception fails the requests of that step only (an ERROR event each) and the loop goes on.
- Every event is handed to its request's `deliver(index, event)` callback from that thread. The
  HTTP layer (FastAPI on uvicorn, one asyncio loop) turns it into `loop.call_soon_threadsafe(
  queue.put_nowait, ...)` on a per-request asyncio.Queue; the Triton front end
  (engines/triton_serve.py) does the same on pytriton's loop. Nothing else touches the scheduler.
- Backpressure: at most `max_batch` rows decode together and at most `max_queue` more requests
  wait; beyond that a request is refused at once (HTTP 429 with Retry-After) instead of queueing
  without bound. While draining (SIGTERM) new requests get 503 with Retry-After.
- Cancellation: a client that disconnects (a closed stream, or a dropped connection while a
  non-streamed request runs) cancels its requests: `Scheduler.cancel`, whose rows leave the batch
  cache at the next step. A stop string found in the text cancels the rest of that request too.

Text: prompts are text (the SOURCE's tokenizer, BOS rule of engines/text.py) or token ids; the
output text is decoded with `StreamDecoder` (a multi-byte character is never split between two
chunks). A SOURCE without a tokenizer (a preset) answers token-id prompts and returns the ids as
text ("365 395 450"); every choice also carries the ids as `token_ids`. Stop tokens default to the
model's EOS, exactly as `hatrt generate` does, so a greedy request (temperature 0) returns what
`hatrt generate` returns for the same prompt alone; a streamed response is built from the same
pieces as the unstreamed one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import numbers
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .generate import ERROR, LENGTH, STOP, Request, SamplingParams, Scheduler, TokenEvent, default_stop_tokens

try:  # the `serve` extra; FastAPI resolves the handlers' string annotations in this module
    from starlette.requests import Request as HTTPRequest
except ImportError:  # pragma: no cover - engines/triton_serve.py uses this module without it
    HTTPRequest = Any

LOG = logging.getLogger("hatrt.serve")

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 64
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
RETRY_AFTER_S = 1
TPS_WINDOW_S = 10.0


# ============================================================================ errors
class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class Overloaded(APIError):
    def __init__(self, message: str):
        super().__init__(429, message, "rate_limit_error", None, "queue_full",
                         {"Retry-After": str(RETRY_AFTER_S)})


class Unavailable(APIError):
    def __init__(self, message: str):
        super().__init__(503, message, "server_error", None, "shutting_down", {"Retry-After": str(RETRY_AFTER_S)})


# ============================================================================ metrics
class Metrics:
    """Prometheus metrics of one Engine, in their own registry (several servers per process work)."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

    def __init__(self, engine: Engine):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:  # pragma: no cover - the serve extra installs it
            self.registry = None
            return
        r = self.registry = CollectorRegistry()
        Gauge("hatrt_queue_depth", "Requests accepted but not yet in the running batch (queued or prefilling)",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("hatrt_running_batch", "Sequences in the running (decoding) batch",
              registry=r).set_function(lambda: engine.scheduler.batch_size)
        Gauge("hatrt_active_requests", "Requests accepted and not finished",
              registry=r).set_function(lambda: engine.active)
        Gauge("hatrt_tokens_per_second", f"Generated tokens per second over the last {TPS_WINDOW_S:.0f} s",
              registry=r).set_function(engine.tokens_per_second)
        Gauge("hatrt_max_batch", "Configured --max-batch", registry=r).set(engine.max_batch)
        Gauge("hatrt_max_queue", "Configured --max-queue", registry=r).set(engine.max_queue)
        self.generated = Counter("hatrt_generated_tokens", "Generated tokens", registry=r)
        self.prompt = Counter("hatrt_prompt_tokens", "Prompt tokens accepted", registry=r)
        self.requests = Counter("hatrt_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("hatrt_time_to_first_token_seconds", "Submit to first token",
                              buckets=self.TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hatrt_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=self.ITL_BUCKETS, registry=r)
        self.step = Histogram("hatrt_step_seconds", "One scheduler iteration (prefill chunk + decode step)",
                              buckets=self.ITL_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        if self.registry is None:
            return b"# prometheus-client is not installed (pip install 'hatrt[serve]')\n", "text/plain"
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def outcome(self, name: str, n: int = 1) -> None:
        if self.registry is not None:
            self.requests.labels(name).inc(n)


# ============================================================================ the engine
Deliver = Callable[[int, TokenEvent], None]


@dataclass
class _Live:
    deliver: Deliver
    index: int
    submitted: float
    last: float | None = None


class Engine:
    """The Scheduler and the one thread that steps it; thread-safe submit/cancel for front ends."""

    def __init__(self, backend, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_chunk: int | None = None, threads: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.backend = backend
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.prefill_chunk = prefill_chunk
        self.threads = threads
        self.scheduler = self._new_scheduler()
        self._cond = threading.Condition()
        self._live: dict[int, _Live] = {}
        self._next_rid = 0
        self._stop = False
        self.draining = False
        self._thread: threading.Thread | None = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.metrics = Metrics(self)
        self.steps = 0

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.backend, max_batch=self.max_batch, prefill_chunk=self.prefill_chunk,
                         isolate_errors=True)

    # -- state -----------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def queue_depth(self) -> int:
        return max(0, self.scheduler.pending - self.scheduler.batch_size)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._cond:
            while self._recent and self._recent[0][0] < now - TPS_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / TPS_WINDOW_S

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hatrt-scheduler", daemon=True)
            self._thread.start()
        return self

    def start_drain(self) -> None:
        """Refuse new requests (503); those accepted run to the end."""
        with self._cond:
            self.draining = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is active; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._live:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.1 if left is None else min(left, 0.1))
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still active end with an ERROR event."""
        with self._cond:
            self._stop = True
            self.draining = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the server is shutting down")

    # -- any thread ------------------------------------------------------------------------
    def submit(self, requests: Sequence[Request], deliver: Deliver, prompt_tokens: int | None = None) -> list[int]:
        """Queue requests (all or none); deliver(i, event) is called from the scheduler thread for
        request i's events. Raises Unavailable (draining), Overloaded (full) or ValueError (bad)."""
        now = time.monotonic()
        with self._cond:
            if self.draining or self._stop:
                raise Unavailable("the server is shutting down and accepts no new requests")
            if len(self._live) + len(requests) > self.capacity:
                self.metrics.outcome("rejected", len(requests))
                raise Overloaded(f"the server is at capacity ({self.max_batch} running + {self.max_queue} queued "
                                 f"requests); retry later")
            rids = []
            try:
                for i, req in enumerate(requests):
                    rid = self._next_rid
                    self._next_rid += 1
                    self.scheduler.submit(req, rid)
                    self._live[rid] = _Live(deliver, i, now)
                    rids.append(rid)
            except Exception:
                for rid in rids:
                    self._live.pop(rid, None)
                    self.scheduler.cancel(rid)
                raise
            self._cond.notify_all()
        if self.metrics.registry is not None:
            n = prompt_tokens if prompt_tokens is not None else sum(len(r.prompt) for r in requests)
            self.metrics.prompt.inc(n)
        return rids

    def cancel(self, rids: Iterable[int], outcome: str = "cancelled") -> int:
        """Cancel requests still running (their cache rows are freed at the next step); returns how
        many. `outcome` labels them in hatrt_requests_total ("stop" for a stop string)."""
        n = 0
        with self._cond:
            for rid in rids:
                if self._live.pop(rid, None) is not None:
                    self.scheduler.cancel(rid)
                    n += 1
            if n:
                self._cond.notify_all()
        if n:
            self.metrics.outcome(outcome, n)
        return n

    # -- the scheduler thread --------------------------------------------------------------
    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stop and not self.scheduler.pending:
                    self._cond.wait()
                if self._stop:
                    return
                scheduler = self.scheduler
            t0 = time.monotonic()
            try:
                events = scheduler.step()
            except Exception as e:  # not a backend step (those are isolated): start over, keep serving
                LOG.exception("scheduler step failed; failing every active request")
                with self._cond:
                    self.scheduler = self._new_scheduler()
                self._fail_all(f"{type(e).__name__}: {e}")
                continue
            now = time.monotonic()
            self.steps += 1
            if self.metrics.registry is not None:
                self.metrics.step.observe(now - t0)
            self._dispatch(events, now)

    def _dispatch(self, events: list[TokenEvent], now: float) -> None:
        out = []
        tokens = 0
        with self._cond:
            for ev in events:
                live = self._live.get(ev.row)
                if live is None:  # cancelled meanwhile
                    continue
                if ev.finish_reason is not None:
                    del self._live[ev.row]
                if ev.finish_reason != ERROR:
                    tokens += 1
                    m = self.metrics
                    if m.registry is not None:
                        (m.ttft.observe(now - live.submitted) if live.last is None else m.itl.observe(now - live.last))
                    live.last = now
                out.append((live, ev))
            if tokens:
                self._recent.append((now, tokens))
            if any(ev.finish_reason is not None for _, ev in out):
                self._cond.notify_all()  # wait_idle
        if self.metrics.registry is not None:
            self.metrics.generated.inc(tokens)
        for live, ev in out:
            if ev.finish_reason is not None:
                self.metrics.outcome(ev.finish_reason)
            try:
                live.deliver(live.index, ev)
            except Exception:  # a front end whose loop is gone: its request is dropped
                LOG.exception("delivering an event failed")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            live, self._live = self._live, {}
            self._cond.notify_all()
        for rid, lv in live.items():
            try:
                lv.deliver(lv.index, TokenEvent(rid, -1, 0, ERROR, message))
            except Exception:
                pass
        if live:
            self.metrics.outcome(ERROR, len(live))


# ============================================================================ text
def load_chat_template(source: str | os.PathLike) -> str | None:
    """The Jinja chat template of SOURCE: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of {"name", "template"}: the one named "default")."""
    from .text import TOKENIZER_CONFIG, tokenizer_dirs

    for d in tokenizer_dirs(source):
        jinja = d / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        path = d / TOKENIZER_CONFIG
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            ct = cfg.get("chat_template") if isinstance(cfg, dict) else None
            if isinstance(ct, str) and ct:
                return ct
            if isinstance(ct, list):
                named = {t.get("name"): t.get("template") for t in ct if isinstance(t, dict)}
                if isinstance(named.get("default"), str):
                    return named["default"]
    return None


class TextSide:
    """The tokenizer of a SOURCE (or none), its chat template and the default stop tokens: the
    adapter between engines/text.py and the server."""

    def __init__(self, source: str | os.PathLike, backend):
        from .text import TokenizerError, load_tokenizer, special_ids

        self.source = source
        self.vocab_size = backend.config.vocab_size
        try:
            self.tokenizer = load_tokenizer(source)
        except TokenizerError as e:
            self.tokenizer = None
            self.why_none = str(e).removesuffix("; use --prompt-ids")
        # the stop rule of `hatrt generate`: the model's EOS, else the tokenizer files' EOS
        eos = default_stop_tokens(backend)
        if not eos:
            try:
                eos = self.tokenizer.eos_ids if self.tokenizer is not None else special_ids(source)[1]
            except TokenizerError:
                eos = []
        self.eos = [t for t in dict.fromkeys(eos) if 0 <= t < self.vocab_size]
        self.chat_template = load_chat_template(source) if self.tokenizer is not None else None
        self._compiled = None

    def encode(self, text: str, param: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request(f"this model has no tokenizer: {self.why_none}; send the prompt as token ids", param)
        return self.tokenizer.encode(text)

    def _special(self, name: str) -> str:
        from .text import TOKENIZER_CONFIG, tokenizer_dirs

        for d in tokenizer_dirs(self.source):
            try:
                cfg = json.loads((d / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            v = cfg.get(name) if isinstance(cfg, dict) else None
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                return v
        tid = self.tokenizer.bos_id if name == "bos_token" else (self.tokenizer.eos_ids or [None])[0]
        return self.tokenizer.special_tokens.get(tid, "") if tid is not None else ""

    def render_chat(self, messages: list[dict], param: str = "messages") -> list[int]:
        if self.chat_template is None:
            raise bad_request("this model's tokenizer has no chat template (no chat_template in "
                              "tokenizer_config.json, no chat_template.jinja): use /v1/completions", param,
                              "no_chat_template")
        if self._compiled is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        try:
            text = self._compiled.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))
        except Exception as e:  # jinja2 TemplateError, raise_exception in the template
            raise bad_request(f"the chat template cannot render these messages: {e}", param) from None
        return self.tokenizer.encode(text)


class ChoiceText:
    """The output of one choice: tokens in, text pieces out. Decoding (engines/text.py
    StreamDecoder, or ids as text without a tokenizer) and stop strings: text that could be the
    start of a stop string is held back until it is not; a stop string ends the choice and is
    not returned. The concatenation of the pieces is the choice's whole text, streamed or not."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stops = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.pending = ""  # decoded, not yet returned (may start a stop string)
        self.text = ""  # returned so far
        self.finish_reason: str | None = None

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text to send now, stop string found)."""
        self.ids.append(int(token))
        if self.decoder is not None:
            piece = self.decoder.push(token)
        else:
            piece = ("" if len(self.ids) == 1 else " ") + str(int(token))
        return self._take(piece, final=False)

    def finish(self) -> str:
        """The text still held back, at the end of the choice."""
        if self.finish_reason == STOP and self._stopped:
            return ""
        piece = self.decoder.flush() if self.decoder is not None else ""
        out, _ = self._take(piece, final=True)
        return out

    _stopped = False

    def _take(self, piece: str, final: bool) -> tuple[str, bool]:
        self.pending += piece
        if self.stops:
            hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
            if hits:
                out = self.pending[:min(hits)]
                self.pending = ""
                self.text += out
                self._stopped = True
                self.finish_reason = STOP
                return out, True
            if not final:
                hold = 0
                for s in self.stops:
                    for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                        if self.pending.endswith(s[:k]):
                            hold = k
                            break
                out = self.pending[:len(self.pending) - hold]
                self.pending = self.pending[len(self.pending) - hold:]
                self.text += out
                return out, False
        out, self.pending = self.pending, ""
        self.text += out
        return out, False


# ============================================================================ request parsing
@dataclass
class Plan:
    """A validated request: what to submit and how to answer."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]
    max_tokens: int
    params: SamplingParams
    seed: int | None
    stop_tokens: frozenset[int]
    stop_strings: list[str]
    stream: bool
    include_usage: bool = False
    model: str = ""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


class ServerState:
    """Everything the HTTP handlers need: the engine, the text side and the limits."""

    def __init__(self, engine: Engine, text: TextSide, *, model_id: str, context_limit: int | None = None,
                 backend_name: str = ""):
        self.engine = engine
        self.text = text
        self.model_id = model_id
        cfg = engine.backend.config
        limit = cfg.max_position_embeddings if context_limit is None else int(context_limit)
        if not 1 <= limit <= cfg.max_position_embeddings:
            raise ValueError(f"the context limit must lie in [1, {cfg.max_position_embeddings}] "
                             f"(max_position_embeddings), got {context_limit}")
        self.context_limit = limit
        self.backend_name = backend_name or getattr(engine.backend, "name", "")
        self.created = int(time.time())

    # -- shared field checks ---------------------------------------------------------------
    def _common(self, body: dict, kind: str, prompts: list[list[int]]) -> Plan:
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                           "invalid_request_error", "model", "model_not_found")
        for name in ("n", "best_of"):
            v = body.get(name)
            if v is not None and v != 1:
                raise bad_request(f"{name}={v!r} is not supported (only 1)", name)
        if body.get("echo"):
            raise bad_request("echo is not supported", "echo")
        if body.get("suffix"):
            raise bad_request("suffix is not supported", "suffix")
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
            raise bad_request("logprobs are not supported", "logprobs")
        if body.get("logit_bias"):
            raise bad_request("logit_bias is not supported", "logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            v = body.get(name)
            if v is not None and (not _is_num(v) or float(v) != 0.0):
                raise bad_request(f"{name} is not supported (only 0)", name)
        temperature = body.get("temperature")
        if temperature is None:
            temperature = 1.0
        if not _is_num(temperature) or temperature < 0:
            raise bad_request(f"temperature must be a number >= 0, got {temperature!r}", "temperature")
        top_p = body.get("top_p")
        if top_p is None:
            top_p = 1.0
        if not _is_num(top_p) or not 0 < top_p <= 1:
            raise bad_request(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        top_k = body.get("top_k")
        if top_k is None or top_k == -1:
            top_k = 0
        if not _is_int(top_k) or top_k < 0:
            raise bad_request(f"top_k must be an integer >= 0 (0 or -1: off), got {top_k!r}", "top_k")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**63 - 2**16):
            raise bad_request(f"seed must be a 64-bit integer, got {seed!r}", "seed")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
        so = body.get("stream_options")
        include_usage = False
        if so is not None:
            if not isinstance(so, dict):
                raise bad_request("stream_options must be an object", "stream_options")
            include_usage = bool(so.get("include_usage", False))
        # stop strings (OpenAI) and stop token ids (extension, as vLLM)
        stop = body.get("stop")
        if stop is None:
            stop_strings = []
        elif isinstance(stop, str):
            stop_strings = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
            stop_strings = list(stop)
        else:
            raise bad_request("stop must be a string or a list of at most 16 strings", "stop")
        if stop_strings and self.text.tokenizer is None:
            raise bad_request("stop strings need a tokenizer and this model has none; use stop_token_ids", "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < self.text.vocab_size for t in stop_ids):
            raise bad_request(f"stop_token_ids must be a list of token ids in [0, {self.text.vocab_size})",
                              "stop_token_ids")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad_request("ignore_eos must be true or false", "ignore_eos")
        stops = frozenset(int(t) for t in stop_ids) | (frozenset() if ignore_eos else frozenset(self.text.eos))
        # max_tokens and the context limit
        longest = max(len(p) for p in prompts)
        param = "max_tokens"
        max_tokens = body.get("max_tokens")
        if kind == "chat" and body.get("max_completion_tokens") is not None:
            max_tokens, param = body["max_completion_tokens"], "max_completion_tokens"
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_TOKENS if kind == "completion" else self.context_limit - longest
            max_tokens = max(1, min(max_tokens, self.context_limit - longest))
        elif not _is_int(max_tokens) or max_tokens < 1:
            raise bad_request(f"{param} must be an integer >= 1, got {max_tokens!r}", param)
        if longest + max_tokens > self.context_limit:
            raise bad_request(f"This model's maximum context length is {self.context_limit} tokens. However, you "
                              f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in "
                              "the completion). Please reduce the prompt or the completion length.",
                              param if longest < self.context_limit else
                              ("messages" if kind == "chat" else "prompt"), "context_length_exceeded")
        try:
            params = SamplingParams(float(temperature), int(top_k), float(top_p))
        except ValueError as e:
            raise bad_request(str(e)) from None
        return Plan(kind, prompts, int(max_tokens), params, None if seed is None else int(seed), stops,
                    stop_strings, stream, include_usage, self.model_id)

    def _check_ids(self, ids: list, param: str) -> list[int]:
        if not ids:
            raise bad_request("the prompt is empty (it needs at least one token)", param)
        v = self.text.vocab_size
        for i, t in enumerate(ids):
            if not _is_int(t) or not 0 <= t < v:
                raise bad_request(f"{param}: token {i} is {t!r}; token ids are integers in [0, {v})", param)
        return [int(t) for t in ids]

    def plan_completion(self, body: dict) -> Plan:
        if "prompt" not in body or body["prompt"] is None:
            raise bad_request("prompt is required (text, a list of token ids, or a list of either)", "prompt")
        p = body["prompt"]
        if isinstance(p, str):
            prompts = [self._check_ids(self.text.encode(p, "prompt"), "prompt")]
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            prompts = [self._check_ids(p, "prompt")]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            prompts = [self._check_ids(self.text.encode(x, "prompt"), "prompt") for x in p]
        elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
            prompts = [self._check_ids(x, "prompt") for x in p]
        else:
            raise bad_request("prompt must be a string, a list of token ids, a list of strings or a list of "
                              "token id lists (non-empty)", "prompt")
        return self._common(body, "completion", prompts)

    def plan_chat(self, body: dict) -> Plan:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a role", f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise bad_request(f"messages[{i}].content: only text parts are supported",
                                          f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                                  f"messages[{i}].content")
            clean.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
        ids = self._check_ids(self.text.render_chat(clean), "messages")
        return self._common(body, "chat", [ids])

    def requests(self, plan: Plan) -> list[Request]:
        seed = plan.seed
        if seed is None and not plan.params.greedy:
            seed = secrets.randbits(62)
        return [Request(ids, plan.max_tokens, plan.params, plan.stop_tokens, None if seed is None else seed + i)
                for i, ids in enumerate(plan.prompts)]


# ============================================================================ one HTTP request's job
class JobFailed(Exception):
    pass


class Job:
    """The requests of one HTTP request (one per prompt) and the asyncio queue their events
    arrive on (loop.call_soon_threadsafe from the scheduler thread)."""

    def __init__(self, state: ServerState, plan: Plan):
        self.state, self.plan = state, plan
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [ChoiceText(state.text.tokenizer, plan.stop_strings) for _ in plan.prompts]
        self.id = ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.rids = state.engine.submit(state.requests(plan), self._deliver,
                                        prompt_tokens=sum(len(p) for p in plan.prompts))
        self.open = set(range(len(self.rids)))

    def _deliver(self, index: int, event: TokenEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def close(self) -> None:
        """Cancel whatever is still running (client gone, stop string, error)."""
        if self.open:
            self.state.engine.cancel([self.rids[i] for i in self.open])
            self.open.clear()

    async def updates(self, request=None):
        """Yields (index, text piece, token, finish_reason or None) per token until every choice
        has finished; raises JobFailed on an ERROR event. With `request` (non-streamed), a watcher
        polls for a client that has gone; then the requests are cancelled and this returns."""
        watcher = None
        if request is not None:
            async def watch():
                while True:
                    await asyncio.sleep(0.25)
                    if await request.is_disconnected():
                        self.queue.put_nowait((None, None))
                        return

            watcher = asyncio.ensure_future(watch())
        try:
            while self.open:
                index, ev = await self.queue.get()
                if index is None:  # the client has gone
                    return
                if index not in self.open:
                    continue  # finished by a stop string: later tokens are dropped
                choice = self.choices[index]
                if ev.finish_reason == ERROR:
                    self.open.discard(index)
                    raise JobFailed(ev.error or "generation failed")
                piece, stopped = choice.push(ev.token)
                finish = STOP if stopped else ev.finish_reason
                if finish is not None:
                    choice.finish_reason = finish
                    self.open.discard(index)
                    if stopped:
                        self.state.engine.cancel([self.rids[index]], outcome=STOP)
                    piece += choice.finish()
                yield index, piece, ev.token, finish
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()

    def usage(self) -> dict:
        p = sum(len(x) for x in self.plan.prompts)
        c = sum(len(ch.ids) for ch in self.choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # -- bodies ----------------------------------------------------------------------------
    def full_body(self) -> dict:
        if self.plan.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": ch.text},
                        "finish_reason": ch.finish_reason or LENGTH, "logprobs": None, "token_ids": ch.ids}
                       for i, ch in enumerate(self.choices)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": ch.text, "finish_reason": ch.finish_reason or LENGTH, "logprobs": None,
                        "token_ids": ch.ids} for i, ch in enumerate(self.choices)]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model,
                "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self):
        """The SSE stream: a chunk per token (text may be empty while a character or a possible
        stop string is incomplete), the finish reason on each choice's last chunk, the usage chunk
        when asked, then [DONE]. An error mid-stream is sent as {"error": {...}}."""
        chat = self.plan.kind == "chat"
        try:
            if chat:
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                   "logprobs": None} for i in range(len(self.choices))])
            async for index, piece, token, finish in self.updates():
                if chat:
                    c = {"index": index, "delta": {"content": piece} if piece or finish is None else {},
                         "finish_reason": finish, "logprobs": None, "token_ids": [token]}
                else:
                    c = {"index": index, "text": piece, "finish_reason": finish, "logprobs": None,
                         "token_ids": [token]}
                yield self.chunk([c])
            if self.plan.include_usage:
                yield self.chunk([], self.usage())
            yield "data: [DONE]\n\n"
        except JobFailed as e:
            err = APIError(500, f"generation failed: {e}", "server_error", None, "generation_failed")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"


# ============================================================================ the app
def create_app(state: ServerState, *, start_engine: bool = True):
    """The FastAPI app. The engine thread starts with the app (lifespan) and stops after the
    server has drained (uvicorn waits for in-flight responses before the lifespan ends)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            state.engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.engine.stop)

    app = FastAPI(title="hatrt", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.hatrt = state

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind, None, None))

    @app.exception_handler(Exception)
    async def _any_error(request, exc):
        LOG.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    async def json_body(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    class SSEResponse(StreamingResponse):
        def __init__(self, job: Job):
            super().__init__(job.sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.close()  # a client that went away: cancel its rows

    async def run(request, plan: Plan):
        try:
            job = Job(state, plan)
        except ValueError as e:  # the scheduler's own checks
            raise bad_request(str(e)) from None
        if plan.stream:
            return SSEResponse(job)
        try:
            async for _ in job.updates(request):
                pass
        except JobFailed as e:
            raise APIError(500, f"generation failed: {e}", "server_error", None, "generation_failed") from None
        if job.open or any(ch.finish_reason is None for ch in job.choices):  # client gone
            return Response(status_code=499)
        return JSONResponse(job.full_body())

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await run(request, state.plan_completion(await json_body(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await run(request, state.plan_chat(await json_body(request)))

    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "hatrt",
                "max_model_len": state.context_limit, "backend": state.backend_name,
                "chat_template": state.text.chat_template is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        e = state.engine
        ok = e.alive and not e.draining
        body = {"status": "ok" if ok else ("draining" if e.draining else "down"), "model": state.model_id,
                "backend": state.backend_name, "active": e.active, "running": e.scheduler.batch_size,
                "queued": e.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        data, ctype = state.engine.metrics.render()
        return Response(data, media_type=ctype)

    return app


# ============================================================================ building and running
def build_state(source: str, backend: str = "torch", *, max_batch: int = DEFAULT_MAX_BATCH,
                max_queue: int = DEFAULT_MAX_QUEUE, prefill_chunk: int | None = None,
                context_limit: int | None = None, model_id: str | None = None, dtype: str | None = None,
                device: str | None = None, threads: int | None = 1, runtime=None) -> ServerState:
    """Load SOURCE on `backend` (or use `runtime`, a Backend) and wrap it for serving.
    Raises engines.backends.BackendError / ValueError on bad input."""
    from .backends import ONNXRUNTIME, load_backend

    if threads is not None:
        torch.set_num_threads(threads)
    if runtime is None:
        if backend == ONNXRUNTIME and threads is not None:
            runtime = _ort_backend(source, threads, dtype)
        else:
            kwargs = {"dtype": dtype}
            if device is not None:
                kwargs["device"] = device
            runtime = load_backend(source, backend, **kwargs)
    engine = Engine(runtime, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk, threads=threads)
    text = TextSide(source, runtime)
    name = model_id or (Path(str(source)).name if Path(str(source)).exists() else str(source))
    return ServerState(engine, text, model_id=name, context_limit=context_limit, backend_name=runtime.name)


def _ort_backend(source, threads: int, dtype):
    """load_backend(source, "onnxruntime") with the session's intra-op threads set (ONNX Runtime
    takes every core by default, whatever OMP_NUM_THREADS says)."""
    from .backends import OnnxRuntimeBackend, is_export_dir, load_backend

    if not is_export_dir(source) or dtype is not None:
        return load_backend(source, "onnxruntime", dtype=dtype)  # its error messages
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return OnnxRuntimeBackend(source, session_options=so)


def _uvicorn_server(app, host: str, port: int, log_level: str = "info", drain_timeout: float | None = None):
    import uvicorn

    state: ServerState = app.state.hatrt

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # stop admitting (503), let uvicorn finish the in-flight responses, then exit 0
            state.engine.start_drain()
            if sig == signal.SIGTERM and not self.should_exit:
                LOG.info("SIGTERM: draining %d active request(s), then exiting", state.engine.active)
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout, access_log=log_level == "debug")
    return Server(config)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          drain_timeout: float | None = None) -> None:
    """Run the server in this (main) thread until SIGINT/SIGTERM; SIGTERM drains, then returns."""
    server = _uvicorn_server(create_app(state), host, port, log_level, drain_timeout)
    server.run()


class ServerThread:
    """uvicorn in a background thread on 127.0.0.1 and a free port (tests, notebooks).

        with ServerThread(state) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    """

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.state = state
        self.app = create_app(state)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _uvicorn_server(self.app, host, self.port, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="hatrt-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["APIError", "ChoiceText", "Engine", "Job", "Metrics", "Plan", "ServerState", "ServerThread", "TextSide",
           "build_state", "create_app", "load_chat_template", "serve"]
