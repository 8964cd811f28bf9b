"""amft: Adaptive Meta Fine-Tuning — SFT and RL in one stage with a learned balance μ.

Paper: He et al. 2025, arXiv 2508.06944; the authors' code never ran (its rollouts
are random tensors), so this follows the paper's derivation (DESIGN §1):
  1. warm-up: [amft] warmup_steps of pure SFT (μ = 1); then H*, the mean token
     entropy on held-out demonstration responses, is measured once;
  2. every step after: Δ_H = η_H·(H* − H) from the rollouts' entropy;
  3. every meta_every steps: Δ_meta = η_meta·dU(θ')/dμ, a one-step lookahead on a
     held-out utility U: dθ'/dμ of the REAL AdamW update is taken before the step
     (`control`), ∇U at θ' after it (`after_update`), algo.meta_gradient;
  4. μ ← clip(μ + Δ_meta + Δ_H, μ_min, μ_max).
After warm-up both signals are computed at every μ, so μ = 1 (mu_max = 1) is not a
dead end. Departures are listed in algo.py's docstring (the meta-gradient through
AdamW, cosine normalisation, the authors' sign error fixed). The warm-up is known here only."""

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
    sum_delta_meta: float = 0.0         # Σ η_meta·dU/dμ since warm-up, and Σ Δ_H: what each term has
    sum_delta_entropy: float = 0.0      # asked of μ (before the clip), so a run shows which one steers it


@register("amft")
class AMFT(Method):
    def __init__(self, cfg: Config, policy: Policy) -> None:
        super().__init__(cfg, policy)
        self.state = ControllerState(mu=cfg.amft.mu_init)
        self._pending: tuple = (None, None)  # (rollout entropy, lookahead) from control to after_update

    @classmethod
    def shared_batches(cls, cfg: Config) -> dict[str, int]:
        return {**super().shared_batches(cfg), "amft.meta_prompts": cfg.amft.meta_prompts}

    def in_warmup(self, step: int) -> bool:
        return step < self.cfg.amft.warmup_steps

    def mu(self, step: int) -> float:
        return 1.0 if self.in_warmup(step) else self.state.mu

    def needs_both_signals(self, step: int) -> bool:
        return not self.in_warmup(step)

    def meta_step_due(self, step: int) -> bool:
        """Every meta_every steps after warm-up, starting with the first one."""
        return not self.in_warmup(step) and (step - self.cfg.amft.warmup_steps) % self.cfg.amft.meta_every == 0

    def control(self, run: Run, step: int, metrics: dict, g_sft: list | None, g_rl: list | None,
                lookahead: Callable[[], tuple]) -> dict:
        """Before the step: H* at the end of warm-up, dθ'/dμ of the step on meta-gradient steps."""
        if step >= self.cfg.amft.warmup_steps and self.state.entropy_target is None:  # >=: a skipped step
            self.state.entropy_target = measure_entropy_target(run.policy, run.val_set)
            run.on_message(f"warm-up done after {step} steps: entropy target H* = {self.state.entropy_target:.3f}")
        due = self.meta_step_due(step) and g_sft is not None and g_rl is not None
        self._pending = (metrics.get("policy/entropy"), lookahead() if due else None)
        return {}

    def after_update(self, run: Run, step: int) -> dict:
        """After the step θ → θ': the μ update, with ∇U at θ'."""
        (entropy, derivative), self._pending = self._pending, (None, None)  # frees the 3 vectors after use
        out = controller_step(self.cfg, self.state, step, entropy, derivative, lambda: utility_grad(run, self),
                              dot=run.policy.dist.dot)
        return {**out, "balance/warmup": float(self.in_warmup(step))}

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = ControllerState(**state)


def controller_step(cfg: Config, state: ControllerState, step: int, entropy: float | None,
                    lookahead: tuple | None, utility: Callable[[], torch.Tensor], dot: algo.Dot = algo.local_dot) -> dict:
    """AMFT's μ update right after the step θ → θ' (DESIGN §1, steps 2–4). Returns balance/* metrics.

    entropy: the step's rollout entropy H. lookahead: (dθ'/dμ, Δ_SFT, Δ_RL) of that step,
    computed before it was taken, on meta-gradient steps (None otherwise). utility(): ∇U at θ' (P,).
    dot: ⟨·,·⟩ of those vectors (with FSDP each process holds a part: parallel.Processes.dot).
    """
    metrics: dict = {"balance/meta_update": 0.0}
    if step >= cfg.amft.warmup_steps and entropy is not None and state.entropy_target is not None:
        state.entropy_term = algo.entropy_term(entropy, state.entropy_target, cfg.amft.eta_entropy)
        delta_meta = 0.0
        if lookahead is not None:
            metrics.update(meta_step(cfg, state, lookahead, utility(), dot))
            delta_meta = cfg.amft.eta_meta * state.meta_grad
        state.mu = algo.update_mu(state.mu, delta_meta, state.entropy_term, cfg.amft.mu_min, cfg.amft.mu_max)
        state.sum_delta_meta += delta_meta
        state.sum_delta_entropy += state.entropy_term
    return {**metrics, "balance/meta_grad": state.meta_grad, "balance/entropy_term": state.entropy_term,
            "balance/entropy_target": state.entropy_target, "balance/sum_delta_meta": state.sum_delta_meta,
            "balance/sum_delta_entropy": state.sum_delta_entropy}


def meta_step(cfg: Config, state: ControllerState, lookahead: tuple, grad_utility: torch.Tensor,
              dot: algo.Dot = algo.local_dot) -> dict:
    """dU(θ')/dμ = ⟨∇U(θ'), dθ'/dμ⟩ into state.meta_grad; returns what a researcher needs to trust
    it: the raw and cosine forms, cos(∇U, each signal's own step) and the signal the step favoured."""
    derivative, step_sft, step_rl = lookahead
    raw = algo.meta_gradient(grad_utility, derivative, "raw", dot)
    normalised = algo.meta_gradient(grad_utility, derivative, "cosine", dot)
    state.meta_grad = raw if cfg.amft.meta_grad_norm == "raw" else normalised
    return {"balance/meta_update": 1.0, "balance/meta_grad_raw": raw, "balance/meta_grad_cosine": normalised,
            "balance/cos_utility_sft_step": algo.cosine(grad_utility, step_sft, dot),
            "balance/cos_utility_rl_step": algo.cosine(grad_utility, step_rl, dot),
            "balance/meta_favours": 1.0 if raw > 0 else -1.0 if raw < 0 else 0.0}  # +1 SFT (μ up), −1 RL


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
    return policy.dist.flat(grads, policy.params).neg_()


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
