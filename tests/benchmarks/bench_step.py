"""Seconds per training step of GRPO and AMFT on the tiny model, optionally beside TRL's GRPOTrainer.

    python tests/benchmarks/bench_step.py [--steps N] [--warmup W] [--threads T] [--trl]

The work of one step is fixed by the issue: 32 prompts × 8 completions of at
most 12 new tokens, RL learning rate 1e-5, one update per rollout batch, no
KL. Each row times `train.train_step` on a freshly loaded policy (the model
folder of presets/tiny-math.toml, built by `amft prepare`), drops W warm-up
steps and prints the median of the next N:

    rl            GRPO (μ = 0): rollouts, rewards, one update
    amft          a mixed step after warm-up: the same RL work plus the SFT batch
    amft (meta)   an amft step that also takes the meta-gradient, which adds
                  amft.meta_prompts × group_size validation rollouts and their backward

With --trl, TRL's GRPOTrainer does the same work on the same model folder,
prompts and verifier (tiny_math.score), in fp32 without gradient checkpointing
like ours, and the table adds the ratio TRL / ours. TRL runs in this process
when it imports here, otherwise as a subprocess of --trl-python (a separate
venv with trl and torch, amft_cli reached through PYTHONPATH). Both halves
use the same torch thread count. The ratios are the claim, not the seconds:
the halves run one after the other on a machine that may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without `pip install -e .`

PROMPTS, GROUP, MAX_NEW_TOKENS, RL_LR = 32, 8, 12, 1e-5
WORKER_TAG = "TRL_ROW "


def bench_config(algo: str, meta_every: int):
    """presets/tiny-math.toml with the benchmark's work; data paths made absolute."""
    from amft_cli.config import apply_overrides, load_preset, validate

    cfg = load_preset(str(ROOT / "presets" / "tiny-math.toml"))
    apply_overrides(cfg, [
        f"train.algo={algo}", f"train.prompts_per_step={PROMPTS}", f"rl.group_size={GROUP}",
        f"rl.max_new_tokens={MAX_NEW_TOKENS}", f"train.rl_lr={RL_LR}", "rl.kl_beta=0",
        "model.device=cpu", "amft.warmup_steps=0", f"amft.meta_every={meta_every}",
    ])
    cfg.task.data_dir = str(ROOT / cfg.task.data_dir)
    cfg.model.path = str(ROOT / cfg.model.path)
    return validate(cfg)


def summarize(label: str, seconds: list[float], rollout_s: list[float], tokens: list[float]) -> dict:
    """One table row from per-step wall times (s), rollout times (s) and generated tokens."""
    step = statistics.median(seconds)
    return {"label": label, "steps": len(seconds), "step_s": step,
            "rollout_share": statistics.median(r / s for r, s in zip(rollout_s, seconds)),
            "completions_per_s": PROMPTS * GROUP / step,
            "tokens_per_s": statistics.median(tokens) / step}


# ---------------------------------------------------------------------------
# ours


def time_ours(label: str, algo: str, meta_every: int, steps: int, warmup: int) -> dict:
    """Median wall time of train.train_step after `warmup` untimed steps on a fresh policy."""
    import torch

    from amft_cli import train
    from amft_cli.data import load_split
    from amft_cli.policy import load_for_training
    from amft_cli.tasks import get_task

    cfg = bench_config(algo, meta_every)
    torch.manual_seed(cfg.seed)
    task, train_set, val_set = get_task(cfg.task.name), load_split(cfg, "train"), load_split(cfg, "val")
    policy = load_for_training(cfg)
    optimizers = train.make_optimizers(policy, cfg)
    generator = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    control, cursors = train.ControllerState(mu=cfg.amft.mu_init), train.Cursors()
    seconds, rollout_s, tokens = [], [], []
    for i in range(warmup + steps):  # step 0 of amft measures H* (warmup_steps = 0): untimed
        started = time.perf_counter()
        metrics = train.train_step(policy, cfg, task, train_set, val_set, optimizers, control, cursors,
                                   generator, None, lambda msg: None)
        elapsed = time.perf_counter() - started
        cursors.step += 1
        if i >= warmup:
            seconds.append(elapsed)
            rollout_s.append(metrics["time/rollout_s"])
            tokens.append(metrics["rollout/len_mean"] * PROMPTS * GROUP)
    if algo == "amft":
        expected = 1.0 if meta_every == 1 else 0.0
        assert metrics["balance/meta_update"] == expected, "benchmark did not time the step it names"
    return summarize(label, seconds, rollout_s, tokens)


