"""The rollout backend interface and the sampler/trainer importance-sampling correction:
the math pinned by hand, its wiring into the RL gradient, the logged log-prob gap (fp32 vs
bf16 sampling on the hf backend), weight sync after every update, and the vLLM backend's
pure parts (vLLM itself cannot run here)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from amft_cli import algo
from amft_cli.cli import resolve_config
from amft_cli.data import prepare
from amft_cli.rollout import HFBackend, generate
from amft_cli.signals import PhaseTimer, rl_signal
from amft_cli.train import setup, train_step

E05, E15 = math.exp(0.5), math.exp(1.5)  # 1.6487, 4.4817

# row 0: Δ = log π_train − log π_sampler = [0.5, 0, (pad)]; row 1: Δ = [0, 1.5, 0]
TRAIN = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
SAMPLER = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -2.0, -0.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("mode, want", [
    ("token_truncate", [[E05, 1.0, 1.0], [1.0, 3.0, 1.0]]),
    ("token_mask", [[E05, 1.0, 1.0], [1.0, 0.0, 1.0]]),
    ("sequence_truncate", [[E05] * 3, [3.0] * 3]),       # row sums 0.5 and 1.5 -> e^1.5 > 3
    ("sequence_mask", [[E05] * 3, [0.0] * 3]),           # TRL's default: the row is dropped
    ("none", [[1.0] * 3, [1.0] * 3]),
])
def test_sampler_is_weights_by_hand(mode, want):
    got = algo.sampler_is_weights(TRAIN, SAMPLER, MASK, mode, cap=3.0)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_sampler_is_weights_edges():
    # a NaN sampler log-prob counts as no difference; a huge ratio is capped, not inf
    sampler = torch.tensor([[float("nan"), -2.0, 0.0], [-0.5, -200.0, -0.5]])
    got = algo.sampler_is_weights(TRAIN, sampler, MASK, "sequence_truncate", cap=3.0)
    assert torch.allclose(got, torch.tensor([[1.0] * 3, [3.0] * 3]))
    assert algo.sampler_is_weights(TRAIN, sampler, MASK, "sequence_mask")[1].eq(0).all()
    assert not algo.sampler_is_weights(TRAIN.requires_grad_(), SAMPLER, MASK).requires_grad
    with pytest.raises(ValueError, match="rl.sampler_correction"):
        algo.sampler_is_weights(TRAIN, SAMPLER, MASK, "sequence_clip")


def test_policy_loss_scales_the_pg_term_and_not_the_kl():
    # ratio 1, A = 1: PPO tokens are −1; weights [2, 0.5]; KL k3 at r = log 2: 2 − ln 2 − 1 = 0.30685
    logprobs = torch.tensor([[-1.0, -1.0]])
    ref = logprobs + math.log(2.0)
    loss, _ = algo.policy_loss(logprobs, logprobs, torch.tensor([1.0]), torch.ones(1, 2), ref_logprobs=ref,
                               kl_beta=0.5, is_weights=torch.tensor([[2.0, 0.5]]))
    kl = 2.0 - math.log(2.0) - 1.0
    assert loss.item() == pytest.approx(((-2.0 + 0.5 * kl) + (-0.5 + 0.5 * kl)) / 2, abs=1e-6)


# ---------------------------------------------------------------------------
# wiring on the tiny model


def varied_reward(prompts, completions, **columns):
    """Rewards that vary within a group even for an untrained model (the verifier gives all 0)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-math-data")
    prepare(resolve_config("tiny-math", sets(path)), log=lambda msg: None)
    return path


def sets(data_dir: Path, *extra: str) -> list[str]:
    return [f"task.data_dir={data_dir}", f"model.path={data_dir / 'model'}", "task.train_size=200",
            "task.val_size=16", "task.test_size=16", "task.ood_size=16", "train.prompts_per_step=3",
            "rl.group_size=4", "rl.max_new_tokens=8", "train.eval_at_end=false", "train.sft_batch_size=4",
            f"task.reward={__name__}:varied_reward", *extra]


