"""chord: GRPO on the model's own samples plus a scheduled, token-weighted SFT loss on expert data.

Paper: "On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and
Reinforcement Learning via Dynamic Weighting" (arXiv 2508.11408). Official code: modelscope/Trinity-RFT,
trinity/algorithm/policy_loss_fn/chord_policy_loss.py — `mu_schedule_function` (the μ
schedule), `phi_function` and `SFTPhiLossFn` (φ-weighted NLL), `MIXCHORDPolicyLossFn`
(L = (1−μ)·L_GRPO on the usual rows + μ·L_SFT on the expert rows, each a token mean).

Here: μ = algo.chord_mu(step, [chord] W, D, μ_peak, μ_valley); the SFT loss is the token-mean
of −φ·log p with φ = p(1−p) held constant (algo.chord_phi), or plain NLL with phi = false
(CHORD-µ). Expert demonstrations are [chord] expert_ratio of the step's sequences.
Departures:
 1. Trinity mixes expert and usual experiences in one batch and one loss call; here they are
    the engine's two signals, combined by apply_update (the same sum in shared-optimizer mode).
 2. Steps with μ = 0 (step 0 of the warm-up ramp) skip the expert forward, as its weight is 0.
 3. SFTPhiLossFn's optional `cutoff_prob` clamp is not offered (its default, 1.0, is a no-op).
"""

from __future__ import annotations

import torch

from amft_cli import algo
from amft_cli.methods import register
from amft_cli.methods.base import Method
from amft_cli.signals import Run


@register("chord")
class CHORD(Method):
    def mu(self, step: int) -> float:
        c = self.cfg.chord
        return algo.chord_mu(step, c.mu_warmup_steps, c.mu_decay_steps, c.mu_peak, c.mu_valley)

    def sft_examples(self, run: Run, rl_examples: list[dict]) -> list[dict]:
        rollouts = self.cfg.train.prompts_per_step * self.cfg.rl.group_size
        ratio = self.cfg.chord.expert_ratio
        return run.draw("sft", max(1, round(rollouts * ratio / (1.0 - ratio))))

    def sft_loss(self, logprobs: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
                 num_tokens: float) -> tuple[torch.Tensor, dict]:
        if not self.cfg.chord.phi:
            return algo.sft_loss(logprobs, mask, num_tokens), {}
        phi = algo.chord_phi(logprobs)
        return algo.sft_loss(logprobs, mask, num_tokens, weights=phi), {"phi": algo.masked_mean(phi, mask).item()}
