"""The training loop of DESIGN §3: one stage, μ·L_SFT + (1 − μ)·L_RL, μ from a controller.

    prompts ─► rollout (hf | vllm) ─► verifier rewards ─► advantages ─┐
    demonstrations ─► SFT NLL ────────────────────────────────────────┤
                                  μ ◄─ controller ◄─ entropy, meta-grad
                                  └─► μ·L_SFT + (1−μ)·L_RL ─► optimizer
    every step ─► metrics        every N steps ─► checkpoint

Every method (amft_cli/methods/, picked by train.algo) is this loop with its own
hooks, so comparisons are like for like; the loop names no method. The two
losses are differentiated separately (the meta-gradient needs g_SFT and g_RL
apart) and combined in `apply_update`. No rich here: progress goes out through
the `on_metrics` / `on_message` callbacks. Several processes (torchrun,
accelerate launch) train one model together as parallel.py describes; only the
main one writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from amft_cli import algo, guard, methods, parallel, provenance, sharding
from amft_cli.checkpoint import (load_trainer_state, restore_rng, resume_checkpoint, rng_state,
                                 save_checkpoint)
from amft_cli.config import Config, ConfigError
from amft_cli.config_io import to_dict, to_toml
from amft_cli.data import load_split
from amft_cli.datalock import reading
from amft_cli.fsio import user_io
from amft_cli.methods.base import Method
from amft_cli.metrics import MetricSink, check_trackers
from amft_cli.policy import Policy, load_for_training, sft_grads
from amft_cli.rewards import load_reward_fn
from amft_cli.rollout import make_backend
from amft_cli.rundir import RunLock
from amft_cli.signals import Cursors, PhaseTimer, Run, rl_signal
from amft_cli.tasks import get_task


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
            part = guard.whole(torch.nn.utils.clip_grad_norm_(policy.params, cfg.train.grad_clip)).item()
            norm = part if math.isnan(part) else max(norm, part)  # max(0.0, nan) would hide a NaN
        for group in optimizers[name].param_groups:
            group["lr"] = weight * lr * lr_scale
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
    return norm


def adamw_views(optimizer: torch.optim.Optimizer, params: list, lr: float,
                dist: parallel.Processes | None = None) -> list[algo.AdamW]:
    """An AdamW's state before its next step, at rate lr, one view per part of `params` (dist.parts:
    with FSDP this process's shards): its moments are read, never copied or changed. Zeros and
    step 0 before its first step."""
    dist = dist or parallel.Processes()
    group, states = optimizer.param_groups[0], [optimizer.state.get(p, {}) for p in params]
    step = int(states[0]["step"]) if "step" in states[0] else 0
    moments = (dist.parts([s.get(key) for s in states], params) for key in ("exp_avg", "exp_avg_sq"))
    return [algo.AdamW(m, v, step, lr, group["weight_decay"], tuple(group["betas"]), group["eps"])
            for m, v in zip(*moments)]


def update_derivative(policy: Policy, optimizers: dict, g_sft: list, g_rl: list, mu: float, cfg: Config,
                      lr_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dθ'/dμ of the step `apply_update` takes with the same arguments, and each signal's own
    full-weight step Δ_SFT, Δ_RL; all (P,) (with FSDP this process's part, parallel.py).
    Reads the optimizers' state, never changes it. The global norms and dot products come
    first (one reduction); then the element-wise formulas run one parameter at a time into the
    three outputs, so no other (P,) vector (θ, the gradients, the moments, temporaries) is ever
    built: a meta-gradient step holds 3 vectors more than a plain one, not ~12."""
    params, clip, dist = policy.params, cfg.train.grad_clip, policy.dist
    theta, sft, rl = (dist.parts(t, params) for t in ([p.detach() for p in params], g_sft, g_rl))
    ss, rr, sr = dist.dots([(sft, sft), (rl, rl), (sft, rl)])
    split = "rl" in optimizers  # two AdamWs at rates μ·α_SFT and (1−μ)·α_RL, else one on the mixed gradient
    opt_sft = adamw_views(optimizers["sft"], params, cfg.train.lr * lr_scale, dist)
    opt_rl = adamw_views(optimizers["rl"], params, cfg.train.rl_lr * lr_scale, dist) if split else opt_sft
    device = theta[0].device if theta else torch.device("cpu")
    out = [torch.empty(sum(t.numel() for t in theta), device=device) for _ in range(3)]  # dθ'/dμ, Δ_SFT, Δ_RL
    at = 0
    for th, s, r, o_sft, o_rl in zip(theta, sft, rl, opt_sft, opt_rl):
        step_sft = algo.adamw_step(th, s, o_sft, clip, grad_norm=math.sqrt(max(ss, 0.0)))
        step_rl = algo.adamw_step(th, r, o_rl, clip, grad_norm=math.sqrt(max(rr, 0.0)))
        derivative = (algo.update_derivative_split(step_sft, step_rl, mu, o_rl) if split else
                      algo.update_derivative_shared(s, r, mu, o_sft, clip, grad_dots=(ss, rr, sr)))
        for vector, value in zip(out, (derivative, step_sft, step_rl)):
            vector[at:at + th.numel()] = value
        at += th.numel()
    return out[0], out[1], out[2]


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
    opts = {"sft": policy.adamw(cfg.train.lr, cfg.train.weight_decay)}
    if cfg.train.rl_lr > 0:
        opts["rl"] = policy.adamw(cfg.train.rl_lr, cfg.train.weight_decay)
    return opts


