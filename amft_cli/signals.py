"""The RL signal as a gradient at the current θ, and what a step reads to make it.

    prompts ─► rollout ─► [method shapes the groups] ─► verifier rewards ─► advantages ─► ∇L_RL
    demonstrations ─► [method's SFT loss] ─► ∇L_SFT          (policy.sft_grads)

A method (amft_cli/methods/) changes the data flow only through its hooks; this
module names no method. Gradients stay lists of per-parameter tensors (one per
signal), so a controller can compare them. With several processes (parallel.py) each
samples and scores its share of the prompts and the gradient is the whole batch's.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from amft_cli.config import Config
from amft_cli.policy import Policy, grads_in_chunks
from amft_cli.rewards import RewardFn, score_completions
from amft_cli.rollout import Rollouts, generate, row_uniforms


@dataclass
class Cursors:
    """Positions in the seeded, per-epoch shuffled data streams (saved in checkpoints)."""

    step: int = 0  # optimizer steps completed
    sft: int = 0
    rl: int = 0
    val: int = 0
    rollouts: int = 0  # completions the policy sampled so far (training and validation utility);
    #                    also the number of the next row's sampling draws (rollout.row_uniforms)
    skipped_in_row: int = 0  # consecutive steps the non-finite guard skipped (train.max_skipped_steps)


class PhaseTimer:
    """Seconds per named phase of one step; the names double as a table of contents."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def take(n: int, count: int, cursor: int, seed: int) -> list[int]:
    """Indices cursor..cursor+count−1 of an endless stream of per-epoch permutations of range(n)."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(cursor, cursor + count)]


# each stream's seed offset: RL prompts and SFT demonstrations are drawn independently
STREAMS = {"rl": ("train_set", 1), "sft": ("train_set", 2), "val": ("val_set", 7)}


@dataclass
class Run:
    """What every step of a run reads: policy, config, data, verifier and data streams."""

    policy: Policy
    cfg: Config
    task: object
    train_set: list[dict]
    val_set: list[dict]
    reward_fn: RewardFn | None
    cursors: Cursors = field(default_factory=Cursors)
    on_message: Callable[[str], None] = print

    def draw(self, stream: str, count: int) -> list[dict]:
        """The next `count` examples of a data stream: rl, sft (train split) or val (held out)."""
        split, offset = STREAMS[stream]
        examples = getattr(self, split)
        cursor = getattr(self.cursors, stream)
        setattr(self.cursors, stream, cursor + count)
        return [examples[i] for i in take(len(examples), count, cursor, self.cfg.seed + offset)]

    def gather(self, items: list) -> list:
        """Every training process's `items`, in rank order (a method's state built from what a
        hook saw of this process's share must see the whole batch; one process: `items`)."""
        return self.policy.dist.gather(items)


# ---------------------------------------------------------------------------
# RL


@dataclass
class RLBatch:
    """Scored rollouts of one step, as the RL loss sees them."""

    rollouts: Rollouts
    examples: list[dict]       # the group's example per row (rollouts.group indexes the prompts)
    rewards: torch.Tensor      # (N,)
    statuses: list[str]        # verifier status per row
    advantages: torch.Tensor   # (N,)
    num_tokens: float          # completion tokens of the whole batch, all processes (loss normaliser)
    num_seqs: int              # rows of the whole batch, all processes (loss normaliser)


def behaviour_logprobs(logprobs: torch.Tensor, batch: RLBatch, rows: slice) -> torch.Tensor:
    """π_old per token (B, T): the rows' recorded behaviour log-probs where known, else the
    current ones detached (one update per rollout batch: π_old = π_θ)."""
    old = logprobs.detach().clone()
    for i, known in enumerate(batch.rollouts.behaviour_logprobs[rows]):
        if known is not None:
            old[i, : len(known)] = torch.tensor(known, dtype=old.dtype, device=old.device)
    return old


