"""algo.py against hand-computed values and finite differences (never against itself)."""

import math

import pytest
import torch

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
    assert algo.meta_gradient(z, torch.ones(3), "cosine") == 0.0
    assert algo.meta_gradient(torch.ones(3), z, "cosine") == 0.0


# ---------------------------------------------------------------------------
# dθ'/dμ of the real AdamW update (the FD checks against train.apply_update are in test_meta.py)


def fresh_adamw(size: int, lr: float, weight_decay: float = 0.0) -> algo.AdamW:
    return algo.AdamW(torch.zeros(size), torch.zeros(size), 0, lr, weight_decay)


def test_two_parameter_example_moves_mu_the_way_the_real_update_does():
    """Issue 8's example: split mode, both rates 0.1, first step, U = ⟨[1, 1.1], θ⟩. AdamW's first
    step is −α·sign(g) per coordinate, so Δ_SFT = [0.1, −0.1], Δ_RL = [−0.1, 0.1] and
    dU/dμ = ⟨[1, 1.1], Δ_SFT − Δ_RL⟩ = 0.2 − 0.22 = −0.02: μ must go DOWN (SGD's form said +0.399)."""
    theta, g_u = torch.zeros(2), torch.tensor([1.0, 1.1])
    g_sft, g_rl = torch.tensor([-1.0, 0.01]), torch.tensor([0.5, -0.5])
    opt_sft, opt_rl = fresh_adamw(2, 0.1), fresh_adamw(2, 0.1)
    step_sft, step_rl = algo.adamw_step(theta, g_sft, opt_sft), algo.adamw_step(theta, g_rl, opt_rl)
    assert torch.allclose(step_sft, torch.tensor([0.1, -0.1]), atol=1e-6)
    assert torch.allclose(step_rl, torch.tensor([-0.1, 0.1]), atol=1e-6)
    derivative = algo.update_derivative_split(step_sft, step_rl, 0.5, opt_rl)
    assert algo.meta_gradient(g_u, derivative, "raw") == pytest.approx(-0.02, abs=1e-6)
    assert algo.meta_gradient(g_u, derivative, "cosine") < 0


def test_adamw_step_equals_torch_adamw_with_state_decay_and_clipping():
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.AdamW([param], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        param.grad = torch.randn(5, generator=gen, dtype=torch.float64)
        opt.step()
    grad = 3.0 * torch.randn(5, generator=gen, dtype=torch.float64)  # norm > 1: clipping is active
    state = opt.state[param]
    view = algo.AdamW(state["exp_avg"].clone(), state["exp_avg_sq"].clone(), int(state["step"]), 0.05, 0.1)
    predicted = algo.adamw_step(param.detach(), grad, view, max_norm=1.0)
    before = param.detach().clone()
    param.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([param], 1.0)
    opt.step()
    torch.testing.assert_close(predicted.double(), param.detach() - before, rtol=1e-5, atol=1e-7)


def test_split_derivative_with_weight_decay_by_hand():
    """θ' = (θ + μΔ_SFT)(1 − (1−μ)αλ) − (1−μ)α·d: at μ = 0.25, α = 0.5, λ = 0.2 the Δ_SFT factor is
    1 + (2·0.25 − 1)·0.5·0.2 = 0.95."""
    rl = fresh_adamw(1, 0.5, weight_decay=0.2)
    out = algo.update_derivative_split(torch.tensor([2.0]), torch.tensor([0.3]), 0.25, rl)
    assert out.item() == pytest.approx(0.95 * 2.0 - 0.3)


def test_shared_derivative_by_hand():
    """One coordinate after one step with g = 1 (m₀ = 0.1, v₀ = 0.001, t = 2: bc₁ = 0.19,
    bc₂ = 0.001999); g_SFT = 3, g_RL = −1, μ = 0.5: g = 1, dg/dμ = 4, m = 0.19, v = 0.001999,
    D = 1 + ε, dm = 0.4, dD = 0.001·1·4/0.001999; dθ'/dμ = −(α/bc₁)·(dm·D − m·dD)/D²."""
    opt = algo.AdamW(torch.tensor([0.1]), torch.tensor([0.001]), 1, lr=0.1)
    out = algo.update_derivative_shared(torch.tensor([3.0]), torch.tensor([-1.0]), 0.5, opt)
    expected = -(0.1 / 0.19) * (0.4 - 0.19 * 0.004 / 0.001999)
    assert out.item() == pytest.approx(expected, rel=1e-4)
    # clipping is checked against the real update (torch's clip_grad_norm_ + AdamW) in test_meta.py


def test_meta_gradient_sign_moves_mu_toward_the_helpful_signal():
    """If only SFT's step raises U, μ must go up; the authors' code moved it down."""
    g_u = torch.tensor([1.0, 0.0])
    step_sft = torch.tensor([0.1, 0.0])  # raises U
    step_rl = torch.tensor([0.0, 0.1])   # orthogonal to ∇U
    derivative = algo.update_derivative_split(step_sft, step_rl, 0.5, fresh_adamw(2, 0.1))
    assert algo.meta_gradient(g_u, derivative, "raw") == pytest.approx(0.1)
    assert algo.meta_gradient(g_u, derivative, "cosine") > 0
