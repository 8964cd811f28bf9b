"""FSDP2 for models that do not fit one device: shard the model, gather it for checkpoints.

Chosen by an accelerate FSDP config (`accelerate launch --config_file presets/accelerate/...`,
parallel.py): accelerate's FullyShardedDataParallelPlugin reads that config and picks the
modules to shard (fsdp2_prepare_auto_wrap_policy: the transformer layer class, by default the
model's `_no_split_modules`), and torch's `fully_shard` shards each of them, then the root, as
accelerate's own fsdp2_prepare_model does. accelerate applies FSDP only to GPU process groups
(on CPU its Accelerator falls back to DDP), so this module calls the same torch API directly:
one code path for GPUs and for the CPU test (tests/test_parallel.py, gloo).

Gradients. Each process differentiates its share of a batch with whole-batch normalisers
(policy.grads_in_chunks), so the batch gradient is the SUM over processes: FSDP's
reduce-scatter averages, and grads_in_chunks multiplies the average by the process count (exact
for powers of two; a custom divide factor needs ReduceOp.PREMUL_SUM, which gloo lacks, so the
CPU test could not run the GPU code path). torch.autograd.grad does
not reach sharded parameters (it returns None for them), so the sharded path uses backward()
and reads each parameter's gradient shard.

Checkpoints hold the full weights and full optimizer state (gathered on every process, written
by the main one), so a checkpoint loads like any Hugging Face folder and resumes the same.
"""

from __future__ import annotations

import torch

from amft_cli.parallel import Processes


def shard_model(model: torch.nn.Module, dist: Processes) -> torch.nn.Module:
    """Shard `model` in place over dist's processes as accelerate's FSDP plugin configures."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = FullyShardedDataParallelPlugin()  # FSDP_* variables set by accelerate launch
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.count,))
    kwargs = {"mesh": mesh, "reshard_after_forward": plugin.reshard_after_forward,
              "offload_policy": plugin.cpu_offload, "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [m for m in model.modules() if m is not model and wrap is not None and wrap(m)]
    for module in units + [model]:
        fully_shard(module, **kwargs)
    return model


def full_model_state(model: torch.nn.Module) -> dict:
    """The full state dict on the main process ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on the main process; every process must call it. An optimizer
    that has not stepped yet (split mode's RL AdamW during AMFT's warm-up) is saved as it is:
    torch's get_optimizer_state_dict would first take a zero step on it, and its step count 1
    would change the bias correction of its first real step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (full_optimizer_state) into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state["state"]:  # never stepped: no zero step (full_optimizer_state), only its settings
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
