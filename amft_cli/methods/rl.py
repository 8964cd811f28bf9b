"""rl: GRPO on the model's own samples only (μ = 0, no demonstrations).

GRPO (Shao et al. 2024, arXiv 2402.03300) as verl's core_algos.py computes it
(`compute_grpo_outcome_advantage`, `compute_policy_loss`): group-normalised
advantages, PPO clip, optional KL to a reference. Departures (all knobs in
[rl]): token-mean aggregation by default (DAPO) instead of the paper's sequence mean;
one update per rollout batch, so the ratio is 1 at the update; and, as TRL does, each
row's PPO term is weighted by exp(Σ_tokens logπ_train − logπ_sampler), and dropped where
that exceeds rl.sampler_is_cap = 3 (rl.sampler_correction = "sequence_mask"; algo.py
`sampler_is_weights`): a no-op when the sampler is the trainer in float32, not with bf16
or vLLM sampling. verl has no such weight.
"""

from __future__ import annotations

from amft_cli.methods import register
from amft_cli.methods.base import Method


@register("rl")
class RL(Method):
    def mu(self, step: int) -> float:
        return 0.0
