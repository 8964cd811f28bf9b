"""The method registry and each method's rule, pinned to hand-worked values."""

import math

import pytest
import torch

from amft_cli import algo, methods
from amft_cli.config import Config, ConfigError
from amft_cli.methods.base import Method
from amft_cli.methods.relift import HardestBuffer, hardest_groups
from amft_cli.rollout import Rollouts
from amft_cli.signals import RLBatch, Run

BUILT_IN = {"sft", "rl", "sft-rl", "mix", "amft", "chord", "luffy", "relift", "srft"}


def make(name: str, **sections) -> Method:
    cfg = Config()
    for key, value in sections.items():
        section, knob = key.split("__")
        setattr(getattr(cfg, section), knob, value)
    return methods.get(name)(cfg, policy=None)


def test_registry_lists_every_module_and_names_the_choices_on_a_typo():
    assert BUILT_IN <= set(methods.names())
    assert all(methods.get(name).name == name for name in methods.names())
    with pytest.raises(ConfigError, match=r"train.algo: unknown method 'amtf'; choices: .*amft"):
        methods.get("amtf")


def test_a_method_must_live_in_the_module_of_its_name():
    with pytest.raises(RuntimeError, match="methods/chorus.py"):
        methods.register("chorus")(type("Chorus", (Method,), {"__module__": "amft_cli.methods.mix"}))


def test_fixed_balances():
    assert [make("sft").mu(s) for s in (0, 9)] == [1.0, 1.0]
    assert [make("rl").mu(s) for s in (0, 9)] == [0.0, 0.0]
    assert [make("sft-rl", sft_rl__switch_step=3).mu(s) for s in (0, 2, 3, 9)] == [1.0, 1.0, 0.0, 0.0]
    assert make("mix", mix__mu=0.3).mu(7) == 0.3
    assert not make("sft").uses_rollouts and make("rl").uses_rollouts


def test_amft_warms_up_then_uses_its_learned_mu_and_saves_it():
    amft = make("amft", amft__warmup_steps=5, amft__mu_init=0.42)
    assert [amft.mu(s) for s in (0, 4, 5, 50)] == [1.0, 1.0, 0.42, 0.42]
    amft.state.mu, amft.state.entropy_target = 0.6, 1.25
    again = make("amft", amft__warmup_steps=5)
    again.load_state_dict(amft.state_dict())
    assert again.mu(5) == 0.6 and again.state.entropy_target == 1.25


# ---------------------------------------------------------------------------
# hand-worked rules of the baselines

LN2 = math.log(2.0)


def run_over(train_set: list[dict], cfg: Config | None = None) -> Run:
    return Run(policy=None, cfg=cfg or Config(), task=None, train_set=train_set, val_set=[], reward_fn=None)


def batch_of(rewards, statuses, group, off_policy) -> RLBatch:
    n = len(rewards)
    rollouts = Rollouts([[1]] * n, [[2]] * n, ["x"] * n, [True] * n, group, off_policy)
    return RLBatch(rollouts, [{}] * n, torch.tensor(rewards), statuses, torch.zeros(n), float(n), n)


def test_chord_mu_schedule_at_its_landmarks():
    chord = make("chord", chord__mu_warmup_steps=200, chord__mu_decay_steps=400, chord__mu_peak=0.5,
                 chord__mu_valley=0.02)
    # 0, W/2, W, W+D/2, W+D, later: 0 → 0.25 (linear) → 0.5 (peak) → 0.02 + 0.48·½ → 0.02 → 0.02
    expected = [0.0, 0.25, 0.5, 0.26, 0.02, 0.02]
    assert [chord.mu(s) for s in (0, 100, 200, 400, 600, 900)] == pytest.approx(expected, abs=1e-12)
    assert chord.mu(300) == pytest.approx(0.02 + 0.48 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_chord_phi_weighted_sft_loss_by_hand():
    assert algo.chord_phi(torch.log(torch.tensor([0.5, 0.9, 0.1, 1.0]))).tolist() == pytest.approx(
        [0.25, 0.09, 0.09, 0.0], abs=1e-6)
    logprobs = torch.log(torch.tensor([[0.5, 0.9, 0.3]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = make("chord").sft_loss(logprobs, mask, torch.zeros(1, 3), num_tokens=2.0)
    # (0.25·ln 2 + 0.09·(−ln 0.9)) / 2 tokens; φ is held constant, so ∂/∂log p = −φ/2
    assert loss.item() == pytest.approx((0.25 * LN2 - 0.09 * math.log(0.9)) / 2, rel=1e-5)
    assert stats["phi"] == pytest.approx(0.17, rel=1e-5)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.125, -0.045, 0.0], abs=1e-6)
    plain, _ = make("chord", chord__phi=False).sft_loss(logprobs, mask, torch.zeros(1, 3), num_tokens=2.0)
    assert plain.item() == pytest.approx((LN2 - math.log(0.9)) / 2, rel=1e-5)


def test_chord_expert_share_of_the_batch():
    cfg = Config()
    cfg.train.prompts_per_step, cfg.rl.group_size, cfg.chord.expert_ratio = 16, 8, 0.2
    run = run_over([{"id": i} for i in range(100)], cfg)
    assert len(methods.get("chord")(cfg, None).sft_examples(run, [])) == 32  # 32 / (128 + 32) = 0.2
    assert run.cursors.sft == 32


def test_luffy_group_advantages_and_shaped_loss_by_hand():
    luffy = make("luffy", rl__max_new_tokens=4)
    batch = batch_of([1.0, 0.0, 0.0, 1.0], ["correct", "wrong", "wrong", "correct"], [0, 0, 0, 0],
                     [False, False, False, True])  # three samples and the demonstration
    batch.advantages = luffy.advantages(batch.rewards, batch.rollouts)
    assert batch.advantages.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])  # r − mean, no std
    logprobs = torch.log(torch.tensor([[0.5], [0.2], [0.8], [0.4]])).requires_grad_(True)
    entropy = torch.tensor([[1.0], [2.0], [3.0], [2.0]])
    loss, stats = luffy.rl_loss(logprobs, torch.ones(4, 1), batch, slice(0, 4), None, entropy, torch.ones(4, 1))
    # samples: −A·ρ with ρ = 1; demo: −A·p/(p+γ) = −0.5·0.4/0.5; Σ / max_new_tokens; − 0.001·mean H
    assert loss.item() == pytest.approx((-0.5 + 0.5 + 0.5 - 0.4) / 4 - 0.001 * 2.0, rel=1e-5)
    assert stats["off_policy_prob"] == pytest.approx((0.4, 1.0))  # (mean, its weight: demonstration tokens)
    loss.backward()
    # ∂/∂log p of −A·p/(p+γ) is −A·γp/(p+γ)² = −0.5·0.04/0.25 = −0.08
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.125, 0.125, 0.125, -0.02], abs=1e-6)


