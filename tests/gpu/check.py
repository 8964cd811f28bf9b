"""The GPU check: what a machine with one CUDA GPU says about amft_cli, as one JSON report.

    bash tests/gpu/check.sh [--out REPORT.json]         # on the GPU machine, ≤ 8 minutes
    bash tests/gpu/check.sh --device cpu --tiny         # dry run of every section here, minutes

Sections (each timed; a failing one records its error and the next one runs; the
report is rewritten after every section, so a run cut short still leaves one):

    env          torch/CUDA/GPU, package versions, which optional packages are missing
    gpu_tests    `pytest -m gpu` (the tests marked gpu; skipped on a machine without CUDA)
    tiny_math    20 training steps of the tiny-math preset on the device (AMFT with a short
                 warm-up, so SFT, GRPO rollouts and meta-gradient steps all run; its verifier
                 needs math-verify only for a box that is not a plain number, which a model this
                 young does not write)
    cli          `amft train` (20 steps), `amft export`, `amft eval` of the run and of the export
                 as subprocesses, as a user types them: the same greedy completions
    qwen_full    5 bf16 steps of a RANDOM-INIT model of Qwen2.5-0.5B's published shape
    qwen_lora    (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936; no
                 download), full fine-tuning and LoRA, rollouts of 256 tokens
    sampler      tokens/s of our sampler vs transformers' model.generate, same bf16 model,
                 same batch, same number of new tokens
    fsdp         2 processes sharded (FSDP2: `accelerate launch` with the math-qwen2.5
                 accelerate config) vs 1 process, 8 tiny-math steps: the same μ, losses and
                 rewards (tests/test_parallel.py does this on CPU over gloo). Needs 2 GPUs, one
                 per process: on a one-GPU machine it records why it was skipped

Peak GPU memory is recorded per section (torch.cuda.max_memory_allocated).

The random model needs a tokenizer of 151936 ids with nothing downloaded: the tiny
models' character tokenizer (model._char_tokenizer: 256 bytes + specials) with its
vocabulary padded by never-merged filler tokens up to the model's size. Prompts and
demonstrations (tiny-math text) tokenize to the first ~260 ids, as they would with
the real tokenizer's byte fallback; what the random model samples across all 151936
ids decodes to filler text. Its rewards come from `char_sum_reward` below (the task
verifier gives 0 to noise), so the RL signal is not zero.

Needs torch, transformers, peft, accelerate, typer, rich; NOT datasets, math-verify
or vLLM (none is imported on these paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True)  # Qwen2.5-0.5B's config.json
QWEN_TINY = dict(QWEN_05B, hidden_size=112, num_hidden_layers=2, intermediate_size=256)  # --tiny: same heads


def char_sum_reward(prompts, completions, **columns):
    """A reward with variance on noise (TRL's reward contract)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


# ---------------------------------------------------------------------------
# the random Qwen-shaped model


def padded_tokenizer(vocab_size: int):
    """The tiny models' byte-level character tokenizer (4 specials + 256 bytes), its vocabulary
    padded to vocab_size ids with 3-character filler tokens that no merge produces: text still
    tokenizes to the first 260 ids; sampled filler ids decode to 3 bytes each."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from amft_cli.model import _char_tokenizer

    base = _char_tokenizer([])
    state = json.loads(base.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    alphabet = sorted(tok for tok in vocab if len(tok) == 1)  # the 256 byte-level characters
    size, i = len(alphabet), 0
    while len(vocab) < vocab_size:
        vocab[alphabet[i // size // size % size] + alphabet[i // size % size] + alphabet[i % size]] = len(vocab)
        i += 1
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), pad_token="<pad>", bos_token="<bos>",
        eos_token="<eos>", unk_token="<unk>", add_bos_token=True, clean_up_tokenization_spaces=False,
        padding_side="left")


def build_random_qwen(out_dir: Path, shape: dict) -> Path:
    """A random-init Qwen2 of `shape`, saved with the padded tokenizer (bf16 weights)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = padded_tokenizer(shape["vocab_size"])
    config = Qwen2Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------
# sections


def section_env(args) -> dict:
    """Versions from the installed distributions' metadata (None: not installed); nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": args.device}
    for name in ("transformers", "peft", "accelerate", "typer", "rich", "datasets", "math-verify", "vllm", "pytest"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


def section_gpu_tests(args) -> dict:
    """pytest -m gpu over the test files that use the marker (the others may import packages
    this machine lacks, e.g. math-verify); on --device cpu they run on CPU (AMFT_TEST_DEVICE)."""
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in f.read_text())
    if not files:
        return {"files": [], "summary": "no gpu-marked tests"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.budget_tests,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "AMFT_TEST_DEVICE": args.device})
    lines = done.stdout.strip().splitlines()
    return {"files": [Path(f).name for f in files], "exit_code": done.returncode,
            "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-25:]), "ok": done.returncode == 0}


def train_run(cfg, run_dir: Path) -> dict:
    """amft_cli.train.train (what `amft train` calls) on cfg; summary of its metrics.jsonl."""
    from amft_cli.metrics import read_metrics
    from amft_cli.train import train

    started = time.perf_counter()
    result = train(cfg, run_dir, on_message=lambda msg: None)
    seconds = time.perf_counter() - started
    records = read_metrics(run_dir)
    last = records[-1]
    finite = all(v == v and abs(v) != float("inf") for r in records for v in r.values() if isinstance(v, float))
    keep = ("loss/total", "balance/mu", "reward/mean", "policy/entropy", "rollout/len_mean",
            "rollout/tokens_per_s", "rollout/logprob_diff_mean", "rollout/logprob_diff_max",
            "rollout/is_weight_mean", "time/step_s", "time/rollout_s")
    return {"steps": result.steps, "seconds": round(seconds, 1), "all_metrics_finite": finite,
            "meta_steps": sum(r.get("balance/meta_update", 0) for r in records),
            "median_step_s": sorted(r["time/step_s"] for r in records)[len(records) // 2],
            "last": {k: last[k] for k in keep if k in last}, "ok": finite and result.steps == cfg.train.steps}


def section_tiny_math(args, work: Path) -> dict:
    from amft_cli.cli import resolve_config
    from amft_cli.data import prepare

    small = ["train.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=12", "train.sft_batch_size=16",
             "amft.meta_prompts=2"] if args.tiny else []
    steps = 4 if args.tiny else 20
    cfg = resolve_config("tiny-math", [
        f"task.data_dir={work / 'tiny-math'}", f"model.path={work / 'tiny-math' / 'model'}", "task.train_size=2000",
        f"model.device={args.device}", f"train.steps={steps}", "amft.warmup_steps=2", "amft.meta_every=2",
        "train.eval_at_end=false", f"train.save_every={steps}", *small])
    prepare(cfg, log=lambda msg: None)
    return train_run(cfg, work / "run-tiny-math")


def amft(args_list: list, cwd: Path, timeout: int = 300) -> str:
    """`python -m amft_cli ARGS` as a user runs it; its stdout (a failure raises with the output's tail)."""
    done = subprocess.run([sys.executable, "-m", "amft_cli", *args_list], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"amft {args_list[0]}: exit {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return done.stdout


def section_cli(args, work: Path) -> dict:
    """The commands a user types, on the device: `amft train` (20 steps), `amft export`, then
    `amft eval` of the run and of the exported folder: the same greedy completions (full
    fine-tuning exports the checkpoint's weights as they are). environment.jsonl names the GPU."""
    data = [f"task.data_dir={work / 'tiny-math'}", f"model.path={work / 'tiny-math' / 'model'}",
            "task.train_size=2000", f"model.device={args.device}"]
    sets = lambda extra: [a for s in data + extra for a in ("--set", s)]  # noqa: E731
    run, exported = work / "run-cli", work / "exported"
    amft(["train", "--preset", "tiny-math", *sets(["amft.warmup_steps=2", "amft.meta_every=2",
                                                   "train.eval_at_end=false"]),
          "--steps", "4" if args.tiny else "20", "--plain", "--run-dir", str(run)], work)
    export = json.loads(amft(["export", "--run", str(run), "--out", str(exported), "--json"], work))
    limit = ["--greedy", "--limit", "16" if args.tiny else "100", "--json"]
    amft(["eval", "--run", str(run), *sets([]), *limit, "--out", str(work / "eval-run")], work)
    amft(["eval", "--model", str(exported), "--preset", "tiny-math", *sets([]), *limit, "--out",
          str(work / "eval-export")], work)
    read = lambda folder: [json.loads(line)["completion"] for path in sorted(folder.glob("*.samples.jsonl"))  # noqa: E731
                           for line in path.read_text().splitlines()]
    ours, theirs = read(work / "eval-run"), read(work / "eval-export")
    started = json.loads((run / "environment.jsonl").read_text().splitlines()[-1])
    same = ours == theirs and len(ours) > 0
    return {"export": {k: export.get(k) for k in ("parameters", "bytes", "dtype")}, "eval_rows": len(ours),
            "same_greedy_completions": same, "environment": {k: started.get(k) for k in ("device", "accelerator")},
            "ok": same and started.get("accelerator") == (torch.cuda.get_device_name(0) if args.device == "cuda" else None)}


def qwen_config(args, work: Path, lora: bool):
    from amft_cli.cli import resolve_config

    from amft_cli.data import prepare

    model_dir = work / "qwen-random"
    if not (model_dir / "config.json").exists():
        build_random_qwen(model_dir, QWEN_TINY if args.tiny else QWEN_05B)
    tiny_data = work / "tiny-math"  # prompts and demonstrations: tiny-math text
    new_tokens, prompts, group = (12, 2, 4) if args.tiny else (256, 8, 8)
    cfg = resolve_config("tiny-math", [
        f"task.data_dir={tiny_data}", "task.train_size=2000", f"model.path={model_dir}", "model.init=pretrained",
        f"model.device={args.device}", "model.dtype=bfloat16", f"model.lora_rank={16 if lora else 0}",
        "train.steps=5", "train.lr=1e-5", "train.rl_lr=1e-6", "train.sft_batch_size=8", f"train.prompts_per_step={prompts}",
        f"rl.group_size={group}", f"rl.max_new_tokens={new_tokens}", "amft.warmup_steps=1", "amft.meta_every=2",
        "amft.meta_prompts=2", "train.micro_batch_size=16", "train.eval_at_end=false", "train.save_every=5",
        f"task.reward={__name__}:char_sum_reward"])
    prepare(cfg, log=lambda msg: None)  # the data only (model.init = pretrained); kept if tiny_math made it
    return cfg


def section_qwen(args, work: Path, lora: bool) -> dict:
    cfg = qwen_config(args, work, lora)
    out = train_run(cfg, work / f"run-qwen-{'lora' if lora else 'full'}")
    return {"rollout_tokens": cfg.rl.max_new_tokens, "completions_per_step": cfg.train.prompts_per_step *
            cfg.rl.group_size, **out}


def section_sampler(args, work: Path) -> dict:
    """Our sampler vs model.generate: same bf16 model, prompts and number of new tokens (eos off)."""
    from amft_cli.data import load_split
    from amft_cli.encoding import encode_prompt
    from amft_cli.model import load_policy
    from amft_cli.rollout import _generate_batch, left_pad

    cfg = qwen_config(args, work, lora=False)
    device = torch.device(args.device)
    model, tok = load_policy(cfg.model, device, trainable=False)  # bf16 weights
    prompts = [encode_prompt(tok, ex["prompt"], False) for ex in load_split(cfg, "train")[: cfg.train.prompts_per_step]]
    n, new = cfg.rl.group_size, cfg.rl.max_new_tokens
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def ours():  # no stop token: never stops early, the same length as generate's below
        ids, _ = _generate_batch(model, prompts, n, pad_id=tok.pad_token_id, stop=[], max_new_tokens=new,
                                 greedy=False, temperature=1.0, top_p=1.0,
                                 generator=torch.Generator(device).manual_seed(0))
        return sum(map(len, ids))

    def theirs():  # full-vocabulary sampling like ours (generate's default top_k is 50)
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=tok.pad_token_id)
        return int(out[:, ids.shape[1]:].numel())

    result = {"rows": len(prompts) * n, "new_tokens": new}
    for name, fn in (("ours", ours), ("generate", theirs), ("ours_again", ours), ("generate_again", theirs)):
        sync()
        started = time.perf_counter()
        tokens = fn()
        sync()
        result[f"{name}_tokens_per_s"] = round(tokens / (time.perf_counter() - started), 1)
    result["speedup"] = round(result["ours_again_tokens_per_s"] / result["generate_again_tokens_per_s"], 2)
    return result


def section_fsdp(args, work: Path) -> dict:
    from amft_cli.cli import resolve_config
    from amft_cli.data import prepare
    from amft_cli.metrics import read_metrics

    if args.device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU here: FSDP needs one GPU per process (2)"}
    sets = [f"task.data_dir={work / 'tiny-math'}", f"model.path={work / 'tiny-math' / 'model'}",
            "task.train_size=2000", f"model.device={args.device}", "amft.warmup_steps=2", "amft.meta_every=2",
            "amft.meta_prompts=2", "train.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=12",
            "train.sft_batch_size=16", "train.eval_at_end=false", "train.save_every=8",
            "train.lr_schedule=constant", "task.reward=check:char_sum_reward"]
    prepare(resolve_config("tiny-math", sets), log=lambda msg: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "gpu")])}
    train = ["-m", "amft_cli", "train", "--preset", "tiny-math", *[a for s in sets for a in ("--set", s)],
             "--steps", "8", "--plain", "--run-dir"]
    launchers = {"one": [sys.executable],
                 "fsdp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "presets" / "math-qwen2.5.accelerate.yaml"), "--num_processes", "2"]}
    out: dict = {}
    for name, launcher in launchers.items():
        done = subprocess.run([*launcher, *train, str(work / f"run-{name}")], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            return {"ok": False, "error": f"{name}: exit {done.returncode}", "tail": (done.stdout + done.stderr)[-3000:]}
        out[f"{name}_sharded"] = "FSDP: weights, gradients and optimizer state sharded" in done.stdout
    one, two = (read_metrics(work / f"run-{name}") for name in launchers)
    diff = {k: max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-6) for a, b in zip(one, two) if a.get(k) is not None)
            for k in ("balance/mu", "loss/sft", "loss/total", "reward/mean", "optim/grad_norm")}
    ok = len(one) == len(two) == 8 and out["fsdp_sharded"] and max(diff.values()) < 1e-3
    return {**out, "steps": len(two), "meta_steps": sum(r.get("balance/meta_update", 0) for r in two),
            "max_relative_difference": diff, "ok": ok}


