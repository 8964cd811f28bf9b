"""rl: GRPO on the model's own samples only (μ = 0, no demonstrations).

GRPO (Shao et al. 2024, arXiv 2402.03300) as verl's core_algos.py computes it
(`compute_grpo_outcome_advantage`, `compute_policy_loss`): group-normalised
advantages, PPO clip, optional KL to a reference. Departures (all knobs in
[rl]): token-mean aggregation by default (DAPO/Dr. GRPO) instead of the paper's
sequence mean; one update per rollout batch, so the ratio is 1 at the update.
"""

from __future__ import annotations

from amft_cli.methods import register
from amft_cli.methods.base import Method


@register("rl")
class RL(Method):
    def mu(self, step: int) -> float:
        return 0.0
