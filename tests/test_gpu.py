"""GPU tests (marked gpu; skipped without CUDA): the sampler and the training step on a CUDA device.

Run by tests/gpu/check.sh on a GPU machine. `AMFT_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`
runs the same code on CPU (a dry run of this file where no GPU is lent).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from amft_cli.cli import resolve_config
from amft_cli.config import ModelConfig
from amft_cli.data import prepare
from amft_cli.encoding import encode_prompt
from amft_cli.model import build_tiny_model, load_policy
from amft_cli.rollout import generate
from amft_cli.train import setup, train_step

DEVICE = os.environ.get("AMFT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = ["1+2*3=", "45+6*7=", "9=", "12+0*0="]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    mcfg = ModelConfig(path=str(tmp_path_factory.mktemp("m") / "model"), hidden_size=64, num_layers=2, num_heads=2)
    return build_tiny_model(mcfg, ["0123456789+*="], mcfg.path, seed=3)


def load(tiny_dir: Path, dtype: str = "float32"):
    return load_policy(ModelConfig(path=str(tiny_dir), dtype=dtype), torch.device(DEVICE), trainable=False)


def uncached_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log π of each completion token from one full forward, no cache."""
    ids = torch.tensor([prompt + completion], device=DEVICE)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


def test_greedy_sampler_on_device_equals_uncached_decoding(tiny_dir):
    model, tok = load(tiny_dir)
    prompts = [encode_prompt(tok, p, False) for p in PROMPTS]
    out = generate(model, tok, prompts, n=2, max_new_tokens=10, greedy=True)
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(10):
            nxt = int(model(input_ids=torch.tensor([seq], device=DEVICE)).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert out.completion_ids[2 * i] == out.completion_ids[2 * i + 1] == seq[len(prompt):]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.5)])
def test_sampler_logprobs_on_device_match_a_full_forward(tiny_dir, dtype, tolerance):
    model, tok = load(tiny_dir, dtype)
    prompts = [encode_prompt(tok, p, False) for p in PROMPTS]
    out = generate(model, tok, prompts, n=4, max_new_tokens=12,
                   generator=torch.Generator(DEVICE).manual_seed(0))
    gaps = [(torch.tensor(lp, device=DEVICE) - uncached_logprobs(model, p, c)).abs()
            for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.sampler_logprobs)]
    gap = torch.cat(gaps)
    assert torch.isfinite(gap).all() and gap.mean().item() < tolerance


def test_amft_steps_on_device(tmp_path):
    data = tmp_path / "data"
    cfg = resolve_config("tiny-math", [
        f"task.data_dir={data}", f"model.path={data / 'model'}", "task.train_size=200", "task.val_size=16",
        "task.test_size=16", "task.ood_size=16", f"model.device={DEVICE}", "train.prompts_per_step=4",
        "rl.group_size=4", "rl.max_new_tokens=12", "train.sft_batch_size=8", "amft.warmup_steps=1",
        "amft.meta_every=1", "amft.meta_prompts=2", "train.eval_at_end=false"])
    prepare(cfg, log=lambda msg: None)
    run, method, optimizers = setup(cfg, on_message=lambda msg: None)
    before = [p.detach().clone() for p in run.policy.params]
    for _ in range(3):  # step 0: SFT warm-up; 1, 2: SFT + GRPO + meta-gradient
        metrics = train_step(run, method, optimizers)
        run.cursors.step += 1
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert metrics["balance/meta_update"] == 1.0 and metrics["rollout/logprob_diff_max"] < 1e-3
    assert run.policy.params[0].device.type == torch.device(DEVICE).type
    assert any(not torch.equal(b, p) for b, p in zip(before, run.policy.params))
