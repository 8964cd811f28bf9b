"""The math of AMFT and its baselines: pure torch functions, no I/O, no state.

Shapes: B sequences, T tokens (response positions, right-aligned with the
logits that predict them), V vocabulary, P parameters (flattened gradients).
A `mask` (B, T) is 1.0 on response tokens that count, 0.0 on prompt/padding.

Loss (DESIGN §1):   L(θ; μ) = μ · L_SFT(θ) + (1 − μ) · L_RL(θ),   μ ∈ [μ_min, μ_max]

Where this departs from the AMFT paper and the authors' code:
 1. The meta-gradient follows the step the optimizer REALLY takes, θ → θ'(μ), not the
    paper's plain SGD step θ − α[(1−μ)g_RL + μ·g_SFT]: dθ'/dμ is differentiated in
    closed form, per coordinate, through torch's AdamW (bias-corrected m̂/(√v̂+ε) after
    adding this step's gradient, decoupled weight decay, the lr schedule factor,
    grad-norm clipping). Split mode (two AdamWs at rates μ·α_SFT and (1−μ)·α_RL):
    dθ'/dμ = (1 + (2μ−1)·α_RL·λ)·Δ_SFT − Δ_RL, Δ_X each optimizer's own step. Shared mode
    (one AdamW on μ·g_SFT + (1−μ)·g_RL, the paper's form): the derivative of m̂/(√v̂+ε)
    and of the clip factor. ∇U is taken at θ' (after the step), so
    dU(θ')/dμ = ⟨∇U(θ'), dθ'/dμ⟩ is the exact chain rule of the one-step lookahead, not
    a first-order approximation at θ. Measured in a real tiny-math loop (30 meta steps,
    tests/test_meta.py): the SGD form at θ agreed in sign with a finite difference of U
    after the real update on 19/30 (split) and 20/30 (shared) steps, this form on 30/30
    and 30/30 (the AdamW derivative with ∇U still at θ: 29/30, 29/30). Adam normalises
    each coordinate, so the raw gradients' sizes say little about the step.
 2. `cosine` normalisation (default) uses cos(∇U, dθ'/dμ) instead of the raw
    product, so η_meta means the same for a 1M and a 7B model. It has the
    sign of the raw derivative by construction.
 3. The authors' released code ADDS dL_val/dμ to μ, which moves μ toward the
    signal that raises validation loss. Here μ follows +dU/dμ for a utility U
    (higher is better): the sign is tested against finite differences.
 4. With one policy update per rollout batch π_old = π_θ, so the PPO ratio is
    1 and old log-probs are the current ones detached (computed once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# ---------------------------------------------------------------------------
# token-level quantities


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target_t | prefix). logits (B, T, V), targets (B, T) -> (B, T) float32."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution in nats. logits (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is 1. x, mask (B, T) -> scalar (0 if mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(loss_tokens: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              num_tokens: float | None = None, num_seqs: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar.

    token-mean: every response token weighs the same (DAPO, our default).
    seq-mean-token-mean: each sequence weighs the same (original GRPO).
    seq-mean-token-sum: sum over tokens, mean over sequences (Dr. GRPO's unnormalised form).
    num_tokens / num_seqs: normalisers of the WHOLE batch when (B, T) is one
    micro-batch of it, so that micro-batch losses add up to the full-batch loss.
    """
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0)
        return (loss_tokens * mask).sum() / denom
    per_seq_sum = (loss_tokens * mask).sum(-1)
    seqs = num_seqs if num_seqs is not None else loss_tokens.shape[0]
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / mask.sum(-1).clamp(min=1.0)).sum() / seqs
    if mode == "seq-mean-token-sum":
        return per_seq_sum.sum() / seqs
    raise ValueError(f"rl.loss_agg: unknown aggregation {mode!r}")


