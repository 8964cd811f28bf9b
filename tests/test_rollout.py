"""The lean sampler: same tokens as step-by-step decoding without a cache (greedy and sampled, with
its preallocated KV cache and with the growing one), right distribution."""

import pytest
import torch

from amft_cli.config import ModelConfig
from amft_cli.encoding import encode_prompt
from amft_cli.model import build_tiny_model, load_policy
from amft_cli import rollout
from amft_cli.rollout import _sample, generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    mcfg = ModelConfig(path=str(tmp_path_factory.mktemp("m") / "model"), hidden_size=32, num_layers=2, num_heads=2)
    build_tiny_model(mcfg, ["0123456789+*=,"], mcfg.path, seed=3)
    return load_policy(mcfg, torch.device("cpu"), trainable=False)


def _greedy_reference(model, ids: list[int], steps: int, eos: int) -> list[int]:
    out, seq = [], torch.tensor([ids])
    for _ in range(steps):
        nxt = int(model(seq).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def test_batched_cached_greedy_equals_uncached_decoding(tiny):
    model, tok = tiny
    prompts = [encode_prompt(tok, p, False) for p in ["1+2*3=", "45+6*7=", "9=", "12+0*0="]]
    out = generate(model, tok, prompts, n=2, max_new_tokens=10, greedy=True)
    for i, ids in enumerate(prompts):
        ref = _greedy_reference(model, ids, 10, tok.eos_token_id)
        assert out.completion_ids[2 * i] == ref and out.completion_ids[2 * i + 1] == ref
    assert len(out.texts) == 8 and out.prompt_ids[1] == prompts[0]


def test_sampling_matches_the_distribution_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(100_000, 1)
    tokens, logprobs = _sample(logits, False, 1.0, 1.0, g)
    freq = torch.bincount(tokens, minlength=4) / 100_000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.01)
    # each token's log-prob at temperature 1, whatever the sampling temperature or nucleus
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[tokens])
    tokens, logprobs = _sample(logits, False, 1.0, 0.5, g)
    freq = torch.bincount(tokens, minlength=4) / 100_000
    assert torch.allclose(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), atol=0.01)
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[tokens])
    tokens, logprobs = _sample(logits[:3], True, 1.0, 1.0, g)
    assert tokens.tolist() == [3, 3, 3] and torch.allclose(logprobs, torch.log(torch.tensor(0.4)).expand(3))
    # temperature 0.5 squares and renormalises the probabilities: [1, 4, 9, 16] / 30
    tokens, logprobs = _sample(logits, False, 0.5, 1.0, g)
    freq = torch.bincount(tokens, minlength=4) / 100_000
    assert torch.allclose(freq, torch.tensor([1, 4, 9, 16]) / 30, atol=0.01)
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[tokens])


def test_seeded_sampling_is_reproducible_and_stops_at_eos(tiny):
    model, tok = tiny
    prompts = [encode_prompt(tok, "3+4*5=", False)]
    a = generate(model, tok, prompts, n=6, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    b = generate(model, tok, prompts, n=6, max_new_tokens=12, generator=torch.Generator().manual_seed(1))
    assert a.completion_ids == b.completion_ids
    for ids, done in zip(a.completion_ids, a.finished):
        assert 1 <= len(ids) <= 12
        assert tok.eos_token_id not in ids[:-1]  # nothing generated after eos
        assert done == (ids[-1] == tok.eos_token_id)


def _sampled_reference(model, prompts: list[list[int]], n: int, steps: int, pad: int, eos: int,
                       generator: torch.Generator) -> list[list[int]]:
    """Uncached sampling: every step re-runs the whole left-padded batch from scratch and draws
    from the last position with the sampler's own draw (one uniform per row and step)."""
    width = max(map(len, prompts))
    rows = [[pad] * (width - len(p)) + p for p in prompts for _ in range(n)]
    masks = [[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(n)]
    out: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(steps):
        mask = torch.tensor(masks)
        logits = model(input_ids=torch.tensor(rows), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        nxt = _sample(logits, False, 1.0, 1.0, generator)[0].tolist()
        logp = torch.log_softmax(logits, -1)
        for i, tok in enumerate(nxt):
            live = not done[i]
            if live:
                out[i].append(tok)
                logprobs[i].append(logp[i, tok].item())
                done[i] = tok == eos
            rows[i].append(tok if live else pad)
            masks[i].append(int(live))
        if all(done):
            break
    return out, logprobs


@pytest.mark.parametrize("preallocated", [True, False])
def test_sampled_tokens_equal_uncached_sampling(tiny, monkeypatch, preallocated):
    model, tok = tiny
    if not preallocated:  # layers of another type keep transformers' growing (torch.cat) cache
        monkeypatch.setattr(rollout, "DynamicLayer", type("OtherLayer", (), {}))
    expanded, expand = [], rollout._expand_cache
    monkeypatch.setattr(rollout, "_expand_cache", lambda *args: expanded.append(expand(*args)) or expanded[-1])
    prompts = [encode_prompt(tok, p, False) for p in ["1+2*3=", "45+6*7=", "9="]]
    out = generate(model, tok, prompts, n=3, max_new_tokens=9, generator=torch.Generator().manual_seed(5))
    ref, ref_logprobs = _sampled_reference(model, prompts, 3, 9, tok.pad_token_id, tok.eos_token_id,
                                           torch.Generator().manual_seed(5))
    assert expanded == [preallocated] and out.completion_ids == ref
    assert len({tuple(c) for c in ref}) > 3  # really sampled: the samples of a prompt differ
    for got, want in zip(out.sampler_logprobs, ref_logprobs):  # the sampler's log-probs of its tokens
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


def test_eval_sampling_does_not_depend_on_batch_size(tiny):
    """`amft eval --batch-size` changes how completions are batched, not what is sampled: each
    row draws from its own stream (seed, row number), through evaluate.batched_generate's chunks
    and the sampler's batches alike. Another seed samples something else."""
    from amft_cli.evaluate import batched_generate

    model, tok = tiny
    prompts = [f"{a}+{b}*{c}=" for a, b, c in ((3, 4, 5), (1, 2, 3), (9, 8, 7), (2, 2, 2), (5, 0, 1))]

    def completions(batch_size: int, seed: int = 11) -> list[list[str]]:
        def sample(chunk, n, greedy, seed, first_row):
            return rollout.sample_texts(model, tok, chunk, n, greedy=greedy, temperature=1.0, top_p=1.0,
                                        max_new_tokens=8, batch_size=batch_size, chat_template=False, seed=seed,
                                        first_row=first_row)
        return batched_generate(sample, batch_size, seed)(prompts, 3, False)

    whole = completions(64)
    assert completions(3) == whole and completions(4) == whole  # one prompt a chunk; a group split
    assert completions(64, seed=12) != whole
