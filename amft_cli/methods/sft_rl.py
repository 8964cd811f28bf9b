"""sft-rl: the classic two-stage pipeline — pure SFT for [sft_rl] switch_step steps, then pure GRPO.

As in Chu et al. 2025 ("SFT Memorizes, RL Generalizes", arXiv 2501.17161) and
the SFT→RL baselines of LUFFY and AMFT, in one run: the RL stage starts from
the SFT weights with the same AdamW state (a second stage would usually start
a fresh optimizer; with train.rl_lr > 0 it does: RL has its own AdamW).
"""

from __future__ import annotations

from amft_cli.methods import register
from amft_cli.methods.base import Method


@register("sft-rl")
class SFTThenRL(Method):
    def mu(self, step: int) -> float:
        return 1.0 if step < self.cfg.sft_rl.switch_step else 0.0