# ---------------------------------------------------------------------------
# losses


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood of demonstrations. logprobs, mask (B, T) -> scalar.
    num_tokens: the whole batch's token count when this is one micro-batch of it.
    weights (B, T), optional: per-token weights w (held constant): token-mean of −w·log p."""
    nll = -logprobs if weights is None else -weights.detach() * logprobs
    return aggregate(nll, mask, "token-mean", num_tokens)


def group_advantages(rewards: torch.Tensor, group: torch.Tensor | list[int], scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean, optionally over the group std.

    rewards (N,); group (N,) a group id per row (as verl's `index`: rows with the same id form
    one group, wherever they sit) -> (N,). std is the unbiased sample std (as in TRL and verl).
    scale_by_std=False is Dr. GRPO (and LUFFY). A group whose rewards are all equal gets zero
    advantages: it carries no signal; so does a group of one row.
    """
    rewards = rewards.float()
    _, index = torch.unique(torch.as_tensor(group), return_inverse=True)
    index = index.to(rewards.device)
    count = torch.bincount(index).float()
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    if scale_by_std:
        var = torch.zeros_like(count).index_add_(0, index, centred ** 2) / (count - 1).clamp(min=1)
        centred = centred / (var.sqrt()[index] + eps)
    return centred


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate k3 = e^(r) − r − 1 with r = log π_ref − log π; (B, T) -> (B, T), ≥ 0."""
    r = ref_logprobs - logprobs
    return torch.exp(r) - r - 1.0


def ppo_tokens(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               clip_eps: float = 0.2, clip_eps_high: float = 0.0,
               clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate loss and where clipping bit. logprobs, old_logprobs (B, T);
    advantages (B,). max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε_high)), ρ = exp(logπ − logπ_old);
    ε_high = ε unless set (DAPO's clip-higher). clip=False: −A·ρ. Returns (B, T) each."""
    eps_high = clip_eps_high or clip_eps
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    if not clip:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def sampler_is_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str = "sequence_mask", cap: float = 3.0) -> torch.Tensor:
    """Importance weights for rollouts drawn by a sampler whose numbers differ from the trainer's
    (vLLM's kernels, bf16 sampling), as TRL's GRPOTrainer applies them (grpo_trainer.py,
    `_generate_and_score_completions`, vllm_importance_sampling_*). Detached: they scale the
    per-token RL loss, they are not differentiated.

    ratio = exp(log π_train − log π_sampler) per token (token_*) or exp of its sum over the
    completion's tokens (sequence_*, one ratio per row); *_truncate clips it at `cap` (C_max),
    *_mask sets it to 0 above `cap` (the row or token is dropped). No lower bound (TRL's
    default C_min = None). A NaN log-prob (unknown to the sampler) counts as no difference.
    Departure: both log-probs are at temperature 1 (our loss uses π_θ untempered); TRL
    compares tempered ones. The same numbers at rl.temperature = 1, every preset's value.
    train_logprobs, sampler_logprobs, mask (B, T) -> weights (B, T) (a row's sequence weight
    repeated on its tokens); mode "none" -> ones.
    """
    if mode == "none":
        return torch.ones_like(mask)
    diff = torch.nan_to_num((train_logprobs - sampler_logprobs).detach().float() * mask, nan=0.0)
    if mode.startswith("sequence_"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        ratio = ratio.clamp(max=cap)
    elif mode.endswith("_mask"):
        ratio = ratio.masked_fill(ratio > cap, 0.0)
    else:
        raise ValueError(f"rl.sampler_correction: unknown mode {mode!r}")
    return ratio.expand_as(mask)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float = 0.0,
                loss_agg: str = "token-mean", ref_logprobs: torch.Tensor | None = None,
                kl_beta: float = 0.0, num_tokens: float | None = None,
                num_seqs: int | None = None, is_weights: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped policy-gradient loss of GRPO (`ppo_tokens`), aggregated.

    logprobs, old_logprobs, mask (B, T); advantages (B,) broadcast over tokens.
    is_weights (B, T): the sampler correction (`sampler_is_weights`) scaling each token's PPO
    term, as TRL does, before β·KL_k3 per token is added (β > 0).
    num_tokens / num_seqs: whole-batch normalisers for a micro-batch (see `aggregate`).
    Returns (scalar loss, stats: clip_frac, kl).
    """
    loss_tokens, clipped = ppo_tokens(logprobs, old_logprobs, advantages, clip_eps, clip_eps_high)
    if is_weights is not None:
        loss_tokens = loss_tokens * is_weights
    stats = {"clip_frac": masked_mean(clipped.float(), mask).item()}
    if ref_logprobs is not None and kl_beta > 0:
        kl = kl_k3(logprobs, ref_logprobs)
        loss_tokens = loss_tokens + kl_beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    return aggregate(loss_tokens, mask, loss_agg, num_tokens, num_seqs), stats


# ---------------------------------------------------------------------------
# the objective


def objective(mu: float, loss_sft, loss_rl):
    """L(θ; μ) = μ · L_SFT + (1 − μ) · L_RL (DESIGN §1), for floats or scalar tensors.

    A signal whose weight is 0 need not be computed: pass None for it (μ = 1 needs no
    rollouts, μ = 0 no demonstrations). A missing signal with a non-zero weight is an error.
    """
    total = 0.0
    for weight, loss, name in ((mu, loss_sft, "L_SFT"), (1.0 - mu, loss_rl, "L_RL")):
        if loss is None:
            if weight != 0:
                raise RuntimeError(f"objective: {name} is missing but weighs {weight}")
            continue
        total = total + weight * loss
    return total


# ---------------------------------------------------------------------------
# AMFT's learned μ (DESIGN §1)


def entropy_term(entropy: float, entropy_target: float, eta_entropy: float) -> float:
    """Δ_H = η_H · (H* − H): entropy below target pushes μ up (more imitation), above pushes it down."""
    return eta_entropy * (entropy_target - entropy)


@dataclass(frozen=True)
class AdamW:
    """One torch AdamW as it stands before a step, flattened over P parameters.

    exp_avg, exp_avg_sq (P,): its moments (zeros before its first step); step: steps
    already taken; lr: the rate of this step before any μ weight (base rate × the lr
    schedule factor); weight_decay λ (decoupled), betas, eps as in the optimizer.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def bias_corrections(self) -> tuple[float, float]:
        t = self.step + 1
        return 1.0 - self.betas[0] ** t, 1.0 - self.betas[1] ** t


# ⟨a, b⟩ of two (P,) vectors as a float. Several processes holding shards of the vectors pass
# the sum of their local products (parallel.Processes.dot); one process: `local_dot`.
Dot = Callable[[torch.Tensor, torch.Tensor], float]


def local_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.dot(a.float(), b.float()).item()


def norm_of(a: torch.Tensor, dot: Dot = local_dot) -> float:
    """‖a‖ through `dot` (so that a sharded vector's norm counts every shard)."""
    return math.sqrt(max(dot(a, a), 0.0))  # NaN and inf carry through (max(nan, 0.0) is nan)


def clip_factor(norm: float, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies gradients by (max_norm ≤ 0: no clipping)."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def adamw_step(theta: torch.Tensor, grad: torch.Tensor, opt: AdamW, max_norm: float = 0.0,
               dot: Dot = local_dot, grad_norm: float | None = None) -> torch.Tensor:
    """θ_new − θ of one full-weight AdamW step on `grad` (clipped first). theta, grad (P,) -> (P,).

    −lr·(λ·θ + m̂/(√v̂ + ε)) with m, v after adding the clipped gradient, as torch computes it.
    Element-wise but for the clip factor: given grad_norm (‖grad‖ of the whole vector), the
    arguments may be any slice of it, with opt's moments sliced alike (train.update_derivative).
    """
    beta1, beta2 = opt.betas
    bc1, bc2 = opt.bias_corrections()
    g = grad.float() * clip_factor(norm_of(grad, dot) if grad_norm is None else grad_norm, max_norm)
    m = beta1 * opt.exp_avg + (1 - beta1) * g
    v = beta2 * opt.exp_avg_sq + (1 - beta2) * g * g
    return -opt.lr * (opt.weight_decay * theta.float() + (m / bc1) / (v.sqrt() / bc2 ** 0.5 + opt.eps))


def update_derivative_split(step_sft: torch.Tensor, step_rl: torch.Tensor, mu: float, opt_rl: AdamW) -> torch.Tensor:
    """dθ'/dμ in split mode. step_sft, step_rl (P,) -> (P,).

    step_X = `adamw_step` of optimizer X on its own unweighted gradient (clipped on its
    own, so independent of μ). The real update runs the SFT optimizer at rate μ·α_SFT,
    then the RL one at (1−μ)·α_RL, each decaying the weights it finds:
        θ₁ = θ + μ·Δ_SFT,  θ' = θ₁·(1 − (1−μ)·α_RL·λ) − (1−μ)·α_RL·d_RL,
    whose derivative is (1 + (2μ − 1)·α_RL·λ)·Δ_SFT − Δ_RL (exact; λ = 0: Δ_SFT − Δ_RL).
    """
    return (1.0 + (2.0 * mu - 1.0) * opt_rl.lr * opt_rl.weight_decay) * step_sft - step_rl


def update_derivative_shared(grad_sft: torch.Tensor, grad_rl: torch.Tensor, mu: float, opt: AdamW,
                             max_norm: float = 0.0, dot: Dot = local_dot,
                             grad_dots: tuple[float, float, float] | None = None) -> torch.Tensor:
    """dθ'/dμ in shared mode: one AdamW step on g(μ) = μ·g_SFT + (1−μ)·g_RL. grads (P,) -> (P,).

    With c(μ) the clip factor and ĝ = c·g: m = β₁m₀ + (1−β₁)ĝ, v = β₂v₀ + (1−β₂)ĝ²,
    D = √v/√bc₂ + ε, θ' = θ(1 − αλ) − (α/bc₁)·m/D. Per coordinate, with δ = g_SFT − g_RL,
        dĝ = c·δ + c'·g,   c' = −max_norm·⟨g, δ⟩ / (‖g‖·(‖g‖ + 1e-6)²) when clipping (else 0),
        dθ'/dμ = −(α/bc₁)·(dm·D − m·dD)/D²,   dm = (1−β₁)·dĝ,   dD = (1−β₂)·ĝ·dĝ/(√v·√bc₂).
    Weight decay does not depend on μ. Coordinates with v = 0 have ĝ = 0 and dD = 0.
    Element-wise but for ‖g‖ and ⟨g, δ⟩, which come from grad_dots = (⟨g_SFT, g_SFT⟩,
    ⟨g_RL, g_RL⟩, ⟨g_SFT, g_RL⟩) of the whole vectors: given those, the arguments may be any
    slice of them (with opt's moments sliced alike); None: computed here with `dot`.
    """
    beta1, beta2 = opt.betas
    bc1, bc2 = opt.bias_corrections()
    g_sft, g_rl = grad_sft.float(), grad_rl.float()
    g, dg = mu * g_sft + (1.0 - mu) * g_rl, g_sft - g_rl
    ss, rr, sr = grad_dots or (dot(g_sft, g_sft), dot(g_rl, g_rl), dot(g_sft, g_rl))
    norm = math.sqrt(max(mu * mu * ss + 2 * mu * (1 - mu) * sr + (1 - mu) ** 2 * rr, 0.0))  # ‖g‖; NaN carries
    c, dc = clip_factor(norm, max_norm), 0.0
    if c < 1.0:  # ⟨g, δ⟩ = μ⟨s,s⟩ − (1−μ)⟨r,r⟩ + (1 − 2μ)⟨s,r⟩
        dc = -max_norm * (mu * ss - (1 - mu) * rr + (1 - 2 * mu) * sr) / (max(norm, 1e-30) * (norm + 1e-6) ** 2)
    g_hat, dg_hat = c * g, c * dg + dc * g
    m = beta1 * opt.exp_avg + (1 - beta1) * g_hat
    v = beta2 * opt.exp_avg_sq + (1 - beta2) * g_hat * g_hat
    root = v.sqrt()
    denom = root / bc2 ** 0.5 + opt.eps
    d_denom = torch.where(root > 0, (1 - beta2) * g_hat * dg_hat / (root.clamp(min=1e-30) * bc2 ** 0.5),
                          torch.zeros_like(root))
    return -(opt.lr / bc1) * ((1 - beta1) * dg_hat * denom - m * d_denom) / denom ** 2


def cosine(a: torch.Tensor, b: torch.Tensor, dot: Dot = local_dot) -> float:
    """cos(a, b) of two (P,) vectors; 0 when either is 0."""
    denom = norm_of(a, dot) * norm_of(b, dot)
    return dot(a, b) / denom if denom > 0 else 0.0


def meta_gradient(grad_utility: torch.Tensor, update_derivative: torch.Tensor, norm: str = "cosine",
                  dot: Dot = local_dot) -> float:
    """dU(θ')/dμ to first order. grad_utility = ∇θU (ascent direction), update_derivative = dθ'/dμ, both (P,).

    raw:    ⟨∇U, dθ'/dμ⟩
    cosine: cos(∇U, dθ'/dμ)   (same sign, scale-free; 0 when a vector is 0)
    Positive means more SFT (larger μ) raises U after this step.
    """
    if norm == "raw":
        return dot(grad_utility, update_derivative)
    if norm == "cosine":
        return cosine(grad_utility, update_derivative, dot)
    raise ValueError(f"amft.meta_grad_norm: unknown normalisation {norm!r}")


def update_mu(mu: float, delta_meta: float, delta_entropy: float, mu_min: float, mu_max: float) -> float:
    """μ ← clip(μ + Δ_meta + Δ_H, μ_min, μ_max)."""
    return min(max(mu + delta_meta + delta_entropy, mu_min), mu_max)


def flatten_grads(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-parameter gradients into one (P,) vector; None counts as zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


# ---------------------------------------------------------------------------
# the baselines' rules (methods/<name>.py says where each comes from)


def chord_mu(step: int, warmup_steps: int, decay_steps: int, mu_peak: float, mu_valley: float) -> float:
    """CHORD's μ at 0-based `step`: 0 → μ_peak linearly over W = warmup_steps, then a half
    cosine from μ_peak down to μ_valley over D = decay_steps, then μ_valley."""
    if step < warmup_steps:
        return step / warmup_steps * mu_peak
    if step >= warmup_steps + decay_steps:
        return mu_valley
    return (mu_peak - mu_valley) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps)) + mu_valley


