"""srft: demonstrations in both an entropy-weighted SFT term and the RL groups, plus weighted
positive / negative likelihood on the model's own samples.

Paper: Fu et al. 2025, "SRFT: A Single-Stage Method with Supervised and Reinforcement
Fine-Tuning for Reasoning" (arXiv 2506.19767, v1 read). No official code was found; this
follows §4 of the paper:
  L = L_SFT^demo + L_RL^demo + L_RL^self                                       (eq. 13)
  L_SFT^demo = w_SFT · NLL(demo),      w_SFT = 0.5·sg(exp(−H))                  (eq. 8)
  L_RL^demo: the demonstration joins its prompt's rollout group, advantages over the
             augmented group with the std (eq. 7), ratio π_θ/π_β with π_β = 1 and no clip
             (eqs. 9-10), i.e. −A·π_θ per token (algo.off_policy_tokens, gamma None)
  L_RL^self = w_RL·(−log π(y+)) + log π(y−),  w_RL = 0.1·sg(exp(+H))            (eq. 12)
Here the demonstrations of a step are those of its RL prompts, one per group after
rl.group_size samples; y+ is a sample the verifier calls correct, y− any other.
What was uncertain, and the reading taken:
 1. The sign inside w_RL: the paper writes exp(H(π_θ)) (positive: the weight grows with
    entropy, "to maintain exploration diversity"); one secondary summary writes exp(−H).
    We follow the paper.
 2. H(π_θ) is "the current policy entropy" without saying over what it is averaged; here it
    is each token's own entropy (per-token weights, which also keep micro-batches exact).
 3. Eq. 12 has no advantage on self-generated rows (it decomposes REINFORCE with rewards
    ±1); implemented literally, whatever the task's reward scale.
 4. The sum of eq. 13 becomes μ = 0.5 in the engine's μ·L_SFT + (1−μ)·L_RL: with one shared
    optimizer (the paper's setting) and no clipping, the same AdamW step up to ε. With
    train.grad_clip c it is the summed loss clipped at 2c (0.5·g clipped at c = 0.5 × g
    clipped at 2c); with train.rl_lr > 0 each signal's step is halved. The two RL terms are
    one token-mean over the augmented batch.
"""

from __future__ import annotations

import torch

from amft_cli import algo
from amft_cli.config import Config, ConfigError
from amft_cli.methods import register
from amft_cli.methods.base import Method
from amft_cli.policy import Policy
from amft_cli.rollout import Rollouts
from amft_cli.signals import RLBatch, Run, add_demonstrations


@register("srft")
class SRFT(Method):
    def __init__(self, cfg: Config, policy: Policy) -> None:
        super().__init__(cfg, policy)
        if cfg.rl.kl_beta > 0:
            raise ConfigError("rl.kl_beta: srft has no KL term; expected 0")

    def mu(self, step: int) -> float:
        return 0.5

    def shape_rollouts(self, run: Run, rollouts: Rollouts, examples: list[dict]) -> Rollouts:
        return add_demonstrations(run.policy, rollouts, examples)

    def rl_loss(self, logprobs, mask, batch: RLBatch, rows: slice, ref_logprobs, entropy, is_weights):
        device = logprobs.device
        off_policy = torch.tensor(batch.rollouts.off_policy[rows], device=device)
        correct = torch.tensor([s == "correct" for s in batch.statuses[rows]], device=device)
        _, w_rl = algo.srft_weights(entropy, self.cfg.srft.sft_coef, self.cfg.srft.positive_coef)
        demo = algo.off_policy_tokens(logprobs, batch.advantages[rows].to(device), gamma=None)
        own = algo.srft_self_tokens(logprobs, correct, w_rl)
        tokens = torch.where(off_policy.unsqueeze(-1), demo, own) * is_weights  # sampler correction
        loss = algo.aggregate(tokens, mask, self.cfg.rl.loss_agg, batch.num_tokens, batch.num_seqs)
        own_mask = mask * (~off_policy & correct).unsqueeze(-1)
        return loss, {"w_rl": (algo.masked_mean(w_rl, own_mask).item(), own_mask.sum().item())}

    def zero_gradient_rows(self, batch: RLBatch) -> torch.Tensor:
        """No row: a correct own rollout is trained on (srft_self_tokens) whatever its advantage."""
        return torch.zeros(len(batch.advantages), dtype=torch.bool)

    def sft_examples(self, run: Run, rl_examples: list[dict]) -> list[dict]:
        return rl_examples

    def sft_loss(self, logprobs, mask, entropy, num_tokens):
        w_sft, _ = algo.srft_weights(entropy, self.cfg.srft.sft_coef, self.cfg.srft.positive_coef)
        return algo.sft_loss(logprobs, mask, num_tokens, weights=w_sft), {"w_sft": algo.masked_mean(w_sft, mask).item()}
