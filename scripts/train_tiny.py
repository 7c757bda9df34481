#!/usr/bin/env python3
"""Train a tiny DeepSeek-V4-style model (the hatrt reference itself) on the Python stdlib, on CPU.

The model is `exporter.model.Transformer` with every structural feature switched on: a window-only
layer, two CSA layers (overlapped ratio-4 compressor + lightning indexer top-k), an HCA layer
(ratio 128), attention sink, MoE with a hash-routed first layer and biased top-k routing after it,
mHC (4 streams, Sinkhorn) and YaRN on the compressed layers.

Data: the `.py` files of the running interpreter's standard library (see `stdlib_files`), split
deterministically by path (`is_held_out`). Tokenizer: byte-level BPE (Hugging Face `tokenizers`),
4096 entries, trained on the training split only.

Training-only additions (monkeypatches, installed by `install_training_hooks`; the exported /
inference model is unchanged):
- the lightning indexer is trained with an auxiliary KL loss toward the main attention's
  distribution over the compressed entries (DeepSeek-V3.2 style): the indexer's inputs are
  detached, so it learns only from that loss and the language-model loss trains everything else;
- the routing bias of the non-hash MoE layers (which gets no gradient through top-k) is updated by
  DeepSeek-V3's auxiliary-loss-free rule: bias += gamma * sign(mean load - expert load).

Usage (the shipped run; see docs/training.md):

    OMP_NUM_THREADS=1 python scripts/train_tiny.py --out models/tiny-stdlib --time-budget 3900

    python scripts/train_tiny.py --timing            # time a few steps of several shapes
    python scripts/train_tiny.py --verify models/tiny-stdlib   # reload / tokenizer checks only

`held_out_text()` and `held_out_bytes()` rebuild the held-out evaluation text without torch.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
             "RAYON_RS_NUM_CPUS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# ============================================================================ data (no torch)
# The corpus and its split live in the package (engines/corpus.py), shared with evaluation and FP8
# calibration; re-exported here for the functions below and for `scripts.train_tiny` users.
sys.path.insert(0, str(REPO))
from engines.corpus import (  # noqa: E402,F401  (held_out_text/held_out_bytes/stdlib_root: re-exported)
    BOS, EOS, documents, held_out_bytes, held_out_text, stdlib_root,
)

SPECIAL_TOKENS = [BOS, EOS]
VOCAB_SIZE = 4096


# ============================================================================ tokenizer
def train_tokenizer(train_docs: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    return tok


def write_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos, "eos_token_id": eos, "max_length": model_max_length}, indent=2) + "\n")


# ============================================================================ model config
def model_config():
    from exporter.config import CSA, HCA, WINDOW, ModelConfig, Yarn

    extra = {}
    if "bos_token_id" in ModelConfig.__dataclass_fields__:  # newer exporter.config keeps the ids
        extra = dict(bos_token_id=0, eos_token_id=(1,))  # <|bos|>, <|eos|> (asserted in save_model)
    return ModelConfig(
        **extra, name="tiny-stdlib", vocab_size=VOCAB_SIZE, hidden_size=128, num_layers=4, num_heads=4,
        head_dim=80, rope_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64,
        compress_ratios=(WINDOW, CSA, HCA, CSA), window=64,
        index_n_heads=8, index_head_dim=32, index_topk=16,
        yarn=Yarn(factor=16.0, original_max_position_embeddings=4096), max_position_embeddings=65536,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
        routed_scaling_factor=1.5, num_hash_layers=1)


# ============================================================================ training hooks
class HookState:
    """Shared state of the training monkeypatches."""

    def __init__(self):
        self.active = False  # collect the indexer KL (training and periodic eval)
        self.dense_indexer = False  # dense warm-up: CSA attends to every visible entry
        self.pending = None  # (index log-probs [B,S,N], visible [B,S,N]) from the indexer of this layer
        self.kl: list = []  # one scalar per CSA layer call
        self.overlap: list = []  # fraction of the target mass inside the selected top-k
        self.expert_counts: dict = {}  # id(gate) -> [E] token counts since the last bias update


HOOKS = HookState()


def install_training_hooks() -> None:
    """Monkeypatch exporter.model.Indexer.forward, exporter.ops.indexer_topk and
    exporter.ops.sparse_attention (eager paths only) and add a forward hook on non-hash gates."""
    import torch

    from exporter import model as M
    from exporter import ops

    if getattr(ops, "_train_tiny_hooks", False):
        return
    orig_topk, orig_attn = ops.indexer_topk, ops.sparse_attention

    def indexer_forward(self, x, cq, q_pos, cos, sin, layer, rotary, quant_sim):
        # As Indexer.forward, with the inputs detached: the indexer learns only from the KL loss.
        if HOOKS.active:
            x, cq = x.detach(), cq.detach()
        layer.index_compressor, layer.index_keys = self.compressor(
            x, q_pos[:, 0], layer.index_compressor, layer.index_keys, rotary, quant_sim)
        q = M.linear(cq, self.wq_b.weight).unflatten(-1, (self.n_heads, self.head_dim))
        q = M.apply_rope(q, cos, sin)
        if quant_sim:
            q = M.fake_quant_fp4(M.hadamard(q))
        w = M.linear(x, self.weights_proj.weight).float() * self.weight_scale
        return M.attention_ops().indexer_topk(q, w, layer.index_keys, q_pos, ratio=M.CSA, topk=self.topk,
                                              bf16_scores=quant_sim)

    def indexer_topk(q, weights, keys, q_pos, *, ratio, topk, bf16_scores=False):
        if not HOOKS.active:
            return orig_topk(q, weights, keys, q_pos, ratio=ratio, topk=topk, bf16_scores=bf16_scores)
        scores = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu()
        scores = (scores * weights.float().unsqueeze(-1)).sum(dim=2)  # [B, S, N], with gradient
        n = keys.shape[1]
        visible = torch.arange(n, device=keys.device) < ((q_pos + 1) // ratio).unsqueeze(-1)
        # a finite fill keeps rows with no visible entry NaN-free (they are left out of the loss)
        HOOKS.pending = (scores.masked_fill(~visible, -1e30).log_softmax(-1), visible)
        if HOOKS.dense_indexer:
            return ops.causal_entry_indices(q_pos, n, ratio)
        with torch.no_grad():
            return orig_topk(q.detach(), weights.detach(), keys.detach(), q_pos, ratio=ratio, topk=topk,
                             bf16_scores=bf16_scores)

    def sparse_attention(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, *, window, scale):
        if HOOKS.pending is not None:
            logq, visible = HOOKS.pending
            HOOKS.pending = None
            with torch.no_grad():  # the target: main attention mass per entry if all were visible
                qf = q.detach().float()
                dist = q_pos.unsqueeze(-1) - window_pos.unsqueeze(1)
                in_window = (window_pos.unsqueeze(1) >= 0) & (dist >= 0) & (dist < window)
                lw = torch.einsum("bshd,bld->bshl", qf, window_kv.detach().float()) * scale
                lw = lw.masked_fill(~in_window.unsqueeze(2), float("-inf"))
                le = torch.einsum("bshd,bnd->bshn", qf, entries.detach().float()) * scale
                le = le.masked_fill(~visible.unsqueeze(2), float("-inf"))
                sink_l = sink.detach().float().view(1, 1, -1, 1).expand(*lw.shape[:3], 1)
                logz = torch.cat([lw, le, sink_l], -1).logsumexp(-1, keepdim=True)
                p = (le - logz).exp().sum(2)  # [B, S, N]: summed over heads
                rows = visible.any(-1)  # queries with at least one visible entry
                p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
                sel = torch.zeros_like(p).scatter_(-1, entry_idx.clamp(min=0), (entry_idx >= 0).float())
                HOOKS.overlap.append(((p * sel).sum(-1)[rows]).mean())
            kl = (torch.xlogy(p, p) - p * logq.masked_fill(~visible, 0.0)).sum(-1)
            HOOKS.kl.append(kl[rows].mean() if rows.any() else kl.sum() * 0)
        return orig_attn(q, q_pos, window_kv, window_pos, entries, entry_idx, sink, window=window, scale=scale)

    M.Indexer.forward = indexer_forward
    ops.indexer_topk = indexer_topk
    ops.sparse_attention = sparse_attention
    ops._train_tiny_hooks = True


def add_gate_hooks(model) -> list:
    """Count the tokens routed to each expert of every non-hash gate (for the bias update)."""
    import torch

    from exporter.model import Gate

    gates = [m for m in model.modules() if isinstance(m, Gate) and m.bias is not None]
    for g in gates:
        def hook(mod, args, out):
            if HOOKS.active:
                idx = out[1]
                c = torch.bincount(idx.flatten(), minlength=mod.weight.shape[0]).float()
                HOOKS.expert_counts[id(mod)] = HOOKS.expert_counts.get(id(mod), 0) + c
        g.register_forward_hook(hook)
    return gates


def update_gate_bias(gates, gamma: float) -> float:
    """DeepSeek-V3 aux-loss-free balancing; returns the worst max/mean load ratio seen."""
    import torch

    worst = 1.0
    with torch.no_grad():
        for g in gates:
            c = HOOKS.expert_counts.pop(id(g), None)
            if c is None:
                continue
            worst = max(worst, float(c.max() / c.mean().clamp(min=1e-9)))
            g.bias.add_(gamma * torch.sign(c.mean() - c))
    return worst


# ============================================================================ training
def sequence_loss(model, ids, chunk: int):
    """Mean next-token cross-entropy of ids [B, L+1], fed as chunked prefill (one cache)."""
    import torch.nn.functional as F

    inputs, targets = ids[:, :-1], ids[:, 1:]
    cache = model.new_cache(ids.shape[0])
    total = 0.0
    for i in range(0, inputs.shape[1], chunk):
        logits = model(inputs[:, i:i + chunk], cache)
        total = total + F.cross_entropy(logits.flatten(0, 1), targets[:, i:i + chunk].flatten(), reduction="sum")
    return total / targets.numel()


def lr_at(progress: float, base: float, warmup: float, final_frac: float) -> float:
    if progress < warmup:
        return base * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() == 2 and not name.split(".")[-1].endswith(("_fn",)) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def eval_windows(stream, seq_len: int):
    """Consecutive non-overlapping windows of the stream: window i is tokens[i*L : i*L + L + 1]."""
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]


def evaluate(model, windows, chunk: int, batch: int):
    """(mean loss in nats per token, tokens, mean indexer KL, mean top-k target mass)."""
    import torch

    tot, ntok, kls, ovs = 0.0, 0, [], []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i:i + batch])
            HOOKS.kl.clear(), HOOKS.overlap.clear()
            loss = sequence_loss(model, ids, chunk)
            tot += float(loss) * ids[:, 1:].numel()
            ntok += ids[:, 1:].numel()
            kls += [float(k) for k in HOOKS.kl]
            ovs += [float(o) for o in HOOKS.overlap]
    HOOKS.kl.clear(), HOOKS.overlap.clear()
    return tot / ntok, ntok, (sum(kls) / len(kls) if kls else float("nan")), \
        (sum(ovs) / len(ovs) if ovs else float("nan"))


def save_model(model, config, tok, out: Path, seq_len: int, meta: dict) -> None:
    from exporter.checkpoint import save_checkpoint

    assert (tok.token_to_id(BOS), tok.token_to_id(EOS)) == (0, 1), "special token ids moved"
    save_checkpoint(model, config, out, overwrite=True)  # replaces the directory atomically
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_tokenizer_files(tok, out, model_max_length=config.max_position_embeddings)
    (out / "training_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)


def binned(records: list, k: int) -> list:
    """Means of consecutive k-step bins (tokens/step/lr: the bin's last)."""
    out = []
    for i in range(0, len(records), k):
        b = records[i:i + k]
        out.append({"step": b[-1]["step"], "tokens": b[-1]["tokens"], "lr": b[-1]["lr"],
                    **{key: round(sum(r[key] for r in b) / len(b), 5)
                       for key in ("loss", "kl", "topk_mass", "gnorm", "imbalance", "dt")}})
    return out


def random_topk_mass(seq_len: int, ratio: int, topk: int) -> float:
    """The top-k mass a random selection would capture, averaged like the metric: over the
    positions with at least one visible entry, E[min(k, N_t) / N_t] with N_t = (t + 1) // ratio."""
    vals = [min(topk, (t + 1) // ratio) / ((t + 1) // ratio) for t in range(seq_len) if (t + 1) // ratio]
    return sum(vals) / len(vals)


def plot_history(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    tr = history["train"]
    if tr:
        toks = [r["tokens"] / 1e6 for r in tr]
        loss = [r["loss"] for r in tr]
        k = max(1, len(loss) // 60)  # light smoothing for readability
        sm = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax[0].plot(toks, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        ax[0].plot(toks, sm, color="tab:blue", lw=1.5, label=f"train ({k}-step mean)")
        ax[1].plot(toks, [r["kl"] for r in tr], color="tab:green", alpha=0.5, lw=0.8, label="indexer KL (train)")
    ev = history["eval"]
    if ev:
        ax[0].plot([r["tokens"] / 1e6 for r in ev], [r["loss"] for r in ev], "o-", color="tab:red",
                   label="held-out (subset)")
        ax2 = ax[1].twinx()
        ax2.plot([r["tokens"] / 1e6 for r in ev], [r["topk_mass"] for r in ev], "s-", color="tab:purple",
                 label="target mass in top-k (held-out)")
        rnd = random_topk_mass(history.get("seq_len", 1024), 4, 16)
        ax2.axhline(rnd, color="tab:purple", ls=":", lw=1, label=f"random selection ({rnd:.3f})")
        ax2.set_ylabel("fraction of target mass in selected top-k")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right", fontsize=8)
    ax[0].set_xlabel("training tokens (M)"), ax[0].set_ylabel("cross-entropy (nats/token)")
    ax[0].set_title("language-model loss"), ax[0].legend(fontsize=8), ax[0].grid(alpha=0.3)
    ax[1].set_xlabel("training tokens (M)"), ax[1].set_ylabel("KL(attention || indexer) (nats)")
    ax[1].set_title("lightning indexer auxiliary loss"), ax[1].legend(loc="upper right", fontsize=8)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare(args):
    """Tokenizer (trained or loaded from the run dir) and the token streams."""
    from tokenizers import Tokenizer

    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    train_docs = documents("train")
    held_docs = documents("held_out")
    tok_path = run / "tokenizer.json"
    if tok_path.exists() and not args.retrain_tokenizer:
        tok = Tokenizer.from_file(str(tok_path))
    else:
        t0 = time.time()
        tok = train_tokenizer([t for _, t in train_docs])
        tok.save(str(tok_path))
        print(f"tokenizer trained in {time.time() - t0:.1f}s", flush=True)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    stream_path = run / "streams.pt"
    import torch

    if stream_path.exists() and not args.retrain_tokenizer:
        streams = torch.load(stream_path)
    else:
        t0 = time.time()
        enc = tok.encode_batch([t for _, t in train_docs])
        train = []
        for e in enc:
            train += [bos] + e.ids + [eos]
        held = tok.encode(held_out_text()).ids  # the documented rule, verbatim
        enc_h = tok.encode_batch([t for _, t in held_docs])
        check = []
        for e in enc_h:
            check += [bos] + e.ids + [eos]
        assert check == held, "held-out text tokenization differs from per-document encoding"
        streams = {"train": torch.tensor(train, dtype=torch.int16 if VOCAB_SIZE < 32768 else torch.int32),
                   "held_out": torch.tensor(held, dtype=torch.int32)}
        torch.save(streams, stream_path)
        print(f"encoded in {time.time() - t0:.1f}s", flush=True)
    info = {
        "python": sys.version.split()[0],
        "stdlib_root": str(stdlib_root()),
        "train_files": len(train_docs), "held_out_files": len(held_docs),
        "train_bytes": sum(len(t.encode()) for _, t in train_docs),
        "held_out_bytes": sum(len(t.encode()) for _, t in held_docs),
        "train_tokens": int(streams["train"].numel()), "held_out_tokens": int(streams["held_out"].numel()),
        "held_out_text_sha256": hashlib.sha256(held_out_text().encode()).hexdigest(),
    }
    return tok, streams, info


def build_model(config, seed: int):
    import torch

    from exporter.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(config)  # quant_sim off: trained in plain fp32 (see docs/training.md)
    model.init_random(seed)
    return model


def train(args) -> None:
    import random

    import torch

    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    tok, streams, data_info = prepare(args)
    print(json.dumps(data_info), flush=True)
    if args.docs:
        try:  # import the plotting stack once, up front
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception as e:  # noqa: BLE001
            print(f"matplotlib unavailable: {e!r}", flush=True)
    config = model_config()
    install_training_hooks()
    model = build_model(config, args.seed)
    gates = add_gate_hooks(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params} ({n_params * 4 / 1e6:.1f} MB fp32)", flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    train_stream = streams["train"].long()
    windows = eval_windows(streams["held_out"].tolist(), args.seq_len)
    step_e = max(1, len(windows) // args.eval_windows)
    eval_subset = windows[::step_e][: args.eval_windows]  # fixed, evenly spaced held-out windows
    gen = torch.Generator().manual_seed(args.seed)
    n_starts = train_stream.numel() - args.seq_len - 1

    out = Path(args.out)
    history = {"train": [], "eval": []}
    step, tokens, train_time = 0, 0, 0.0
    state_path = Path(args.run_dir) / "state.pt"
    if args.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"]), opt.load_state_dict(st["opt"]), gen.set_state(st["gen"])
        step, tokens, train_time, history = st["step"], st["tokens"], st["train_time"], st["history"]
        print(f"resumed at step {step}, {tokens} tokens, {train_time:.0f}s", flush=True)

    def progress() -> float:
        if args.steps:
            return step / args.steps
        return train_time / args.time_budget

    def meta(final: bool) -> dict:
        return {"command": args.command, "seed": args.seed, "steps": step, "tokens_trained": tokens,
                "train_wall_s": round(train_time, 1), "final": final, "data": data_info,
                "args": {k: v for k, v in vars(args).items() if k != "command"}}

    def checkpoint(final: bool) -> None:
        save_model(model, config, tok, out, args.seq_len, meta(final))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                    "tokens": tokens, "train_time": train_time, "history": history}, state_path)
        if args.docs:
            Path(args.docs).mkdir(parents=True, exist_ok=True)
            (Path(args.docs) / "training_history.json").write_text(json.dumps(
                {"meta": meta(final), "history": {"train_10step_bins": binned(history["train"], 10),
                                                  "eval": history["eval"]}}) + "\n")
            (Path(args.run_dir) / "history_full.json").write_text(json.dumps(history) + "\n")
            try:  # a broken plotting stack (e.g. numpy swapped underneath) must not stop training
                plot_history(history, Path(args.docs) / "training_loss.png")
            except Exception as e:  # noqa: BLE001
                print(f"plot failed: {e!r}", flush=True)
        print(f"checkpoint saved at step {step} -> {out}", flush=True)

    def do_eval() -> None:
        model.eval()
        HOOKS.active = True
        loss, ntok, kl, mass = evaluate(model, eval_subset, args.chunk, args.batch)
        HOOKS.active = False
        history["eval"].append({"step": step, "tokens": tokens, "loss": loss, "kl": kl, "topk_mass": mass,
                                "train_time": round(train_time, 1)})
        print(json.dumps({"eval": history["eval"][-1]}), flush=True)
        model.train()

    last_ckpt = train_time
    last_eval = train_time
    model.train()
    while (args.steps and step < args.steps) or (not args.steps and train_time < args.time_budget):
        t0 = time.time()
        p = progress()
        lr = lr_at(p, args.lr, args.warmup, args.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        HOOKS.dense_indexer = p < args.dense_warmup
        HOOKS.active = True
        starts = torch.randint(0, n_starts, (args.batch,), generator=gen)
        ids = torch.stack([train_stream[s:s + args.seq_len + 1] for s in starts.tolist()])
        HOOKS.kl.clear(), HOOKS.overlap.clear()
        lm = sequence_loss(model, ids, args.chunk)
        kl = torch.stack(HOOKS.kl).mean()
        mass = float(torch.stack(HOOKS.overlap).mean())
        opt.zero_grad(set_to_none=True)
        (lm + args.kl_coef * kl).backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step()
        imbalance = update_gate_bias(gates, args.bias_gamma)
        HOOKS.active = False
        step += 1
        tokens += ids[:, 1:].numel()
        dt = time.time() - t0
        train_time += dt
        lm, kl = lm.detach(), kl.detach()
        history["train"].append({"step": step, "tokens": tokens, "loss": float(lm), "kl": float(kl),
                                 "topk_mass": mass, "lr": lr, "gnorm": gnorm, "imbalance": imbalance,
                                 "dense": HOOKS.dense_indexer, "dt": round(dt, 3)})
        if step % args.log_every == 0 or step == 1:
            print(json.dumps({"step": step, "tokens": tokens, "loss": round(float(lm), 4), "kl": round(float(kl), 4),
                              "topk_mass": round(mass, 3), "lr": f"{lr:.2e}", "gnorm": round(gnorm, 3),
                              "imb": round(imbalance, 2), "dt": round(dt, 2), "t": round(train_time)}), flush=True)
        if train_time - last_eval >= args.eval_every:
            do_eval()
            last_eval = train_time
        if train_time - last_ckpt >= args.ckpt_every:
            checkpoint(final=False)
            last_ckpt = train_time
    if not history["eval"] or history["eval"][-1]["step"] != step:
        do_eval()
    checkpoint(final=True)
    check_reload(model, out, streams["held_out"][: args.seq_len].long().unsqueeze(0))
    print(f"training done: {step} steps, {tokens} tokens, {train_time:.0f}s train time, "
          f"{time.time() - t_start:.0f}s total", flush=True)
    if args.full_eval:
        final_eval(args, out, streams, data_info)


def check_reload(model, out: Path, ids) -> None:
    """load_model(out) must hold bit-identical tensors and give identical logits."""
    import torch

    from exporter.checkpoint import load_model

    loaded = load_model(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "reloaded tensors differ"
    model.eval()
    with torch.no_grad():
        la, lb = model(ids), loaded(ids)
    assert torch.equal(la, lb), f"reloaded logits differ by {(la - lb).abs().max()}"
    print(json.dumps({"reload_check": "bit-exact tensors, identical logits", "tensors": len(a),
                      "logits_shape": list(la.shape)}), flush=True)


def final_eval(args, out: Path, streams=None, data_info=None) -> dict:
    """Held-out loss over every window of the held-out stream with the SAVED model."""
    import torch

    from exporter.checkpoint import load_model

    torch.set_num_threads(1)
    if streams is None:
        _, streams, data_info = prepare(args)
    install_training_hooks()
    model = load_model(out)
    windows = eval_windows(streams["held_out"].tolist(), args.seq_len)
    t0 = time.time()
    HOOKS.active = True
    loss, ntok, kl, mass = evaluate(model, windows, args.chunk, args.batch)
    HOOKS.active = False
    # bits per byte: the stream's tokens cover the held-out bytes (the last partial window is left
    # out, so scale the byte count by the fraction of tokens scored)
    total_tokens = len(streams["held_out"]) - 1
    bytes_scored = data_info["held_out_bytes"] * ntok / total_tokens
    res = {"held_out_loss": loss, "tokens_scored": ntok, "held_out_tokens": total_tokens,
           "held_out_bytes": data_info["held_out_bytes"], "bits_per_byte": loss * ntok / bytes_scored / math.log(2),
           "indexer_kl": kl, "topk_target_mass": mass, "eval_s": round(time.time() - t0, 1),
           "windows": len(windows), "seq_len": args.seq_len}
    print(json.dumps({"final_eval": res}), flush=True)
    if args.docs:
        hp = Path(args.docs) / "training_history.json"
        h = json.loads(hp.read_text()) if hp.exists() else {}
        h["final_eval"] = res
        hp.write_text(json.dumps(h) + "\n")
    return res


def verify(path: Path, seq_len: int = 256) -> None:
    """Reload checks: bit-exact tensors, identical logits, tokenizer round trip, AutoTokenizer."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from exporter.checkpoint import load_model

    torch.set_num_threads(1)
    config = model_config()
    model = load_model(path)
    stored = load_file(str(path / "model.safetensors"))
    sd = model.state_dict()
    assert set(stored) == set(sd), set(stored) ^ set(sd)
    assert all(torch.equal(stored[k], sd[k]) and stored[k].dtype == sd[k].dtype for k in sd)
    # a fresh Transformer with the stored state (the "trained" model) vs load_model's
    from exporter.model import Transformer

    ref = Transformer(config)
    ref.load_state_dict(stored)
    ref.eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = held_out_text()[:20000]
    ids = torch.tensor([tok.encode(text).ids[:seq_len]])
    with torch.no_grad():
        a, b = model(ids), ref(ids)
    assert torch.equal(a, b), (a - b).abs().max()
    # tokenizer: exact round trip of the held-out text and of awkward strings
    for s in [held_out_text(), "héllo ☃ \t\r\n  x\u200b", "def f():\n\treturn 'ü'\n", "   ", BOS + "x" + EOS]:
        enc = tok.encode(s)
        assert tok.decode(enc.ids, skip_special_tokens=False) == s, s[:80]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    s = "import os\nprint(os.getcwd())  # ☃\n"
    assert hf.decode(hf(s)["input_ids"]) == s
    assert hf(s)["input_ids"] == tok.encode(s).ids
    assert hf.bos_token == BOS and hf.eos_token == EOS
    sizes = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    print(json.dumps({"verify": "ok", "sizes": sizes, "total_MB": round(sum(sizes.values()) / 1e6, 2),
                      "logits_shape": list(a.shape)}), flush=True)


def timing(args) -> None:
    import torch

    torch.set_num_threads(1)
    config = model_config()
    install_training_hooks()
    model = build_model(config, args.seed)
    gates = add_gate_hooks(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    for batch, seq, chunk, dense in [(1, 1024, 1024, False), (2, 1024, 256, False), (4, 1024, 256, False),
                                     (4, 1024, 128, False), (2, 1024, 256, True)]:
        HOOKS.dense_indexer = dense
        times = []
        for _ in range(3):
            t0 = time.time()
            HOOKS.active = True
            ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
            HOOKS.kl.clear(), HOOKS.overlap.clear()
            lm = sequence_loss(model, ids, chunk)
            kl = torch.stack(HOOKS.kl).mean()
            opt.zero_grad()
            (lm + kl).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            update_gate_bias(gates, 1e-3)
            times.append(time.time() - t0)
        best = min(times[1:])
        print(f"batch {batch} seq {seq} chunk {chunk} dense {dense}: {best:.2f}s/step, "
              f"{batch * seq / best:.0f} tok/s (times {[round(t, 2) for t in times]})", flush=True)
    HOOKS.active = False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "models" / "tiny-stdlib"))
    ap.add_argument("--docs", default=str(REPO / "docs"), help="where training_loss.png / history go ('' = none)")
    ap.add_argument("--run-dir", default="/tmp/train_tiny", help="tokenizer cache, token streams, resume state")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256, help="chunked prefill size inside one training sequence")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the run")
    ap.add_argument("--final-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--kl-coef", type=float, default=1.0)
    ap.add_argument("--bias-gamma", type=float, default=1e-3)
    ap.add_argument("--dense-warmup", type=float, default=0.0,
                    help="fraction of the run during which CSA attends to every visible entry")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (LR schedule by step)")
    ap.add_argument("--time-budget", type=float, default=3600.0,
                    help="seconds of training (LR schedule by elapsed training time) when --steps is 0")
    ap.add_argument("--ckpt-every", type=float, default=600.0)
    ap.add_argument("--eval-every", type=float, default=300.0)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--retrain-tokenizer", action="store_true")
    ap.add_argument("--full-eval", action="store_true", help="after training: every held-out window")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--verify", metavar="DIR")
    ap.add_argument("--eval-only", action="store_true", help="the full held-out evaluation of --out")
    args = ap.parse_args(argv)
    args.command = "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in [
        os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0], *(argv or sys.argv[1:])])
    sys.path.insert(0, str(REPO))
    print(f"host {platform.node()} python {platform.python_version()} cpus {os.cpu_count()} "
          f"command: {args.command}", flush=True)
    if args.timing:
        timing(args)
    elif args.verify:
        verify(Path(args.verify))
    elif args.eval_only:
        final_eval(args, Path(args.out))
    else:
        train(args)


if __name__ == "__main__":
    main()