def chord_phi(logprobs: torch.Tensor) -> torch.Tensor:
    """CHORD's token weight φ = p(1 − p), p = exp(log p), held constant. (B, T) -> (B, T).
    Largest (1/4) at p = ½: tokens the policy already predicts surely, or finds very unlikely,
    count less."""
    p = logprobs.detach().exp()
    return p * (1.0 - p)


def off_policy_tokens(logprobs: torch.Tensor, advantages: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-token loss −A·f(π_θ) on a demonstration whose behaviour probability is taken as 1
    (no ratio, no clip). LUFFY: f(p) = p/(p + γ), which keeps gradients alive on unlikely
    tokens; gamma None: f(p) = p (SRFT). logprobs (B, T), advantages (B,) -> (B, T)."""
    p = logprobs.exp()
    shaped = p if gamma is None else p / (p + gamma)
    return -advantages.unsqueeze(-1) * shaped


def length_normalised_sum(loss_tokens: torch.Tensor, mask: torch.Tensor, length: float) -> torch.Tensor:
    """Σ over every masked token of the batch / a fixed length (LUFFY's `loss_remove_token_mean`:
    verl pads responses to the maximum response length and divides by it). (B, T) -> scalar."""
    return (loss_tokens * mask).sum() / length


def srft_weights(entropy: torch.Tensor, sft_coef: float = 0.5,
                 positive_coef: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """SRFT's entropy-aware weights, held constant: w_SFT = c_SFT·exp(−H) on demonstration NLL
    (less imitation where the policy is uncertain) and w_RL = c_RL·exp(+H) on the likelihood of
    its own correct samples (more where it is uncertain, against entropy collapse).
    entropy (B, T) -> (w_SFT, w_RL), each (B, T)."""
    h = entropy.detach()
    return sft_coef * torch.exp(-h), positive_coef * torch.exp(h)


def srft_self_tokens(logprobs: torch.Tensor, positive: torch.Tensor, positive_weights: torch.Tensor) -> torch.Tensor:
    """SRFT's loss on self-generated rows, per token: w_RL·(−log π) on correct rows (positive
    (B,) True), +log π on the others. logprobs, positive_weights (B, T) -> (B, T)."""
    pos = positive.unsqueeze(-1).to(logprobs.dtype)
    return pos * positive_weights.detach() * -logprobs + (1.0 - pos) * logprobs
