"""amft: Adaptive Meta Fine-Tuning — SFT and RL in one stage with a learned balance μ.

Paper: He et al. 2025, arXiv 2508.06944; the authors' code never ran (its rollouts
are random tensors), so this follows the paper's derivation (DESIGN §1):
  1. warm-up: [amft] warmup_steps of pure SFT (μ = 1); then H*, the mean token
     entropy on held-out demonstration responses, is measured once;
  2. every step after: Δ_H = η_H·(H* − H) from the rollouts' entropy;
  3. every meta_every steps: Δ_meta = η_meta·dU/dμ, a one-step lookahead on a
     held-out utility U (algo.meta_gradient);
  4. μ ← clip(μ + Δ_meta + Δ_H, μ_min, μ_max).
Departures are listed in algo.py's docstring (first-order meta-gradient, cosine
normalisation, the authors' sign error fixed). The warm-up is known here only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from amft_cli import algo
from amft_cli.config import Config
from amft_cli.methods import register
from amft_cli.methods.base import Method
from amft_cli.policy import Policy, sequence_logprobs, sft_grads
from amft_cli.signals import PhaseTimer, Run, rl_signal


@dataclass
class ControllerState:
    """What the μ controller carries between steps (saved in checkpoints)."""

    mu: float                           # learned μ (used by amft after warm-up)
    entropy_target: float | None = None  # H*, measured once at the end of warm-up
    meta_grad: float = 0.0              # last dU/dμ signal
    entropy_term: float = 0.0           # last Δ_H


@register("amft")
class AMFT(Method):
    def __init__(self, cfg: Config, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.state = ControllerState(mu=cfg.amft.mu_init)

    def in_warmup(self, step: int) -> bool:
        return step < self.cfg.amft.warmup_steps

    def mu(self, step: int) -> float:
        return 1.0 if self.in_warmup(step) else self.state.mu

    def control(self, run: Run, step: int, metrics: dict, g_sft: list | None, g_rl: list | None) -> dict:
        if step == self.cfg.amft.warmup_steps and self.state.entropy_target is None:
            self.state.entropy_target = measure_entropy_target(run.policy, run.val_set)
            run.on_message(f"warm-up done after {step} steps: entropy target H* = {self.state.entropy_target:.3f}")
        out = controller_step(run.policy, self.cfg, self.state, step, metrics.get("policy/entropy"), g_sft, g_rl,
                              lambda: utility_grad(run, self))
        return {**out, "balance/warmup": float(self.in_warmup(step))}

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = ControllerState(**state)


def controller_step(policy: Policy, cfg: Config, state: ControllerState, step: int, entropy: float | None,
                    g_sft, g_rl, utility: Callable[[], torch.Tensor]) -> dict:
    """AMFT's μ update after a step at θ (DESIGN §1, steps 2–4). Returns balance/* metrics."""
    meta_update = 0.0
    if step >= cfg.amft.warmup_steps and entropy is not None and state.entropy_target is not None:
        state.entropy_term = algo.entropy_term(entropy, state.entropy_target, cfg.amft.eta_entropy)
        delta_meta = 0.0
        if (step - cfg.amft.warmup_steps) % cfg.amft.meta_every == 0 and g_sft is not None and g_rl is not None:
            state.meta_grad = algo.meta_gradient(
                utility(), algo.flatten_grads(g_rl, policy.params), algo.flatten_grads(g_sft, policy.params),
                cfg.train.rl_lr or cfg.train.lr, cfg.train.lr, cfg.amft.meta_grad_norm)
            delta_meta, meta_update = cfg.amft.eta_meta * state.meta_grad, 1.0
        state.mu = algo.update_mu(state.mu, delta_meta, state.entropy_term, cfg.amft.mu_min, cfg.amft.mu_max)
    return {"balance/meta_grad": state.meta_grad, "balance/meta_update": meta_update,
            "balance/entropy_term": state.entropy_term, "balance/entropy_target": state.entropy_target}


def utility_grad(run: Run, method: Method) -> torch.Tensor:
    """∇θ U on held-out data, flattened (P,). reward: −∇L_RL on fresh validation rollouts
    (the advantage-weighted ∇log π estimate); nll: −∇L_SFT on held-out demonstrations."""
    cfg, policy = run.cfg, run.policy
    count = cfg.amft.meta_prompts if cfg.amft.utility == "reward" else cfg.train.sft_batch_size
    examples = run.draw("val", count)
    if cfg.amft.utility == "reward":
        grads, _, _ = rl_signal(run, examples, method, PhaseTimer())
    else:
        grads, _, _ = sft_grads(policy, examples, cfg.train.micro_batch_size)
    return -algo.flatten_grads(grads, policy.params)


@torch.no_grad()
def measure_entropy_target(policy: Policy, val_set: list[dict], batch: int = 64) -> float:
    """H*: mean per-token entropy on held-out demonstration response tokens (prompt tokens excluded)."""
    total, count = 0.0, 0.0
    for start in range(0, len(val_set), batch):
        chunk = val_set[start:start + batch]
        pairs = [policy.demo_ids(ex) for ex in chunk]
        _, entropy, mask = sequence_logprobs(policy, [p for p, _ in pairs], [c for _, c in pairs], grad=False)
        total += (entropy * mask).sum().item()
        count += mask.sum().item()
    return total / max(count, 1.0)
