"""What a method can change, as hooks the loop calls in this order every step:

    mu(step)                                  the balance μ of L = μ·L_SFT + (1−μ)·L_RL
    needs_both_signals(step)                  compute g_RL and g_SFT even at μ = 1 or 0
    samples_per_prompt()                      rollouts sampled per prompt        ┐ only when
    shape_rollouts(run, rollouts, examples)   e.g. add off-policy rows to groups │ μ < 1 (*)
    observe(run, examples, rollouts, ...)     see the scored groups (buffers)    │
    advantages(rewards, rollouts)             per-row advantages                 │
    zero_gradient_rows(batch)                 rows rl_loss gives no gradient     │
    rl_loss(logprobs, mask, batch, rows, ...) the RL loss of a micro-batch       ┘
    sft_examples(run, rl_examples)            the demonstrations of this step    ┐ only when
    sft_loss(logprobs, mask, entropy, n)      the SFT loss of a micro-batch      ┘ μ > 0 (*)
    control(run, step, metrics, g_sft, g_rl, lookahead)  the method's own state, before the update
    after_update(run, step)                   extra work after the optimizer step
    state_dict() / load_state_dict(state)     the method's state, for exact resume

(*) or whenever needs_both_signals(step).

The defaults are GRPO (group advantages, PPO clip, optional KL) and token-mean NLL.
With several training processes (parallel.py) every process runs every hook: the RL hooks
see this process's share of the groups, rl_loss/sft_loss normalise by the whole batch's
counts (batch.num_tokens, num_seqs, num_tokens), and control/after_update see gradients and
metrics of the whole batch, so every process takes the same decisions.
"""

from __future__ import annotations

from typing import Callable

import torch

from amft_cli import algo
from amft_cli.config import Config
from amft_cli.policy import Policy
from amft_cli.rollout import Rollouts
from amft_cli.signals import RLBatch, Run, behaviour_logprobs


class Method:
    """A training method: the defaults of every hook. Subclasses override what they change."""

    name = "base"
    uses_rollouts = True  # False: never samples, so no rollout engine is started
    entropy_grad = False  # True: the losses get token entropies in the graph (entropy bonus)

    def __init__(self, cfg: Config, policy: Policy) -> None:
        self.cfg = cfg

    @classmethod
    def shared_batches(cls, cfg: Config) -> dict[str, int]:
        """The batch knobs whose examples several training processes share out (each needs at
        least one): checked before any work (train.check_processes)."""
        return {"train.prompts_per_step": cfg.train.prompts_per_step, "train.sft_batch_size": cfg.train.sft_batch_size}

    # --- the balance

    def mu(self, step: int) -> float:
        """μ at 0-based `step`: 1 = SFT only (no rollouts), 0 = RL only (no demonstrations)."""
        raise NotImplementedError

    def needs_both_signals(self, step: int) -> bool:
        """True: sample rollouts at μ = 1 and demonstrations at μ = 0 too (a controller that reads
        both signals); the update still gives the weightless one weight 0."""
        return False

    # --- the RL batch

    def samples_per_prompt(self) -> int:
        return self.cfg.rl.group_size

    def shape_rollouts(self, run: Run, rollouts: Rollouts, examples: list[dict]) -> Rollouts:
        return rollouts

    def observe(self, run: Run, examples: list[dict], rollouts: Rollouts, rewards: torch.Tensor,
                statuses: list[str]) -> None:
        """See each step's scored groups (rollouts.group indexes `examples`). With several training
        processes each sees its share of the groups: state built here must gather the whole
        batch (run.gather) so that every process decides the same (ReLIFT's buffer does)."""

    def advantages(self, rewards: torch.Tensor, rollouts: Rollouts) -> torch.Tensor:
        return algo.group_advantages(rewards, rollouts.group, self.cfg.rl.scale_adv_by_std)

    def rl_loss(self, logprobs: torch.Tensor, mask: torch.Tensor, batch: RLBatch, rows: slice,
                ref_logprobs: torch.Tensor | None, entropy: torch.Tensor,
                is_weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of the batch rows `rows` (logprobs, mask, entropy (b, T)), normalised by whole-batch
        counts so that micro-batches add up to the batch loss. is_weights (b, T): the sampler
        correction (algo.sampler_is_weights), to scale each token's policy-gradient term."""
        rl = self.cfg.rl
        return algo.policy_loss(
            logprobs, behaviour_logprobs(logprobs, batch, rows), batch.advantages[rows].to(logprobs.device),
            mask, rl.clip_eps, rl.clip_eps_high, rl.loss_agg, ref_logprobs, rl.kl_beta,
            batch.num_tokens, batch.num_seqs, is_weights)

    def zero_gradient_rows(self, batch: RLBatch) -> torch.Tensor:
        """(N,) bool: the rows whose term of rl_loss has no gradient, whatever θ, so the loop may run
        them forward only (rl.skip_zero_advantage). Every term of the default loss (and LUFFY's) is
        scaled by the row's advantage; a KL or entropy term gives every row a gradient. A method
        whose loss has terms not scaled by the advantage overrides this (SRFT)."""
        if self.cfg.rl.kl_beta > 0 or self.entropy_grad:
            return torch.zeros(len(batch.advantages), dtype=torch.bool)
        return batch.advantages == 0

    # --- the SFT batch

    def sft_examples(self, run: Run, rl_examples: list[dict]) -> list[dict]:
        """The demonstrations of this step (rl_examples: this step's RL prompts, if any)."""
        return run.draw("sft", self.cfg.train.sft_batch_size)

    def sft_loss(self, logprobs: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
                 num_tokens: float) -> tuple[torch.Tensor, dict]:
        """Loss of a micro-batch of demonstrations; num_tokens counts the whole batch's tokens."""
        return algo.sft_loss(logprobs, mask, num_tokens), {}

    # --- the method's own state

    def control(self, run: Run, step: int, metrics: dict, g_sft: list | None, g_rl: list | None,
                lookahead: Callable[[], tuple]) -> dict:
        """After both signals are computed at θ, before the update. lookahead() computes
        (dθ'/dμ, Δ_SFT, Δ_RL), all (P,), of the update about to be taken (train.update_derivative).
        Returns metrics."""
        return {}

    def after_update(self, run: Run, step: int) -> dict:
        """After the optimizer step. Returns metrics."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the method. Called on every training process (FSDP: an
        optimizer's sharded state is gathered with a collective, sharding.py); the main one writes it."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