# ---------------------------------------------------------------------------
# the loop


class StopFlag:
    """The first Ctrl-C or SIGTERM (a cluster scheduler's preemption notice) asks the loop to
    checkpoint and stop after the current step. A second Ctrl-C aborts, as the caller would have.
    A second SIGTERM is the same request again, not an abort: Slurm sends SIGTERM to every process
    of a job and torchrun passes its own on, so each of its workers gets two (and a sweep's cell
    gets the sweep's too); the scheduler's SIGKILL after its grace period is the hard stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if not self.requested or signum == signal.SIGTERM:
                self.requested = True
                return
            if callable(self._previous.get(signum)):  # abort the way the caller would have (the CLI says so)
                self._previous[signum](signum, frame)
            raise KeyboardInterrupt
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {sig: signal.signal(sig, handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, nothing to restore
                signal.signal(sig, previous)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int                 # steps completed
    interrupted: bool
    summary: dict = field(default_factory=dict)


def setup(cfg: Config, checkpoint: Path | None = None,
          on_message: Callable[[str], None] = print) -> tuple[Run, Method, dict]:
    """The run (policy, data, verifier, streams), its method and optimizers, at step 0 (weights
    from `checkpoint` when given; the trainer state is restored by the caller)."""
    torch.manual_seed(cfg.seed)
    method_cls = methods.get(cfg.train.algo)
    task, train_set, val_set = get_task(cfg.task.name), load_split(cfg, "train"), load_split(cfg, "val")
    reward_fn = load_reward_fn(cfg.task.reward)
    policy = load_for_training(cfg, checkpoint, parallel.current())
    backend = make_backend(cfg, policy.model, policy.tokenizer) if method_cls.uses_rollouts else None
    run = Run(policy, cfg, task, train_set, val_set, reward_fn, backend, on_message=on_message)
    return run, method_cls(cfg, policy), make_optimizers(policy, cfg)


def check_processes(cfg: Config, dist: parallel.Processes, saved: dict | None, checkpoint: Path | None) -> None:
    """One-line errors before any work: every process needs a share of each batch, and a run
    resumes with as many processes as wrote its checkpoint; sequential revision runs in one."""
    if cfg.task.verify_iter > 1 and dist.count > 1:
        raise ConfigError(f"task.verify_iter = {cfg.task.verify_iter}: sequential revision trains in one process "
                          f"(its episodes differ in length, so they are not shared out); start one process or set "
                          "task.verify_iter = 1")
    for key, value in methods.get(cfg.train.algo).shared_batches(cfg).items():
        if value < dist.count:
            raise ConfigError(f"{key} = {value}: fewer than the {dist.count} training processes, and each "
                              "process takes a share of the batch; raise it or start fewer processes")
    if dist.sharded:
        check_sharding(cfg, dist)
    wrote = saved.get("processes", 1) if saved is not None else dist.count
    if wrote != dist.count:
        raise ConfigError(f"--resume: {checkpoint} was written by a run of {wrote} training process(es), this "
                          f"one has {dist.count}; resume with the same number (torchrun --nproc_per_node {wrote} "
                          f"or accelerate launch --num_processes {wrote}; 1: plain `amft train`)")


def check_sharding(cfg: Config, dist: parallel.Processes) -> None:
    """What FSDP (sharding.py) needs: every process runs the same forwards (each forward
    gathers the shards), so each shares the same number of examples of every batch; and the
    paths it was tested on (full fine-tuning, the hf sampler)."""
    method = methods.get(cfg.train.algo)
    for key, value in method.shared_batches(cfg).items():
        if value % dist.count:
            raise ConfigError(f"{key} = {value}: not a multiple of the {dist.count} training processes; with FSDP "
                              "every process takes an equal share of each batch")
    for bad, why in ((cfg.model.lora_rank > 0, "model.lora_rank > 0: LoRA models fit one GPU; FSDP shards "
                                                "full fine-tuning only"),
                     (cfg.rl.backend == "vllm", "rl.backend = \"vllm\": vLLM cannot sample from a sharded model")):
        if bad:
            raise ConfigError(f"{why} (an FSDP accelerate config was given: ACCELERATE_USE_FSDP)")


def save_run(run_dir: Path, run: Run, method: Method, optimizers: dict, summary: dict) -> Path | None:
    """Checkpoint the current step: the main process writes it; with FSDP every process first
    helps gather the full weights and optimizer states (sharding.py)."""
    policy, dist = run.policy, run.policy.dist
    weights = None
    if dist.sharded:
        opt_states = {k: sharding.full_optimizer_state(policy.model, o) for k, o in optimizers.items()}
        weights = sharding.full_model_state(policy.model)
    elif dist.is_main:
        opt_states = {k: o.state_dict() for k, o in optimizers.items()}
    method_state = method.state_dict()  # on every process: it may gather shards too
    if not dist.is_main:  # every process holds the same state (or its shard of it)
        return None
    state = {"optimizers": opt_states, "summary": summary, "method": method_state,
             "cursors": asdict(run.cursors), "rng": rng_state(), "processes": dist.count}
    return save_checkpoint(run_dir, run.cursors.step, policy.model, policy.tokenizer, state,
                           run.cfg.train.keep_checkpoints, weights)


def restore(run: Run, method: Method, optimizers: dict, saved: dict) -> dict:
    """Load a checkpoint's trainer state (the weights are loaded with the model); returns its summary."""
    for name, opt in optimizers.items():
        if run.policy.dist.sharded:
            sharding.load_optimizer_state(run.policy.model, opt, saved["optimizers"][name])
        else:
            opt.load_state_dict(saved["optimizers"][name])
    method.load_state_dict(saved["method"])
    run.cursors = Cursors(**saved["cursors"])
    restore_rng(saved["rng"])
    return saved.get("summary", {})


