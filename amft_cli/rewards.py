"""Scoring a batch of completions: the task's verifier, or a custom reward function.

Custom rewards follow TRL's contract, loaded by dotted path (`--set task.reward=pkg.mod:fn`):
    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]
with the example columns (answer, meta, id) as keyword lists. None means "not
applicable": that completion falls back to the task verifier. Statuses (and so
reward/accuracy) always come from the task verifier.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from amft_cli.config import ConfigError

RewardFn = Callable[..., list]


def load_reward_fn(spec: str) -> RewardFn | None:
    """'pkg.module:function' -> the function; '' -> None (use the task verifier)."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"task.reward {spec!r}: cannot import ({e}); expected 'package.module:function'") from None
    if not callable(fn):
        raise ConfigError(f"task.reward {spec!r}: not a function")
    return fn


def score_completions(task, examples: list[dict], completions: list[str],
                      reward_fn: RewardFn | None = None) -> tuple[torch.Tensor, list[str]]:
    """Rewards (N,) and verifier statuses for N (example, completion) pairs."""
    scores = [task.score(ex, text) for ex, text in zip(examples, completions)]
    rewards = [s.reward for s in scores]
    if reward_fn is not None:
        columns = {key: [ex[key] for ex in examples] for key in ("answer", "meta", "id")}
        custom = reward_fn([ex["prompt"] for ex in examples], completions, **columns)
        if len(custom) != len(completions):
            raise ConfigError(f"task.reward: returned {len(custom)} rewards for {len(completions)} completions")
        rewards = [float(c) if c is not None else r for c, r in zip(custom, rewards)]
    return torch.tensor(rewards, dtype=torch.float32), [s.status for s in scores]
