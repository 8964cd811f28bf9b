"""Sequential revision: the transcript of scripted wrong-then-right answers, the attempt bound,
the V-IRL per-step reset, eval's success-within-attempts, and the multi-turn training rows."""

from __future__ import annotations

import json

import pytest
import torch

from amft_cli.config import ModelConfig, TaskConfig
from amft_cli.evaluate import evaluate_split
from amft_cli.encoding import encode_prompt, encode_transcript, plain_transcript
from amft_cli.model import build_tiny_model, load_policy
from amft_cli.policy import Policy, group_runs, sequence_logprobs
from amft_cli.revise import episodes_to_rollouts
from amft_cli.tasks import gp, virl
from amft_cli.tasks.revision import run_episodes

GP_HAND = [4, 7, 8, 8]


def formula(text: str) -> str:
    return json.dumps({"cards": ["4", "7", "8", "8"], "number": GP_HAND, "formula": text})


class Script:
    """A generate() that answers from a fixed script per round and records what it was asked."""

    def __init__(self, rounds: list[list[str]]):
        self.rounds, self.asked = rounds, []

    def __call__(self, conversations, n):
        answers = self.rounds[len(self.asked)]
        self.asked.append((conversations, n))
        return [[answers[i * n + j] for j in range(n)] for i in range(len(conversations))]


def test_gp_transcript_of_wrong_then_right_answers():
    ex = gp.make_example(GP_HAND, "id", "hand", "full")
    wrong, illegal, right = formula("8+8+7+4"), formula("8*(7-4)"), formula("(7-8/8)*4")
    script = Script([[wrong], [illegal], [right], ["never asked"]])
    (episode,) = run_episodes(gp, [ex], 1, 5, script)
    assert [a.score.reward for a in episode.attempts] == [-1.0, -2.0, 5.0] and episode.solved
    assert len(script.asked) == 3  # solved at the third attempt: no fourth
    prompt = {"role": "user", "content": ex["prompt"]}
    assert script.asked[0] == ([ex["prompt"]], 1)
    assert script.asked[2] == ([[
        prompt,
        {"role": "assistant", "content": wrong},
        {"role": "user", "content": "You failed this trial because value 27, not 24."},
        {"role": "assistant", "content": illegal},
        {"role": "user", "content": "You failed this trial because you did not use 8."},
    ]], 1)


def test_attempts_stop_at_verify_iter_and_solved_episodes_stop_early():
    examples = [gp.make_example(GP_HAND, "id", f"e{i}", "compact") for i in range(2)]
    right = "8/8=1,7-1=6,6*4=24"
    # round 1: e0 gets (wrong, right), e1 gets (wrong, wrong); later rounds only the open episodes
    script = Script([["8+8=16", right, "x", "8+8=16"], ["x", "y", "z"], ["x", "y", "z"]])
    episodes = run_episodes(gp, examples, 2, 3, script)
    assert [len(e.attempts) for e in episodes] == [3, 1, 3, 3]
    assert [e.solved for e in episodes] == [False, True, False, False]
    assert [n for _, n in script.asked] == [2, 1, 1] and len(script.asked[1][0]) == 3
    statuses = [a.score.status for a in episodes[2].attempts]
    assert statuses == ["malformed", "malformed", "malformed"]
    assert episodes[2].messages()[2]["content"].startswith("You failed this trial because cannot read step")


def test_plain_and_chat_transcripts(tmp_path):
    messages = [{"role": "user", "content": "4,7,8,8;JQK=10,10,10:"}, {"role": "assistant", "content": "8+8=16"},
                {"role": "user", "content": "You failed this trial because x."}]
    assert plain_transcript(messages) == "4,7,8,8;JQK=10,10,10:8+8=16\nYou failed this trial because x.\n4,7,8,8;JQK=10,10,10:"
    mcfg = ModelConfig(path=str(tmp_path / "m"), hidden_size=32, num_layers=1, num_heads=2)
    build_tiny_model(mcfg, ["x"], tmp_path / "m", seed=0)
    _, tok = load_policy(mcfg, torch.device("cpu"), trainable=False)
    assert encode_transcript(tok, messages[:1], False) == encode_prompt(tok, messages[0]["content"], False)
    assert tok.decode(encode_transcript(tok, messages, False)) == "<bos>" + plain_transcript(messages)
    tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert tok.decode(encode_transcript(tok, messages, True)) == (
        "<bos>[user]4,7,8,8;JQK=10,10,10:[assistant]8+8=16[user]You failed this trial because x.[assistant]")


