"""The RL signal as a gradient at the current θ, and what a step reads to make it.

    prompts ─► rollout ─► [method shapes the groups] ─► verifier rewards ─► advantages ─► ∇L_RL
               (multi-turn with task.verify_iter > 1: revise.py)
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
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch

from amft_cli.config import Config
from amft_cli.policy import Policy, grads_in_chunks, group_runs
from amft_cli.revise import revision_rollouts
from amft_cli.rewards import RewardFn, score_completions
from amft_cli import algo
from amft_cli.rollout import RolloutBackend, Rollouts, row_uniforms


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
    backend: RolloutBackend | None = None   # rollout.make_backend; None when the method never samples
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


def _known_or_current(logprobs: torch.Tensor, known_rows: list[list[float] | None]) -> torch.Tensor:
    """(B, T): each row's recorded per-token log-probs where known, else `logprobs` detached."""
    out = logprobs.detach()
    if all(row is None for row in known_rows):
        return out.clone()
    width = out.shape[1]
    values, known = [], []
    for row in known_rows:
        row = (row or [])[:width]
        values.append(list(row) + [0.0] * (width - len(row)))
        known.append([True] * len(row) + [False] * (width - len(row)))
    return torch.where(torch.tensor(known, device=out.device),
                       torch.tensor(values, dtype=out.dtype, device=out.device), out)


def behaviour_logprobs(logprobs: torch.Tensor, batch: RLBatch, rows: slice) -> torch.Tensor:
    """π_old per token (B, T): the rows' recorded behaviour log-probs where known, else the
    current ones detached (one update per rollout batch: π_old = π_θ)."""
    return _known_or_current(logprobs, batch.rollouts.behaviour_logprobs[rows])


class SamplerGap:
    """The sampler correction of each micro-batch, and what it measured over the whole batch:
    |log π_train − log π_sampler| over sampled tokens (mean, max), the mean weight, and the
    share of sampled rows the cap touched (masked or truncated). Rows without sampler
    log-probs (demonstrations) get weight 1 and are left out of the figures."""

    def __init__(self, mode: str, cap: float) -> None:
        self.mode, self.cap = mode, cap
        self.gap_sum, self.gap_max, self.weight_sum, self.tokens, self.rows, self.capped = 0.0, 0.0, 0.0, 0.0, 0, 0

    def weights(self, logprobs: torch.Tensor, mask: torch.Tensor, batch: RLBatch, rows: slice) -> torch.Tensor:
        """is_weights (B, T) of the batch rows `rows`."""
        known = batch.rollouts.sampler_logprobs[rows]
        sampler = _known_or_current(logprobs, known)
        weights = algo.sampler_is_weights(logprobs, sampler, mask, self.mode, self.cap)
        sampled = mask * torch.tensor([k is not None for k in known], device=mask.device).unsqueeze(-1)
        gap = torch.nan_to_num((logprobs.detach() - sampler).abs(), nan=0.0) * sampled
        capped = (weights == 0) if self.mode.endswith("_mask") else (weights >= self.cap)
        self.gap_sum += gap.sum().item()
        self.gap_max = max(self.gap_max, gap.max().item())
        self.weight_sum += (weights * sampled).sum().item()
        self.tokens += sampled.sum().item()
        self.rows += int((sampled.sum(-1) > 0).sum())
        self.capped += int(((capped & (sampled > 0)).any(-1)).sum()) if self.mode != "none" else 0
        return weights

    def stats(self, dist) -> dict:
        """The figures over every training process's rows (dist: parallel.Processes)."""
        gap_sum, weight_sum, tokens, rows, capped = dist.sum_floats(
            [self.gap_sum, self.weight_sum, self.tokens, float(self.rows), float(self.capped)])
        return {"rollout/logprob_diff_mean": gap_sum / max(tokens, 1.0),
                "rollout/logprob_diff_max": max(dist.gather([self.gap_max])),
                "rollout/is_weight_mean": weight_sum / tokens if tokens else 1.0,
                "rollout/is_capped_frac": capped / max(rows, 1.0)}


def trainable_first(batch: RLBatch, no_gradient: torch.Tensor) -> tuple[RLBatch, int]:
    """The batch with the groups whose every row has no gradient (no_gradient (N,) bool) moved to
    its end, both parts in their order. Returns (batch, number of rows before them)."""
    r, head, tail, start = batch.rollouts, [], [], 0
    for size in group_runs(r.group):
        (tail if bool(no_gradient[start:start + size].all()) else head).extend(range(start, start + size))
        start += size
    if not tail:
        return batch, len(head)
    order = head + tail

    def pick(rows: list) -> list:
        return [rows[i] for i in order]

    rollouts = Rollouts(*(pick(getattr(r, f.name)) for f in fields(r)))
    index = torch.tensor(order, device=batch.rewards.device)
    return replace(batch, rollouts=rollouts, examples=pick(batch.examples), rewards=batch.rewards[index],
                   statuses=pick(batch.statuses), advantages=batch.advantages[index]), len(head)


def add_demonstrations(policy: Policy, rollouts: Rollouts, examples: list[dict]) -> Rollouts:
    """Each group with its example's demonstration as one more row at its end, flagged
    off-policy, behaviour log-probs unknown (an expert wrote it); the demonstration ends with
    eos. rollouts.group indexes `examples`."""
    rows: list[tuple] = []
    r = rollouts
    for i, g in enumerate(r.group):
        rows.append((r.prompt_ids[i], r.completion_ids[i], r.texts[i], r.finished[i], g, r.off_policy[i],
                     r.behaviour_logprobs[i], r.sampler_logprobs[i]))
        if i + 1 == len(r.group) or r.group[i + 1] != g:
            prompt, demo = policy.demo_ids(examples[g])
            rows.append((prompt, demo, examples[g]["demonstration"], True, g, True, None, None))
    return Rollouts(*map(list, zip(*rows)))


