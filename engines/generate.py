"""One generate loop for every backend (engines/backends.py), the CLI and the server alike.

`Scheduler` does continuous batching: each request's prompt is prefilled alone in chunks (batch 1:
prompts of different lengths need no padding), one chunk per iteration while other rows decode,
and its cache is merged into the batch cache (KVCache.merge); the batch decodes one token per row
per step, every row at its own position; a row that ends (a stop token, max_new_tokens, or a
cancel) leaves the batch (KVCache.select). Stop tokens default to the model's EOS (config.json)
when the caller passes none. `stream` / `generate` submit a list of prompts and run it to the end.

Sampling: greedy (argmax, lowest id on ties) when temperature == 0; otherwise logits / temperature,
then top-k, then top-p (nucleus: the smallest set of most likely tokens whose probability reaches
top_p), then a draw. Each request draws from its own torch.Generator (prompt r of `stream` with
seed + r), so a seeded run is reproducible and a row's draws do not depend on the other rows.

    results = generate(backend, [[1, 2, 3], [4, 5]], max_new_tokens=16)
    for event in stream(backend, prompts, max_new_tokens=16):   # TokenEvent(row, token, index, finish_reason)
        ...
    scheduler = Scheduler(backend, max_batch=16); rid = scheduler.submit(Request(ids, 32)); scheduler.step()
"""

from __future__ import annotations

import numbers
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .backends import DEFAULT_PREFILL_CHUNK, Backend
from .cache_ops import KVCache

