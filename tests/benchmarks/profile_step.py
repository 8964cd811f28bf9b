"""Where a GRPO step's time goes: torch.profiler over bench_step.py's GRPO row, and one MLP op alone.

    python tests/benchmarks/profile_step.py [--steps 3] [--threads 1] [--rows 20]

Prints the ops of `--steps` profiled steps (after two unprofiled ones) by self CPU
time, then grouped by input shape; then the MLP's `act(gate) * up` product of the
trainer's shape timed alone, once writing into a reused output (cache-hot) and once
keeping every output alive, as autograd keeps activations for the backward. The gap
between the in-step time of that `mul` and the first of these is what memory, not
arithmetic, costs the step. Profiler times include its own per-op overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (also puts the checkout on sys.path)


def median_ms(fn, repeats: int = 40) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def mul_alone(shape: tuple[int, ...]) -> None:
    import torch

    a, b, out = torch.randn(shape), torch.randn(shape), torch.empty(shape)
    kept = []
    reused = median_ms(lambda: torch.mul(a, b, out=out))
    fresh = median_ms(lambda: kept.append(a * b))
    megabytes = a.numel() * 4 / 1e6
    print(f"\nmul {list(shape)} alone ({megabytes:.1f} MB per tensor): {reused:.2f} ms into a reused output, "
          f"{fresh:.2f} ms with every output kept alive")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after two unprofiled ones)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rows", type=int, default=20, help="rows of each table")
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    # every backward, as TRL's step (every reward of this work is 0: the default skip would run none)
    row = bench_step.OursRow("ours GRPO (rl)", "rl", 10**9, "float32", extra=("rl.skip_zero_advantage=false",))
    for _ in range(2):
        row.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            row.step()
    print(f"{args.steps} GRPO steps of bench_step.py's work, {args.threads} thread(s)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=32))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=24, max_shapes_column_width=60))
    # the trainer's MLP activation: (completions, completion tokens after the first, intermediate size)
    config = row.run.policy.model.config
    mul_alone((bench_step.PROMPTS * bench_step.GROUP, bench_step.MAX_NEW_TOKENS - 1, config.intermediate_size))


if __name__ == "__main__":
    main()