# ---------------------------------------------------------------------------
# the run


def run_section(report: dict, name: str, fn, args, out: Path) -> None:
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        entry = fn()
        entry.setdefault("ok", True)
    except Exception as e:  # noqa: BLE001 - a failing section is reported; the next one runs
        entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    entry["section_s"] = round(time.perf_counter() - started, 1)
    if args.device == "cuda":
        entry["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report["sections"][name] = entry
    report["ok"] = all(s.get("ok") for s in report["sections"].values())
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"[{entry['section_s']:7.1f} s] {name}: {'ok' if entry['ok'] else 'FAILED ' + entry.get('error', '')}",
          flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry run of every section")
    p.add_argument("--tiny", action="store_true", help="miniature sizes (the Qwen shape at 2 layers, short rollouts)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu-check.json"), help="report path")
    p.add_argument("--budget-tests", type=int, default=150, help="seconds for the gpu-marked tests")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu check: --device cuda, but torch sees no CUDA device here (--device cpu --tiny: a dry run on CPU)",
              file=sys.stderr)
        sys.exit(2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "ok": True, "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sections = [("env", lambda: section_env(args)), ("gpu_tests", lambda: section_gpu_tests(args)),
                    ("tiny_math", lambda: section_tiny_math(args, work)),
                    ("cli", lambda: section_cli(args, work)),
                    ("qwen_full", lambda: section_qwen(args, work, lora=False)),
                    ("qwen_lora", lambda: section_qwen(args, work, lora=True)),
                    ("sampler", lambda: section_sampler(args, work)),
                    ("fsdp", lambda: section_fsdp(args, work))]
        for name, fn in sections:
            if name not in args.skip.split(","):
                run_section(report, name, fn, args, out)
    print(f"report: {out} ({'all ok' if report['ok'] else 'FAILURES'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
