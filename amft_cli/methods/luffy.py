"""luffy: GRPO whose groups each hold one off-policy demonstration, learned through a shaped loss.

Paper: Yan et al. 2025, "Learning to Reason under Off-Policy Guidance" (arXiv 2504.14945).
Official code: ElliottYan/LUFFY — luffy/verl/verl/mix_src/mix_core_alg.py,
`compute_token_on_off_policy_loss` (the on/off-policy token losses and their aggregation),
mix_vllm_rollout.py (a full demonstration, eos appended, as one of the n samples), and the
choices of exp_scripts/train.sh: rollout.n = 8 with n_prefix = 1, grpo_use_std = False,
off_policy_reshape = p_div_p_0.1, loss_remove_clip = True, loss_remove_token_mean = True,
entropy_coeff = 0.001, no KL.

Here each group is rl.group_size − 1 samples plus the example's demonstration
(signals.add_demonstrations); advantages over all rows of a group, without the std by default
([luffy] scale_adv_by_std); demonstration tokens get −A·p/(p+γ) (algo.off_policy_tokens, no
ratio, no clip), sampled tokens the PPO term (unclipped by default, [luffy] clip); the sum over
tokens is divided by rl.max_new_tokens (or token-mean, [luffy] token_mean); minus
entropy_coeff × the token-mean entropy of all response tokens.
Departures:
 1. One optimizer step per rollout batch; the script's 128 prompts in mini-batches of 64 take two.
 2. The script's entropy bonus is a token mean per micro-batch, each micro-batch's loss added
    at full weight (mix_actor.py `update_policy`: gradient_accumulation = mini/micro = 64/64 = 1
    with dynamic batch sizes), while the policy term is a sum over tokens; relative to that
    term the bonus there weighs M times ours, M the micro-batches of an optimizer step over all
    GPUs (at least 8 in the 7B script). Here it is one token mean per batch, so micro-batching
    does not change the loss, and entropy_coeff 0.001 is that much weaker than the script's.
 3. The demonstration is kept whole even when it is longer than rl.max_new_tokens (LUFFY's
    data was filtered so that it fits).
"""

from __future__ import annotations

import torch

from amft_cli import algo
from amft_cli.config import Config, ConfigError
from amft_cli.methods import register
from amft_cli.methods.base import Method
from amft_cli.policy import Policy
from amft_cli.rollout import Rollouts
from amft_cli.signals import RLBatch, Run, add_demonstrations, behaviour_logprobs


def luffy_tokens(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 off_policy: torch.Tensor, gamma: float, clip_eps: float, clip_eps_high: float,
                 clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token LUFFY loss: shaped −A·f(p) on off-policy rows (off_policy (B,) True), PPO on the
    others. Returns (loss (B, T), clipped (B, T))."""
    on, clipped = algo.ppo_tokens(logprobs, old_logprobs, advantages, clip_eps, clip_eps_high, clip)
    off = algo.off_policy_tokens(logprobs, advantages, gamma)
    rows = off_policy.unsqueeze(-1)
    return torch.where(rows, off, on), clipped & ~rows


@register("luffy")
class LUFFY(Method):
    def __init__(self, cfg: Config, policy: Policy) -> None:
        super().__init__(cfg, policy)
        if cfg.rl.kl_beta > 0:
            raise ConfigError("rl.kl_beta: luffy has no KL term (LUFFY's script: kl 0); expected 0")
        self.entropy_grad = cfg.luffy.entropy_coeff != 0

    def mu(self, step: int) -> float:
        return 0.0

    def samples_per_prompt(self) -> int:
        return self.cfg.rl.group_size - 1

    def shape_rollouts(self, run: Run, rollouts: Rollouts, examples: list[dict]) -> Rollouts:
        return add_demonstrations(run.policy, rollouts, examples)

    def advantages(self, rewards: torch.Tensor, rollouts: Rollouts) -> torch.Tensor:
        return algo.group_advantages(rewards, rollouts.group, self.cfg.luffy.scale_adv_by_std)

    def rl_loss(self, logprobs, mask, batch: RLBatch, rows: slice, ref_logprobs, entropy, is_weights):
        c, rl = self.cfg.luffy, self.cfg.rl
        off_policy = torch.tensor(batch.rollouts.off_policy[rows], device=logprobs.device)
        tokens, clipped = luffy_tokens(logprobs, behaviour_logprobs(logprobs, batch, rows),
                                       batch.advantages[rows].to(logprobs.device), off_policy, c.gamma,
                                       rl.clip_eps, rl.clip_eps_high, c.clip)
        tokens = tokens * is_weights  # the sampler correction (1 on the demonstration rows)
        if c.token_mean:
            loss = algo.aggregate(tokens, mask, "token-mean", batch.num_tokens)
        else:
            loss = algo.length_normalised_sum(tokens, mask, rl.max_new_tokens)
        loss = loss - c.entropy_coeff * algo.aggregate(entropy, mask, "token-mean", batch.num_tokens)
        off_mask = mask * off_policy.unsqueeze(-1)
        stats = {"clip_frac": algo.masked_mean(clipped.float(), mask).item(),
                 "off_policy_prob": (algo.masked_mean(logprobs.detach().exp(), off_mask).item(), off_mask.sum().item())}
        return loss, stats
