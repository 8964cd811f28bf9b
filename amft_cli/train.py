"""The training loop of DESIGN §3: one stage, μ·L_SFT + (1 − μ)·L_RL, μ from a controller.

    prompts ─► rollout (hf | vllm) ─► verifier rewards ─► advantages ─┐
    demonstrations ─► SFT NLL ────────────────────────────────────────┤
                                  μ ◄─ controller ◄─ entropy, meta-grad
                                  └─► μ·L_SFT + (1−μ)·L_RL ─► optimizer
    every step ─► metrics        every N steps ─► checkpoint

Every baseline is this loop with another μ schedule (algo.MU_SCHEDULES), so
comparisons are like for like. The two losses are differentiated separately
(the meta-gradient needs g_SFT and g_RL apart) and combined in `apply_update`.
No rich here: progress goes out through the `on_metrics` / `on_message` callbacks.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from amft_cli import algo
from amft_cli.checkpoint import (checkpoint_dirs, load_trainer_state, restore_rng, rng_state,
                                 save_checkpoint)
from amft_cli.config import Config, to_toml
from amft_cli.data import load_split
from amft_cli.metrics import MetricSink
from amft_cli.policy import Policy, grads_in_chunks, load_for_training, sequence_logprobs, sft_grads
from amft_cli.rewards import RewardFn, load_reward_fn, score_completions
from amft_cli.rollout import generate
from amft_cli.tasks import get_task


@dataclass
class ControllerState:
    """What the μ controller carries between steps (saved in checkpoints)."""

    mu: float                           # learned μ (used by amft after warm-up)
    entropy_target: float | None = None  # H*, measured once at the end of warm-up
    meta_grad: float = 0.0              # last dU/dμ signal
    entropy_term: float = 0.0           # last Δ_H


@dataclass
class Cursors:
    """Positions in the seeded, per-epoch shuffled data streams (saved in checkpoints)."""

    step: int = 0  # optimizer steps completed
    sft: int = 0
    rl: int = 0
    val: int = 0


class PhaseTimer:
    """Seconds per named phase of one step; the names double as a table of contents."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def take(n: int, count: int, cursor: int, seed: int) -> list[int]:
    """Indices cursor..cursor+count−1 of an endless stream of per-epoch permutations of range(n)."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(cursor, cursor + count)]


# ---------------------------------------------------------------------------
# the two signals


def rl_signal(policy: Policy, cfg: Config, task, examples: list[dict], generator: torch.Generator,
              reward_fn: RewardFn | None, timer: PhaseTimer) -> tuple[list[torch.Tensor], float, dict]:
    """Rollouts → verifier rewards → group advantages → ∇ of the GRPO loss. Returns (g_RL, loss, stats)."""
    with timer("rollout"), policy.compute():
        rollouts = generate(policy.model, policy.tokenizer, [policy.prompt_ids(ex) for ex in examples],
                            cfg.rl.group_size, max_new_tokens=cfg.rl.max_new_tokens,
                            temperature=cfg.rl.temperature, top_p=cfg.rl.top_p,
                            generator=generator, engine=policy.engine)
    with timer("reward"):
        grouped = [ex for ex in examples for _ in range(cfg.rl.group_size)]
        rewards, statuses = score_completions(task, grouped, rollouts.texts, reward_fn)
        advantages = algo.group_advantages(rewards, cfg.rl.group_size, cfg.rl.scale_adv_by_std)
    with timer("losses"):
        prompts, completions = rollouts.prompt_ids, rollouts.completion_ids
        num_tokens = float(rollouts.num_tokens)

        def chunk_loss(logprobs, mask, rows):
            ref = (policy.ref_logprobs(prompts[rows], completions[rows], cfg.rl.group_size)
                   if cfg.rl.kl_beta > 0 else None)
            return algo.policy_loss(  # one update per batch: π_old = π_θ, log-probs computed once
                logprobs, logprobs.detach(), advantages[rows].to(logprobs.device), mask, cfg.rl.clip_eps,
                cfg.rl.clip_eps_high, cfg.rl.loss_agg, ref, cfg.rl.kl_beta, num_tokens, len(completions))

        grads, loss, chunk_stats = grads_in_chunks(policy, prompts, completions, chunk_loss,
                                                   cfg.train.micro_batch_size, cfg.rl.group_size)
    rollout_s = timer.seconds.get("rollout", 0.0)
    stats = {
        "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
        "reward/accuracy": sum(s == "correct" for s in statuses) / len(statuses),
        "policy/entropy": chunk_stats["entropy"],
        "rollout/len_mean": rollouts.num_tokens / len(completions),
        "rollout/truncated_frac": 1.0 - sum(rollouts.finished) / len(rollouts.finished),
        "rollout/tokens_per_s": rollouts.num_tokens / max(rollout_s, 1e-9),
        "rl/clip_frac": chunk_stats["clip_frac"],
        **({"rl/kl": chunk_stats["kl"]} if "kl" in chunk_stats else {}),
    }
    return grads, loss, stats


def utility_grad(policy: Policy, cfg: Config, task, val: list[dict], cursors: Cursors,
                 generator: torch.Generator, reward_fn: RewardFn | None) -> torch.Tensor:
    """∇θ U on held-out data, flattened (P,). reward: −∇L_RL on fresh validation rollouts
    (the advantage-weighted ∇log π estimate); nll: −∇L_SFT on held-out demonstrations."""
    count = cfg.amft.meta_prompts if cfg.amft.utility == "reward" else cfg.train.sft_batch_size
    examples = [val[i] for i in take(len(val), count, cursors.val, cfg.seed + 7)]
    cursors.val += count
    if cfg.amft.utility == "reward":
        grads, _, _ = rl_signal(policy, cfg, task, examples, generator, reward_fn, PhaseTimer())
    else:
        grads, _, _ = sft_grads(policy, examples, cfg.train.micro_batch_size)
    return -algo.flatten_grads(grads, policy.params)


# ---------------------------------------------------------------------------
# the update


def apply_update(policy: Policy, optimizers: dict, g_sft: list | None, g_rl: list | None,
                 mu: float, cfg: Config, lr_scale: float) -> float:
    """One optimizer step on μ·L_SFT + (1−μ)·L_RL. Returns the pre-clip gradient norm.

    shared (train.rl_lr = 0, the paper): one AdamW on the combined gradient.
    split (train.rl_lr > 0): each part has its own AdamW and its own rate, and the
    update is μ·Δ_SFT + (1−μ)·Δ_RL (each optimizer's lr scaled by its weight).
    """
    if "rl" in optimizers:  # split: unweighted gradients, each optimizer's rate scaled by its weight
        parts = [("sft", mu, g_sft, cfg.train.lr), ("rl", 1.0 - mu, g_rl, cfg.train.rl_lr)]
    else:  # shared: the weights go into the gradient
        combined = [sum(w * g[i] for w, g in ((mu, g_sft), (1.0 - mu, g_rl)) if g is not None and w > 0)
                    for i in range(len(policy.params))]
        parts = [("sft", 1.0, combined, cfg.train.lr)]
    norm = 0.0
    for name, weight, grads, lr in parts:
        if grads is None or weight <= 0:
            continue
        for p, g in zip(policy.params, grads):
            p.grad = g
        if cfg.train.grad_clip > 0:
            norm = max(norm, torch.nn.utils.clip_grad_norm_(policy.params, cfg.train.grad_clip).item())
        for group in optimizers[name].param_groups:
            group["lr"] = weight * lr * lr_scale
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
    return norm


def lr_factor(step: int, cfg: Config) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then constant or cosine decay."""
    t = cfg.train
    if t.lr_warmup_steps and step < t.lr_warmup_steps:
        return (step + 1) / t.lr_warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.lr_warmup_steps) / max(1, t.steps - t.lr_warmup_steps)
        return t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def make_optimizers(policy: Policy, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    def adamw(lr: float):
        return torch.optim.AdamW(policy.params, lr=lr, weight_decay=cfg.train.weight_decay)
    opts = {"sft": adamw(cfg.train.lr)}
    if cfg.train.rl_lr > 0:
        opts["rl"] = adamw(cfg.train.rl_lr)
    return opts


# ---------------------------------------------------------------------------
# the loop


class StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def controller_step(policy: Policy, cfg: Config, state: ControllerState, step: int, entropy: float | None,
                    g_sft, g_rl, utility: Callable[[], torch.Tensor]) -> dict:
    """AMFT's μ update after a step at θ (DESIGN §1, steps 2–4). Returns balance/* metrics."""
    meta_update = 0.0
    if step >= cfg.amft.warmup_steps and entropy is not None and state.entropy_target is not None:
        state.entropy_term = algo.entropy_term(entropy, state.entropy_target, cfg.amft.eta_entropy)
        delta_meta = 0.0
        if (step - cfg.amft.warmup_steps) % cfg.amft.meta_every == 0 and g_sft is not None and g_rl is not None:
            state.meta_grad = algo.meta_gradient(
                utility(), algo.flatten_grads(g_rl, policy.params), algo.flatten_grads(g_sft, policy.params),
                cfg.train.rl_lr or cfg.train.lr, cfg.train.lr, cfg.amft.meta_grad_norm)
            delta_meta, meta_update = cfg.amft.eta_meta * state.meta_grad, 1.0
        state.mu = algo.update_mu(state.mu, delta_meta, state.entropy_term, cfg.amft.mu_min, cfg.amft.mu_max)
    return {"balance/meta_grad": state.meta_grad, "balance/meta_update": meta_update,
            "balance/entropy_term": state.entropy_term, "balance/entropy_target": state.entropy_target}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int                 # steps completed
    interrupted: bool
    summary: dict = field(default_factory=dict)


def train(cfg: Config, run_dir: Path, resume: bool = False,
          on_metrics: Callable[[int, dict], None] = lambda step, m: None,
          on_message: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) training into run_dir. Returns when done or after a Ctrl-C checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task.name)
    train_set, val_set = load_split(cfg, "train"), load_split(cfg, "val")
    reward_fn = load_reward_fn(cfg.task.reward)

    checkpoint = max(checkpoint_dirs(run_dir).items(), default=(None, None))[1] if resume else None
    policy = load_for_training(cfg, checkpoint)
    optimizers = make_optimizers(policy, cfg)
    generator = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    control, cursors = ControllerState(mu=cfg.amft.mu_init), Cursors()
    summary: dict = {}
    if checkpoint is not None:
        saved = load_trainer_state(checkpoint)
        for name, opt in optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        control, cursors = ControllerState(**saved["controller"]), Cursors(**saved["cursors"])
        summary = saved.get("summary", {})
        restore_rng(saved["rng"], generator)
        on_message(f"resumed from {checkpoint} (step {cursors.step})")
    elif cfg.train.eval_at_end:
        summary["before"] = quick_eval(policy, cfg, task)
        on_message(f"untrained: {summary['before']['label']} {summary['before']['value']:.1%} on unseen ID test problems")

    def save() -> Path:
        state = {"optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "summary": summary,
                 "controller": asdict(control), "cursors": asdict(cursors), "rng": rng_state(generator)}
        return save_checkpoint(run_dir, cursors.step, policy.model, policy.tokenizer, state,
                               cfg.train.keep_checkpoints)

    interrupted = False
    with MetricSink(run_dir, resume_step=cursors.step if checkpoint else None) as sink, StopFlag() as stop:
        while cursors.step < cfg.train.steps:
            metrics = train_step(policy, cfg, task, train_set, val_set, optimizers, control, cursors,
                                 generator, reward_fn, on_message)
            cursors.step += 1
            sink.log(cursors.step, metrics)
            on_metrics(cursors.step, metrics)
            if stop.requested:
                on_message(f"interrupted: checkpoint {save()} — continue with --resume {run_dir}")
                interrupted = True
                break
            if cursors.step % cfg.train.save_every == 0 or cursors.step == cfg.train.steps:
                save()
    if not interrupted and cfg.train.eval_at_end:
        summary["after"] = quick_eval(policy, cfg, task)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(run_dir, cursors.step, interrupted, summary)


