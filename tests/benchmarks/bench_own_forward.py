"""Would owning the model's forward make the trainer's step faster? A negative result, kept reproducible.

    python tests/benchmarks/bench_own_forward.py [--rounds N] [--threads T] [--compile]

bench_step.py's GRPO row spends ~70% of its step in the trainer's forward and
backward (policy.sequence_logprobs on the shared-prompt path, then
torch.autograd.grad). This script times that forward+backward on the bench's
batch (32 prompts × 8 sampled completions of ≤ 12 tokens on the tiny-math model)
against a hand-written Qwen2 forward over the same parameters that does what a
hand-tuned model would: q/k/v in one product, gate/up in one product, rotary and
RMSNorm inline, no module dispatch, the prompt run once and its keys/values
repeated per group. It first checks that both give the same log-probs and
gradients, then alternates the two for N rounds and reports medians.
--compile adds the hand-written forward under torch.compile (inductor), with
the time of its first call (the compilation).

Measured 2026-11-27 at 71c0e17, one thread, two runs (the second while a
SmolLM2 sweep ran beside it): transformers' forward 0.323 / 0.318 s, the
hand-written one 0.344 / 0.323 s, so no faster; compiled 0.302 / 0.276 s
(9-13% less) after a first call of 98 / 225 s. The step is bound by its matrix
products and memory traffic, not by Python or module overhead, so the trainer keeps transformers' model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (puts the checkout on sys.path)

from amft_cli import algo, policy, rollout  # noqa: E402
from amft_cli.data import load_split  # noqa: E402


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin


def layers(model, h: torch.Tensor, positions: torch.Tensor, bias_mask: torch.Tensor, prefix=None, rows: int = 1):
    """Hidden states (B, T, H) through every decoder layer; prefix: per layer the prompt's (k, v),
    (b, heads, Pw, d), repeated `rows` times ahead of this pass's keys. Returns (h, per-layer (k, v))."""
    c = model.config
    hq, hkv = c.num_attention_heads, c.num_key_value_heads
    d, (B, T, _) = c.hidden_size // hq, h.shape
    cos, sin = model.model.rotary_emb(h, positions)
    cos, sin = cos[:, None], sin[:, None]
    kvs = []
    for i, layer in enumerate(model.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        qkv = F.linear(rms(h, layer.input_layernorm.weight, c.rms_norm_eps),
                       torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                       torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
        q = rope(q.view(B, T, hq, d).transpose(1, 2), cos, sin)
        k = rope(k.view(B, T, hkv, d).transpose(1, 2), cos, sin)
        v = v.view(B, T, hkv, d).transpose(1, 2)
        kvs.append((k, v))
        if prefix is not None:
            k = torch.cat([prefix[i][0].repeat_interleave(rows, 0), k], 2)
            v = torch.cat([prefix[i][1].repeat_interleave(rows, 0), v], 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5 + bias_mask
        h = h + F.linear(torch.matmul(torch.softmax(scores, -1), v).transpose(1, 2).reshape(B, T, hq * d),
                         a.o_proj.weight)
        gate, up = F.linear(rms(h, layer.post_attention_layernorm.weight, c.rms_norm_eps),
                            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])).chunk(2, -1)
        h = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight)
    return h, kvs


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


def own_logits(model, prompts, completions, rows: int, pad: int):
    """The shared-prompt logits of policy.shared_prompt_logits, by hand: (B, Lc, V), targets, mask."""
    eps, head = model.config.rms_norm_eps, model.lm_head.weight
    p_ids, p_mask = rollout.left_pad(prompts, pad, torch.device("cpu"))
    width_p = p_ids.shape[1]
    allowed = torch.ones(width_p, width_p, dtype=torch.bool).tril()[None] & p_mask[:, None, :].bool()
    h, prefix = layers(model, model.model.embed_tokens(p_ids), (p_mask.cumsum(-1) - 1).clamp(min=0), additive(allowed))
    first = F.linear(rms(h[:, -1:], model.model.norm.weight, eps), head).repeat_interleave(rows, 0)
    width = max(len(c) for c in completions)
    targets = torch.full((len(completions), width), pad, dtype=torch.long)
    mask = torch.zeros(len(completions), width)
    for i, c in enumerate(completions):
        targets[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1.0
    p_rows, steps = p_mask.repeat_interleave(rows, 0).bool(), width - 1
    own = torch.ones(steps, steps, dtype=torch.bool).tril()[None] & mask[:, None, :-1].bool()
    allowed = torch.cat([p_rows[:, None, :].expand(-1, steps, -1), own], -1)
    positions = p_rows.sum(-1, keepdim=True) + torch.arange(steps)
    h, _ = layers(model, model.model.embed_tokens(targets[:, :-1]), positions, additive(allowed), prefix, rows)
    return torch.cat([first, F.linear(rms(h, model.model.norm.weight, eps), head)], 1), targets, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds; the first 2 are dropped")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time the hand-written forward under torch.compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    row = bench_step.OursRow("rl", "rl", 10**9, "float32")
    pol, group_size = row.run.policy, bench_step.GROUP
    model, pad = pol.model, pol.tokenizer.pad_token_id
    prompts = [pol.prompt_ids(ex) for ex in load_split(row.cfg, "train")[: bench_step.PROMPTS]]
    completions, _ = rollout._generate_batch(
        model, prompts, group_size, pad_id=pad, stop=rollout.stop_ids(model, pol.tokenizer),
        max_new_tokens=bench_step.MAX_NEW_TOKENS, greedy=False, temperature=1.0, top_p=1.0,
        generator=torch.Generator().manual_seed(0))
    every = [q for q in prompts for _ in range(group_size)]
    group = [i for i in range(len(prompts)) for _ in range(group_size)]
    advantages = torch.randn(len(every), 1, generator=torch.Generator().manual_seed(1))

    def grads(logprobs, mask):
        return torch.autograd.grad((logprobs * mask * advantages).sum() / mask.sum(), pol.params)

    def theirs():
        logprobs, _, mask = policy.sequence_logprobs(pol, every, completions, group=group)
        return grads(logprobs, mask), logprobs

    def by_hand(forward):
        def run():
            logits, targets, mask = forward(model, prompts, completions, group_size, pad)
            logprobs = algo.token_logprobs(logits, targets)
            with torch.no_grad():
                algo.token_entropy(logits.detach())  # the trainer computes it too
            return grads(logprobs, mask), logprobs
        return run

    rows = {"transformers": theirs, "hand-written": by_hand(own_logits)}
    if args.compile:
        rows["hand-written, compiled"] = by_hand(torch.compile(own_logits, dynamic=True))
    reference, ref_lp = theirs()
    for name, run in rows.items():
        started = time.perf_counter()
        g, lp = run()
        rel = max(((a - b).norm() / (a.norm() + 1e-12)).item() for a, b in zip(reference, g))
        print(f"{name:24s} first call {time.perf_counter() - started:6.2f} s; log-prob max diff "
              f"{(lp - ref_lp).abs().max().item():.1e}, gradient max relative diff {rel:.1e}")
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    for name, ts in times.items():
        print(f"{name:24s} forward+backward {statistics.median(ts[2:]):.3f} s (median of {len(ts) - 2})")


if __name__ == "__main__":
    main()
