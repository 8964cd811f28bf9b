"""Seconds per training step of GRPO and AMFT on the tiny model, optionally beside TRL's GRPOTrainer.

    python tests/benchmarks/bench_step.py [--steps N] [--warmup W] [--threads T] [--trl]
                                          [--warm-sft S] [--max-new-tokens L]

The work of one step is fixed by the issue: 32 prompts × 8 completions of at
most 12 new tokens, RL learning rate 1e-5, one update per rollout batch, no
KL. Each row times `train.train_step` on its own freshly loaded policy (the
model folder of presets/tiny-math.toml, built by `amft prepare`):

    rl, every backward   GRPO (μ = 0): rollouts, rewards, one update, with
                  rl.skip_zero_advantage=false: the forward and backward over every row, TRL's work
    rl            the same with the default skip: groups whose rewards are all equal
                  (advantages 0, no gradient) run forward only (column fwd-only)
    amft          a mixed step after warm-up: the same RL work plus the SFT batch
    amft (meta)   an amft step that also takes the meta-gradient, which adds
                  amft.meta_prompts × group_size validation rollouts and their backward

At the issue's work every reward is 0: that model starts from random weights (the preset's
SFT warm-up teaches it the task) and no tiny-math answer fits in 12 tokens, so every group
has advantages 0, GRPO's update is zero, and with the skip our step runs no backward at
all; the first row is the like-for-like comparison with TRL. --warm-sft S first trains the
model with S of our SFT steps (the preset's batch and rate) and both trainers start from
that copy; with --max-new-tokens long enough for an answer (e.g. 32) rewards vary and only
part of the groups have no gradient (column zero-std).

With --trl, TRL's GRPOTrainer does the same work on the same model folder,
prompts and verifier (tiny_math.score), in fp32 without gradient checkpointing
and with the same attention kernel as ours (the preset's model.attention)
(--trl-defaults keeps TRL's bf16 autocast and checkpointing), and the
table adds the ratio TRL / ours. TRL runs in this process when it imports here,
otherwise as a subprocess of --trl-python (a venv with trl; amft_cli is reached
through PYTHONPATH), with the same torch thread count.

Steps are interleaved in rounds (one TRL step, then one step of each of our
rows; a subprocess waits on a pipe meanwhile), so load from other programs on
a shared machine hits every row alike. W warm-up rounds are dropped and each
row reports the median of the next N. The ratios are the claim, not the seconds.
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
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without `pip install -e .`

PROMPTS, GROUP, RL_LR = 32, 8, 1e-5
MAX_NEW_TOKENS = 12  # the work; --max-new-tokens sets it for both trainers
WORKER_TAG = "TRL_STEP "


def bench_config(algo: str, meta_every: int, dtype: str = "float32", model: str | None = None,
                 extra: tuple[str, ...] = ()):
    """presets/tiny-math.toml with the benchmark's work; data paths made absolute. dtype
    bfloat16: bf16 autocast over fp32 master weights (model.dtype), as TRL's bf16=True.
    model: another model folder (--warm-sft's); extra: more overrides."""
    from amft_cli.config import validate
    from amft_cli.config_io import apply_overrides, load_preset

    cfg = load_preset(str(ROOT / "presets" / "tiny-math.toml"))
    apply_overrides(cfg, [
        f"train.algo={algo}", f"train.prompts_per_step={PROMPTS}", f"rl.group_size={GROUP}",
        f"rl.max_new_tokens={MAX_NEW_TOKENS}", f"train.rl_lr={RL_LR}", "rl.kl_beta=0",
        "model.device=cpu", "amft.warmup_steps=0", f"amft.meta_every={meta_every}", f"model.dtype={dtype}",
        *extra])
    cfg.task.data_dir = str(ROOT / cfg.task.data_dir)
    cfg.model.path = model or str(ROOT / cfg.model.path)
    return validate(cfg)


def warm_model(sft_steps: int, out_dir: str) -> str:
    """The preset's model after `sft_steps` of our SFT (its batch, rate and schedule), saved to out_dir."""
    from amft_cli import train
    from amft_cli.model import save_policy

    cfg = bench_config("sft", 10**9, extra=(f"train.steps={sft_steps}",))
    run, method, optimizers = train.setup(cfg, on_message=lambda msg: None)
    for _ in range(sft_steps):
        train.train_step(run, method, optimizers)
        run.cursors.step += 1
    save_policy(run.policy.model, run.policy.tokenizer, out_dir)
    return out_dir


def summarize(label: str, records: list[dict], warmup: int) -> dict:
    """One table row from per-step records {s, rollout_s, tokens[, zero_std, forward_only]}, warm-up dropped."""
    timed = records[warmup:]
    step = statistics.median(r["s"] for r in timed)
    shares = {k: statistics.mean(r[k] for r in timed) for k in ("zero_std", "forward_only") if k in timed[0]}
    return {"label": label, "steps": len(timed), "step_s": step,
            "rollout_share": statistics.median(r["rollout_s"] / r["s"] for r in timed),
            "completions_per_s": PROMPTS * GROUP / step,
            "tokens_per_s": statistics.median(r["tokens"] for r in timed) / step, **shares}


# ---------------------------------------------------------------------------
# ours


class OursRow:
    """One configuration of our trainer on a fresh policy, stepped one train_step at a time."""

    def __init__(self, label: str, algo: str, meta_every: int, dtype: str, model: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        from amft_cli import train

        self.label, self.algo, self.meta_every, self.train = label, algo, meta_every, train
        self.cfg = bench_config(algo, meta_every, dtype, model, extra)
        self.run, self.method, self.optimizers = train.setup(self.cfg, on_message=lambda msg: None)
        self.records: list[dict] = []

    def step(self) -> None:
        """One timed train_step (amft's step 0 also measures H*: a warm-up round drops it)."""
        started = time.perf_counter()
        metrics = self.train.train_step(self.run, self.method, self.optimizers)
        elapsed = time.perf_counter() - started
        if self.algo == "amft" and self.run.cursors.step > 0:  # the row times the step it names
            assert metrics["balance/meta_update"] == float(self.meta_every == 1)
        self.run.cursors.step += 1
        self.records.append({"s": elapsed, "rollout_s": metrics["time/rollout_s"],
                             "tokens": metrics["rollout/len_mean"] * PROMPTS * GROUP,
                             "zero_std": metrics["reward/zero_std_frac"],
                             "forward_only": metrics["rl/forward_only_frac"]})


# ---------------------------------------------------------------------------
# TRL


def tiny_math_reward(prompts, completions, answer, **columns) -> list[float]:
    """TRL reward contract around the task verifier that our trainer calls."""
    from amft_cli.tasks import tiny_math

    return [tiny_math.score({"answer": a}, c).reward for c, a in zip(completions, answer)]


def run_trl(total_steps: int, after_step: Callable[[dict], None], trl_defaults: bool = False,
            dtype: str = "float32", model_dir: str | None = None) -> None:
    """GRPOTrainer on the same model, prompts, verifier and work; after_step(record) after each step.

    A step is timed from the return of the previous after_step to the step's end,
    so it covers TRL's batch fetch, generation, scoring, loss and update.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from amft_cli.data import load_split

    cfg = bench_config("rl", 10**9, dtype, model_dir)
    rows = load_split(cfg, "train")[: PROMPTS * total_steps]
    dataset = Dataset.from_list([{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in rows])
    kernel = {} if cfg.model.attention == "auto" else {"attn_implementation": cfg.model.attention}
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32, **kernel)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    generated: list[tuple[float, int]] = []
    generate = model.generate

    def timed_generate(*args, **kwargs):  # TRL's rollout: its time and new tokens (eos included)
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:]
        generated.append((time.perf_counter() - started, int((new != tokenizer.pad_token_id).sum())))
        return out

    model.generate = timed_generate

    class Clock(TrainerCallback):
        resumed = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.resumed = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.resumed
            after_step({"s": seconds, "rollout_s": generated[-1][0], "tokens": generated[-1][1]})
            self.resumed = time.perf_counter()

    precision = {} if trl_defaults else {"bf16": dtype == "bfloat16", "gradient_checkpointing": False}
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, seed=cfg.seed, **precision,
            per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
            num_generations=GROUP, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0,
            learning_rate=RL_LR, lr_scheduler_type="constant", max_grad_norm=1.0, beta=0.0,
            num_iterations=1, epsilon=0.2, loss_type="dapo", max_steps=total_steps,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True)
        GRPOTrainer(model=model, args=args, reward_funcs=tiny_math_reward, train_dataset=dataset,
                    processing_class=tokenizer, callbacks=[Clock()]).train()


def trl_imports_here() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "use the separate venv"
        return False
    return True


def trl_worker(args) -> None:
    """Subprocess side: report each TRL step on stdout, then wait for the parent's round."""
    def after_step(record: dict) -> None:
        print(WORKER_TAG + json.dumps(record), flush=True)
        sys.stdin.readline()

    run_trl(args.warmup + args.steps, after_step, args.trl_defaults, args.dtype, args.model)


def run_trl_subprocess(args, between: Callable[[], None]) -> list[dict] | None:
    """TRL in the --trl-python venv, in lockstep: after each of its steps, between() runs here."""
    python = Path(args.trl_python)
    if not python.is_file():
        print(f"--trl: trl does not import here and {python} does not exist; create that venv "
              "(tests/benchmarks/README.md) or pass --trl-python", file=sys.stderr)
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [str(python), __file__, "--trl-worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--dtype", args.dtype] + (["--trl-defaults"] if args.trl_defaults else []) \
        + (["--model", args.model] if args.model else []) + ["--max-new-tokens", str(args.max_new_tokens)]
    records: list[dict] = []
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: TRL's warnings can't block it
        with subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=errors, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                if line.startswith(WORKER_TAG):
                    records.append(json.loads(line[len(WORKER_TAG):]))
                    between()
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
        if proc.returncode != 0 or len(records) < args.warmup + args.steps:
            errors.seek(0)
            print(f"--trl: the TRL subprocess failed (exit {proc.returncode}):\n{errors.read()[-3000:]}",
                  file=sys.stderr)
            return None
    return records


# ---------------------------------------------------------------------------
# report


def versions() -> str:
    import torch
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
            f"thread(s), attention {bench_config('rl', 1).model.attention} on both sides")


def print_table(rows: list[dict], trl: dict | None) -> None:
    """One line per row; with TRL, the ratio TRL s/step ÷ row s/step (>= 2: at most half of TRL's)."""
    print(f"{'step':<34}{'s/step':>8}{'rollout':>9}{'compl/s':>9}{'tok/s':>8}{'zero-std':>10}{'fwd-only':>10}"
          + (f"{'TRL/ours':>10}" if trl else ""))
    for row in rows + ([trl] if trl else []):
        shares = "".join(f"{row[k]:>10.0%}" if k in row else f"{'-':>10}" for k in ("zero_std", "forward_only"))
        line = (f"{row['label']:<34}{row['step_s']:>8.3f}{row['rollout_share']:>9.0%}"
                f"{row['completions_per_s']:>9.0f}{row['tokens_per_s']:>8.0f}{shares}")
        print(line + (f"{trl['step_s'] / row['step_s']:>10.2f}" if trl else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed rounds (each row reports its median step)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (>= 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both halves")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="both trainers' compute: bfloat16 = autocast over fp32 weights (TRL's bf16=True)")
    p.add_argument("--warm-sft", type=int, default=0, metavar="S",
                   help="start both trainers from the preset's model after S of our SFT steps (with "
                        "--max-new-tokens 32, rewards vary)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, metavar="L",
                   help="completion cap of both trainers (default 12, the issue's work: no answer fits)")
    p.add_argument("--model", help=argparse.SUPPRESS)  # the worker's copy of the parent's model folder
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer and print TRL/ours")
    p.add_argument("--trl-defaults", action="store_true",
                   help="keep TRL's own bf16 autocast and gradient checkpointing (not the same work as ours)")
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", str(ROOT.parent / "venv-trl/bin/python")),
                   help="python of a venv with trl, used when trl does not import here (env TRL_PYTHON)")
    p.add_argument("--trl-subprocess", action="store_true", help="use --trl-python even if trl imports here")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.threads < 1 or args.warm_sft < 0:
        p.error("--steps, --warmup and --threads: expected integers >= 1; --warm-sft: >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    global MAX_NEW_TOKENS
    args = parse_args(argv)
    MAX_NEW_TOKENS = args.max_new_tokens
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    if args.trl_worker:
        return trl_worker(args)
    with tempfile.TemporaryDirectory() as warm_dir:
        if args.warm_sft:
            print(f"warming the model: {args.warm_sft} SFT steps ...", flush=True)
            args.model = warm_model(args.warm_sft, warm_dir)
        bench(args)


def bench(args: argparse.Namespace) -> None:
    """Our rows and TRL's, interleaved in rounds, then the table."""
    model, dtype = args.model, args.dtype
    ours = [OursRow("ours GRPO (rl), every backward", "rl", 10**9, dtype, model, ("rl.skip_zero_advantage=false",)),
            OursRow("ours GRPO (rl)", "rl", 10**9, dtype, model),
            OursRow("ours AMFT (mixed)", "amft", 10**9, dtype, model),
            OursRow("ours AMFT (meta-grad step)", "amft", 1, dtype, model)]

    def our_round() -> None:
        for row in ours:
            row.step()

    rounds, trl_records = args.warmup + args.steps, None
    in_process = args.trl and not args.trl_subprocess and trl_imports_here()
    if in_process:
        trl_records = []
        run_trl(rounds, lambda record: (trl_records.append(record), our_round()), args.trl_defaults, args.dtype, model)
    elif args.trl:
        trl_records = run_trl_subprocess(args, our_round)
    while len(ours[0].records) < rounds:  # no TRL, or it failed part way (reason printed)
        our_round()
    notes = ([] if in_process else ["subprocess"]) + (["TRL defaults"] if args.trl_defaults else [])
    trl_label = "TRL GRPO" + (f" ({', '.join(notes)})" if notes else "")
    trl = summarize(trl_label, trl_records, args.warmup) if trl_records else None
    print(f"\n{PROMPTS} prompts x {GROUP} completions, <= {MAX_NEW_TOKENS} new tokens, rl lr {RL_LR:g}; "
          f"median of {args.steps} interleaved rounds after {args.warmup} warm-up; {versions()}, {args.dtype} compute; "
          f"model: {f'after {args.warm_sft} SFT steps' if args.warm_sft else 'the preset folder (random init)'}")
    print("rollout = share of the step generating the training completions; compl/s, tok/s = training "
          "completions and their tokens per second of whole step; zero-std = mean share of groups whose rewards "
          "are all equal; fwd-only = mean share of rows run forward only (no backward); TRL/ours = TRL s/step / "
          "row s/step\n")
    print_table([summarize(row.label, row.records, args.warmup) for row in ours], trl)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # ConfigError / ModelError: e.g. data or model not prepared yet
        sys.exit(f"bench_step: {e}")
