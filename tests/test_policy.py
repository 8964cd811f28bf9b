"""Micro-batched gradients equal whole-batch gradients (the normalisers are whole-batch)."""

import pytest
import torch

from amft_cli import algo
from amft_cli.config import ModelConfig
from amft_cli.model import build_tiny_model, load_policy
from amft_cli.policy import Policy, grads_in_chunks, pack, sequence_logprobs, sft_grads


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    torch.set_num_threads(1)
    mcfg = ModelConfig(path=str(tmp_path_factory.mktemp("m") / "model"), hidden_size=32, num_layers=2, num_heads=2)
    build_tiny_model(mcfg, ["0123456789+*=,\\boxed{}"], mcfg.path, seed=0)
    model, tok = load_policy(mcfg, torch.device("cpu"), trainable=True)
    return Policy(model, tok, torch.device("cpu"))


def _examples(n):
    return [{"id": f"e{i}", "prompt": f"{i}+{i % 7}*3=", "demonstration": f"{i % 7}*3={(i % 7) * 3}" + "x" * (i % 4)}
            for i in range(n)]


def test_pack_aligns_completions_and_keeps_only_their_logit_columns():
    ids, attention, positions, targets, mask, keep = pack([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]], pad_id=0,
                                                          device=torch.device("cpu"))
    assert ids.tolist() == [[1, 5, 6, 8, 2, 0], [0, 1, 7, 9, 9, 2]]
    assert attention.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 1, 2, 3, 4]]
    assert targets.tolist() == [[8, 2, 0], [9, 9, 2]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert keep.tolist() == [2, 3, 4]  # column 2 (the last prompt token) predicts completion token 0


def test_packed_logprobs_equal_a_plain_forward_of_each_row(policy):
    pairs = [policy.demo_ids(ex) for ex in _examples(3)]
    lp, _, mask = sequence_logprobs(policy, [p for p, _ in pairs], [c for _, c in pairs], grad=False)
    for i, (p, c) in enumerate(pairs):
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        assert torch.allclose(lp[i][mask[i].bool()], want, atol=1e-5)


def test_sft_grads_do_not_depend_on_micro_batch(policy):
    examples = _examples(7)
    full, loss_full, stats_full = sft_grads(policy, examples, 0)
    chunked, loss_chunked, stats_chunked = sft_grads(policy, examples, 3)
    h_full, h_chunked = stats_full["entropy"], stats_chunked["entropy"]
    assert loss_chunked == pytest.approx(loss_full, rel=1e-5)
    assert h_chunked == pytest.approx(h_full, rel=1e-5)
    for a, b in zip(full, chunked):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_policy_loss_grads_do_not_depend_on_micro_batch(policy, agg):
    pairs = [policy.demo_ids(ex) for ex in _examples(6)]
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    adv = torch.tensor([1.0, -0.5, 0.2, -1.0, 0.7, 0.0])
    num_tokens = float(sum(len(c) for c in completions))

    def chunk_loss(lp, mask, rows, entropy):
        return algo.policy_loss(lp, lp.detach(), adv[rows], mask, loss_agg=agg,
                                num_tokens=num_tokens, num_seqs=len(prompts))

    full, loss_full, _ = grads_in_chunks(policy, prompts, completions, chunk_loss, 0)
    chunked, loss_chunked, _ = grads_in_chunks(policy, prompts, completions, chunk_loss, 4)
    assert loss_chunked == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, chunked):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_shared_prompt_path_equals_the_packed_path(policy):
    """GRPO groups run their prompt once; log-probs and entropies must match running each row whole."""
    from amft_cli.policy import sequence_logprobs

    prompts = [policy.prompt_ids(ex) for ex in _examples(3)]
    gen = torch.Generator().manual_seed(0)
    completions = [torch.randint(5, 40, (int(n),), generator=gen).tolist() + [policy.tokenizer.eos_token_id]
                   for n in torch.randint(0, 6, (6,), generator=gen)]
    rows = [p for p in prompts for _ in range(2)]
    lp_packed, h_packed, m_packed = sequence_logprobs(policy, rows, completions, grad=False)
    lp_group, h_group, m_group = sequence_logprobs(policy, rows, completions, grad=False, group=[0, 0, 1, 1, 2, 2])
    assert torch.allclose(lp_packed[m_packed.bool()], lp_group[m_group.bool()], atol=1e-5)
    assert torch.allclose(h_packed[m_packed.bool()], h_group[m_group.bool()], atol=1e-5)
    assert m_group.sum() == sum(len(c) for c in completions)
    # groups of unequal size (a method may add rows to a group): read from the ids, not from counts
    rows = [prompts[0]] * 3 + [prompts[1]] + [prompts[2]] * 2
    lp_packed, _, m_packed = sequence_logprobs(policy, rows, completions, grad=False)
    lp_group, _, m_group = sequence_logprobs(policy, rows, completions, grad=False, group=[4, 4, 4, 0, 7, 7])
    assert torch.allclose(lp_packed[m_packed.bool()], lp_group[m_group.bool()], atol=1e-5)


def test_chunks_never_split_a_group():
    from amft_cli.policy import chunk_rows, group_runs

    assert group_runs([7, 7, 3, 3, 3, 7]) == [2, 3, 1]
    assert chunk_rows([0, 0, 1, 1, 1, 2], 6, micro_batch=4) == [slice(0, 2), slice(2, 6)]
    assert chunk_rows([0, 0, 0, 0, 0, 1], 6, micro_batch=2) == [slice(0, 5), slice(5, 6)]  # one group > micro-batch
    assert chunk_rows(None, 5, micro_batch=2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert chunk_rows([0, 0, 1, 1], 4, micro_batch=0) == [slice(0, 4)]


def test_shared_prompt_grads_equal_packed_grads_with_micro_batches(policy):
    prompts = [policy.prompt_ids(ex) for ex in _examples(3) for _ in range(2)]
    completions = [policy.demo_ids(ex)[1] for ex in _examples(6)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.3, -0.3])
    num_tokens = float(sum(len(c) for c in completions))

    def chunk_loss(lp, mask, rows, entropy):
        return algo.policy_loss(lp, lp.detach(), adv[rows], mask, num_tokens=num_tokens, num_seqs=6)

    packed, loss_packed, _ = grads_in_chunks(policy, prompts, completions, chunk_loss, 0)
    grouped, loss_grouped, _ = grads_in_chunks(policy, prompts, completions, chunk_loss, 4, group=[0, 0, 1, 1, 2, 2])
    assert loss_grouped == pytest.approx(loss_packed, rel=1e-5, abs=1e-7)
    for a, b in zip(packed, grouped):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