class TamperedSampler(HFBackend):
    """The hf sampler, reporting row 0's log-probs `shift` nats lower than it computed: a sampler
    whose numbers disagree with the trainer's, as vLLM's or a bf16 copy's can."""

    def __init__(self, model, tokenizer, shift: float) -> None:
        super().__init__(model, tokenizer)
        self.shift = shift

    def generate(self, *args, **kwargs):
        out = super().generate(*args, **kwargs)
        out.sampler_logprobs[0] = [lp - self.shift for lp in out.sampler_logprobs[0]]
        return out


def rl_grads(data_dir: Path, mode: str, shift: float):
    cfg = resolve_config("tiny-math", sets(data_dir, f"rl.sampler_correction={mode}"), algo="rl")
    run, method, _ = setup(cfg, on_message=lambda msg: None)
    run.backend = TamperedSampler(run.policy.model, run.policy.tokenizer, shift)
    grads, _, stats = rl_signal(run, run.draw("rl", cfg.train.prompts_per_step), method, PhaseTimer())
    return torch.cat([g.flatten() for g in grads]), stats


def test_the_correction_reaches_the_rl_gradient(data_dir):
    # row 0 sampled 1 nat per token less likely than the trainer computes: its sequence ratio
    # e^(1·len) > 3. The RL gradient is Σ_r w_r·g_r, so truncating (w_0 = 3) and masking (w_0 = 0)
    # move it from the uncorrected one (w_0 ≈ 1) by +2·g_0 and −1·g_0.
    plain, _ = rl_grads(data_dir, "none", 1.0)
    truncated, t_stats = rl_grads(data_dir, "sequence_truncate", 1.0)
    masked, m_stats = rl_grads(data_dir, "sequence_mask", 1.0)
    row0 = plain - masked
    assert row0.abs().max() > 1e-3  # row 0 carries gradient (its advantage is not 0)
    assert torch.allclose(truncated - plain, 2.0 * row0, rtol=1e-2, atol=1e-5)  # fp32 noise ~3e-7
    assert m_stats["rollout/is_capped_frac"] == pytest.approx(1 / 12)  # 1 of 3 × 4 rows
    assert m_stats["rollout/logprob_diff_max"] == pytest.approx(1.0, abs=1e-4)
    assert t_stats["rollout/is_weight_mean"] > 1.0 > m_stats["rollout/is_weight_mean"]


@pytest.mark.parametrize("dtype, low, high", [("float32", 0.0, 1e-4), ("bfloat16", 1e-4, 1.0)])
def test_logprob_gap_of_the_hf_sampler(data_dir, dtype, low, high):
    # fp32: the cached sampler and the trainer's forward agree to float error; bf16 autocast
    # (full fine-tuning keeps fp32 weights) computes both in bf16, by different sdpa kernels and
    # shapes (eager attention, tiny-math's choice, happens to agree to ~1e-7 here too)
    cfg = resolve_config("tiny-math", sets(data_dir, f"model.dtype={dtype}", "model.attention=sdpa"), algo="rl")
    run, method, _ = setup(cfg, on_message=lambda msg: None)
    _, _, stats = rl_signal(run, run.draw("rl", 3), method, PhaseTimer())
    assert low <= stats["rollout/logprob_diff_mean"] < high
    assert stats["rollout/logprob_diff_mean"] <= stats["rollout/logprob_diff_max"]