def train_step(policy: Policy, cfg: Config, task, train_set: list[dict], val_set: list[dict],
               optimizers: dict, control: ControllerState, cursors: Cursors, generator: torch.Generator,
               reward_fn: RewardFn | None, on_message: Callable[[str], None]) -> dict:
    """One step of DESIGN §3 at the current θ; mutates control and cursors. Returns its metrics."""
    timer, step, started = PhaseTimer(), cursors.step, time.perf_counter()
    mu = algo.mu_for_step(cfg.train.algo, step, control.mu, warmup_steps=cfg.amft.warmup_steps,
                          switch_step=cfg.train.sft_rl_switch, mix_mu=cfg.train.mix_mu)
    metrics: dict = {"balance/mu": mu}
    g_sft = g_rl = None
    if mu < 1.0:
        prompts = [train_set[i] for i in take(len(train_set), cfg.train.prompts_per_step, cursors.rl, cfg.seed + 1)]
        cursors.rl += len(prompts)
        g_rl, loss_rl, rl_stats = rl_signal(policy, cfg, task, prompts, generator, reward_fn, timer)
        metrics.update({"loss/rl": loss_rl, **rl_stats})
    if mu > 0.0:
        with timer("losses"):
            demos = [train_set[i] for i in take(len(train_set), cfg.train.sft_batch_size, cursors.sft, cfg.seed + 2)]
            cursors.sft += len(demos)
            g_sft, loss_sft, entropy_demo = sft_grads(policy, demos, cfg.train.micro_batch_size)
        metrics.update({"loss/sft": loss_sft, "policy/entropy_demo": entropy_demo})
    metrics["loss/total"] = mu * metrics.get("loss/sft", 0.0) + (1 - mu) * metrics.get("loss/rl", 0.0)
    if cfg.train.algo == "amft":
        with timer("controller"):
            if step == cfg.amft.warmup_steps and control.entropy_target is None:
                control.entropy_target = measure_entropy_target(policy, val_set)
                on_message(f"warm-up done after {step} steps: entropy target H* = {control.entropy_target:.3f}")
            metrics.update(controller_step(
                policy, cfg, control, step, metrics.get("policy/entropy"), g_sft, g_rl,
                lambda: utility_grad(policy, cfg, task, val_set, cursors, generator, reward_fn)))
    with timer("update"):
        lr_scale = lr_factor(step, cfg)
        metrics["optim/grad_norm"] = apply_update(policy, optimizers, g_sft, g_rl, mu, cfg, lr_scale)
        metrics["optim/lr"] = cfg.train.lr * lr_scale
        policy.after_update()
    metrics.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
    metrics["time/step_s"] = time.perf_counter() - started
    return metrics


