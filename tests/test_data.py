"""`amft prepare`: cached by a record of what built each folder, rebuilt when stale, and the
pretraining of the tiny base model on the task's mix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from amft_cli.cli import resolve_config
from amft_cli.data import is_prepared, is_stale, prepare
from amft_cli.model import load_policy
from amft_cli.pretrain import _sft_batch
from amft_cli.policy import Policy, sequence_logprobs
from amft_cli.tasks.base import read_jsonl


def gp_cfg(tmp_path, *sets: str):
    return resolve_config("tiny-gp", [
        f"task.data_dir={tmp_path}/data", f"model.path={tmp_path}/data/model", "task.train_size=64",
        "task.val_size=8", "task.test_size=8", "task.ood_size=8", "task.pretrain_size=64",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.pretrain_steps=0", *sets])


def weights(cfg) -> dict:
    return load_file(f"{cfg.model.path}/model.safetensors")


def test_sft_batch_labels_only_the_completion():
    ids, attention, labels = _sft_batch([([1, 2], [3, 4]), ([5], [6])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, 3, 4], [-100, 6, -100, -100]]


def test_prepare_is_cached_and_rebuilds_what_is_stale(tmp_path):
    cfg = gp_cfg(tmp_path)
    assert not is_prepared(cfg)
    sizes = prepare(cfg, log=lambda m: None)
    assert sizes["pretrain"] == 64 and is_prepared(cfg)
    record = json.loads((tmp_path / "data" / "prepared.json").read_text())
    assert record["train_size"] == 64 and "data_dir" not in record and record["data_version"] == 2
    before = weights(cfg)
    assert prepare(cfg, log=lambda m: None) == {}  # nothing to do
    # another data size: the data is stale, so is the model built from it (same init seed: same weights)
    bigger = gp_cfg(tmp_path, "task.train_size=80")
    assert not is_prepared(bigger)
    assert prepare(bigger, log=lambda m: None)["train"] == 80 and is_prepared(bigger) and not is_prepared(cfg)
    assert all(torch.equal(before[k], v) for k, v in weights(bigger).items())
    # the run's seed does not change the base model; a pretraining knob does
    assert is_prepared(gp_cfg(tmp_path, "task.train_size=80", "seed=5"))
    assert not is_prepared(gp_cfg(tmp_path, "task.train_size=80", "model.pretrain_steps=2"))
    # no pretraining asked: a pretrain split left from an earlier config goes away
    prepare(gp_cfg(tmp_path, "task.pretrain_size=0"), log=lambda m: None)
    assert not (tmp_path / "data" / "pretrain.jsonl").exists()
    assert not list(tmp_path.glob("data/.model-*"))  # no half-built model folders left behind


def test_pretraining_fits_the_mix_demonstrations(tmp_path):
    steps = []
    cfg = gp_cfg(tmp_path, "model.pretrain_steps=40", "model.pretrain_lr=3e-3", "model.pretrain_batch_size=16")
    prepare(gp_cfg(tmp_path), log=lambda m: None)  # the same base, not pre-trained
    mix = read_jsonl(tmp_path / "data" / "pretrain.jsonl")

    def nll() -> float:
        model, tokenizer = load_policy(cfg.model, trainable=False)
        policy = Policy(model, tokenizer, torch.device("cpu"))
        pairs = [policy.demo_ids(ex) for ex in mix]
        logprobs, _, mask = sequence_logprobs(policy, [p for p, _ in pairs], [c for _, c in pairs], grad=False)
        return -(logprobs * mask).sum().item() / mask.sum().item()

    untrained = nll()
    logs = []
    prepare(cfg, log=logs.append, on_pretrain_step=lambda step, total, loss: steps.append((step, total)))
    assert steps[0] == (1, 40) and steps[-1] == (40, 40)
    assert any("pre-trained 40 steps on 64 mixed examples" in m for m in logs)
    assert nll() < untrained - 0.5  # the demonstrations of the mix, given their prompts
    assert is_prepared(cfg)


def test_pretraining_needs_a_mix():
    with pytest.raises(ValueError, match="task.pretrain_size"):
        resolve_config("tiny-gp", ["model.pretrain_steps=10", "task.pretrain_size=0"])


def test_a_folder_without_record_is_kept_unless_it_lacks_the_mix(tmp_path):
    cfg = gp_cfg(tmp_path)
    prepare(cfg, log=lambda m: None)
    (tmp_path / "data" / "prepared.json").unlink()  # as placed by hand, or written before records existed
    (tmp_path / "data" / "pretrain.jsonl").unlink()
    assert not is_stale(gp_cfg(tmp_path, "task.pretrain_size=0"))  # hand-placed data is taken as it is
    assert is_stale(cfg) and not is_prepared(cfg)  # but the mix this config pre-trains on is missing
    assert prepare(cfg, log=lambda m: None)["pretrain"] == 64 and is_prepared(cfg)


def test_a_prepare_killed_while_writing_is_redone_in_full(tmp_path):
    """A kill between split files (SIGKILL, or SIGTERM as a repeat of the command is told to fix it)
    left a folder that prepare and train took as done, missing val/test/ood: the `.preparing`
    marker, there until the record is written, makes it stale; a writer's temp files go too."""
    import subprocess
    import sys

    from amft_cli.data import WRITING
    from amft_cli.fsio import staged_folder

    cfg = gp_cfg(tmp_path)
    prepare(cfg, log=lambda m: None)
    data = tmp_path / "data"
    good = {p.name: p.read_bytes() for p in data.glob("*.jsonl")}
    (data / WRITING).touch()  # as a kill after train.jsonl leaves it
    for name in ("val.jsonl", "test.jsonl", "ood.jsonl"):
        (data / name).unlink()
    (data / ".ood.jsonl.tmp").write_text("half")
    assert is_stale(cfg) and not is_prepared(cfg)
    assert prepare(cfg, log=lambda m: None)["ood"] == 8
    assert {p.name: p.read_bytes() for p in data.glob("*.jsonl")} == good and is_prepared(cfg)
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == []

    # the tiny model's (or an export's) staged folder, of a process killed with SIGKILL
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has ended
    model = data / "model"
    (data / f".model-{pid}-x1y2").mkdir()  # its half-built temp folder
    model.rename(data / f".model.old-{pid}")  # killed between moving the old folder aside and the rename
    (data / f".model-{os.getpid()}-live").mkdir()  # a live process's: left alone
    with staged_folder(model) as new:
        (new / "config.json").write_text("{}")
        assert (data / "model" / "model.safetensors").is_file()  # the old folder is back before the new one moves
    assert (model / "config.json").read_text() == "{}"
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == [f".model-{os.getpid()}-live"]