class SyncLog(HFBackend):
    """The hf backend, recording the policy's weights each time the trainer syncs."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.seen: list[torch.Tensor] = []

    def sync_weights(self) -> None:
        self.seen.append(torch.cat([p.detach().flatten() for p in self.model.parameters()]).clone())


def test_trainer_builds_the_backend_and_syncs_after_every_update(data_dir):
    cfg = resolve_config("tiny-math", sets(data_dir, "train.rl_lr=1e-3"), algo="rl")
    run, method, optimizers = setup(cfg, on_message=lambda msg: None)
    assert isinstance(run.backend, HFBackend) and run.backend.model is run.policy.model
    run.backend = SyncLog(run.policy.model, run.policy.tokenizer)
    for step in range(2):
        train_step(run, method, optimizers)
        run.cursors.step += 1
        after = torch.cat([p.detach().flatten() for p in run.policy.model.parameters()])
        assert len(run.backend.seen) == step + 1 and torch.equal(run.backend.seen[-1], after)
    assert not torch.equal(run.backend.seen[0], run.backend.seen[1])  # the update moved the weights
    sft_run, _, _ = setup(resolve_config("tiny-math", sets(data_dir), algo="sft"), on_message=lambda msg: None)
    assert sft_run.backend is None  # a method that never samples starts no backend


# ---------------------------------------------------------------------------
# vLLM: only what runs without it


def test_vllm_backend_without_vllm_is_a_user_error(data_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    cfg = resolve_config("tiny-math", sets(data_dir, "rl.backend=vllm"), algo="rl")
    with pytest.raises(ValueError, match="rl.backend 'vllm': vLLM is not installed"):
        setup(cfg, on_message=lambda msg: None)  # the trainer builds the backend
    sft = resolve_config("tiny-math", sets(data_dir, "rl.backend=vllm"), algo="sft")
    assert setup(sft, on_message=lambda msg: None)[0].backend is None  # never samples: vLLM not needed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pushed_weights_are_the_merged_lora_model_under_plain_names(data_dir, dtype):
    from amft_cli.rollout_vllm import merged_lora, named_weights

    cfg = resolve_config("tiny-math", sets(data_dir, "model.lora_rank=4", f"model.dtype={dtype}"), algo="sft")
    model = setup(cfg, on_message=lambda msg: None)[0].policy.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # fresh adapters are exact no-ops (B = 0): give them an effect
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = {k: v.to(getattr(torch, dtype)) for k, v in  # W + BA in fp32, then rounded once
            copy.deepcopy(model).float().merge_and_unload().state_dict().items()}
    with merged_lora(model):
        pushed = {name: t.clone() for name, t in named_weights(model)}
    assert set(pushed) == {k for k in want if k != "lm_head.weight"}  # tied to the embeddings
    for name, tensor in pushed.items():
        assert tensor.dtype == want[name].dtype and torch.allclose(tensor, want[name], 0.0, 1e-6), name
    assert any(not torch.allclose(pushed[k], before[f"base_model.model.{k}".replace(".weight", ".base_layer.weight")])
               for k in pushed if "q_proj.weight" in k)  # the adapters did change the pushed weights
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base untouched: training goes on


# ---------------------------------------------------------------------------
# LoRA: the merged weights vLLM gets


def test_merged_lora_computes_what_the_adapters_do_and_never_writes_the_base(data_dir):
    from amft_cli.rollout_vllm import merged_lora

    cfg = resolve_config("tiny-math", sets(data_dir, "model.lora_rank=4"), algo="rl")
    run = setup(cfg, on_message=lambda msg: None)[0]
    model, tok = run.policy.model, run.policy.tokenizer
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))  # B = 0 would be a no-op
    prompts = [run.policy.prompt_ids(ex) for ex in run.train_set[:4]]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def sample():
        return generate(model, tok, prompts, 2, max_new_tokens=8, greedy=True)

    adapters = sample()
    with merged_lora(model):
        merged = sample()
    with model.disable_adapter():
        base = sample()
    assert merged.completion_ids == adapters.completion_ids
    gaps = [abs(a - b) for ra, rb in zip(adapters.sampler_logprobs, merged.sampler_logprobs) for a, b in zip(ra, rb)]
    assert max(gaps) < 1e-4  # W + BA·s in one product vs three: fp32 rounding only
    assert max(abs(a[0] - b[0]) for a, b in zip(adapters.sampler_logprobs, base.sampler_logprobs)) > 1e-2
    with pytest.raises(RuntimeError), merged_lora(model):
        raise RuntimeError("a failure while pushing")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one bit moved
    assert sample().sampler_logprobs == adapters.sampler_logprobs  # the adapters are back on
