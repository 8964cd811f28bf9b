"""Multi-turn rollouts for sequential revision (task.verify_iter > 1; tasks/revision.py).

Each prompt gets n episodes of up to verify_iter attempts; every attempt is one
rollout row whose prompt is the conversation so far (the task prompt, earlier
answers, the verifier's "You failed this trial because …" messages) and whose
completion is the new answer. All rows of one problem form one group, so GRPO
normalises an attempt's reward against every attempt at that problem: a failed
first try scores below the revision that fixes it. The rows of a group are
laid out first attempts first (they share the task prompt, which the loss
forward then runs once), later attempts after.

Departure from the reference (LeslieTrue/SFTvsRL rl/trainer/llama_trainer.py
`collect_trajectories`, rl/trainer/algo/ppo.py): it trains with PPO, a value
head and discounted returns across the attempts of an episode; here each
attempt is a bandit row with its own verifier reward and group advantages.

Sampled through the run's rollout backend (rollout.RolloutBackend), one call per round of attempts.
"""

from __future__ import annotations

from amft_cli.config import Config
from amft_cli.encoding import encode_prompt, encode_transcript
from amft_cli.policy import Policy
from amft_cli.rollout import RolloutBackend, Rollouts, row_uniforms
from amft_cli.tasks.revision import Conversation, Episode, run_episodes


def revision_rollouts(policy: Policy, backend: RolloutBackend, cfg: Config, task, examples: list[dict], n: int,
                      first_row: int) -> tuple[Rollouts, dict]:
    """Rows for every attempt of n episodes per example (group = example index), and
    revision/* metrics: success within the attempts, attempts per episode, first-try accuracy.
    first_row: the run's number of the first row sampled here; rows are numbered in the order
    they are generated and each draws its own seeded uniforms (rollout.row_uniforms)."""
    next_row = first_row

    def generate_round(conversations: list, k: int) -> list[list[tuple]]:
        nonlocal next_row
        ids = [encode_transcript(policy.tokenizer, c, policy.chat_template) if isinstance(c, Conversation) else
               encode_prompt(policy.tokenizer, c, policy.chat_template) for c in conversations]
        out = backend.generate(ids, k, max_new_tokens=cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
                               top_p=cfg.rl.top_p,
                               uniforms=row_uniforms(cfg.seed, next_row, len(ids) * k, cfg.rl.max_new_tokens))
        next_row += len(ids) * k
        rows = [(text, (p, c, f, s)) for text, p, c, f, s in
                zip(out.texts, out.prompt_ids, out.completion_ids, out.finished, out.sampler_logprobs)]
        return [rows[i * k:(i + 1) * k] for i in range(len(ids))]

    episodes = run_episodes(task, examples, n, cfg.task.verify_iter, generate_round)
    return episodes_to_rollouts(episodes, n), revision_stats(episodes)


def episodes_to_rollouts(episodes: list[Episode], n: int) -> Rollouts:
    """One row per attempt; example i's episodes (n of them, example-major) are group i, its
    first attempts first, then the second attempts, and so on."""
    prompt_ids, completion_ids, texts, finished, group, sampler = [], [], [], [], [], []
    for g in range(len(episodes) // n):
        mine = episodes[g * n:(g + 1) * n]
        for k in range(max(len(e.attempts) for e in mine)):
            for episode in mine:
                if k < len(episode.attempts):
                    attempt = episode.attempts[k]
                    p, c, f, s = attempt.data
                    prompt_ids.append(p)
                    completion_ids.append(c)
                    texts.append(attempt.completion)
                    finished.append(f)
                    group.append(g)
                    sampler.append(s)
    return Rollouts(prompt_ids, completion_ids, texts, finished, group=group, sampler_logprobs=sampler)


def revision_stats(episodes: list[Episode]) -> dict:
    return {"revision/success": sum(e.solved for e in episodes) / len(episodes),
            "revision/attempts": sum(len(e.attempts) for e in episodes) / len(episodes),
            "revision/first_accuracy": sum(e.attempts[0].score.correct for e in episodes) / len(episodes)}
