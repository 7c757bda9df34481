"""One generate loop for every backend (engines/backends.py).

Each prompt is prefilled alone in chunks (batch 1: prompts of different lengths need no padding;
`Backend.prefill`), the caches are merged (KVCache.merge) and then decoded together, one token per
sequence per step, every row at its own position. A row that ends (a stop token, or
max_new_tokens) leaves the batch (KVCache.select). Stop tokens default to the model's EOS
(config.json / generation_config.json) when the caller passes none.

Sampling: greedy (argmax, lowest id on ties) when temperature == 0; otherwise logits / temperature,
then top-k, then top-p (nucleus: the smallest set of most likely tokens whose probability reaches
top_p), then a draw. Each prompt row r draws from its own torch.Generator seeded with seed + r, so
a seeded run is reproducible and a row's draws do not depend on when other rows finish.

    results = generate(backend, [[1, 2, 3], [4, 5]], max_new_tokens=16)
    for event in stream(backend, prompts, max_new_tokens=16):   # TokenEvent(row, token, index, finish_reason)
        ...
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .backends import Backend
from .cache_ops import KVCache

STOP, LENGTH = "stop", "length"


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
    finish reason when it is the row's last token (else None)."""

    row: int
    token: int
    index: int
    finish_reason: str | None = None


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
           prefill_chunk: int | None = None) -> Iterator[TokenEvent]:
    """Generate, yielding each token as it is produced (first tokens in prompt order after each
    prefill, then per decode step the rows still running, in prompt order). Arguments are
    checked here, before the first token is asked for; bad ones raise ValueError.
    stop_tokens None: the model's EOS; () generates to max_new_tokens."""
    prompts = _check_prompts(backend, prompts, max_new_tokens)
    params = SamplingParams(float(temperature), top_k, float(top_p))
    stops = set(default_stop_tokens(backend) if stop_tokens is None else (int(t) for t in stop_tokens))
    return _run(backend, prompts, max_new_tokens, params, stops, seed, prefill_chunk)


def _run(backend: Backend, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, stops: set[int],
         seed: int | None, prefill_chunk: int | None) -> Iterator[TokenEvent]:
    if max_new_tokens == 0:
        return
    if seed is None:
        seed = random.SystemRandom().randrange(2**62)
    gens = None if params.greedy else [torch.Generator().manual_seed(seed + r) for r in range(len(prompts))]
    counts = [0] * len(prompts)

    def emit(rows: list[int], logits: torch.Tensor) -> tuple[list[TokenEvent], list[int]]:
        """Sample a token for each row; return its events and the positions (in `rows`) still running."""
        tokens = sample(logits[:, -1].float().cpu(), params, None if gens is None else [gens[r] for r in rows])
        events, keep = [], []
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):
            counts[r] += 1
            reason = STOP if t in stops else LENGTH if counts[r] >= max_new_tokens else None
            events.append(TokenEvent(r, t, counts[r] - 1, reason))
            if reason is None:
                keep.append(i)
        return events, keep

    caches: list[KVCache] = []
    rows, last = [], []
    for r, ids in enumerate(prompts):
        logits, cache = backend.prefill(torch.tensor([ids], dtype=torch.long), chunk_size=prefill_chunk)
        (event,), keep = emit([r], logits)
        yield event
        if keep:
            caches.append(cache)
            rows.append(r)
            last.append(event.token)
    if not rows:
        return
    cache = KVCache.merge(caches)
    del caches
    while rows:
        logits = backend.decode(torch.tensor(last, dtype=torch.long).view(-1, 1), cache)
        events, keep = emit(rows, logits)
        yield from events
        if len(keep) < len(rows):
            if keep:
                cache = cache.select(keep)
            rows = [rows[i] for i in keep]
        last = [events[i].token for i in keep]


def generate(backend: Backend, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Iterable[int] | None = None, seed: int | None = None,
             prefill_chunk: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
    """Generate up to max_new_tokens for each prompt; on_token(row, token) streams them as made.
    stop_tokens None: the model's EOS; () generates to max_new_tokens."""
    events = stream(backend, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, stop_tokens=stop_tokens, seed=seed, prefill_chunk=prefill_chunk)
    results = [GenerationResult([], LENGTH, len(p)) for p in _check_prompts(backend, prompts, max_new_tokens)]
    for event in events:
        results[event.row].tokens.append(event.token)
        if event.finish_reason is not None:
            results[event.row].finish_reason = event.finish_reason
        if on_token is not None:
            on_token(event.row, event.token)
    return results


__all__ = ["GenerationResult", "LENGTH", "STOP", "SamplingParams", "TokenEvent", "default_stop_tokens",
           "filter_logits", "generate", "sample", "stream"]