def test_relift_buffers_hardest_prompts_newest_first():
    examples = [{"id": f"e{i}"} for i in range(8)]
    buffer = HardestBuffer()
    steps = [  # (group ids, verifier statuses) of each step's rollouts, two per prompt; take 2 per update
        ([0, 0, 1, 1, 2, 2, 3, 3], ["wrong", "wrong", "correct", "wrong", "wrong", "malformed", "illegal", "wrong"]),
        ([4, 4, 5, 5], ["malformed", "malformed", "wrong", "wrong"]),
        ([6, 6, 7, 7], ["wrong", "illegal", "wrong", "wrong"]),
    ]
    log = []
    for group, statuses in steps:
        buffer.add([examples[g] for g in hardest_groups(group, statuses, ["malformed"])])
        log.append((buffer.take(2), [ex["id"] for ex in buffer.examples]))
    e = examples
    # 1: e0 and e3 all failed (e1 was solved once, e2 had a format failure): taken at once
    # 2: only e5; 1 < 2, nothing taken.  3: e6, e7 go in front of e5; the newest two are taken
    assert log == [([e[0], e[3]], []), (None, ["e5"]), ([e[6], e[7]], ["e5"])]
    assert hardest_groups([4, 4], ["malformed", "malformed"], []) == [4]  # no format failures configured


def test_srft_weights_and_self_loss_by_hand():
    w_sft, w_rl = algo.srft_weights(torch.tensor([0.0, LN2]))
    assert w_sft.tolist() == pytest.approx([0.5, 0.25]) and w_rl.tolist() == pytest.approx([0.1, 0.2])
    srft = make("srft")
    batch = batch_of([1.0, 0.0, 1.0], ["correct", "wrong", "correct"], [0, 0, 0], [False, False, True])
    batch.advantages = srft.advantages(batch.rewards, batch.rollouts)
    a_demo = (1 / 3) / math.sqrt(1 / 3)  # (1 − 2/3) / unbiased std of [1, 0, 1]
    assert batch.advantages[2].item() == pytest.approx(a_demo, rel=1e-4)
    logprobs = torch.log(torch.tensor([[0.5], [0.25], [0.4]])).requires_grad_(True)
    entropy = torch.tensor([[LN2], [0.3], [0.0]])
    loss, stats = srft.rl_loss(logprobs, torch.ones(3, 1), batch, slice(0, 3), None, entropy, torch.ones(3, 1))
    assert stats["w_rl"] == pytest.approx((0.2, 1.0))  # (mean over the correct own tokens, their count)
    # correct own sample: 0.2·(−ln 0.5); wrong own sample: +ln 0.25; demo: −A·p; token mean
    expected = (0.2 * LN2 + math.log(0.25) - a_demo * 0.4) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.2 / 3, 1 / 3, -a_demo * 0.4 / 3], rel=1e-4)
    sft, _ = srft.sft_loss(torch.log(torch.tensor([[0.5]])), torch.ones(1, 1), torch.tensor([[LN2]]), 1.0)
    assert sft.item() == pytest.approx(0.25 * LN2, rel=1e-5)
    assert srft.sft_examples(run_over([]), [{"id": "p"}]) == [{"id": "p"}]  # the RL prompts' demonstrations
