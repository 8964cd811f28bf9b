"""`amft export`: a run's checkpoint as one plain model folder (the work is in export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from amft_cli.cli_options import JSON_OUT, emit_json, stdout_reserved
from amft_cli.dashboard import output_console

console = output_console()


def export_cmd(out: Path = typer.Option(..., "--out", help="Folder to write the model to (created; must not exist "
                                        "or be empty, unless --overwrite)."),
               run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: the most recently trained "
                                                  "under runs/)."),
               step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the latest)."),
               dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: "
                                                   "the run's model.dtype)."),
               overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds, once the new "
                                              "folder is complete."),
               json_out: bool = JSON_OUT):
    """Write a run's checkpoint as one plain Hugging Face model folder (LoRA merged, no trainer state).

    What transformers or vLLM load to serve or share it.

    Example: amft export --run runs/tiny-math --out exported/tiny-math
    """
    from amft_cli import rundir
    from amft_cli.export import export_checkpoint

    with stdout_reserved(json_out) as stdout:
        if run is None:
            run = rundir.latest_run()
            console.print(f"[dim]using the most recent run: {run}[/]")
        cfg = rundir.read_config(run)  # first: a folder that is not a run is named as such
        checkpoint = rundir.resolve_checkpoint(run, step)
        done = export_checkpoint(checkpoint, cfg, out, dtype, overwrite)
        merged = ", LoRA adapters merged" if done["merged_lora"] else ""
        console.print(f"exported {checkpoint} to {done['out']}: {done['parameters']:,} parameters in "
                      f"{done['dtype']}{merged}, {done['bytes'] / 1e6:.1f} MB", highlight=False)
        if json_out:
            emit_json({"command": "export", "run": str(run), "step": rundir.checkpoint_step(checkpoint), **done}, stdout)
