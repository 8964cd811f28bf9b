"""One model trained by several processes: data parallelism over the process group accelerate sets up.

    torchrun --nproc_per_node N $(which amft) train ...            CPU (gloo)
    accelerate launch --num_processes N $(which amft) train ...    GPU (nccl)

`accelerate launch --cpu` starts ONE process, so on CPU torchrun starts the ranks;
accelerate's PartialState then joins them (MULTI_CPU over gloo, or MULTI_GPU over nccl,
each rank on its own GPU). A single process never imports accelerate and talks to no one.

How the gradients are reduced. torch's DDP wrapper reduces gradients in backward() hooks
and does not support torch.autograd.grad, which the loop needs to keep g_SFT, g_RL and ∇U
apart. Instead, each process computes a signal's gradient on ITS share of the batch with
the loss normalised by WHOLE-batch counts (tokens, sequences), so the batch gradient is the
SUM of the processes' gradients: one all-reduce (sum) per signal, in flat buckets, before
anything reads it (`sum_grads`). Every process then holds the same g_SFT, g_RL and ∇U, so
dot products, μ and every controller decision come out the same everywhere without more
talk, and the same optimizer step keeps the replicas equal (checked every step on μ).

What is shared how (the loop, signals.py and policy.py call these; methods see only `Run`):
  - the data streams are drawn whole on every process (same seed, same cursors), and each
    process takes a contiguous share of the prompts (`shard`): a GRPO group never straddles
    processes; rollout randomness is per row (rollout.row_uniforms), so samples do not depend
    on how the prompts are shared out;
  - metrics are computed from gathered per-row values or summed counts: globally reduced;
  - only the main process (rank 0) writes the run directory (lock, config, metrics,
    checkpoints, dashboard); every process reads the checkpoint when resuming.

Sharded (FSDP2) training, for models whose weights, gradients and optimizer state do not fit
one device: `accelerate launch --config_file presets/accelerate/<preset>.yaml` sets
ACCELERATE_USE_FSDP, and sharding.py shards the model with torch's fully_shard as accelerate's
FSDP plugin configures it. Backward() then reduce-scatters each signal's gradient (summed, the
same whole-batch normalisers), so each process holds ITS shard of g_SFT, g_RL and ∇U. Every
flattened vector (`flat`) is this process's part — its shards, plus on the main process only
the parameters FSDP leaves whole — and a dot product or norm is the sum of the local parts'
products over the processes (`dot`): each coordinate counted once, as FSDP's clip_grad_norm_.
Element-wise work (the AdamW lookahead dθ'/dμ) stays local.

torch is imported only where processes talk, so `amft train`'s config errors stay fast.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BUCKET = 1 << 25  # gradient elements per all-reduce (128 MiB of fp32)
# How long a process waits at a collective for the others. The main process alone prepares the
# data (downloads), evaluates before and after training and writes checkpoints while the others
# wait; NCCL's default of 10 minutes would end a run whose 7B download or 500-problem evaluation
# takes longer. A process that dies ends the others at once (torchrun stops the group).
TIMEOUT_S = 4 * 3600


class Processes:
    """This process's place among the processes training one model; one process by default."""

    def __init__(self, count: int = 1, rank: int = 0, device: torch.device | None = None,
                 sharded: bool = False) -> None:
        self.count, self.rank, self._device = count, rank, device
        self.sharded = sharded  # FSDP: each process holds a shard of the weights and gradients

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, configured: torch.device) -> torch.device:
        """The device this process trains on: its own GPU when several processes share a machine."""
        if self.count > 1 and configured.type == "cuda" and self._device is not None:
            return self._device
        return configured

    # --- sharing out work

    def share(self, total: int) -> slice:
        """This process's contiguous part of `total` items (sizes differ by at most one)."""
        base, extra = divmod(total, self.count)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def shard(self, items: list) -> list:
        """This process's share of a list that every process holds whole."""
        if self.count == 1:
            return items
        if len(items) < self.count:
            raise ValueError(f"{len(items)} items cannot be shared out over {self.count} processes: every "
                             "process needs at least one (raise the batch knobs or use fewer processes)")
        return items[self.share(len(items))]

    # --- collectives (no-ops in one process)

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in rank order (= the order of `shard`)."""
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes (float64)."""
        if self.count == 1:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_grads(self, grads: list) -> list:
        """All-reduce (sum) a gradient list (tensors) in place, in flat buckets of one dtype.
        Sharded: backward() already reduce-scattered them (sharding.py)."""
        if self.count == 1 or self.sharded:
            return grads
        import torch

        bucket: list[torch.Tensor] = []
        for g in grads + [None]:
            if bucket and (g is None or g.dtype != bucket[0].dtype or g.device != bucket[0].device
                           or sum(t.numel() for t in bucket) + g.numel() > BUCKET):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                torch.distributed.all_reduce(flat)
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(part.view_as(t))
                bucket = []
            if g is not None:
                bucket.append(g)
        return grads

    # --- vectors over all parameters (the controller's dot products)

    def parts(self, tensors: list, params: list) -> list[torch.Tensor]:
        """This process's part of each per-parameter tensor (None: zeros), flattened float32 views
        where no copy is needed, in parameter order. One process or data parallel: every tensor
        whole. Sharded: its shard of each sharded parameter, and the parameters FSDP left whole
        on the main process only (so every coordinate is counted once over the processes)."""
        import torch

        out = []
        for t, p in zip(tensors, params):
            t = torch.zeros_like(p) if t is None else t
            if hasattr(t, "to_local"):  # a DTensor: this process's shard
                t = t.to_local()
            elif self.sharded and not self.is_main:  # whole on every process: counted on the main one
                continue
            out.append(t.detach().reshape(-1).float())
        return out

    def flat(self, tensors: list, params: list) -> torch.Tensor:
        """This process's part of the (P,) vector of per-parameter tensors: `parts`, concatenated."""
        import torch

        parts = self.parts(tensors, params)
        return torch.cat(parts) if parts else torch.zeros(0)

    def dots(self, pairs: list[tuple[list, list]]) -> list[float]:
        """⟨a, b⟩ over all coordinates for each pair of `parts` lists, one reduction for all pairs."""
        import torch

        local = [sum(torch.dot(x, y).item() for x, y in zip(a, b)) for a, b in pairs]
        return self.sum_floats(local) if self.sharded else local

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """⟨a, b⟩ of two vectors made by `flat`: sharded, the sum of the processes' local products."""
        import torch

        local = torch.dot(a.float(), b.float()).item()
        return self.sum_floats([local])[0] if self.sharded else local

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (e.g. a Ctrl-C seen by one rank)."""
        return bool(self.sum_floats([float(flag)])[0]) if self.count > 1 else flag

    def check_same(self, value: float, what: str) -> None:
        """Stop when the processes disagree on a value every one of them computes (a bug: the
        replicas have drifted apart)."""
        if self.count == 1:
            return
        values = self.gather([value])
        if any(v != values[0] for v in values):
            raise RuntimeError(f"the {self.count} training processes disagree on {what}: {values}")

    def barrier(self) -> None:
        if self.count > 1:
            import torch

            torch.distributed.barrier()

    def _comm_device(self) -> torch.device:
        import torch

        return self._device if self._device is not None and torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")


_current: Processes | None = None


def current() -> Processes:
    """This process's `Processes`, joined on first use: WORLD_SIZE > 1 (set by torchrun and
    accelerate launch) starts accelerate's PartialState, on CPU over gloo when there is no GPU
    or ACCELERATE_USE_CPU is set; ACCELERATE_USE_FSDP (an FSDP config) shards the model."""
    global _current
    if _current is None:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            _current = Processes()
        else:
            from datetime import timedelta

            import torch
            from accelerate import PartialState

            cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
            state = PartialState(cpu=cpu, timeout=timedelta(seconds=TIMEOUT_S))
            fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
            _current = Processes(state.num_processes, state.process_index, state.device, sharded=fsdp)
    return _current


def several() -> bool:
    """This process is one of several that have joined (without joining them)."""
    return _current is not None and _current.count > 1


def shutdown(code: int) -> None:
    """End a process of several with exit status `code`, without Python's interpreter teardown.

    Why: a gloo worker thread that releases the tensors of a recent collective while the
    interpreter tears down needs the GIL it can no longer get, and aborts the process ("terminate
    called without an active exception", SIGABRT; core dump: ProcessGroupGloo::AsyncWork's
    destructor in a runLoop thread while the main thread is in Py_FinalizeEx) after a run that
    succeeded: 2 of 60 two-process `amft train` runs here. destroy_process_group would join those
    threads first, but only when nothing else holds the group, and torch itself does:
    torch.distributed.nn.functional takes `group.WORLD` as default arguments when imported
    (transformers' model imports do, after the group exists), DTensor's sharding caches keep
    FSDP's device mesh. So, as accelerate's end_training, leave the group; then run the
    atexit handlers and flush, while Python still works, and exit. One process: nothing to do."""
    if not several():
        return
    import atexit
    import sys

    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()  # logging's flush, the verifier pool's close, ...
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