# ---------------------------------------------------------------------------
# TRL


def tiny_math_reward(prompts, completions, answer, **columns) -> list[float]:
    """TRL reward contract around the task verifier that our trainer calls."""
    from amft_cli.tasks import tiny_math

    return [tiny_math.score({"answer": a}, c).reward for c, a in zip(completions, answer)]


def time_trl(steps: int, warmup: int) -> dict:
    """GRPOTrainer on the same model, prompts, verifier and work; medians over the timed steps.

    A step is timed from the end of the previous one (so it includes TRL's batch
    fetch, generation, scoring, loss and update); hence warm-up must be >= 1.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from amft_cli.data import load_split

    cfg = bench_config("rl", 10**9)
    rows = load_split(cfg, "train")[: PROMPTS * (warmup + steps)]
    dataset = Dataset.from_list([{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in rows])
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    generated = {"s": [], "tokens": []}
    generate = model.generate

    def timed_generate(*args, **kwargs):  # TRL's rollout, timed and its new tokens counted
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        generated["s"].append(time.perf_counter() - started)
        new = out[:, kwargs["input_ids"].shape[1]:]
        generated["tokens"].append(int((new != tokenizer.pad_token_id).sum()))
        return out

    model.generate = timed_generate

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=cfg.seed,
            per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
            num_generations=GROUP, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
            learning_rate=RL_LR, lr_scheduler_type="constant", max_grad_norm=1.0, beta=0.0,
            num_iterations=1, epsilon=0.2, loss_type="dapo", max_steps=warmup + steps,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0)
        clock = StepClock()
        trainer = GRPOTrainer(model=model, args=args, reward_funcs=tiny_math_reward, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    seconds = [b - a for a, b in zip(clock.ends[warmup - 1:], clock.ends[warmup:])]
    return summarize("TRL GRPO", seconds, generated["s"][warmup:], generated["tokens"][warmup:])


def trl_in_process() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use the separate venv"
        return False
    return True


def trl_row(args) -> dict | None:
    """TRL's row, from this process when trl imports here, else from the --trl-python venv."""
    if trl_in_process() and not args.trl_subprocess:
        return time_trl(args.steps, args.warmup)
    python = Path(args.trl_python)
    if not python.is_file():
        print(f"--trl: trl does not import here and {python} does not exist; create the venv "
              "(tests/benchmarks/README.md) or pass --trl-python", file=sys.stderr)
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [str(python), __file__, "--trl-worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            row = json.loads(line[len(WORKER_TAG):])
            row["label"] += " (subprocess)"
            return row
    print(f"--trl: the TRL subprocess failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------
# report


def versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s)"


def print_table(rows: list[dict], trl: dict | None) -> None:
    """One line per row; with TRL, the ratio TRL s/step ÷ ours (> 2 meets the issue's 'half')."""
    head = f"{'step':<28}{'s/step':>8}{'rollout':>9}{'compl/s':>9}{'tok/s':>8}"
    print(head + (f"{'TRL/ours':>10}" if trl else ""))
    for row in rows + ([trl] if trl else []):
        line = (f"{row['label']:<28}{row['step_s']:>8.3f}{row['rollout_share']:>9.0%}"
                f"{row['completions_per_s']:>9.0f}{row['tokens_per_s']:>8.0f}")
        if trl:
            line += f"{trl['step_s'] / row['step_s']:>10.2f}"
        print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both halves")
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer and print TRL/ours")
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", str(ROOT.parent / "venv-trl/bin/python")),
                   help="python of a venv with trl, used when trl does not import here (env TRL_PYTHON)")
    p.add_argument("--trl-subprocess", action="store_true", help="run TRL in --trl-python even if it imports here")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup: expected integers >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.trl_worker:
        print(WORKER_TAG + json.dumps(time_trl(args.steps, args.warmup)), flush=True)
        return
    rows = [time_ours("ours GRPO (rl)", "rl", 10**9, args.steps, args.warmup),
            time_ours("ours AMFT (mixed)", "amft", 10**9, args.steps, args.warmup),
            time_ours("ours AMFT (meta-grad step)", "amft", 1, args.steps, args.warmup)]
    trl = trl_row(args) if args.trl else None
    print(f"\n{PROMPTS} prompts x {GROUP} completions, <= {MAX_NEW_TOKENS} new tokens, rl lr {RL_LR:g}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; {versions()}")
    print("rollout = share of the step spent generating the training completions; "
          "compl/s, tok/s = training completions and their tokens per second of whole step\n")
    print_table(rows, trl)


if __name__ == "__main__":
    main()
