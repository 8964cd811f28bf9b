"""rl.skip_zero_advantage: groups whose every row has no gradient run forward only. For every
method that samples, the RL gradient, loss and logged figures are those of the full backward;
the rows said to have no gradient really ran without autograd; a method that says so of rows
with a loss is caught."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from amft_cli import methods
from amft_cli.cli import resolve_config
from amft_cli.policy import chunk_rows
from amft_cli.signals import PhaseTimer, rl_signal
from amft_cli.train import setup
from amft_runs import tiny_sets

SAMPLING = [name for name in methods.names() if methods.get(name).uses_rollouts]


def half_constant_reward(prompts, completions, **columns):
    """Every row of a group gets the same reward on about half of the prompts (a zero-std group:
    advantages 0), a reward that varies with the completion on the others."""
    return [1.0 if zlib.crc32(p.encode()) % 2 else float(sum(map(ord, c)) % 5) for p, c in zip(prompts, completions)]


def rl_gradient(data_dir: Path, algo: str, skip: bool, *extra: str):
    """g_RL (P,), loss, stats and the model's forward calls [(rows, grad enabled)] of one RL batch."""
    sets = [*tiny_sets(data_dir), "train.prompts_per_step=8", "rl.group_size=4", f"rl.skip_zero_advantage={skip}",
            f"task.reward={__name__}:half_constant_reward", *extra]
    cfg = resolve_config("tiny-math", sets, algo=algo)
    run, method, _ = setup(cfg, on_message=lambda msg: None)
    calls: list[tuple[int, bool]] = []
    run.policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[0], torch.is_grad_enabled())),
        with_kwargs=True)
    grads, loss, stats = rl_signal(run, run.draw("rl", cfg.train.prompts_per_step), method, PhaseTimer())
    return torch.cat([g.flatten() for g in grads]), loss, stats, calls


@pytest.mark.parametrize("algo, micro_batch", [(name, 0) for name in SAMPLING] + [("rl", 8)])
def test_skipping_zero_advantage_groups_keeps_the_gradient_and_the_figures(tiny_data, algo, micro_batch):
    extra = ["luffy.entropy_coeff=0"] if algo == "luffy" else []  # an entropy bonus trains every row
    extra.append(f"train.micro_batch_size={micro_batch}")  # 8: two groups a chunk, on both sides of the split
    full, full_loss, full_stats, full_calls = rl_gradient(tiny_data, algo, False, *extra)
    fast, fast_loss, fast_stats, fast_calls = rl_gradient(tiny_data, algo, True, *extra)
    assert full.abs().max() > 1e-4  # the varied groups carry a gradient
    assert torch.allclose(fast, full, rtol=1e-4, atol=1e-6 * full.abs().max().item())  # fp32 sums in another order
    assert fast_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    assert full_stats.pop("rl/forward_only_frac") == 0.0
    share = fast_stats.pop("rl/forward_only_frac")
    assert fast_stats.keys() == full_stats.keys()
    for key, value in full_stats.items():
        if key.startswith(("rollout/logprob_diff", "rollout/is_weight")):  # sampler vs trainer: float noise ~1e-6
            assert fast_stats[key] == pytest.approx(value, rel=0.0, abs=1e-5), key
        elif not key.startswith("time/") and key != "rollout/tokens_per_s":
            assert fast_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # the rollouts run without autograd either way; the losses' shared-prompt forwards run each
    # group's prompt once, then its rows: those moved out of autograd cover exactly the share reported
    size = 5 if algo == "srft" else 4  # SRFT adds a demonstration to each group; LUFFY samples one fewer
    moved = sum(n for n, grad in fast_calls if not grad) - sum(n for n, grad in full_calls if not grad)
    assert share == 0.0 if algo == "srft" else 0.2 < share < 0.8
    assert moved == round(share * 8 * size * (size + 1) / size)


def test_an_entropy_bonus_or_kl_term_trains_every_row(tiny_data):
    _, _, stats, _ = rl_gradient(tiny_data, "luffy", True)  # LUFFY's default entropy_coeff 0.001
    assert stats["rl/forward_only_frac"] == 0.0
    _, _, stats, _ = rl_gradient(tiny_data, "rl", True, "rl.kl_beta=0.05")
    assert stats["rl/forward_only_frac"] == 0.0


def test_rows_wrongly_said_to_have_no_gradient_are_caught(tiny_data, monkeypatch):
    # LUFFY's entropy bonus gives every row a gradient: a hook that forgot it is a bug, not a speed-up
    monkeypatch.setattr(methods.get("luffy"), "zero_gradient_rows", lambda self, batch: batch.advantages == 0)
    with pytest.raises(RuntimeError, match="were said to have no gradient, but their loss is"):
        rl_gradient(tiny_data, "luffy", True)


def test_a_stat_over_a_sub_mask_does_not_depend_on_the_micro_batches(tiny_data):
    # LUFFY's off_policy_prob is a mean over the demonstration tokens only: chunks weigh it by
    # those tokens (value, weight), not by all of theirs
    _, _, whole, _ = rl_gradient(tiny_data, "luffy", False, "train.micro_batch_size=0")
    _, _, chunked, _ = rl_gradient(tiny_data, "luffy", False, "train.micro_batch_size=4")  # one group a chunk
    assert chunked["rl/off_policy_prob"] == pytest.approx(whole["rl/off_policy_prob"], rel=1e-5)
    assert chunked["policy/entropy"] == pytest.approx(whole["policy/entropy"], rel=1e-5)


def test_chunks_never_cross_the_split_or_a_group():
    group = [0, 0, 1, 1, 2, 2]
    assert chunk_rows(group, 6, 0, split=4) == [slice(0, 4), slice(4, 6)]
    assert chunk_rows(group, 6, 4, split=2) == [slice(0, 2), slice(2, 6)]
    assert chunk_rows(group, 6, 0, split=6) == [slice(0, 6)]
    assert chunk_rows(group, 6, 0, split=0) == [slice(0, 6)]
