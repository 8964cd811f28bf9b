"""The policy as the trainer sees it: model + tokenizer + token-level forward passes.

Sequences are prompt ids followed by completion ids, right-padded; log-probs
and entropies are aligned with the tokens they predict, and `mask` marks the
completion tokens (the only ones any loss counts). With several training processes
(parallel.py), each differentiates its share of a batch and `grads_in_chunks` sums them
(all-reduce; with FSDP, backward's reduce-scatter leaves each process its gradient shard).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from amft_cli import algo
from amft_cli.config import Config
from amft_cli.encoding import encode_completion, encode_prompt
from amft_cli.model import keep_freed_memory, load_policy, resolve_device
from amft_cli.parallel import Processes
from amft_cli.rollout import cache_of, forward, left_pad


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    chat_template: bool = False
    reference: torch.nn.Module | None = None  # frozen copy, only when rl.kl_beta > 0
    autocast: torch.dtype | None = None  # bf16/fp16 compute over fp32 master weights
    dist: Processes = field(default_factory=Processes)  # the processes training this model together
    params: list = field(default_factory=list)
    _ids: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def prompt_ids(self, example: dict) -> list[int]:
        key = ("p", example["id"])
        if key not in self._ids:
            self._ids[key] = encode_prompt(self.tokenizer, example["prompt"], self.chat_template)
        return self._ids[key]

    def demo_ids(self, example: dict) -> tuple[list[int], list[int]]:
        key = ("d", example["id"])
        if key not in self._ids:
            self._ids[key] = encode_completion(self.tokenizer, example["demonstration"])
        return self.prompt_ids(example), self._ids[key]

    @torch.no_grad()
    def ref_logprobs(self, prompts: list[list[int]], completions: list[list[int]],
                     group: list[int] | None = None) -> torch.Tensor:
        logprobs, _, _ = sequence_logprobs(self, prompts, completions, grad=False, model=self.reference,
                                           group=group)
        return logprobs

    def adamw(self, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """An AdamW over the trainable parameters, with torch's fused kernel on CPU and CUDA (FSDP's
        DTensor shards included, as torchtitan's optimizer default): one pass over each tensor instead of a
        for-loop of ops, the same update to float rounding; on SmolLM2 (2 CPU threads) a step took
        0.12 s instead of 0.33 s (README)."""
        fused = self.device.type in ("cpu", "cuda") or None
        return torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=fused)

    def compute(self):
        """Mixed-precision context for forwards (a no-op for fp32 models)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device):
    """One (B, Pw + Cw) batch: prompts left-padded to width Pw, completions right-padded to Cw,
    so every row's completion starts at column Pw. Returns ids, attention, positions (B, Pw + Cw),
    targets and mask (B, Cw), and `keep`: the Cw columns whose logits predict the completion
    (Pw − 1 ..), so the model computes logits (B, Cw, V) only there, never over the prompt."""
    p_ids, p_mask = left_pad(prompts, pad_id, torch.device("cpu"))
    width = max(len(c) for c in completions)
    targets = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width))
    for i, c in enumerate(completions):
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1.0
    ids = torch.cat([p_ids, targets], dim=1)
    attention = torch.cat([p_mask, mask.long()], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(p_ids.shape[1] - 1, ids.shape[1] - 1)
    return (ids.to(device), attention.to(device), positions.to(device), targets.to(device), mask.to(device),
            keep.to(device))


def group_runs(group: list[int], prompts: list[list[int]] | None = None) -> list[int]:
    """Sizes of the runs of equal group ids, in order: [7, 7, 3, 3, 3] -> [2, 3]. With prompts,
    a run also ends where the prompt changes (sequential revision: a group's later attempts
    continue different conversations)."""
    runs: list[int] = []
    for i, g in enumerate(group):
        if i and g == group[i - 1] and (prompts is None or prompts[i] == prompts[i - 1]):
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def shared_prompt_logits(model, prompts: list[list[int]], completions: list[list[int]], sizes: list[int],
                         pad_id: int, device: torch.device):
    """Logits for groups of completions that share a prompt, each prompt run ONCE: the prompt pass
    builds a KV cache (kept in the graph), repeated per group row for the completion pass.
    prompts: one per group; sizes: rows per group (sum = B = len(completions)). Returns logits
    (B, Lc, V), targets (B, Lc), mask (B, Lc), where column k of row i predicts completion token k.
    Same values as the packed path, fewer FLOPs when prompts are long or groups large (a compact
    V-IRL prompt is ~30x its answer)."""
    p_ids, p_mask = left_pad(prompts, pad_id, device)
    out = forward(model, p_ids, p_mask, (p_mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1)
    uniform = len(set(sizes)) == 1
    rows = sizes[0] if uniform else torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                                             torch.tensor(sizes, device=device))
    cache, first = cache_of(out), out.logits[:, -1:]  # predicts token 0
    first = first.repeat_interleave(rows, dim=0) if uniform else first[rows]
    width = max(len(c) for c in completions)
    targets = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width))
    for i, c in enumerate(completions):
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1.0
    targets, mask = targets.to(device), mask.to(device)
    if width == 1:
        return first, targets, mask
    if uniform:
        cache.batch_repeat_interleave(rows)
        p_mask = p_mask.repeat_interleave(rows, dim=0)
    else:
        cache.batch_select_indices(rows)
        p_mask = p_mask[rows]
    positions = p_mask.sum(-1, keepdim=True) + torch.arange(width - 1, device=device)
    attention = torch.cat([p_mask, mask[:, :-1].long()], dim=-1)
    rest = forward(model, targets[:, :-1], attention, positions, cache).logits
    return torch.cat([first, rest], dim=1), targets, mask


