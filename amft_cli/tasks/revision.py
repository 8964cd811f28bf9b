"""Sequential revision, the setting of Chu et al. 2025's GP and V-IRL numbers, as plain data.

Up to `verify_iter` attempts per problem: after a failed attempt the model's
answer stays in the conversation as an assistant turn and the next user turn
is "You failed this trial because {the verifier's message}"; the model answers
again. Every attempt is scored (and, in training, trained on); an episode
succeeds when one of its attempts is correct. Reference (LeslieTrue/SFTvsRL):
rl/trainer/llama_trainer.py `formulate_prompt` / `append_intermidiate_res`
build that conversation; the environments' `verify_iter` / `remaining_step`
(gym_cards/envs/general_points_oneline.py `step`, gym_virl/envs/
navigation_environment.py `step`, `move_on_rail`) bound the attempts, and
V-IRL restores the count after each correct step (its episodes are per step
here and in tasks/virl.py `evaluate_episodes`).

Departure: the reference's environment asks for one more answer after the
last allowed attempt, which it does not read and scores -1; here an episode
simply stops after `verify_iter` attempts.

An episode's conversation is a `Conversation` of chat messages ({"role",
"content"}); model.encode_transcript turns it into token ids (with the chat
template, or as plain text for models without one). No torch here: train and eval drive the
same rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from amft_cli.tasks.base import Score

FEEDBACK = "You failed this trial because {}"


class Conversation(list):
    """The chat messages of a revision episode ({"role", "content"} dicts). A type of its own, so
    encoders tell it from a task prompt, which may itself be a list of messages (a system prompt)."""



def feedback(score: Score) -> str:
    """The user turn after a failed attempt: the verifier's message (info["error"], else the status)."""
    message = str(score.info.get("error") or f"the answer is {score.status}").rstrip(".")
    return FEEDBACK.format(message + ".")


@dataclass
class Attempt:
    completion: str
    score: Score
    data: object = None  # whatever the generator attached (the trainer: token ids)


@dataclass
class Episode:
    """One try at one problem: its attempts so far."""

    example: dict
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def solved(self) -> bool:
        return any(a.score.correct for a in self.attempts)

    def messages(self) -> Conversation:
        """The conversation the next attempt continues: the prompt, then per failed attempt
        the answer (assistant) and the verifier's message (user)."""
        prompt = self.example["prompt"]
        out = Conversation(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
        for a in self.attempts:
            out += [{"role": "assistant", "content": a.completion}, {"role": "user", "content": feedback(a.score)}]
        return out

    def conversation(self) -> str | Conversation:
        """What the next attempt continues: the bare prompt first, the messages after a failure."""
        return self.messages() if self.attempts else self.example["prompt"]

    def open(self, verify_iter: int) -> bool:
        """Whether the episode gets another attempt."""
        return not self.solved and len(self.attempts) < verify_iter

    def add(self, task, item) -> None:
        """Score and record one completion: a text, or (text, data)."""
        text, data = (item, None) if isinstance(item, str) else item
        self.attempts.append(Attempt(text, task.score(self.example, text), data))


def run_episodes(task, examples: list[dict], n: int, verify_iter: int,
                 generate: Callable[[list[str | Conversation], int], list[list]]) -> list[Episode]:
    """n episodes per example (example-major), each up to verify_iter attempts.

    generate(conversations, n) returns n completions per conversation, each a text or
    (text, data); the first round asks for n per example prompt (the episodes of an example
    start alike), later rounds for one per open episode's messages.
    """
    episodes = [Episode(ex) for ex in examples for _ in range(n)]
    for i, completions in enumerate(generate([ex["prompt"] for ex in examples], n)):
        for j, item in enumerate(completions):
            episodes[i * n + j].add(task, item)
    active = [e for e in episodes if e.open(verify_iter)]
    while active:
        for episode, (item,) in zip(active, generate([e.conversation() for e in active], 1)):
            episode.add(task, item)
        active = [e for e in active if e.open(verify_iter)]
    return episodes