def _route_examples():
    splits = virl.build_splits(TaskConfig(name="virl", format="compact", seed=3, train_size=1, val_size=0,
                                          test_size=1, ood_size=0))
    return splits["test"]


def test_virl_resets_the_attempt_count_after_each_correct_step():
    examples = _route_examples()  # one route
    gold = {ex["prompt"]: ex["demonstration"] for ex in examples}
    n = len(examples)
    fail_at = {1: 1, 3: 1}  # one wrong try at steps 1 and 3: each recovers within 2 attempts
    asked = []

    def generate(prompts):
        (prompt,) = prompts
        asked.append(prompt)
        if isinstance(prompt, str):
            step = next(ex["meta"]["step"] for ex in examples if ex["prompt"] == prompt)
            return ["no idea"] if fail_at.get(step) else [gold[prompt]]
        return [gold[prompt[0]["content"]]]  # the retry names the same step prompt first

    metrics, samples = virl.evaluate_episodes(examples, generate, verify_iter=2)
    assert metrics == {"step_accuracy": 1.0, "route_success": 1.0, "routes": 1, "steps": n, "attempts": n + 2}
    retries = [p for p in asked if not isinstance(p, str)]
    assert len(retries) == 2 and retries[0][1] == {"role": "assistant", "content": "no idea"}
    assert retries[0][2]["content"] == ("You failed this trial because your reply names no action "
                                        "from the action space.")
    assert [s["attempt"] for s in samples if s["id"].endswith("step-1")] == [0, 1]
    # the same two slips without revision end the route at step 1
    metrics, _ = virl.evaluate_episodes(examples, generate, verify_iter=1)
    assert metrics["route_success"] == 0.0 and metrics["steps"] == 2


def test_virl_fails_a_step_that_uses_up_its_attempts():
    examples = _route_examples()
    metrics, samples = virl.evaluate_episodes(examples, lambda prompts: ["no idea"] * len(prompts), verify_iter=2)
    assert metrics["route_success"] == 0.0 and metrics["steps"] == 1 and metrics["attempts"] == 2
    assert [s["attempt"] for s in samples] == [0, 1]


def test_eval_counts_an_episode_solved_within_its_attempts():
    examples = [gp.make_example(GP_HAND, "id", "e0", "compact"), gp.make_example([1, 2, 3, 4], "id", "e1", "compact")]
    right = {ex["prompt"]: ex["demonstration"] for ex in examples}

    def generate_fn(prompts, n, greedy):
        # first attempts are wrong; every retry (a conversation) of e0 is right, of e1 wrong
        return [[right[p[0]["content"]] if not isinstance(p, str) and p[0]["content"] == examples[0]["prompt"]
                 else "1+1=2"] * n for p in prompts]

    metrics, rows = evaluate_split(gp, examples, generate_fn, k=2, verify_iter=3)
    assert metrics["avg@k"] == 0.5 and metrics["pass@k"] == 0.5 and metrics["greedy_accuracy"] == 0.5
    assert metrics["first_try_avg@k"] == 0.0 and metrics["first_try_greedy"] == 0.0 and metrics["verify_iter"] == 3
    e1 = [r for r in rows if r["id"] == "e1" and r["mode"] == "greedy"][0]
    assert len(e1["attempts"]) == 3 and e1["status"] == "illegal"
    assert [len(r["attempts"]) for r in rows if r["id"] == "e0"] == [2, 2, 2]


def test_group_runs_split_where_the_prompt_changes():
    assert group_runs([0, 0, 0, 1, 1]) == [3, 2]
    assert group_runs([0, 0, 0, 1, 1], [[1], [1], [2], [3], [3]]) == [2, 1, 2]