def rollout_stats(run: Run, batch: RLBatch, rollout_s: float) -> dict:
    """reward/* and rollout/* metrics over the rows the policy sampled itself, on every process;
    reward/zero_std_frac over whole groups as the advantages see them (a demonstration included):
    the share of groups whose rewards are all equal, to which GRPO gives no signal (TRL logs it
    as frac_reward_zero_std)."""
    r = batch.rollouts
    rows = run.gather([(batch.rewards[i].item(), batch.statuses[i] == "correct", len(r.completion_ids[i]),
                        r.finished[i]) for i, off in enumerate(r.off_policy) if not off])
    rewards, lengths = torch.tensor([row[0] for row in rows], dtype=batch.rewards.dtype), [row[2] for row in rows]
    by_group: dict[int, list[float]] = {}
    for g, reward in zip(r.group, batch.rewards.tolist()):
        by_group.setdefault(g, []).append(reward)
    flat = run.gather([max(v) == min(v) for v in by_group.values()])  # groups never straddle processes
    return {
        "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
        "reward/zero_std_frac": sum(flat) / len(flat),
        "reward/accuracy": sum(row[1] for row in rows) / len(rows),
        "rollout/len_mean": sum(lengths) / len(rows),
        "rollout/truncated_frac": 1.0 - sum(row[3] for row in rows) / len(rows),
        "rollout/tokens_per_s": sum(lengths) / max(rollout_s, 1e-9),
    }


def rl_signal(run: Run, examples: list[dict], method, timer: PhaseTimer) -> tuple[list[torch.Tensor], float, dict]:
    """Rollouts → (method shapes the groups) → verifier rewards → advantages → ∇ of the method's
    RL loss. Returns (g_RL, loss, stats) of the whole batch.
    examples: the batch's prompts, the same list on every process; each process samples, scores
    and differentiates its contiguous share (whole groups), normalised by whole-batch counts.
    With sequential revision (task.verify_iter > 1, one process: train.check_processes) every
    attempt of an episode is a row of its problem's group (revise.py)."""
    policy, cfg, n = run.policy, run.cfg, method.samples_per_prompt()
    revision: dict = {}
    with timer("rollout"), policy.compute():
        if cfg.task.verify_iter > 1:
            rollouts, revision = revision_rollouts(policy, run.backend, cfg, run.task, examples, n,
                                                   run.cursors.rollouts)
            run.cursors.rollouts += len(rollouts.completion_ids)  # every attempt, rows numbered in order
        else:
            first_row = run.cursors.rollouts + policy.dist.share(len(examples)).start * n  # this share's rows
            run.cursors.rollouts += len(examples) * n  # all processes' samples, before shaping adds off-policy rows
            examples = policy.dist.shard(examples)
            rollouts = run.backend.generate([policy.prompt_ids(ex) for ex in examples], n,
                                            max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
                                            top_p=cfg.rl.top_p,
                                            uniforms=row_uniforms(cfg.seed, first_row, len(examples) * n,
                                                                  cfg.rl.max_new_tokens))
        rollouts = method.shape_rollouts(run, rollouts, examples)
    with timer("reward"):
        grouped = [examples[g] for g in rollouts.group]
        rewards, statuses = score_completions(run.task, grouped, rollouts.texts, run.reward_fn)
        method.observe(run, examples, rollouts, rewards, statuses)
        num_tokens, num_seqs = policy.dist.sum_floats([float(rollouts.num_tokens), float(len(rollouts.group))])
        batch = RLBatch(rollouts, grouped, rewards, statuses, method.advantages(rewards, rollouts),
                        num_tokens, int(num_seqs))
    with timer("losses"):
        trained = len(batch.advantages)
        if cfg.rl.skip_zero_advantage and not policy.dist.sharded:
            batch, trained = trainable_first(batch, method.zero_gradient_rows(batch))
        rollouts = batch.rollouts
        prompts, completions = rollouts.prompt_ids, rollouts.completion_ids
        gap = SamplerGap(cfg.rl.sampler_correction, cfg.rl.sampler_is_cap)

        def chunk_loss(logprobs, mask, rows, entropy):
            ref = (policy.ref_logprobs(prompts[rows], completions[rows], rollouts.group[rows])
                   if cfg.rl.kl_beta > 0 else None)
            loss, stats = method.rl_loss(logprobs, mask, batch, rows, ref, entropy,
                                         gap.weights(logprobs, mask, batch, rows))
            return loss, {**stats, "forward_only_frac": (float(rows.start >= trained), float(rows.stop - rows.start))}

        grads, loss, chunk_stats = grads_in_chunks(policy, prompts, completions, chunk_loss,
                                                   cfg.train.micro_batch_size, rollouts.group, method.entropy_grad,
                                                   forward_only_from=trained)
    stats = {**rollout_stats(run, batch, timer.seconds.get("rollout", 0.0)), **gap.stats(policy.dist),
             "policy/entropy": chunk_stats.pop("entropy"),
             **{f"rl/{k}": v for k, v in chunk_stats.items()}, **revision}
    return grads, loss, stats