def sequence_logprobs(policy: Policy, prompts: list[list[int]], completions: list[list[int]],
                      grad: bool = True, model: torch.nn.Module | None = None,
                      group: list[int] | None = None, entropy_grad: bool = False):
    """Token log-probs, entropies and the completion mask, all (B, T) and aligned.
    group: a group id per row (a group's rows are contiguous, as in Rollouts.group); each run of
    rows sharing a group and a prompt then runs the prompt once. None: every row is packed whole.
    entropy_grad: keep the entropies in the graph (for an entropy bonus); else detached."""
    model = model or policy.model
    with torch.set_grad_enabled(grad), policy.compute():
        if group is not None:
            sizes = group_runs(group, prompts)
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            logits, targets, mask = shared_prompt_logits(model, [prompts[s] for s in starts], completions, sizes,
                                                         policy.tokenizer.pad_token_id, policy.device)
        else:
            ids, attention, positions, targets, mask, keep = pack(prompts, completions,
                                                                  policy.tokenizer.pad_token_id, policy.device)
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=keep).logits
        logprobs = algo.token_logprobs(logits, targets)
        entropy = algo.token_entropy(logits) if entropy_grad and grad else None
    if entropy is None:
        with torch.no_grad():
            entropy = algo.token_entropy(logits.detach())
    return logprobs, entropy, mask


# (logprobs, mask, rows, entropy) of one micro-batch -> (loss, stats: name -> value or (value, weight))
ChunkLoss = Callable[[torch.Tensor, torch.Tensor, slice, torch.Tensor], tuple[torch.Tensor, dict]]


def chunk_rows(group: list[int] | None, rows: int, micro_batch: int, split: int | None = None) -> list[slice]:
    """Row slices of at most micro_batch rows (0 = all at once) that never split a group; a
    group larger than micro_batch is one chunk. group None: every row is its own group.
    split: no slice crosses this row (a group boundary)."""
    sizes = group_runs(group) if group is not None else [1] * rows
    limit = micro_batch or rows
    chunks, start, size = [], 0, 0
    for n in sizes:
        if size and (size + n > limit or start + size == split):
            chunks.append(slice(start, start + size))
            start, size = start + size, 0
        size += n
    if size:
        chunks.append(slice(start, start + size))
    return chunks


