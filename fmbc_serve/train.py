"""`fmbc train`: train an FMBC checkpoint (or its learned-table twin) on a text file, in plain PyTorch.

It trains the reference model itself (`FMBCForCausalLM`), not a second definition. Deterministic under
`--seed`: the initial weights come from the seed and the batch of step s from a generator seeded with
(seed, s), so a run resumed from its last state (`--resume`) continues exactly as if it had not stopped.
The held-out split is the last `--eval-fraction` of the token stream; its loss is logged every
`--eval-every` steps to `train_log.jsonl` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .checkpoint import make_config, save_checkpoint
from .configuration_fmbc import INPUT_MODES
from .modeling_fmbc import FMBCForCausalLM
from .tokenizer import train_bpe_tokenizer

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="UTF-8 text file to train on")
    p.add_argument("--out", required=True, help="checkpoint folder (written at every evaluation and at the end)")
    p.add_argument("--preset", default="tiny", help="shape to start from (default: tiny)")
    p.add_argument("--input-mode", choices=INPUT_MODES, default="binary")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on --data (V; K=ceil(log2 V))")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--context", type=int, default=256, help="context length = training sequence length")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --out")


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10% of --lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_at(tokens: torch.Tensor, step: int, args: argparse.Namespace) -> torch.Tensor:
    """The batch of `step`: random windows of `context` tokens from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - args.context - 1, (args.batch_size,), generator=gen)
    return torch.stack([tokens[s:s + args.context] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model: FMBCForCausalLM, tokens: torch.Tensor, context: int) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the held-out split."""
    model.eval()
    windows = tokens[: (len(tokens) // context) * context].view(-1, context)
    losses = [model(input_ids=w, labels=w, use_cache=False).loss for w in windows.split(16)]
    model.train()
    return float(torch.stack(losses).mean())


def train(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(args.data).read_text(encoding="utf-8")
    tokenizer = train_bpe_tokenizer(text, args.vocab_size)
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    split = int(len(tokens) * (1 - args.eval_fraction))
    train_tokens, eval_tokens = tokens[:split], tokens[split:]

    overrides = {"vocab_size": args.vocab_size, "input_mode": args.input_mode,
                 "max_position_embeddings": args.context, **special_ids(tokenizer)}
    for field, value in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                         ("num_attention_heads", args.heads)):
        if value is not None:
            overrides[field] = value
    if args.hidden_size is not None:
        overrides["intermediate_size"] = 4 * args.hidden_size
    config = make_config(args.preset, **overrides)
    torch.manual_seed(args.seed)
    model = FMBCForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, elapsed = 0, 0.0
    log_path = out / LOG_FILE
    if args.resume:
        state = torch.load(out / STATE_FILE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    elif log_path.exists():
        log_path.unlink()

    record: dict = {}
    bar = tqdm(total=args.steps, initial=step, desc=f"fmbc train ({args.input_mode})", unit="step")
    start = time.perf_counter() - elapsed
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = batch_at(train_tokens, step, args)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            eval_loss = held_out_loss(model, eval_tokens, args.context)
            record = {"step": step, "train_loss": round(loss.item(), 4), "held_out_loss": round(eval_loss, 4),
                      "held_out_perplexity": round(math.exp(eval_loss), 2),
                      "minutes": round((time.perf_counter() - start) / 60, 2),
                      "tokens_seen": step * args.batch_size * args.context}
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            bar.write(json.dumps(record))
            save_checkpoint(model, tokenizer, out)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": time.perf_counter() - start}, out / STATE_FILE)
    bar.close()
    return record


def special_ids(tokenizer) -> dict[str, int]:
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
