"""mix: a fixed single-stage mix, μ = [mix] mu at every step.

The hand-set balance that AMFT learns instead (the "SFT+RL" single-stage
baseline of the AMFT and LUFFY papers). No departures.
"""

from __future__ import annotations

from amft_cli.methods import register
from amft_cli.methods.base import Method


@register("mix")
class Mix(Method):
    def mu(self, step: int) -> float:
        return self.cfg.mix.mu
