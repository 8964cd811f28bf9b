"""Peak memory of AMFT training steps, counted in float32 vectors of the model's size P.

    python tests/benchmarks/bench_memory.py [--hidden 512] [--layers 8] [--steps 4] [--meta-every 1]

Builds a from-scratch tiny-math model of the given width and depth in a temporary folder
(`amft prepare`, in a child process so its own peak does not count), then trains it for
--steps AMFT steps (one warm-up step, then mixed steps; a meta-gradient step every
--meta-every steps) and reports the process's peak resident memory above what it held
after setting up the trainer, divided by 4·P bytes. Weights, AdamW's two moments, the two
signals' gradients and the meta-gradient's vectors are each one such vector, so the count
says how many whole-model copies a step keeps alive at its peak.

Measured 2026-11-27 (P = 27.4M: hidden 512, 8 layers; tiny-math's two AdamWs; 4 steps,
3 of them meta-gradient steps): peak 3.28 GB, 26.5 vectors above setup, at 2cd107a; 1.98 GB,
14.6 vectors, once the lookahead went one parameter at a time (train.update_derivative);
1.86 GB, 13.6, once AMFT let go of a lookahead after using it (it held it until the next
meta step). What is left at the peak: the weights, four AdamW moments, the two signals'
gradients, the lookahead's three vectors, ∇U and its gradient list, and temporaries.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable from a checkout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--meta-every", type=int, default=1)
    p.add_argument("--data", help=argparse.SUPPRESS)  # the child's folder (internal)
    args = p.parse_args()
    if args.data is None:
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, __file__, *sys.argv[1:], "--data", tmp]
            subprocess.run(argv + ["--steps", "0"], check=True)  # prepare only
            subprocess.run(argv, check=True)
        return

    import torch

    from amft_cli import train
    from amft_cli.cli import resolve_config
    from amft_cli.data import prepare

    torch.set_num_threads(1)
    sets = [f"task.data_dir={args.data}", f"model.path={args.data}/model", "task.train_size=300",
            "task.val_size=32", "task.test_size=8", "task.ood_size=8", f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}", f"model.num_heads={max(1, args.hidden // 64)}",
            "train.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4", "train.sft_batch_size=2",
            "amft.warmup_steps=1", "amft.meta_prompts=1", "train.eval_at_end=false",
            f"amft.meta_every={args.meta_every}"]
    cfg = resolve_config("tiny-math", sets, algo="amft")
    if args.steps == 0:
        prepare(cfg, log=lambda msg: None)
        return
    run, method, optimizers = train.setup(cfg, on_message=lambda msg: None)
    size = 4 * sum(p.numel() for p in run.policy.params)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meta = 0
    for _ in range(args.steps):
        meta += train.train_step(run, method, optimizers).get("balance/meta_update", 0.0)
        run.cursors.step += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"P = {size // 4:,} ({size / 1e6:.0f} MB per float32 vector); {args.steps} steps, {meta:.0f} meta-gradient; "
          f"after setup {base / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB: {(peak - base) / size:.1f} vectors above setup")


if __name__ == "__main__":
    main()
