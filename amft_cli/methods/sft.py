"""sft: supervised fine-tuning on the demonstrations only (μ = 1, no rollouts).

The imitation half of DESIGN §1: token-mean negative log-likelihood of the
demonstration's response tokens (prompt tokens excluded), as TRL's SFTTrainer
with completion-only loss. No departures.
"""

from __future__ import annotations

from amft_cli.methods import register
from amft_cli.methods.base import Method


@register("sft")
class SFT(Method):
    uses_rollouts = False

    def mu(self, step: int) -> float:
        return 1.0
