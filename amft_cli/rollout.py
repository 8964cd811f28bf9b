"""Where rollouts come from: the `RolloutBackend` interface and its `hf` backend.

The trainer builds one backend (`make_backend`, from rl.backend), samples every
rollout through it and calls `sync_weights()` after every optimizer step:

    hf    this module's sampler on the policy's own model (any device); its
          weights ARE the policy's, so there is nothing to sync
    vllm  a colocated vLLM engine holding its own copy (rollout_vllm.py; GPU,
          optional extra, imported only when chosen)

The hf sampler is a lean loop over the model's forward with a KV cache: prompts
left-padded and prefilled once per group (the cache is then copied for the
group's samples into buffers preallocated for the whole generation, written in
place instead of grown by torch.cat), one batched forward per new token, and all
sampling on tensors (no per-sequence Python in the loop). Besides token ids it
records each sampled token's log-probability under the sampler's own numerics
(bf16 autocast, vLLM kernels), which the trainer compares with its forward for
the importance-sampling correction (algo.sampler_is_weights).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Protocol

import torch

from amft_cli.config import Config

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers < 4.56: no per-layer cache objects, the cache grows by torch.cat
    DynamicLayer = None

from amft_cli.tasks.revision import Conversation


@dataclass
class Rollouts:
    """Completions in groups: the rows of one group share a prompt and sit next to each other.

    The layout is data (as verl's per-row `index`), never re-derived from counts: a method may
    add rows that were not sampled from the policy (LUFFY puts a demonstration in each group).
    """

    prompt_ids: list[list[int]]      # one row per completion (a group's prompt repeated)
    completion_ids: list[list[int]]  # the stop token included when it was sampled
    texts: list[str]                 # decoded completions, special tokens removed
    finished: list[bool]             # ended with a stop token (False: hit max_new_tokens)
    group: list[int] = field(default_factory=list)       # group id per row; equal ids are contiguous
    off_policy: list[bool] = field(default_factory=list)  # row not sampled from the current policy
    # per-token log-probs of the policy that produced each row, where known (None: the current
    # policy, detached, as with one update per rollout batch)
    behaviour_logprobs: list[list[float] | None] = field(default_factory=list)
    # per-token log π(token) at temperature 1 as the SAMPLER computed it (its dtype, kernels and
    # cache); None: the row was not sampled by a backend (e.g. a demonstration)
    sampler_logprobs: list[list[float] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = len(self.completion_ids)
        self.group = self.group or list(range(rows))
        self.off_policy = self.off_policy or [False] * rows
        self.behaviour_logprobs = self.behaviour_logprobs or [None] * rows
        self.sampler_logprobs = self.sampler_logprobs or [None] * rows

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """transformers 5 names the KV-cache argument `cache`, 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache=None, **kw):
    """model(...) with a KV cache, by keyword (peft wrappers reorder positional arguments)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                 **{_cache_kwarg(type(base)): cache}, **kw)


def cache_of(out):
    """The KV cache of a forward output (transformers 5 calls it `cache`, 4.x `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sample(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float,
            generator: torch.Generator | None,
            uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens from last-position logits (B, V) -> tokens (B,) and their log-probs (B,) at
    temperature 1: the quantity the trainer's forward computes for the same token (its loss
    uses π_θ untempered), so the two can be compared whatever the sampling temperature.
    uniform (B,): each row's draw in [0, 1) (row_uniforms); None: drawn from `generator`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if greedy or temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs = logprobs.exp() if temperature == 1.0 else torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # inverse-CDF sampling: one uniform draw per row (torch.multinomial draws one per vocabulary entry)
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) if uniform is None \
        else uniform.unsqueeze(-1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _PreallocatedLayer(DynamicLayer if DynamicLayer is not None else object):
    """One layer's KV cache in a buffer sized for the whole generation.

    transformers' DynamicLayer grows by torch.cat, which allocates and copies the
    whole cache on every token. This layer writes each new position into its
    buffer in place and, like transformers' StaticLayer, hands attention the
    whole (contiguous) buffer: positions not written yet are masked, because the
    sampler's attention mask spans the buffer and is 0 there. Built from a
    prefilled layer of P rows, repeated for n samples each.
    """

    def __init__(self, prefilled, repeats: int, capacity: int) -> None:
        super().__init__()
        keys, values = prefilled.keys, prefilled.values
        rows, heads, length, _ = keys.shape
        self.keys = keys.new_zeros((rows * repeats, heads, capacity, keys.shape[-1]))
        self.values = values.new_zeros((rows * repeats, heads, capacity, values.shape[-1]))
        for buf, src in ((self.keys, keys), (self.values, values)):  # row r·n + j ← prompt row r
            buf.view(rows, repeats, *buf.shape[1:])[:, :, :, :length] = src.unsqueeze(1)
        self.device, self.is_initialized, self.length = keys.device, True, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[-2], 0  # (kv length, kv offset): attention sees the whole buffer


def _expand_cache(cache, repeats: int, capacity: int) -> bool:
    """Give each prompt's prefilled cache `repeats` rows and room for `capacity` positions.
    True: every layer is now a preallocated buffer. False (a sliding-window layer, or
    transformers < 4.56 without cache layers): the cache was repeated and grows by torch.cat."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        return False
    cache.layers = [_PreallocatedLayer(layer, repeats, capacity) for layer in layers]
    return True


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's eos and every eos of the model's generation
    config (where load_policy adds the chat template's end-of-turn token, e.g. <|im_end|>)."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_eos = config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({i for i in [tokenizer.eos_token_id, *config_eos] if i is not None})


def _sample_batch(model, prompt_ids: list[list[int]], n: int, *, pad_id: int, stop: list[int],
                  max_new_tokens: int, greedy: bool, temperature: float, top_p: float,
                  generator: torch.Generator | None, uniforms: torch.Tensor | None = None,
                  sharded: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    """Sample n continuations of each prompt; returns P·n token lists (stop token kept) and the
    sampler's log-prob of each of those tokens. uniforms (P·n, max_new_tokens): each row's
    draws (row_uniforms); None: from `generator`. sharded: FSDP weights (_generate_batch)."""
    device = next(model.parameters()).device
    uniforms = None if uniforms is None else uniforms.to(device)
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    ids, prompt_mask = left_pad(prompt_ids, pad_id, device)
    width = ids.shape[1]
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = forward(model, ids, prompt_mask, positions, logits_to_keep=1)
    cache = cache_of(out)  # prefilled once per prompt, then copied for each of its n samples
    preallocated = _expand_cache(cache, n, width + max_new_tokens)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    rows = logits.shape[0]
    mask = torch.zeros((rows, width + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask.repeat_interleave(n, dim=0)
    next_pos = positions[:, -1:].repeat_interleave(n, dim=0) + 1
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token_logprobs = torch.zeros((rows, max_new_tokens), device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        nxt, token_logprobs[:, t] = _sample(logits, greedy, temperature, top_p, generator,
                                            None if uniforms is None else uniforms[:, t])
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, t] = nxt
        just_done = torch.isin(nxt, stop_t) & ~done
        lengths = torch.where(just_done, torch.full_like(lengths, t + 1), lengths)
        done |= just_done
        if t + 1 == max_new_tokens or _finished(done, sharded):
            break
        mask[:, width + t] = ~done
        seen = mask if preallocated else mask[:, : width + t + 1]
        out = forward(model, nxt.unsqueeze(-1), seen, next_pos, cache)
        logits, next_pos = out.logits[:, -1], next_pos + 1
    tokens, token_logprobs, lengths = tokens.cpu(), token_logprobs.cpu(), lengths.cpu()
    return ([tokens[i, : lengths[i]].tolist() for i in range(rows)],
            [token_logprobs[i, : lengths[i]].tolist() for i in range(rows)])


def _generate_batch(model, prompt_ids: list[list[int]], n: int,
                    **kw) -> tuple[list[list[int]], list[list[float]]]:
    """_sample_batch without autograd. FSDP (sharding.py, DTensor weights): no_grad, as the
    shards gathered under inference_mode could not be written by the next training forward."""
    sharded = hasattr(next(model.parameters()), "to_local")
    with torch.no_grad() if sharded else torch.inference_mode():
        return _sample_batch(model, prompt_ids, n, sharded=sharded, **kw)


def _finished(done: torch.Tensor, sharded: bool) -> bool:
    """Every row has stopped; with FSDP on every process, as each forward gathers the weight
    shards from all of them (one process stopping early would leave the others waiting)."""
    if not sharded:
        return bool(done.all())
    running = (~done).any().to(torch.int32).reshape(1)
    torch.distributed.all_reduce(running)
    return running.item() == 0


def generate(model, tokenizer, prompt_ids: list[list[int]], n: int = 1, *, max_new_tokens: int,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             batch_size: int = 256, generator: torch.Generator | None = None,
             uniforms: torch.Tensor | None = None) -> Rollouts:
    """n completions per prompt from the hf sampler, groups contiguous. batch_size counts
    completions per forward. uniforms (P·n, max_new_tokens), optional: each row's sampling
    draws (row_uniforms), which make a row's sample independent of the batch it is generated
    in; else `generator` draws."""
    stop = stop_ids(model, tokenizer)
    per_batch = max(1, batch_size // n)
    completions, logprobs = [], []
    for start in range(0, len(prompt_ids), per_batch):
        ids, lps = _generate_batch(
            model, prompt_ids[start:start + per_batch], n, pad_id=tokenizer.pad_token_id, stop=stop,
            max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
            generator=generator, uniforms=None if uniforms is None else uniforms[start * n:(start + per_batch) * n])
        completions, logprobs = completions + ids, logprobs + lps
    return to_rollouts(tokenizer, prompt_ids, n, completions, logprobs, stop)


def to_rollouts(tokenizer, prompt_ids: list[list[int]], n: int, completions: list[list[int]],
                sampler_logprobs: list[list[float]], stop: list[int]) -> Rollouts:
    """Rollouts of P prompts × n completions (completions grouped by prompt, in order)."""
    return Rollouts(
        prompt_ids=[p for p in prompt_ids for _ in range(n)],
        completion_ids=completions,
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True),
        finished=[len(c) > 0 and c[-1] in stop for c in completions],
        group=[i for i in range(len(prompt_ids)) for _ in range(n)],
        sampler_logprobs=sampler_logprobs,
    )


def row_uniforms(seed: int, first_row: int, rows: int, length: int) -> torch.Tensor:
    """Uniform draws (rows, length) in [0, 1) for rows first_row, first_row + 1, ... of a run's
    rollouts, each row from its own generator seeded by (seed, row number). A row's sample then
    depends only on its number, not on which process or batch generates it: one process or
    several sample the same completions (parallel.py). CPU generators, so every device agrees."""
    out = torch.empty((rows, length))
    gen = torch.Generator()
    for i in range(rows):
        gen.manual_seed((seed * 0x9E3779B97F4A7C15 + first_row + i) % 2 ** 64)
        torch.rand(length, generator=gen, out=out[i])
    return out


# ---------------------------------------------------------------------------
# the backend interface


class RolloutBackend(Protocol):
    """What the trainer samples through. generate() returns grouped Rollouts with the
    sampler's log-probs; uniforms (P·n, max_new_tokens) are the rows' draws (row_uniforms),
    for a backend that can sample from given draws; sync_weights() is called after every
    optimizer step."""

    name: str

    def generate(self, prompt_ids: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                 top_p: float, uniforms: torch.Tensor | None) -> Rollouts: ...

    def sync_weights(self) -> None: ...


class HFBackend:
    """The lean sampler on the policy's own model: its weights are the trained ones, so sync is a
    no-op. Runs under whatever autocast the caller holds (the policy's bf16 compute)."""

    name = "hf"

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompt_ids: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                 top_p: float, uniforms: torch.Tensor | None) -> Rollouts:
        return generate(self.model, self.tokenizer, prompt_ids, n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, uniforms=uniforms)

    def sync_weights(self) -> None:
        pass


def make_backend(cfg: Config, model, tokenizer) -> RolloutBackend:
    """The rollout backend named by rl.backend, for the policy `model` (a peft model or plain)."""
    if cfg.rl.backend == "hf":
        return HFBackend(model, tokenizer)
    from amft_cli.rollout_vllm import VLLMBackend  # vLLM is an optional extra: imported only here

    return VLLMBackend(model, tokenizer, dtype=cfg.model.dtype, gpu_memory=cfg.rl.vllm_gpu_memory,
                       seed=cfg.seed, max_model_len=cfg.rl.max_new_tokens + 2048,  # prompts up to 2048 tokens
                       sleep=cfg.rl.vllm_sleep)


def sample_texts(model, tokenizer, prompts: list, n: int, *, greedy: bool, temperature: float,
                 top_p: float, max_new_tokens: int, batch_size: int, chat_template: bool,
                 seed: int, first_row: int = 0) -> list[list[str]]:
    """Completion texts, n per prompt (for eval). A prompt is a task prompt or a revision
    Conversation (tasks/revision.py). Row first_row + i samples from row_uniforms(seed, ...),
    so eval is reproducible and does not depend on how the prompts are batched."""
    from amft_cli.encoding import encode_prompt, encode_transcript

    ids = [encode_transcript(tokenizer, p, chat_template) if isinstance(p, Conversation) else
           encode_prompt(tokenizer, p, chat_template) for p in prompts]
    uniforms = None if greedy else row_uniforms(seed, first_row, len(ids) * n, max_new_tokens)
    out = generate(model, tokenizer, ids, n, max_new_tokens=max_new_tokens, greedy=greedy,
                   temperature=temperature, top_p=top_p, batch_size=batch_size, uniforms=uniforms)
    return [out.texts[i * n:(i + 1) * n] for i in range(len(prompts))]