def test_training_rows_of_revision_episodes(tmp_path):
    """Layout: one group per problem, first attempts first; the shared-prompt forward of such a
    group (prompts differ inside it) equals the plain packed forward."""
    mcfg = ModelConfig(path=str(tmp_path / "m"), hidden_size=32, num_layers=1, num_heads=2)
    build_tiny_model(mcfg, ["x"], tmp_path / "m", seed=0)
    model, tok = load_policy(mcfg, torch.device("cpu"), trainable=False)
    policy = Policy(model, tok, torch.device("cpu"))
    examples = [gp.make_example(GP_HAND, "id", "e0", "compact"), gp.make_example([1, 2, 3, 4], "id", "e1", "compact")]

    def generate(conversations, n):
        return [[(f"{i}{j}+", ([len(c)] * len(c), [40 + j, 2], True, [-float(j)])) for j in range(n)]
                for i, c in enumerate(conversations)]

    episodes = run_episodes(gp, examples, 2, 2, generate)
    rollouts = episodes_to_rollouts(episodes, 2)
    assert rollouts.group == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rollouts.texts == ["00+", "01+", "00+", "10+"] + ["10+", "11+", "20+", "30+"]
    assert rollouts.sampler_logprobs == [[0.0], [-1.0], [0.0], [0.0]] * 2  # each row keeps its sampler's
    assert rollouts.prompt_ids[:4] == [[len(examples[0]["prompt"])] * len(examples[0]["prompt"])] * 2 + [[3, 3, 3]] * 2
    prompts = [encode_prompt(tok, ex["prompt"], False) for ex in examples]
    rows_prompts = [prompts[0], prompts[0], prompts[0] + [5, 6], prompts[0] + [7], prompts[1], prompts[1],
                    prompts[1] + [8], prompts[1] + [9]]
    completions = [[40, 2], [41, 2], [42], [43, 44, 2], [40, 2], [41, 2], [45, 2], [46]]
    shared, _, mask = sequence_logprobs(policy, rows_prompts, completions, grad=False, group=rollouts.group)
    packed, _, packed_mask = sequence_logprobs(policy, rows_prompts, completions, grad=False)
    assert torch.allclose((shared * mask).sum(-1), (packed * packed_mask).sum(-1), atol=1e-5)


def test_training_with_revision_scores_every_attempt(tmp_path):
    from amft_cli.cli import resolve_config
    from amft_cli.data import prepare
    from amft_cli.metrics import read_metrics
    from amft_cli.train import train

    cfg = resolve_config("tiny-gp", [
        f"task.data_dir={tmp_path}/data", f"model.path={tmp_path}/data/model", "task.train_size=64",
        "task.val_size=8", "task.test_size=8", "task.ood_size=8", "task.pretrain_size=0", "model.pretrain_steps=0",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "train.steps=2",
        "train.prompts_per_step=3", "rl.group_size=2", "rl.max_new_tokens=8", "task.verify_iter=3",
        "train.eval_limit=4", "train.save_every=2"], algo="rl")
    prepare(cfg, log=lambda m: None)
    train(cfg, tmp_path / "run", on_message=lambda m: None)
    for record in read_metrics(tmp_path / "run"):
        # an untrained model fails nearly every attempt, so nearly every episode uses all three
        assert 2.5 <= record["revision/attempts"] <= 3.0
        assert record["revision/success"] >= record["revision/first_accuracy"]
        assert record["reward/mean"] < 0


def test_revision_trains_in_one_process_only():
    from amft_cli.cli import resolve_config
    from amft_cli.config import ConfigError
    from amft_cli.parallel import Processes
    from amft_cli.train import check_processes

    cfg = resolve_config("tiny-gp", ["task.verify_iter=2"])
    check_processes(cfg, Processes(count=1), None, None)
    with pytest.raises(ConfigError, match="task.verify_iter = 2: sequential revision trains in one process"):
        check_processes(cfg, Processes(count=2), None, None)
    check_processes(resolve_config("tiny-gp", []), Processes(count=2), None, None)