def add_demonstrations(policy: Policy, rollouts: Rollouts, examples: list[dict]) -> Rollouts:
    """Each group with its example's demonstration as one more row at its end, flagged
    off-policy, behaviour log-probs unknown (an expert wrote it); the demonstration ends with
    eos. rollouts.group indexes `examples`."""
    rows: list[tuple] = []
    r = rollouts
    for i, g in enumerate(r.group):
        rows.append((r.prompt_ids[i], r.completion_ids[i], r.texts[i], r.finished[i], g, r.off_policy[i],
                     r.behaviour_logprobs[i]))
        if i + 1 == len(r.group) or r.group[i + 1] != g:
            prompt, demo = policy.demo_ids(examples[g])
            rows.append((prompt, demo, examples[g]["demonstration"], True, g, True, None))
    return Rollouts(*map(list, zip(*rows)))


def rollout_stats(run: Run, batch: RLBatch, rollout_s: float) -> dict:
    """reward/* and rollout/* metrics over the rows the policy sampled itself, on every process."""
    r = batch.rollouts
    rows = run.gather([(batch.rewards[i].item(), batch.statuses[i] == "correct", len(r.completion_ids[i]),
                        r.finished[i]) for i, off in enumerate(r.off_policy) if not off])
    rewards, lengths = torch.tensor([row[0] for row in rows], dtype=batch.rewards.dtype), [row[2] for row in rows]
    return {
        "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
        "reward/accuracy": sum(row[1] for row in rows) / len(rows),
        "rollout/len_mean": sum(lengths) / len(rows),
        "rollout/truncated_frac": 1.0 - sum(row[3] for row in rows) / len(rows),
        "rollout/tokens_per_s": sum(lengths) / max(rollout_s, 1e-9),
    }


def rl_signal(run: Run, examples: list[dict], method, timer: PhaseTimer) -> tuple[list[torch.Tensor], float, dict]:
    """Rollouts → (method shapes the groups) → verifier rewards → advantages → ∇ of the method's
    RL loss. Returns (g_RL, loss, stats) of the whole batch.
    examples: the batch's prompts, the same list on every process; each process samples, scores
    and differentiates its contiguous share (whole groups), normalised by whole-batch counts."""
    policy, cfg, n = run.policy, run.cfg, method.samples_per_prompt()
    first_row = run.cursors.rollouts + policy.dist.share(len(examples)).start * n  # this share's row numbers
    run.cursors.rollouts += len(examples) * n  # all processes' samples, before shaping adds off-policy rows
    examples = policy.dist.shard(examples)
    with timer("rollout"), policy.compute():
        rollouts = generate(policy.model, policy.tokenizer, [policy.prompt_ids(ex) for ex in examples], n,
                            max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
                            top_p=cfg.rl.top_p, engine=policy.engine,
                            uniforms=row_uniforms(cfg.seed, first_row, len(examples) * n, cfg.rl.max_new_tokens))
        rollouts = method.shape_rollouts(run, rollouts, examples)
    with timer("reward"):
        grouped = [examples[g] for g in rollouts.group]
        rewards, statuses = score_completions(run.task, grouped, rollouts.texts, run.reward_fn)
        method.observe(run, examples, rollouts, rewards, statuses)
        num_tokens, num_seqs = policy.dist.sum_floats([float(rollouts.num_tokens), float(len(rollouts.group))])
        batch = RLBatch(rollouts, grouped, rewards, statuses, method.advantages(rewards, rollouts),
                        num_tokens, int(num_seqs))
    with timer("losses"):
        prompts, completions = rollouts.prompt_ids, rollouts.completion_ids

        def chunk_loss(logprobs, mask, rows, entropy):
            ref = (policy.ref_logprobs(prompts[rows], completions[rows], rollouts.group[rows])
                   if cfg.rl.kl_beta > 0 else None)
            return method.rl_loss(logprobs, mask, batch, rows, ref, entropy)

        grads, loss, chunk_stats = grads_in_chunks(policy, prompts, completions, chunk_loss,
                                                   cfg.train.micro_batch_size, rollouts.group, method.entropy_grad)
    stats = {**rollout_stats(run, batch, timer.seconds.get("rollout", 0.0)),
             "policy/entropy": chunk_stats.pop("entropy"),
             **{f"rl/{k}": v for k, v in chunk_stats.items()}}
    return grads, loss, stats
