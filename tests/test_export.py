"""`amft export`: a run's checkpoint as a plain model folder that transformers loads without peft or
this project, computing what the trained policy computes; refusals in one line, no half folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from typer.testing import CliRunner

from amft_cli.fsio import staged_folder
from amft_cli.cli import app, resolve_config
from amft_cli.model import load_policy
from amft_cli.train import train
from amft_runs import one_line_error, snapshot, tiny_sets


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """A 3-step SFT run with LoRA adapters and one with full fine-tuning."""
    root = tmp_path_factory.mktemp("export-runs")
    for name, rank in (("lora", 4), ("full", 0)):
        sets = tiny_sets(tiny_data) + [f"model.lora_rank={rank}", "train.steps=3", "train.eval_at_end=false",
                                       "train.lr=1e-2"]
        train(resolve_config("tiny-math", sets, algo="sft"), root / name, on_message=lambda msg: None)
    return root


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def export_cli(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def test_a_lora_run_exports_merged_weights_that_plain_transformers_loads(runs, tiny_data, tmp_path):
    run, out = runs / "lora", tmp_path / "exported"
    result = export_cli("--run", str(run), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "LoRA adapters merged" in result.output and str(out) in result.output
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"}
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no peft involved
    assert not hasattr(plain, "peft_config")
    cfg = resolve_config(str(run / "config.toml"), [])
    trained, tokenizer = load_policy(replace(cfg.model, path=str(run / "checkpoints" / "step-3")),
                                     torch.device("cpu"), trainable=False)
    assert hasattr(trained, "peft_config")
    base, _ = load_policy(replace(cfg.model, lora_rank=0), torch.device("cpu"), trainable=False)
    ids = torch.tensor([tokenizer.encode("12+3*4=")])
    assert torch.allclose(logits(plain, ids), logits(trained, ids), atol=1e-5)
    assert not torch.allclose(logits(plain, ids), logits(base, ids), atol=1e-3)  # the adapters are in it
    assert AutoTokenizer.from_pretrained(out).encode("12+3*4=") == tokenizer.encode("12+3*4=")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_a_full_run_exports_its_weights_in_the_asked_dtype(runs, tmp_path):
    step = runs / "full" / "checkpoints" / "step-3"
    saved = load_file(step / "model.safetensors")
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert export_cli("--run", str(runs / "full"), "--out", str(out), "--dtype", dtype).exit_code == 0
        exported = load_file(out / "model.safetensors")
        assert exported.keys() == saved.keys()
        assert all(torch.equal(exported[k], saved[k].to(getattr(torch, dtype))) for k in saved)
        assert not (out / "trainer_state.pt").exists()


def test_checkpoints_and_exports_are_readable_as_the_umask_says(runs, tmp_path):
    """safetensors writes model.safetensors 0600; on a shared machine a checkpoint or an export is
    then unreadable to the colleagues who can read every other file of it."""
    import os

    umask = os.umask(0o027)  # group may read, others not: not a mode anything writes by default
    try:
        assert export_cli("--run", str(runs / "full"), "--out", str(tmp_path / "x")).exit_code == 0
    finally:
        os.umask(umask)
    for folder, mode in ((runs / "full" / "checkpoints" / "step-3", 0o666 & ~umask), (tmp_path / "x", 0o640)):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert modes["model.safetensors"] == mode and set(modes.values()) == {mode}, modes


def test_refusals_are_one_line_and_change_nothing(runs, tmp_path, amft):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    run = ["export", "--run", str(runs / "full")]
    one_line_error(amft(*run, "--out", str(out)), f"--out {out}: already exists; pass --overwrite")
    one_line_error(amft(*run, "--out", str(tmp_path / "new"), "--dtype", "int8"),
                   "--dtype 'int8': expected float32, bfloat16, float16")
    one_line_error(amft(*run, "--out", str(tmp_path / "new"), "--step", "2"), "step")
    one_line_error(amft("export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "new")),
                   str(tmp_path / "nothing"))
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()
    # --out at the run, in it or above it would, with --overwrite, replace the run's own files
    kept = snapshot(runs)
    full = (runs / "full").resolve()
    for where, target in (("is the run", runs / "full"), ("is inside the run", runs / "full" / "checkpoints" / "step-3"),
                          ("is inside the run", runs / "full" / "eval"), ("holds the run", runs)):
        one_line_error(amft(*run, "--out", str(target), "--overwrite"), f"--out {target}: {where} {full}; export to")
    assert snapshot(runs) == kept
    assert export_cli("--run", str(runs / "full"), "--out", str(out), "--overwrite").exit_code == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_an_export_that_fails_half_way_leaves_the_old_folder_and_no_debris(runs, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    assert export_cli("--run", str(runs / "full"), "--out", str(out)).exit_code == 0
    before = snapshot(tmp_path)

    def half_written(self, folder, **kwargs):  # the disk fills up in the middle of the weights
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    result = export_cli("--run", str(runs / "full"), "--out", str(out), "--overwrite")
    assert result.exit_code != 0 and "no space left" in str(result.exception).lower()
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_a_staged_folder_replaces_the_old_one_only_once_it_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rename = Path.rename

    def fails_for_the_new_folder(self, target):
        if self.name.startswith(".out-"):
            raise OSError(18, "Invalid cross-device link")
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", fails_for_the_new_folder)
    with pytest.raises(OSError), staged_folder(out) as new:
        (new / "model.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    monkeypatch.setattr(Path, "rename", rename)
    with staged_folder(out) as new:
        (new / "model.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["model.txt"]


def test_json_puts_one_document_on_stdout(runs, tmp_path, amft):
    result = amft("export", "--run", str(runs / "lora"), "--out", str(tmp_path / "x"), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # nothing else on stdout; the human line went to stderr
    assert document["command"] == "export" and document["step"] == 3 and document["merged_lora"] is True
    assert document["out"] == str(tmp_path / "x") and document["dtype"] == "float32"
    weights = load_file(tmp_path / "x" / "model.safetensors")
    assert document["parameters"] == sum(t.numel() for t in weights.values()) and "exported" in result.stderr
