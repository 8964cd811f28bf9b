"""Seconds per AMFT training step of one preset under several values of one config knob.

    python tests/benchmarks/bench_knob.py [--preset smol-math] [--key model.attention] [--values sdpa,eager]
                                          [--steps 7] [--threads 2]

Each value trains its own freshly loaded policy with the preset's work, AMFT without
warm-up (every step is a mixed step: the SFT batch plus rollouts; no meta-gradient step),
steps interleaved in rounds so machine load hits every value alike; the first round is
dropped (it measures H* and warms caches) and each row reports the medians of the rest.
Needs the preset prepared (`amft prepare --preset P`). How the tiny presets' eager attention
and smol-math's sdpa were checked (README, Speed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol-math")
    parser.add_argument("--key", default="model.attention", help="the config key to vary")
    parser.add_argument("--values", default="sdpa,eager", help="comma-separated values of --key")
    parser.add_argument("--steps", type=int, default=7, help="rounds, the first one dropped")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from amft_cli import train
    from amft_cli.cli import resolve_config

    torch.set_num_threads(args.threads)
    rows = {}
    for value in args.values.split(","):
        cfg = resolve_config(args.preset, [f"{args.key}={value}", "amft.warmup_steps=0",
                                           f"amft.meta_every={10**9}", "train.eval_at_end=false"], algo="amft")
        rows[value] = (*train.setup(cfg, on_message=lambda msg: None), [])
    for _ in range(args.steps):
        for run, method, optimizers, records in rows.values():
            started = time.perf_counter()
            metrics = train.train_step(run, method, optimizers)
            run.cursors.step += 1
            records.append((time.perf_counter() - started, metrics["time/rollout_s"]))
    print(f"{args.preset}, {args.key}: median of {args.steps - 1} interleaved AMFT steps after one dropped, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{'value':<12}{'s/step':>8}{'rollout s':>11}")
    for value, (*_, records) in rows.items():
        kept = records[1:]
        print(f"{value:<12}{statistics.median(r[0] for r in kept):8.3f}{statistics.median(r[1] for r in kept):11.3f}")


if __name__ == "__main__":
    main()
