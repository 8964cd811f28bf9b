"""The `vllm` rollout backend: a vLLM engine colocated with the trainer on one GPU.

UNTESTED in this project: vLLM's wheels cannot reach the project's GPU machine
and the development machines have no GPU. It is written against the calls
TRL 1.16 makes in colocate mode (trl/generation/vllm_generation.py,
`VLLMGeneration.__init__`, `_iter_named_params`, `sync_weights`, `generate`;
TRL 1.16 accepts vLLM 0.22–0.31), and nothing else in amft_cli imports it:
rollout.make_backend imports this module only when rl.backend = "vllm".

How it follows the policy (as TRL does):
- vLLM runs inside this process (`distributed_executor_backend="external_launcher"`,
  which wants the torch.distributed variables RANK, WORLD_SIZE, MASTER_ADDR/PORT),
  so the policy's weights are pushed straight into vLLM's model with
  `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`,
  one tensor at a time, after every optimizer step (`sync_weights`).
- A LoRA policy is pushed merged (merged_lora: W + ΔW as new tensors in
  the base weights' dtype, so unlike TRL's in-place merge_adapter/unmerge_adapter
  the frozen base is never written), its names stripped of `base_model.model.` and `.base_layer`, the
  adapter tensors skipped; training goes on with the adapters.
- Sleep mode (rl.vllm_sleep) shares the GPU with training: level 2 frees vLLM's
  weights and KV cache between rollouts; since level 2 discards the weights, they
  are pushed again before the next generation.
- Log-probs: vLLM returns each sampled token's log-prob (`logprobs=0`) in
  `raw_logprobs` mode, i.e. before temperature and top-p, the quantity our trainer
  computes (its loss uses π_θ at temperature 1). TRL asks for `processed_logprobs`
  and divides its training logits by the temperature instead; at temperature 1
  (every preset) the two are the same number.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch

from amft_cli.rollout import Rollouts, stop_ids, to_rollouts


def _distributed_env() -> None:
    """The variables vLLM's external launcher reads, for a single process (kept when set)."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")):
        os.environ.setdefault(name, value)
    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


@contextlib.contextmanager
def merged_lora(model):
    """For its duration, a peft LoRA model computes through merged weights (what VLLMBackend
    pushes): each adapted layer's base weight W is swapped for a new tensor W + ΔW (peft's
    get_delta_weight; summed in float32, rounded once to W's dtype) and the adapters are
    bypassed. W itself is never written, so no rounding piles up in the frozen base (peft's
    in-place merge_adapter/unmerge_adapter, which TRL uses, adds and subtracts ΔW: in bf16 each
    round trip moves W). Holds a copy of the adapted weights meanwhile. Not used for the hf
    sampler: rounded to bf16, W + ΔW loses a ΔW below |W|/256, as a young adapter's is, and in
    float32 on this CPU it saved 4% of a SmolLM2 rollout. Any other model: no-op."""
    layers = _lora_layers(model)
    if not layers:
        yield
        return
    swapped = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                swapped.append((weight, weight.data))
                weight.data = (weight.data.float() + delta.float()).to(weight.dtype)  # one rounding
        with model.disable_adapter():
            yield
    finally:
        for weight, original in swapped:
            weight.data = original


def _lora_layers(model) -> list:
    """A peft model's unmerged LoRA layers with an active adapter ([] for any other model)."""
    if not hasattr(model, "disable_adapter"):
        return []
    from peft.tuners.lora import LoraLayer

    return [layer for layer in model.modules() if isinstance(layer, LoraLayer) and not layer.merged
            and hasattr(layer, "get_delta_weight") and any(a in layer.lora_A for a in layer.active_adapters)]


def named_weights(model):
    """(name, tensor) pairs as a plain Hugging Face model names them, one at a time. Inside
    `merged_lora(model)` a peft model yields its merged weights."""
    prefix = getattr(model, "prefix", "lora_")
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if prefix in name or "original_module" in name:
            continue  # adapter tensors (merged already) and peft's copies of modules_to_save
        yield name.replace("modules_to_save.default.", ""), param.data


class VLLMBackend:
    """Rollouts from a colocated vLLM engine whose weights follow the policy `model`."""

    name = "vllm"

    def __init__(self, model, tokenizer, *, dtype: str, gpu_memory: float, seed: int, max_model_len: int,
                 sleep: bool) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ValueError("rl.backend 'vllm': vLLM is not installed; `pip install 'amft-cli[vllm]'` "
                             "on a CUDA machine, or use --set rl.backend=hf") from None
        if not torch.cuda.is_available():
            raise ValueError("rl.backend 'vllm': needs a CUDA GPU; use --set rl.backend=hf on CPU")
        _distributed_env()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.tokenizer, self.sleep = model, tokenizer, sleep
        self.stop = stop_ids(model, tokenizer)  # eos and the chat template's end of turn, as the hf sampler
        self.llm = LLM(model=base.name_or_path, dtype=dtype, gpu_memory_utilization=gpu_memory, seed=seed,
                       max_model_len=max_model_len, enable_sleep_mode=sleep,
                       distributed_executor_backend="external_launcher", max_num_batched_tokens=4096,
                       logprobs_mode="raw_logprobs")
        if sleep:
            self.llm.sleep(level=2)
        self.stale = True  # vLLM loaded the checkpoint on disk; push the policy's weights before sampling

    def sync_weights(self) -> None:
        """Push the policy's current weights into vLLM (called after every optimizer step)."""
        if self.sleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        with merged_lora(self.model), torch.no_grad():
            for name, tensor in named_weights(self.model):
                runner.model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()
        self.stale = False

    def generate(self, prompt_ids: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                 top_p: float, uniforms: torch.Tensor | None) -> Rollouts:
        """n completions per prompt with each token's log-prob. vLLM draws with its own seeded
        generator (LLM(seed=...)), so `uniforms` is unused: unlike the hf backend's, its samples
        depend on how the prompts are shared out over training processes."""
        from vllm import SamplingParams

        if self.stale:
            self.sync_weights()
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                stop_token_ids=self.stop)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling_params=params,
                                 use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=2)  # level 2 discards the weights too: push them again next time
            self.stale = True
        completions = [list(o.token_ids) for out in outs for o in out.outputs]
        logprobs = [[step[token].logprob for step, token in zip(o.logprobs, o.token_ids)]
                    for out in outs for o in out.outputs]
        return to_rollouts(self.tokenizer, prompt_ids, n, completions, logprobs, self.stop)