@torch.no_grad()
def measure_entropy_target(policy: Policy, val_set: list[dict], batch: int = 64) -> float:
    """H*: mean per-token entropy on held-out demonstration response tokens (prompt tokens excluded)."""
    total, count = 0.0, 0.0
    for start in range(0, len(val_set), batch):
        chunk = val_set[start:start + batch]
        pairs = [policy.demo_ids(ex) for ex in chunk]
        _, entropy, mask = sequence_logprobs(policy, [p for p, _ in pairs], [c for _, c in pairs], grad=False)
        total += (entropy * mask).sum().item()
        count += mask.sum().item()
    return total / max(count, 1.0)


def quick_eval(policy: Policy, cfg: Config, task) -> dict:
    """Greedy success on the first train.eval_limit unseen ID test examples (the headline number)."""
    from amft_cli.evaluate import eval_settings, evaluate_split, generate_fn_for

    examples = load_split(cfg, "test", cfg.train.eval_limit)
    policy.model.eval()
    generate_fn = generate_fn_for(policy.model, policy.tokenizer, cfg, eval_settings(
        cfg, None, temperature=None, top_p=None, max_new_tokens=None, limit=None, batch_size=None))
    metrics, _ = evaluate_split(task, examples, generate_fn, k=0)
    policy.model.train()
    label = "route success" if "route_success" in metrics else "greedy accuracy"
    return {"label": label, "value": metrics["greedy_accuracy"], "n": len(examples),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