def train(cfg: Config, run_dir: Path, resume: bool = False,
          on_metrics: Callable[[int, dict], None] = lambda step, m: None,
          on_message: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) training into run_dir. Returns when done or after a Ctrl-C checkpoint.
    The main process holds run_dir's lock throughout: a second writer is refused (rundir.RunLock);
    every process reads the data folder under its shared lock (datalock.reading: no rebuild beneath it)."""
    if not parallel.current().is_main:  # the main process writes (and locks) the run directory
        with reading(cfg):
            return _train(cfg, Path(run_dir), resume, on_metrics, on_message)
    with RunLock(run_dir) as lock, reading(cfg):
        if lock.stale:
            on_message(f"the last process writing {run_dir} was killed ({lock.stale})")
        return _train(cfg, Path(run_dir), resume, on_metrics, on_message)


def _train(cfg: Config, run_dir: Path, resume: bool, on_metrics: Callable[[int, dict], None],
           on_message: Callable[[str], None]) -> TrainResult:
    dist = parallel.current()
    if not dist.is_main:  # the main process reports for all
        on_metrics, on_message = (lambda step, m: None), (lambda msg: None)
    checkpoint = resume_checkpoint(run_dir) if resume else None
    saved = load_trainer_state(checkpoint) if checkpoint is not None else None
    check_processes(cfg, dist, saved, checkpoint)
    check_trackers(cfg.train.report_to)
    run, method, optimizers = setup(cfg, checkpoint, on_message)
    policy = run.policy
    if dist.sharded:
        on_message(f"FSDP: weights, gradients and optimizer state sharded over {dist.count} processes")
    summary: dict = {}
    if dist.is_main:
        with user_io(run_dir / "config.toml", "writing the run's config"):  # every input read: a failed
            (run_dir / "config.toml").write_text(to_toml(cfg))                # start changes nothing
    evaluates = cfg.train.eval_at_end and (dist.is_main or dist.sharded)  # FSDP: every forward takes all
    if saved is not None:
        summary = restore(run, method, optimizers, saved)
        done = f"; train.steps is {cfg.train.steps}: nothing left to train" if run.cursors.step >= cfg.train.steps else ""
        on_message(f"resumed from {checkpoint} (step {run.cursors.step}{done})")
    elif evaluates:
        summary["before"] = quick_eval(policy, cfg, run.task)
        on_message(f"before training: {summary['before']['label']} {summary['before']['value']:.1%} on unseen ID test problems")
    if dist.is_main:  # the software and machine of this start (provenance.py)
        provenance.note_start(run_dir, run.cursors.step, str(policy.device), dist.count, on_message)

    def save() -> Path | None:
        return save_run(run_dir, run, method, optimizers, summary)

    interrupted = False
    sink = MetricSink(run_dir, resume_step=run.cursors.step if checkpoint else None, trackers=cfg.train.report_to,
                      config=to_dict(cfg)) if dist.is_main else None
    with sink or contextlib.nullcontext(), StopFlag() as stop:
        while run.cursors.step < cfg.train.steps:
            metrics = train_step(run, method, optimizers)
            run.cursors.step += 1
            if sink is not None:
                sink.log(run.cursors.step, metrics)
            on_metrics(run.cursors.step, metrics)
            run.cursors.skipped_in_row = guard.count_skip(metrics, run.cursors.skipped_in_row,
                                                          cfg.train.max_skipped_steps, run.cursors.step, on_message)
            if dist.any(stop.requested):  # every process stops after the same step
                on_message(f"interrupted: checkpoint {save()} — continue with --resume {run_dir}")
                interrupted = True
                break
            if run.cursors.step % cfg.train.save_every == 0 or run.cursors.step == cfg.train.steps:
                save()
    if not interrupted and evaluates:
        summary["after"] = quick_eval(policy, cfg, run.task)
    path = run_dir / "summary.json"
    if not interrupted and dist.is_main:  # never an older end's score beside these weights
        with user_io(path, "writing the run's summary"):
            path.write_text(json.dumps(summary, indent=2)) if summary else path.unlink(missing_ok=True)
    return TrainResult(run_dir, run.cursors.step, interrupted, summary)


def train_step(run: Run, method: Method, optimizers: dict) -> dict:
    """One step of DESIGN §3 at the current θ; the method's hooks shape it. Returns its metrics."""
    policy, cfg = run.policy, run.cfg
    timer, step, started = PhaseTimer(), run.cursors.step, time.perf_counter()
    mu = method.mu(step)
    policy.dist.check_same(mu, f"μ at step {step + 1}")
    metrics: dict = {"balance/mu": mu}
    both = method.needs_both_signals(step)  # a controller reading both keeps μ = 1 or 0 from being a dead end
    g_sft = g_rl = None
    prompts: list[dict] = []
    if mu < 1.0 or both:
        prompts = run.draw("rl", cfg.train.prompts_per_step)
        g_rl, loss_rl, rl_stats = rl_signal(run, prompts, method, timer)
        metrics.update({"loss/rl": loss_rl, **rl_stats})
    if mu > 0.0 or both:
        with timer("losses"):
            demos = method.sft_examples(run, prompts)
            g_sft, loss_sft, sft_stats = sft_grads(policy, demos, cfg.train.micro_batch_size, method.sft_loss,
                                                   method.entropy_grad)
        metrics.update({"loss/sft": loss_sft, "policy/entropy_demo": sft_stats.pop("entropy"),
                        **{f"sft/{k}": v for k, v in sft_stats.items()}})
    metrics["loss/total"] = algo.objective(mu, metrics.get("loss/sft"), metrics.get("loss/rl"))
    lr_scale = lr_factor(step, cfg)
    metrics["optim/lr"] = cfg.train.lr * lr_scale
    problem, norm = guard.nonfinite_signal(metrics, g_sft, g_rl)
    if problem is None:
        with timer("controller"), guard.KeepFinite(method) as kept:
            metrics.update(method.control(run, step, metrics, g_sft, g_rl, lambda: update_derivative(
                policy, optimizers, g_sft, g_rl, mu, cfg, lr_scale)))
        problem = kept.problem
    if problem is not None:  # the guard: nothing non-finite reaches weights, optimizer or μ
        metrics = guard.skipped(metrics, problem, norm)
    else:
        with timer("update"):
            metrics["optim/grad_norm"] = apply_update(policy, optimizers, g_sft, g_rl, mu, cfg, lr_scale)
            metrics["optim/skipped"] = 0.0
            if run.backend is not None:
                run.backend.sync_weights()  # a vLLM engine holds its own copy of the weights
        with timer("method"), guard.KeepFinite(method) as kept:
            metrics.update(method.after_update(run, step))
        if kept.problem is not None:
            metrics["guard/rolled_back"] = kept.problem
            run.on_message(f"step {step + 1}: {kept.problem}; the method's state was rolled back")
        guard.check_weights(policy.params, step)
    metrics.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
    metrics["rollout/total"] = run.cursors.rollouts  # cumulative: the sweep table's "rollouts used"
    metrics["time/step_s"] = time.perf_counter() - started
    return metrics


def quick_eval(policy: Policy, cfg: Config, task) -> dict:
    """Greedy success on the first train.eval_limit unseen ID test examples (the headline number)."""
    from amft_cli.evaluate import eval_settings, evaluate_split, generate_fn_for

    examples = load_split(cfg, "test", cfg.train.eval_limit)
    policy.model.eval()
    generate_fn = generate_fn_for(policy.model, policy.tokenizer, cfg, eval_settings(
        cfg, None, temperature=None, top_p=None, max_new_tokens=None, limit=None, batch_size=None))
    metrics, _ = evaluate_split(task, examples, generate_fn, k=0, verify_iter=cfg.task.verify_iter)
    policy.model.train()
    label = "route success" if "route_success" in metrics else "greedy accuracy"
    return {"label": label, "value": metrics["greedy_accuracy"], "n": len(examples),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
