"""LoRA through the whole engine: only adapters train, checkpoints hold adapters, resume and eval load them."""

from __future__ import annotations

import subprocess

import torch
from safetensors.torch import load_file

from amft_cli.cli import resolve_config
from amft_cli.data import prepare
from amft_cli.model import load_policy
from test_train import AMFT, ENV, small_sets


def test_lora_run_trains_adapters_resumes_and_evaluates(tmp_path):
    data = tmp_path / "data"
    sets = [s for s in small_sets(data) if not s.startswith("train.steps=")]
    sets += ["model.lora_rank=4", "train.save_every=3", "train.eval_at_end=false"]
    prepare(resolve_config("tiny-math", sets), log=lambda msg: None)
    run = tmp_path / "run"
    args = [AMFT, "train", "--algo", "mix", "--plain", "--run-dir", str(run)] + [f"--set={s}" for s in sets]
    first = subprocess.run(args + ["--steps", "3"], env=ENV, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    ckpt = run / "checkpoints" / "step-3"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained

    resumed = subprocess.run([AMFT, "train", "--resume", str(run), "--steps", "6", "--plain"],
                             env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and (run / "checkpoints" / "step-6").is_dir()

    cfg = resolve_config("tiny-math", sets + [f"model.path={run / 'checkpoints' / 'step-6'}"])
    model, _ = load_policy(cfg.model, torch.device("cpu"), trainable=False)
    assert hasattr(model, "peft_config")
    ev = subprocess.run([AMFT, "eval", "--run", str(run), "--limit", "4", "--k", "1"], env=ENV,
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert (run / "eval" / "test.json").is_file()
