"""`amft export`: a run's checkpoint as one plain Hugging Face model folder, to serve or share.

A checkpoint (checkpoint.py) is a model folder plus trainer_state.pt (the optimizer's moments:
twice the weights again), and a LoRA checkpoint holds only its adapter, which needs the base
model beside it. The export loads the checkpoint in float32 on the CPU, merges LoRA adapters
into the base weights there (peft's merge_and_unload: W + BA summed in float32, then rounded
once to the export dtype), and saves the model (safetensors) with its tokenizer, chat template
and generation config (the end-of-turn stop load_policy adds). The result loads with
`AutoModelForCausalLM.from_pretrained(DIR)` or vLLM's `LLM(model=DIR)`, without peft or this
project. It is written under a temp name beside DIR and renamed into place, so an interrupted
export leaves no half folder, and `--overwrite` replaces an old export only once the new one
is complete. Needs RAM for the weights in float32 (a 7B model: ~28 GB).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from amft_cli.config import Config
from amft_cli.fsio import staged_folder, user_io
from amft_cli.model import DTYPES, load_policy


class ExportError(ValueError):
    """An export that cannot be written as asked; printed as one line."""


def _outside_the_run(out: Path, run: Path) -> None:
    """--out may not be the run, a folder in it (its checkpoints, eval/) or one holding it:
    with --overwrite the export would replace what the run has."""
    target, run = out.resolve(), run.resolve()
    where = ("is the run" if target == run else "is inside the run" if run in target.parents
             else "holds the run" if target in run.parents else "")
    if where:
        raise ExportError(f"--out {out}: {where} {run}; export to a folder outside it")


def export_checkpoint(checkpoint: Path, cfg: Config, out: Path, dtype: str | None = None,
                      overwrite: bool = False) -> dict:
    """Write checkpoint (a run's step-N folder, trained with cfg) to `out` as a plain model in
    `dtype` (default: the run's model.dtype). Returns what was written: out, dtype, whether LoRA
    adapters were merged, parameter count and bytes on disk."""
    dtype = dtype or cfg.model.dtype
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected {', '.join(DTYPES)}")
    out = Path(out)
    _outside_the_run(out, Path(checkpoint).parent.parent)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"--out {out}: already exists{'' if out.is_dir() else ' as a file'}; pass --overwrite "
                          "to replace it, or name a new folder")
    mcfg = replace(cfg.model, path=str(checkpoint), dtype="float32", device="cpu", gradient_checkpointing=False)
    model, tokenizer = load_policy(mcfg, torch.device("cpu"), trainable=False)
    merged = hasattr(model, "merge_and_unload")
    if merged:
        model = model.merge_and_unload()
    model = model.to(getattr(torch, dtype))
    with user_io(out, "writing the exported model"), staged_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "dtype": dtype, "merged_lora": merged,
            "parameters": sum(p.numel() for p in model.parameters()), "bytes": size}

