"""Quality per backend: perplexity and bits per byte of a text (`hatrt eval`).

The definition (one rule for every backend, so their numbers are comparable):

1. The text is encoded with SOURCE's tokenizer (engines/text.py): special-token markers written
   in the text (e.g. "<|bos|>") become the special token, and BOS is put in front when the model
   has one and the encoding does not already start with it (`add_bos=False` / `--no-bos`: not).
   Call the result t_0 .. t_{N-1}.
2. Every token after the first is predicted exactly once: nll = -sum_{i=1}^{N-1} ln p(t_i | context).
   With BOS in front, that is every token of the text.
3. Windows of `context` tokens, each run from a fresh cache through `backend.prefill(window,
   all_logits=True)` (chunked by `chunk_size`): window k holds t_{k(C-1)} .. t_{k(C-1)+C-1} and
   predicts all its tokens but its first from the ones before it in the window. Consecutive windows
   share one token (the last input of one is the first of the next), so the predicted tokens are
   split into non-overlapping runs of C-1 and none is predicted twice or left out; the last window
   may be shorter. No token sees more than C-1 tokens of context. With C = seq_len + 1 these are
   the windows of `scripts/train_tiny.py`'s held-out evaluation (which drops the last partial one).
4. tokens = N - 1 (the predicted tokens); bytes = the UTF-8 bytes of the text without the
   special-token markers in it (they carry no content), and without the first token's bytes when
   it is a text token that is not predicted (no BOS in front);
   perplexity = exp(nll / tokens); bits_per_byte = nll / ln(2) / bytes.

    result = evaluate_text(backend, tokenizer, text, context=1024)
    result.to_dict()  # tokens, bytes, nll, perplexity, bits_per_byte, windows, context, ...
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .backends import Backend
from .text import TextTokenizer

DEFAULT_CONTEXT = 1024


class EvalError(ValueError):
    """Bad evaluation input (empty text, a context out of range, ids outside the vocabulary)."""


@dataclass
class EvalResult:
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text scored
    nll: float  # natural-log negative log-likelihood, summed over the predicted tokens
    windows: int
    context: int
    text_tokens: int  # N: the encoded text, BOS included
    bos: bool  # whether BOS was put in front
    backend: str
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    def to_dict(self) -> dict:
        """tokens, bytes, nll, perplexity, bits_per_byte first, then the details."""
        d = {"tokens": self.tokens, "bytes": self.bytes, "nll": self.nll, "perplexity": self.perplexity,
             "bits_per_byte": self.bits_per_byte, "nll_per_token": self.nll_per_token}
        d.update(asdict(self))
        d["tokens_per_second"] = self.tokens / self.seconds if self.seconds > 0 else None
        return d


def window_spans(n: int, context: int) -> list[tuple[int, int]]:
    """[start, end) of the windows over n tokens (see the module docstring, rule 3)."""
    if context < 2:
        raise EvalError(f"context must be >= 2 tokens (one predicts the next), got {context}")
    spans, start = [], 0
    while start < n - 1:
        end = min(start + context, n)
        spans.append((start, end))
        start = end - 1
    return spans


def check_context(backend: Backend, context: int) -> None:
    max_pos = backend.config.max_position_embeddings
    if context < 2:
        raise EvalError(f"context must be >= 2 tokens (one predicts the next), got {context}")
    if context > max_pos:
        raise EvalError(f"context {context} exceeds the model's max_position_embeddings={max_pos}")


@torch.no_grad()
def score_ids(backend: Backend, ids: Sequence[int], context: int = DEFAULT_CONTEXT, *, chunk_size: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> tuple[float, int, int]:
    """(nll summed in nats, tokens predicted, windows) of a token sequence (rules 2 and 3).
    progress(tokens fed, total tokens to feed)."""
    check_context(backend, context)
    ids = [int(t) for t in ids]
    vocab = backend.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise EvalError(f"token ids {bad[:8]} lie outside the model's vocabulary [0, {vocab}): the tokenizer does "
                        "not belong to this model")
    spans = window_spans(len(ids), context)
    if not spans:
        raise EvalError(f"{len(ids)} token(s): nothing to predict (a text needs at least 2 tokens, BOS included)")
    total = sum(e - s for s, e in spans)
    done = 0
    nll = 0.0
    seq = torch.tensor(ids, dtype=torch.long)
    for s, e in spans:
        window = seq[s:e]
        report = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
        logits, _ = backend.prefill(window.view(1, -1), chunk_size=chunk_size, all_logits=True, progress=report)
        nll += float(F.cross_entropy(logits[0, :-1].float().cpu(), window[1:], reduction="sum").double())
        done += e - s
    return nll, len(ids) - 1, len(spans)


def encode_for_eval(tokenizer: TextTokenizer, text: str, add_bos: bool = True) -> tuple[list[int], int, bool]:
    """(ids, bytes scored, whether BOS was put in front) of `text` (rules 1 and 4)."""
    raw = tokenizer.tokenizer.encode(text)
    ids = list(raw.ids)
    inserted = add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id)
    specials = tokenizer.special_tokens
    nbytes = len(text.encode("utf-8")) - sum(len(specials[i].encode("utf-8")) for i in ids if i in specials)
    if inserted:
        ids.insert(0, tokenizer.bos_id)
    elif ids and ids[0] not in specials:  # the first text token is not predicted: its bytes are not scored
        a, b = raw.offsets[0]
        nbytes -= len(text[a:b].encode("utf-8"))
    return ids, nbytes, inserted


def evaluate_text(backend: Backend, tokenizer: TextTokenizer, text: str, *, context: int = DEFAULT_CONTEXT,
                  chunk_size: int | None = None, add_bos: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity and bits per byte of `text` on `backend` (see the module docstring)."""
    check_context(backend, context)
    if not text:
        raise EvalError("the text is empty")
    ids, nbytes, inserted = encode_for_eval(tokenizer, text, add_bos)
    if len(ids) < 2:
        raise EvalError(f"the text encodes to {len(ids)} token(s): nothing to predict (it needs at least 2 tokens, "
                        "BOS included)")
    if nbytes <= 0:
        raise EvalError("the text scored holds no bytes (only special-token markers)")
    t0 = time.perf_counter()
    nll, tokens, windows = score_ids(backend, ids, context, chunk_size=chunk_size, progress=progress)
    return EvalResult(tokens=tokens, bytes=nbytes, nll=nll, windows=windows, context=context, text_tokens=len(ids),
                      bos=inserted, backend=backend.name, seconds=time.perf_counter() - t0)


__all__ = ["DEFAULT_CONTEXT", "EvalError", "EvalResult", "check_context", "encode_for_eval", "evaluate_text",
           "score_ids", "window_spans"]
