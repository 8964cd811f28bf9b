"""relift: GRPO, plus SFT on the demonstrations of the hardest prompts, interleaved in the same step.

Paper: Ma et al. 2025, "Learning What Reinforcement Learning Can't: Interleaved Online
Fine-Tuning for Hardest Questions" (arXiv 2506.07527). Official code: TheRoadQaQ/ReLIFT —
relift/verl/verl/relift/trainer.py, `ReliftPPOTrainer.fit` (a prompt whose n rollouts all
score the failure reward goes to a buffer, newest first; once the buffer holds sft_data_size,
that many are taken for an SFT update right after the RL update), actor.py
`sft_update_policy` (loss NLL − entropy_coeff·entropy, its own optimizer and grad clip),
fsdp_worker.py (that optimizer: AdamW, lr optim.sft.lr, weight decay 1e-2), config
relift_trainer.yaml (sft_data_size 32, entropy_coeff 0.001, lr 1e-6).

Here "all failed" reads the verifier's statuses: a group is hardest when no rollout is
correct and none has a status in [relift] format_failures (ReLIFT compares rewards with its
failure value, so format failures, which score lower, keep a prompt out; our tasks do not
all score them lower, hence statuses). The RL step is the engine's GRPO ([rl]).
Departures:
 1. ReLIFT's 7B script also changes the RL loss (no std, no clip, length-normalised sum,
    entropy bonus: LUFFY's settings); here the RL side is plain [rl] GRPO. Set
    rl.scale_adv_by_std = false for the no-std part.
 2. The buffered SFT update is one step on sft_data_size demonstrations (the script's
    sft_mini_batch_size equals sft_data_size: one step there too).
 3. That step's loss is one token mean over all its demonstrations, clipped at sft_grad_clip.
    ReLIFT's actor.py `sft_update_policy` takes a token mean per micro-batch (4 rows in the 7B
    script), divides by the accumulation count and, as each GPU holds a share of the rows,
    ends about 1/world_size of a mean of micro-batch means: its clip of 1.0 acts on a gradient
    ~8× smaller than ours, so it bites less often there, and long demonstrations weigh less.
"""

from __future__ import annotations

import math

import torch

from amft_cli import algo, guard, sharding
from amft_cli.config import Config
from amft_cli.methods import register
from amft_cli.methods.base import Method
from amft_cli.policy import Policy, sft_grads
from amft_cli.rollout import Rollouts
from amft_cli.signals import Run

def hardest_groups(group: list[int], statuses: list[str], format_failures: list[str]) -> list[int]:
    """Group ids, in order of first appearance, whose rows all failed, none of them with a
    status in format_failures."""
    ids = list(dict.fromkeys(group))
    return [g for g in ids if all(s != "correct" and s not in format_failures
                                  for s, row_group in zip(statuses, group) if row_group == g)]


class HardestBuffer:
    """Demonstrations of hardest prompts, newest first; `take` removes the newest n."""

    def __init__(self, examples: list[dict] | None = None) -> None:
        self.examples = list(examples or [])

    def add(self, examples: list[dict]) -> None:
        self.examples = list(examples) + self.examples

    def take(self, n: int) -> list[dict] | None:
        """The newest n examples when the buffer holds at least n, else None (nothing taken)."""
        if len(self.examples) < n:
            return None
        taken, self.examples = self.examples[:n], self.examples[n:]
        return taken


@register("relift")
class ReLIFT(Method):
    def __init__(self, cfg: Config, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.buffer, self.policy = HardestBuffer(), policy
        self.optimizer = policy.adamw(cfg.relift.lr, cfg.relift.weight_decay)
        self.hardest = 0

    @classmethod
    def shared_batches(cls, cfg: Config) -> dict[str, int]:
        return {**super().shared_batches(cfg), "relift.sft_data_size": cfg.relift.sft_data_size}

    def mu(self, step: int) -> float:
        return 0.0

    def observe(self, run: Run, examples: list[dict], rollouts: Rollouts, rewards: torch.Tensor,
                statuses: list[str]) -> None:
        hardest = hardest_groups(rollouts.group, statuses, self.cfg.relift.format_failures)
        hardest = run.gather([examples[g] for g in hardest])  # every process keeps the whole buffer
        self.hardest = len(hardest)
        self.buffer.add(hardest)

    def after_update(self, run: Run, step: int) -> dict:
        metrics = {"relift/hardest": float(self.hardest), "relift/sft_update": 0.0}
        demos = self.buffer.take(self.cfg.relift.sft_data_size)
        if demos is not None:
            metrics.update({**self.sft_update(run, demos), "relift/sft_update": 1.0})
        metrics["relift/buffer"] = float(len(self.buffer.examples))
        return metrics

    def sft_update(self, run: Run, demos: list[dict]) -> dict:
        """One AdamW step of ReLIFT's own optimizer on NLL − c·entropy of the demonstrations."""
        coef, policy = self.cfg.relift.entropy_coeff, run.policy

        def loss(logprobs, mask, entropy, num_tokens):
            nll = algo.sft_loss(logprobs, mask, num_tokens)
            return nll - coef * algo.aggregate(entropy, mask, "token-mean", num_tokens), {"nll": nll.item()}

        grads, value, stats = sft_grads(policy, demos, self.cfg.train.micro_batch_size, loss, entropy_grad=coef != 0)
        if not math.isfinite(value) or not math.isfinite(guard.grad_norm(grads)):  # never into the weights
            return {"relift/sft_loss": value, "relift/sft_skipped": 1.0}
        for p, g in zip(policy.params, grads):
            p.grad = g
        norm = guard.whole(torch.nn.utils.clip_grad_norm_(policy.params, self.cfg.relift.grad_clip)).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if run.backend is not None:
            run.backend.sync_weights()  # its own step moved the weights too
        return {"relift/sft_loss": value, "relift/sft_grad_norm": norm, "relift/sft_entropy": stats["entropy"]}

    def state_dict(self) -> dict:
        optimizer = (sharding.full_optimizer_state(self.policy.model, self.optimizer) if self.policy.dist.sharded
                     else self.optimizer.state_dict())
        return {"buffer": self.buffer.examples, "optimizer": optimizer, "hardest": self.hardest}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = HardestBuffer(state["buffer"])
        if self.policy.dist.sharded:
            sharding.load_optimizer_state(self.policy.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.hardest = state["hardest"]