STOP, LENGTH = "stop", "length"
ERROR = "error"  # Scheduler(isolate_errors=True): the request failed; TokenEvent.error says why


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: prompt row, token id, its index among the row's new tokens, and the
    finish reason when it is the row's last token (else None). With Scheduler(isolate_errors=True)
    a failed request ends with finish_reason ERROR, token -1 and the exception text in `error`."""

    row: int
    token: int
    index: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens; a stop token that ended the row is included
    finish_reason: str  # "stop" | "length"
    prompt_length: int


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits [B, V] (fp32); removed tokens get -inf."""
    x = logits.float() / params.temperature
    v = x.shape[-1]
    if 0 < params.top_k < v:
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(params.top_k, dim=-1).indices, True)
        x = x.masked_fill(~keep, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Next token per row of logits [B, V] -> int64 [B]; generators: one per row (sampling only)."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"sample: {len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _check_prompts(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    config = backend.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token id lists")
    out = []
    for r, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        elif hasattr(prompt, "tolist"):  # numpy arrays
            prompt = prompt.reshape(-1).tolist()
        ids = list(prompt)
        if not ids:
            raise ValueError(f"prompt {r} is empty (prefill needs at least one token)")
        for i, t in enumerate(ids):
            # numbers.Integral: Python and numpy integers alike
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < config.vocab_size:
                raise ValueError(f"prompt {r}: token {i} is {t!r}; ids must be integers in [0, {config.vocab_size})")
        last = len(ids) + max_new_tokens - 1  # positions fed: 0 .. len + max_new_tokens - 2
        if last > config.max_position_embeddings:
            raise ValueError(f"prompt {r}: {len(ids)} tokens + max_new_tokens={max_new_tokens} exceed "
                             f"max_position_embeddings={config.max_position_embeddings}")
        out.append([int(t) for t in ids])
    return out


def default_stop_tokens(backend: Backend) -> list[int]:
    """The model's EOS token ids (config.json / generation_config.json), if it names any."""
    return list(backend.config.eos_token_id or ())


def stream(backend: Backend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, stop_tokens: Iterable[int] | None = None, seed: int | None = None,
           prefill_chunk: int | None = None, max_batch: int | None = None) -> Iterator[TokenEvent]:
    """Generate, yielding each token as it is produced: a prompt's first token when its prefill
    ends, then per decode step the rows still running, in prompt order. Arguments are checked
    here, before the first token is asked for; bad ones raise ValueError.
    stop_tokens None: the model's EOS; () generates to max_new_tokens. Prompt r samples with seed + r."""
    prompts = _check_prompts(backend, prompts, max_new_tokens)
    params = SamplingParams(float(temperature), top_k, float(top_p))
    stops = frozenset(default_stop_tokens(backend) if stop_tokens is None else (int(t) for t in stop_tokens))
    if seed is None and not params.greedy:
        seed = random.SystemRandom().randrange(2**62)
    scheduler = Scheduler(backend, max_batch=max_batch, prefill_chunk=prefill_chunk)
    if max_new_tokens == 0:  # nothing to generate: no prefill either
        return iter(())
    for r, ids in enumerate(prompts):
        scheduler.submit(Request(ids, max_new_tokens, params, stops, None if seed is None else seed + r), rid=r)
    return scheduler.run()


# ============================================================================ the loop
@dataclass(frozen=True)
class Request:
    """One sequence to generate: prompt ids, limits, sampling and the seed of its own generator."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    stop_tokens: frozenset[int] = frozenset()
    seed: int | None = None


@dataclass
class _Seq:
    rid: Any
    request: Request
    generator: torch.Generator | None
    cache: KVCache | None = None  # own cache while its prompt is prefilled
    fed: int = 0  # prompt tokens prefilled so far
    count: int = 0  # tokens generated
    last: int = -1  # the token to feed next


class Scheduler:
    """Continuous batching over one Backend: the one decode loop of hatrt (CLI and server).

    Requests join the running batch between decode steps: a waiting request is prefilled alone
    in chunks of `prefill_chunk` tokens, ONE chunk per iteration while other rows are decoding (a
    long prompt stalls running streams by at most one chunk), and its cache is merged into the
    batch cache (KVCache.merge) when its prompt is done. Rows leave when they finish or are
    cancelled (KVCache.select). At most `max_batch` sequences are admitted at a time (None: all).

    `submit` and `cancel` may be called from any thread; `step` (one iteration: at most one
    prefill chunk, then one decode step of the running rows) from one thread at a time.
    Results do not depend on batching: each row is computed from its own cache and position, and
    each request samples with its own generator.

    isolate_errors (the server): an exception in a prefill chunk or a decode step fails only the
    requests of that step (the prompt being prefilled, or every running row), each with an ERROR
    event, and the scheduler goes on with the others; default: the exception propagates."""

    def __init__(self, backend: Backend, *, max_batch: int | None = None, prefill_chunk: int | None = None,
                 isolate_errors: bool = False):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend, self.max_batch = backend, max_batch
        self.isolate_errors = isolate_errors
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else int(prefill_chunk)
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self._lock = threading.Lock()
        self._inbox: list[_Seq] = []
        self._cancelled: set = set()
        self.waiting: list[_Seq] = []  # admitted in order; the first one is being prefilled
        self.running: list[_Seq] = []  # rows of self.cache, in order
        self.cache: KVCache | None = None
        self._next_id = 0

    # -- any thread --------------------------------------------------------------------------
    def submit(self, request: Request, rid: Any = None) -> Any:
        """Queue a request (checked here; ValueError if bad). Returns its id (events carry it as `row`)."""
        _check_prompts(self.backend, [request.prompt], request.max_new_tokens)
        if request.max_new_tokens < 1:
            raise ValueError("a request must ask for at least one new token (max_new_tokens >= 1)")
        gen = None if request.params.greedy else torch.Generator().manual_seed(
            request.seed if request.seed is not None else random.SystemRandom().randrange(2**62))
        with self._lock:
            if rid is None:
                rid, self._next_id = self._next_id, self._next_id + 1
            self._inbox.append(_Seq(rid, request, gen))
        return rid

    def cancel(self, rid: Any) -> None:
        """Drop a request wherever it is (its cache rows are freed at the next step)."""
        with self._lock:
            self._cancelled.add(rid)

    @property
    def pending(self) -> int:
        """Requests not finished: queued, being prefilled or decoding."""
        with self._lock:
            return len(self._inbox) + len(self.waiting) + len(self.running)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    # -- the loop thread ----------------------------------------------------------------------
    def run(self) -> Iterator[TokenEvent]:
        """Step until every submitted request is done, yielding events as they come."""
        while self.pending:
            yield from self.step()

    def step(self) -> list[TokenEvent]:
        """One iteration: take new and cancelled requests in, feed one prefill chunk (if a prompt
        is waiting), then one decode step of the running rows. Returns the tokens produced."""
        with self._lock:
            self.waiting += self._inbox
            self._inbox = []
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self.waiting = [s for s in self.waiting if s.rid not in cancelled]
            self._drop([i for i, s in enumerate(self.running) if s.rid in cancelled])
        events: list[TokenEvent] = []
        if self.waiting and (self.max_batch is None or len(self.running) < self.max_batch):
            seq = self.waiting[0]
            try:
                events += self._prefill_chunk(seq)
            except Exception as e:
                if not self.isolate_errors:
                    raise
                self.waiting = [s for s in self.waiting if s is not seq]
                self.running = [s for s in self.running if s is not seq]  # (merge failed: not in the cache)
                seq.cache = None
                events.append(self._failed(seq, e))
        if self.running:
            try:
                events += self._decode()
            except Exception as e:
                if not self.isolate_errors:
                    raise
                events += [self._failed(s, e) for s in self.running]  # the batch cache may be half-updated
                self.running, self.cache = [], None
        return events

    @staticmethod
    def _failed(seq: _Seq, exc: Exception) -> TokenEvent:
        return TokenEvent(seq.rid, -1, seq.count, ERROR, f"{type(exc).__name__}: {exc}")

    def _prefill_chunk(self, seq: _Seq) -> list[TokenEvent]:
        prompt = seq.request.prompt
        if seq.cache is None:
            seq.cache = self.backend.new_cache(1)
        part = prompt[seq.fed:seq.fed + self.prefill_chunk]
        logits = self.backend.step(torch.tensor([part], dtype=torch.long), seq.cache)
        seq.fed += len(part)
        if seq.fed < len(prompt):
            return []
        self.waiting.pop(0)
        event = self._emit([seq], logits)[0]
        if event.finish_reason is None:  # join the running batch
            self.cache = seq.cache if self.cache is None else KVCache.merge([self.cache, seq.cache])
            self.running.append(seq)
        seq.cache = None
        return [event]

    def _decode(self) -> list[TokenEvent]:
        ids = torch.tensor([[s.last] for s in self.running], dtype=torch.long)
        logits = self.backend.decode(ids, self.cache)
        events = self._emit(self.running, logits)
        self._drop([i for i, e in enumerate(events) if e.finish_reason is not None])
        return events

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> list[TokenEvent]:
        """Sample the next token of each row; events with the finish reason where a row ends."""
        rows = logits[:, -1].float().cpu()
        greedy = rows.argmax(-1).tolist()
        events = []
        for i, seq in enumerate(seqs):
            req = seq.request
            t = greedy[i] if req.params.greedy else int(sample(rows[i:i + 1], req.params, [seq.generator])[0])
            seq.count += 1
            seq.last = t
            reason = STOP if t in req.stop_tokens else LENGTH if seq.count >= req.max_new_tokens else None
            events.append(TokenEvent(seq.rid, t, seq.count - 1, reason))
        return events

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        self.cache = self.cache.select(keep) if keep and self.cache is not None else None


def generate(backend: Backend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Iterable[int] | None = None, seed: int | None = None,
             prefill_chunk: int | None = None, max_batch: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
    """Generate up to max_new_tokens for each prompt; on_token(row, token) streams them as made.
    stop_tokens None: the model's EOS; () generates to max_new_tokens."""
    events = stream(backend, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, stop_tokens=stop_tokens, seed=seed, prefill_chunk=prefill_chunk,
                    max_batch=max_batch)
    results = [GenerationResult([], LENGTH, len(p)) for p in _check_prompts(backend, prompts, max_new_tokens)]
    for event in events:
        results[event.row].tokens.append(event.token)
        if event.finish_reason is not None:
            results[event.row].finish_reason = event.finish_reason
        if on_token is not None:
            on_token(event.row, event.token)
    return results


__all__ = ["ERROR", "GenerationResult", "LENGTH", "Request", "STOP", "SamplingParams", "Scheduler", "TokenEvent",
           "default_stop_tokens", "filter_logits", "generate", "sample", "stream"]
