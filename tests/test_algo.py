"""algo.py against hand-computed values and finite differences (never against itself)."""

import math

import pytest
import torch
from torch.func import functional_call
from transformers import Qwen2Config, Qwen2ForCausalLM

from amft_cli import algo


# ---------------------------------------------------------------------------
# token quantities and losses


def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, -1e9]]])  # (1, 2, 4)
    targets = torch.tensor([[2, 0]])
    lp = algo.token_logprobs(logits, targets)
    assert torch.allclose(lp, torch.tensor([[math.log(0.25), math.log(3 / 5)]]), atol=1e-6)
    h = algo.token_entropy(logits)
    p = torch.tensor([0.6, 0.2, 0.2])
    assert torch.allclose(h, torch.tensor([[math.log(4.0), -(p * p.log()).sum().item()]]), atol=1e-5)


def test_sft_loss_is_token_mean_nll_over_mask():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert algo.sft_loss(logprobs, mask).item() == pytest.approx((2 + 3 + 6) / 3)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    adv = algo.group_advantages(rewards, groups)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0, 0, 0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5)
    dr = algo.group_advantages(rewards, groups, scale_by_std=False)
    assert torch.allclose(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_group_advantages_read_groups_from_ids_not_counts():
    # groups of unequal size, ids not sorted: {3: [2, 4, 0]} mean 2, {9: [1, 3]} mean 2, {5: [7]} alone
    rewards = torch.tensor([2.0, 1.0, 4.0, 3.0, 0.0, 7.0])
    groups = [3, 9, 3, 9, 3, 5]
    dr = algo.group_advantages(rewards, groups, scale_by_std=False)
    assert torch.allclose(dr, torch.tensor([0.0, -1.0, 2.0, 1.0, -2.0, 0.0]))
    adv = algo.group_advantages(rewards, groups)  # stds: 2 and sqrt(2); a lone row has no signal
    assert torch.allclose(adv, torch.tensor([0.0, -1 / math.sqrt(2), 1.0, 1 / math.sqrt(2), -1.0, 0.0]), atol=1e-5)


def test_objective_by_hand():
    assert algo.objective(0.3, 2.0, 5.0) == pytest.approx(0.3 * 2.0 + 0.7 * 5.0)  # 4.1
    assert algo.objective(1.0, 2.0, None) == 2.0  # μ = 1: no rollouts needed
    assert algo.objective(0.0, None, 5.0) == 5.0  # μ = 0: no demonstrations needed
    with pytest.raises(RuntimeError, match="L_RL"):
        algo.objective(0.5, 2.0, None)
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    loss_sft, loss_rl = (theta ** 2).sum(), 3.0 * theta[0]  # gradients [2, -4] and [3, 0]
    algo.objective(0.25, loss_sft, loss_rl).backward()
    assert theta.grad.tolist() == pytest.approx([0.25 * 2 + 0.75 * 3, 0.25 * -4])


def test_policy_loss_clip_by_hand():
    # four sequences, one token each: ratios 1.5, 1.5, 0.5, 0.5 with A = +1, -1, +1, -1
    old = torch.zeros(4, 1)
    logprobs = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, stats = algo.policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # max(-A r, -A clip(r)): -1.2, 1.5, -0.5, 0.8
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.5)
    # clip-higher: ε_high = 0.6 lets the first ratio through unclipped
    loss_hi, _ = algo.policy_loss(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert loss_hi.item() == pytest.approx((-1.5 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)


def test_policy_loss_on_policy_gradient_is_advantage_weighted_logprob():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([0.7, -1.3])
    lp = algo.token_logprobs(logits, targets)
    loss, _ = algo.policy_loss(lp, lp.detach(), adv, mask)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    surrogate = -(adv.unsqueeze(-1) * lp * mask).sum() / mask.sum()
    (g_ref,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert algo.aggregate(x, mask, "token-mean").item() == pytest.approx(2.0)
    assert algo.aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 3.0) / 2)
    assert algo.aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx((3.0 + 3.0) / 2)


def test_kl_k3_is_zero_at_reference_and_positive_elsewhere():
    lp = torch.tensor([[-1.0, -2.0]])
    assert torch.allclose(algo.kl_k3(lp, lp), torch.zeros(1, 2))
    # KL(π‖π_ref) with r = log π_ref − log π = 0.3: e^0.3 − 1.3 (the swapped sign would give 0.0408)
    assert torch.allclose(algo.kl_k3(lp, lp + 0.3), torch.full((1, 2), math.exp(0.3) - 1.3), atol=1e-6)


# ---------------------------------------------------------------------------
# controllers


def test_entropy_term_pushes_mu_up_when_entropy_below_target():
    up = algo.entropy_term(entropy=0.5, entropy_target=1.0, eta_entropy=0.1)
    down = algo.entropy_term(entropy=1.5, entropy_target=1.0, eta_entropy=0.1)
    assert up == pytest.approx(0.05) and down == pytest.approx(-0.05)
    assert algo.update_mu(0.5, 0.0, up, 0.05, 0.95) > 0.5
    assert algo.update_mu(0.5, 0.0, down, 0.05, 0.95) < 0.5


def test_mu_never_leaves_its_bounds():
    gen = torch.Generator().manual_seed(0)
    mu = 0.8
    for _ in range(2000):
        delta = (torch.rand(2, generator=gen) - 0.5).tolist()
        mu = algo.update_mu(mu, delta[0], delta[1], 0.05, 0.95)
        assert 0.05 <= mu <= 0.95
    assert algo.update_mu(0.9, 10.0, 0.0, 0.05, 0.95) == 0.95
    assert algo.update_mu(0.1, -10.0, 0.0, 0.05, 0.95) == 0.05


def test_meta_gradient_cosine_of_zero_vector_is_zero():
    z = torch.zeros(3)
    assert algo.meta_gradient(z, torch.ones(3), torch.zeros(3), 1.0, 1.0, "cosine") == 0.0


# ---------------------------------------------------------------------------
# the meta-gradient against a finite difference of U(θ'(μ)) on a real tiny model


def _tiny_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=17, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).double()


