"""The hot paths of the smol presets on SmolLM2-135M-Instruct, timed side by side.

    python tests/benchmarks/bench_smol.py [--rounds N] [--threads T] [--prompts P] [--group G] [--new N]

Needs the model folder of presets/smol-math.toml (`amft prepare --preset smol-math`)
and its data. Rows, each timed once per round, rounds interleaved so that load from
other programs hits every row alike; the table shows the median of the rounds after
the first and the ratio to the row's baseline. The ratios are the claim, not the seconds.

    rollout  ours        rollout.generate: P prompts × G samples, ≤ N new tokens (fp32)
    rollout  hf          model.generate with the same prompts, samples and stop tokens
    rollout  ours bf16   rollout.generate under bf16 autocast
    rollout  lora        LoRA r16 on every linear layer instead of full fine-tuning
    loss     packed      forward+backward of the GRPO batch, each row prompt + completion
    loss     shared      the same through policy.shared_prompt_logits (prompt once per group)
    loss     shared bf16 the same under bf16 autocast
    loss     lora        shared, LoRA r16 on every linear layer instead of full fine-tuning
    optim    ours        one AdamW step over the full model's parameters as the trainer builds it
                         (Policy.adamw: torch's fused kernel on CPU), lr 0 so the weights stay put
    optim    torch default  the same step with torch.optim.AdamW's defaults (for-loop on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from amft_cli import algo
    from amft_cli.config_io import load_preset
    from amft_cli.data import load_split
    from amft_cli.model import load_policy
    from amft_cli.policy import Policy, sequence_logprobs
    from amft_cli.rollout import generate, stop_ids

    cfg = load_preset(str(ROOT / "presets" / "smol-math.toml"))
    cfg.task.data_dir = str(ROOT / cfg.task.data_dir)
    cfg.model.local_copy = str(ROOT / cfg.model.local_copy)
    # full fine-tuning trains fp32 weights (bf16 only under autocast, policy.load_for_training);
    # LoRA keeps the preset's bf16 base weights
    full, tok = load_policy(dataclasses.replace(cfg.model, lora_rank=0, dtype="float32", gradient_checkpointing=False),
                            torch.device("cpu"))
    lora, _ = load_policy(dataclasses.replace(cfg.model, lora_rank=16, gradient_checkpointing=False),
                          torch.device("cpu"))
    policies = {"full": Policy(full, tok, torch.device("cpu"), True),
                "bf16": Policy(full, tok, torch.device("cpu"), True, autocast=torch.bfloat16),
                "lora": Policy(lora, tok, torch.device("cpu"), True)}
    examples = load_split(cfg, "train", args.prompts)
    prompts = [policies["full"].prompt_ids(ex) for ex in examples]
    gen = torch.Generator().manual_seed(0)
    sample = dict(max_new_tokens=args.new, temperature=1.0, top_p=1.0, generator=gen)
    batch = generate(full, tok, prompts, args.group, **sample)  # the GRPO batch the loss rows reuse
    tokens = {"n": batch.num_tokens}

    def ours(model, autocast: bool = False):
        def run():
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.no_grad()
            with ctx:
                tokens["n"] = generate(model, tok, prompts, args.group, **sample).num_tokens
        return run

    def hf():
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True,
                                              padding_value=tok.pad_token_id).flip(1)
        with torch.no_grad():
            out = full.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), do_sample=True,
                                max_new_tokens=args.new, num_return_sequences=args.group,
                                eos_token_id=stop_ids(full, tok), pad_token_id=tok.pad_token_id, top_k=0)
        tokens["n"] = int((out[:, ids.shape[1]:] != tok.pad_token_id).sum())

    def loss(policy: Policy, shared: bool):
        group = batch.group if shared else None  # shared: each group's prompt runs once
        def run():
            lp, _, mask = sequence_logprobs(policy, batch.prompt_ids, batch.completion_ids, group=group)
            algo.sft_loss(lp, mask, mask.sum()).backward()
            policy.model.zero_grad(set_to_none=True)
        return run

    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in policies["full"].params]

    def optim(optimizer):  # lr 0: every moment and weight is still read and written
        def run():
            for p, g in zip(policies["full"].params, grads):
                p.grad = g
            optimizer.step()
            policies["full"].model.zero_grad(set_to_none=True)
        return run

    rows = {"rollout ours": ours(full), "rollout hf generate": hf, "rollout ours bf16": ours(full, autocast=True),
            "rollout lora": ours(lora),
            "loss packed": loss(policies["full"], False), "loss shared": loss(policies["full"], True),
            "loss shared bf16": loss(policies["bf16"], True), "loss lora": loss(policies["lora"], True),
            "optim ours": optim(policies["full"].adamw(0.0, 0.0)),
            "optim torch default": optim(torch.optim.AdamW(policies["full"].params, lr=0.0, weight_decay=0.0))}
    times: dict[str, list[float]] = {k: [] for k in rows}
    toks: dict[str, list[int]] = {k: [] for k in rows}
    for r in range(args.rounds + 1):
        for name, fn in rows.items():
            t = timed(fn)
            if r > 0:
                times[name].append(t)
                toks[name].append(tokens["n"])
        print(f"round {r}/{args.rounds} done", file=sys.stderr)
    base = {"rollout": statistics.median(times["rollout ours"]), "loss": statistics.median(times["loss shared"]),
            "optim": statistics.median(times["optim ours"])}
    print(f"SmolLM2-135M-Instruct, {args.prompts} prompts x {args.group} samples, <= {args.new} new tokens, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'row':24} {'s':>8} {'tokens/s':>9} {'time / baseline':>16}")
    for name in rows:
        s = statistics.median(times[name])
        rate = statistics.median(toks[name]) / s if name.startswith("rollout") else float("nan")
        print(f"{name:24} {s:8.2f} {rate:9.1f} {s / base[name.split()[0]]:16.2f}")


if __name__ == "__main__":
    main()