def grads_in_chunks(policy: Policy, prompts: list[list[int]], completions: list[list[int]],
                    chunk_loss: ChunkLoss, micro_batch: int = 0, group: list[int] | None = None,
                    entropy_grad: bool = False, forward_only_from: int | None = None,
                    ) -> tuple[list[torch.Tensor], float, dict]:
    """Gradients (one tensor per trainable parameter) of a batch loss computed micro_batch
    sequences at a time (0 = all at once; groups are never split). chunk_loss(logprobs, mask,
    rows, entropy) must normalise by whole-batch counts so the chunks add up to the batch loss
    (algo.aggregate's num_tokens). group: per-row group ids for the shared-prompt forward.
    forward_only_from: rows from this index on have a loss without gradient (e.g. GRPO's
    zero-advantage groups): they run without autograd and add only their loss and stats; a
    non-zero finite loss there is a bug of whoever said so, and raises.
    Several processes: the rows are this process's share of the batch, the normalisers count
    the whole batch, and gradients, loss and stats are summed over the processes.
    Returns (grads, loss value, stats: entropy = mean response-token entropy, plus chunk stats
    averaged over the chunks by token count, or by the weight a chunk gives as (value, weight))."""
    sharded = policy.dist.sharded  # FSDP: backward() reduce-scatters into each shard's .grad (sharding.py)
    grads = [torch.zeros_like(p) for p in policy.params] if not sharded else []
    loss_value, sums, weights = 0.0, {}, {}
    split = len(prompts) if forward_only_from is None else forward_only_from
    for rows in chunk_rows(group, len(prompts), micro_batch, split):
        train = rows.stop <= split
        logprobs, entropy, mask = sequence_logprobs(policy, prompts[rows], completions[rows], grad=train,
                                                    group=group[rows] if group is not None else None,
                                                    entropy_grad=entropy_grad)
        loss, stats = chunk_loss(logprobs, mask, rows, entropy)
        if not train:
            if loss.item() != 0.0 and math.isfinite(loss.item()):
                raise RuntimeError(f"rows {rows.start}..{rows.stop - 1} were said to have no gradient, "
                                   f"but their loss is {loss.item()}")
        elif sharded:
            loss.backward()
        else:
            for g, new in zip(grads, torch.autograd.grad(loss, policy.params, allow_unused=True)):
                if new is not None:
                    g += new
        n = mask.sum().item()
        loss_value += loss.item()
        for k, v in {"entropy": ((entropy.detach() * mask).sum().item() / max(n, 1.0), n), **stats}.items():
            value, weight = v if isinstance(v, tuple) else (v, n)
            sums[k], weights[k] = sums.get(k, 0.0) + value * weight, weights.get(k, 0.0) + weight
    if sharded:  # FSDP averaged the processes' gradients: their sum (sharding.py)
        grads = [p.grad * policy.dist.count if p.grad is not None else torch.zeros_like(p) for p in policy.params]
        for p in policy.params:
            p.grad = None
    keys = list(sums)  # the same order on every process (the same code made them)
    loss_value, *totals = policy.dist.sum_floats([loss_value] + [sums[k] for k in keys] + [weights[k] for k in keys])
    return policy.dist.sum_grads(grads), loss_value, {k: totals[i] / max(totals[len(keys) + i], 1.0)
                                                      for i, k in enumerate(keys)}


# (logprobs, mask, entropy, num_tokens of the whole batch) -> (loss, stats)
SFTLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, dict]]


def plain_nll(logprobs: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
              num_tokens: float) -> tuple[torch.Tensor, dict]:
    return algo.sft_loss(logprobs, mask, num_tokens), {}


def sft_grads(policy: Policy, examples: list[dict], micro_batch: int = 0, loss: SFTLoss = plain_nll,
              entropy_grad: bool = False) -> tuple[list, float, dict]:
    """∇ of an SFT loss on the examples' demonstrations (default: token-mean NLL). Returns
    (grads, loss value, stats: entropy = mean entropy on the demonstrations, plus the loss's).
    examples: the same list on every process; each differentiates its share."""
    pairs = [policy.demo_ids(ex) for ex in examples]
    num_tokens = float(sum(len(c) for _, c in pairs))  # the whole batch's
    pairs = policy.dist.shard(pairs)
    completions = [c for _, c in pairs]
    return grads_in_chunks(policy, [p for p, _ in pairs], completions,
                           lambda lp, mask, rows, entropy: loss(lp, mask, entropy, num_tokens), micro_batch,
                           entropy_grad=entropy_grad)


def load_for_training(cfg: Config, checkpoint: Path | None = None, dist: Processes | None = None) -> Policy:
    """The trainable policy (from a checkpoint when resuming) and its reference; dist: the
    processes training it together. The rollout backend is the trainer's (rollout.make_backend),
    not the policy's."""
    dist = dist or Processes()
    device = dist.device(resolve_device(cfg.model.device))
    if device.type == "cpu":
        keep_freed_memory()
    mcfg = replace(cfg.model, path=str(checkpoint)) if checkpoint is not None else cfg.model
    autocast = None
    if mcfg.lora_rank == 0 and mcfg.dtype != "float32":
        # full fine-tuning keeps fp32 master weights: a bf16 AdamW step at lr 1e-6 rounds most updates away
        autocast, mcfg = getattr(torch, mcfg.dtype), replace(mcfg, dtype="float32")
    model, tokenizer = load_policy(mcfg, device, trainable=True)
    if dist.sharded:
        from amft_cli.sharding import shard_model

        model = shard_model(model, dist)
    model.train()
    reference = None
    if cfg.rl.kl_beta > 0:
        reference, _ = load_policy(replace(cfg.model, lora_rank=0), device, trainable=False)
        reference.eval().requires_grad_(False)
    return Policy(model, tokenizer, device, cfg.model.chat_template, reference, autocast, dist)