def _batch(seed, rows=6, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 17, (rows, length), generator=g)
    mask = torch.zeros(rows, length - 1, dtype=torch.float64)
    mask[:, 3:] = 1.0  # the first 4 tokens are "prompt"
    return ids, mask


def _logprobs(model, params, ids):
    logits = functional_call(model, params, (ids,)).logits[:, :-1]
    return algo.token_logprobs(logits, ids[:, 1:]).double()


def _losses(model, params):
    """L_SFT on demos, L_RL on fixed samples with fixed advantages, U = −NLL or the PG surrogate."""
    sft_ids, sft_mask = _batch(1)
    rl_ids, rl_mask = _batch(2)
    val_ids, val_mask = _batch(3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    l_sft = algo.sft_loss(_logprobs(model, params, sft_ids), sft_mask)
    lp = _logprobs(model, params, rl_ids)
    l_rl, _ = algo.policy_loss(lp, lp.detach(), adv, rl_mask)
    val_lp = _logprobs(model, params, val_ids)
    u_nll = -algo.sft_loss(val_lp, val_mask)
    u_reward = algo.masked_mean(adv.flip(0).unsqueeze(-1) * val_lp, val_mask)  # advantage-weighted log π
    return l_sft, l_rl, {"nll": u_nll, "reward": u_reward}


@pytest.mark.parametrize("utility", ["nll", "reward"])
@pytest.mark.parametrize("lrs", [(1e-3, 1e-3), (5e-4, 2e-3)])
def test_meta_gradient_matches_finite_difference(utility, lrs):
    lr_rl, lr_sft = lrs
    model = _tiny_model()
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    l_sft, l_rl, utilities = _losses(model, theta)
    params = list(theta.values())
    flat = lambda loss: algo.flatten_grads(torch.autograd.grad(loss, params, retain_graph=True), params)
    g_sft, g_rl, g_u = flat(l_sft), flat(l_rl), flat(utilities[utility])

    def u_after_step(mu: float) -> float:
        step = (1 - mu) * lr_rl * g_rl + mu * lr_sft * g_sft
        new, offset = {}, 0
        for n in names:
            p = theta[n]
            new[n] = (p - step[offset:offset + p.numel()].view_as(p)).detach()
            offset += p.numel()
        with torch.no_grad():
            return _losses(model, new)[2][utility].item()

    mu, h = 0.6, 1e-2
    finite_diff = (u_after_step(mu + h) - u_after_step(mu - h)) / (2 * h)
    raw = algo.meta_gradient(g_u, g_rl, g_sft, lr_rl, lr_sft, "raw")
    cosine = algo.meta_gradient(g_u, g_rl, g_sft, lr_rl, lr_sft, "cosine")
    assert abs(finite_diff) > 1e-9
    assert abs(raw - finite_diff) / abs(finite_diff) < 0.10
    assert math.copysign(1, raw) == math.copysign(1, finite_diff)
    assert math.copysign(1, cosine) == math.copysign(1, finite_diff)
    assert -1.0 <= cosine <= 1.0


def test_meta_gradient_sign_moves_mu_toward_the_helpful_signal():
    """If only SFT's descent direction raises U, μ must go up; the authors' code moved it down."""
    g_u = torch.tensor([1.0, 0.0])
    g_sft = torch.tensor([-1.0, 0.0])  # descent −g_SFT = +e1 raises U
    g_rl = torch.tensor([0.0, 1.0])    # orthogonal to ∇U
    assert algo.meta_gradient(g_u, g_rl, g_sft, 0.1, 0.1, "raw") == pytest.approx(0.1)
    assert algo.meta_gradient(g_u, g_rl, g_sft, 0.1, 0.1, "cosine") > 0
