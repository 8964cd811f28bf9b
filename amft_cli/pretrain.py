"""Pre-training of the tiny base model on a task's broad mix (`amft prepare`, data.py).

A from-scratch 0.9M model cannot read a rule it never saw vary, so the tiny
presets can pre-train their base on the task's "pretrain" split (tasks/gp.py:
stated face values 10-13; tasks/virl.py: both action spaces) before any
method fine-tunes it on the ID rule alone, as the paper fine-tunes a
pretrained LLM (issue 10). The loss is the SFT loss of train.py (token-mean
NLL of the demonstration given its prompt) with its own AdamW and a cosine
rate; the cost is model.pretrain_steps × model.pretrain_batch_size
demonstrations, paid once per preset (data.py caches the model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amft_cli.encoding import encode_completion, encode_prompt


def _sft_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids, attention and labels (-100 on prompt and padding) of (prompt, completion) pairs."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
    return ids, attention, labels


def pretrain_tiny_model(folder: Path, examples: list[dict], steps: int, batch_size: int, lr: float, seed: int,
                        on_step: Callable[[int, float], None] = lambda step, loss: None) -> float:
    """Pre-train the model saved in `folder` in place: `steps` AdamW steps on the token-mean NLL of
    the examples' demonstrations given their prompts (the SFT loss), lr cosine-decayed to 10%,
    gradients clipped at 1, batches from seeded per-epoch shuffles. Returns the mean loss of the
    last 10% of steps; calls on_step(step, loss) after each step."""
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model.train()
    pairs = [(encode_prompt(tokenizer, ex["prompt"], False), encode_completion(tokenizer, ex["demonstration"]))
             for ex in examples]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order: list[int] = []
    tail: list[float] = []
    for step in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=generator).tolist()
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        ids, attention, labels = _sft_batch(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        on_step(step + 1, loss.item())
    model.save_pretrained(folder)
    return sum(tail) / max(1, len(tail))


