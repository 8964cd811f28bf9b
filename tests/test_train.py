"""The training engine end to end on tiny generated data: every algo's μ and metrics,
exact resume after Ctrl-C, checkpoints that survive SIGKILL, and the two update modes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amft_cli.checkpoint import checkpoint_dirs, load_trainer_state, save_checkpoint
from amft_cli.cli import resolve_config
from amft_cli.config import Config
from amft_cli.config_io import load_preset
from amft_cli.data import prepare
from amft_cli.metrics import read_metrics
from amft_cli.policy import Policy
from amft_cli.train import apply_update, make_optimizers, train

AMFT = str(Path(sys.executable).parent / "amft")
# PYTHONPATH: subprocesses import this module's scrambled_reward as task.reward
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
W, K = 4, 3  # amft.warmup_steps, amft.meta_every of the small runs
DESIGN_KEYS = {"loss/sft", "loss/rl", "balance/mu", "balance/meta_grad", "balance/entropy_term",
               "policy/entropy", "reward/mean", "reward/std", "reward/accuracy", "rollout/len_mean",
               "rollout/tokens_per_s", "time/step_s", "time/rollout_s"}
RL_KEYS = {"loss/rl", "reward/mean", "policy/entropy", "time/rollout_s"}


def small_sets(data_dir: Path) -> list[str]:
    """--set overrides that make a tiny-math-like run take a few seconds."""
    return [f"task.data_dir={data_dir}", f"model.path={data_dir / 'model'}", "task.train_size=500",
            "task.val_size=32", "task.test_size=32", "task.ood_size=32", "train.steps=12",
            "train.sft_batch_size=8", "train.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=12",
            f"amft.warmup_steps={W}", f"amft.meta_every={K}", "amft.meta_prompts=2", "train.eval_limit=20",
            "train.log_every=1", "eval.batch_size=64", "model.pretrain_steps=0", "task.pretrain_size=0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-math-data")
    prepare(resolve_config("tiny-math", small_sets(path)), log=lambda msg: None)
    return path


def scrambled_reward(prompts, completions, **columns):
    """A custom reward with signal even for an untrained model (its verifier rewards are all 0)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


REWARD = f"task.reward={__name__}:scrambled_reward"
SUBPROCESS_REWARD = "task.reward=test_train:scrambled_reward"  # importable through ENV's PYTHONPATH


def run_algo(tmp_path: Path, data_dir: Path, algo: str, *sets: str, preset: str = "tiny-math") -> list[dict]:
    cfg = resolve_config(preset, small_sets(data_dir) + list(sets), algo=algo)
    result = train(cfg, tmp_path / "run", on_message=lambda msg: None)
    assert result.steps == cfg.train.steps and not result.interrupted
    assert load_preset(str(tmp_path / "run" / "config.toml")) == cfg  # the saved config reproduces the run
    assert list(checkpoint_dirs(tmp_path / "run")) == [cfg.train.steps]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, cfg.train.steps + 1))
    return records


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------
# every algo through the one loop


def test_sft_has_no_rollouts_and_mu_one(tmp_path, data_dir):
    records = run_algo(tmp_path, data_dir, "sft")
    assert all(r["balance/mu"] == 1.0 and "loss/sft" in r for r in records)
    assert not any(key in r for r in records for key in RL_KEYS)
    assert all(r["rollout/total"] == 0 for r in records)
    assert records[-1]["loss/sft"] < records[0]["loss/sft"]  # lr 1e-3 learns within 12 steps
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["n"] == summary["after"]["n"] == 20


def test_summary_holds_no_score_of_an_earlier_end(tmp_path, data_dir):
    """A resume that ends without its own eval leaves no older 'after' beside the new weights (it did:
    summary.json said step 2's accuracy after step 4); the 'before' of the first start stays."""
    quiet = {"on_message": lambda msg: None}
    sets = small_sets(data_dir) + ["train.save_every=1"]
    train(resolve_config("tiny-math", sets + ["train.steps=2"], algo="sft"), tmp_path / "run", **quiet)
    path = tmp_path / "run" / "summary.json"
    first = json.loads(path.read_text())
    assert set(first) == {"before", "after"}
    result = train(resolve_config("tiny-math", sets + ["train.steps=3", "train.eval_at_end=false"], algo="sft"),
                   tmp_path / "run", resume=True, **quiet)
    assert result.summary == {"before": first["before"]} == json.loads(path.read_text())
    train(resolve_config("tiny-math", sets + ["train.steps=4", "train.eval_at_end=false"], algo="sft"),
          tmp_path / "other", **quiet)
    assert not (tmp_path / "other" / "summary.json").exists()  # nothing was scored: no file


def test_rl_has_no_demonstrations_and_mu_zero(tmp_path, data_dir):
    records = run_algo(tmp_path, data_dir, "rl", REWARD)
    assert all(r["balance/mu"] == 0.0 for r in records)
    assert not any("loss/sft" in r or "policy/entropy_demo" in r for r in records)
    assert all(RL_KEYS <= r.keys() and r["reward/std"] > 0 for r in records)
    assert all(0.0 <= r["reward/zero_std_frac"] < 1.0 for r in records)  # 4 groups: some carry signal
    assert [r["rollout/total"] for r in records] == [16 * s for s in range(1, 13)]  # 4 prompts × 4 samples a step
    before = weights(data_dir / "model")
    after = weights(tmp_path / "run" / "checkpoints" / "step-12")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the RL gradient reached the weights


def test_zero_std_frac_counts_whole_groups_whose_rewards_are_all_equal():
    """Groups as the advantages see them: group 0 all equal (no signal), group 1 mixed, group 2 one
    sampled failure beside a rewarded demonstration (signal: LUFFY's point)."""
    from amft_cli.rollout import Rollouts
    from amft_cli.signals import RLBatch, rollout_stats

    rollouts = Rollouts([[1]] * 7, [[2]] * 7, [""] * 7, [True] * 7, group=[0, 0, 1, 1, 1, 2, 2],
                        off_policy=[False] * 6 + [True])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    batch = RLBatch(rollouts, [{}] * 7, rewards, ["correct"] * 7, torch.zeros(7), 7.0, 7)

    class OneProcess:
        gather = staticmethod(lambda items: items)

    assert rollout_stats(OneProcess(), batch, 1.0)["reward/zero_std_frac"] == pytest.approx(1 / 3)


def test_sft_rl_switches_at_the_configured_step(tmp_path, data_dir):
    records = run_algo(tmp_path, data_dir, "sft-rl", "sft_rl.switch_step=5")
    assert [r["balance/mu"] for r in records] == [1.0] * 5 + [0.0] * 7
    assert all(("loss/rl" in r) == (r["step"] > 5) and ("loss/sft" in r) == (r["step"] <= 5) for r in records)


def test_mix_keeps_mu_constant(tmp_path, data_dir):
    records = run_algo(tmp_path, data_dir, "mix", "mix.mu=0.3")
    assert all(r["balance/mu"] == 0.3 for r in records)
    assert all("loss/sft" in r and "loss/rl" in r for r in records)  # both signals every step


def test_amft_warmup_then_learned_mu(tmp_path, data_dir):
    records = run_algo(tmp_path, data_dir, "amft", REWARD)
    cfg = load_preset(str(tmp_path / "run" / "config.toml")).amft
    warm, mixed = records[:W], records[W:]
    assert all(r["balance/mu"] == 1.0 and r["balance/entropy_target"] is None for r in warm)
    assert not any("loss/rl" in r for r in warm)
    assert mixed[0]["balance/mu"] == cfg.mu_init
    assert len({r["balance/mu"] for r in mixed}) > 1
    target = mixed[0]["balance/entropy_target"]
    assert target is not None and all(r["balance/entropy_target"] == target for r in mixed)
    # metrics "step" counts completed steps: the controller runs at 0-based step s-1 >= W and
    # takes a meta-gradient step when (s-1-W) % K == 0, i.e. on the first mixed step and every K after
    assert [r["step"] for r in records if r["balance/meta_update"] == 1.0] == [5, 8, 11]
    assert all(r["balance/meta_update"] in (0.0, 1.0) for r in records)
    assert all(r["balance/meta_grad"] != 0.0 for r in records if r["balance/meta_update"])
    # rollouts: none in warm-up, then 4 × 4 a step, plus 2 validation prompts × 4 at each meta-update
    assert [r["rollout/total"] for r in records] == [0] * 4 + [24, 40, 56, 80, 96, 112, 136, 152]
    pushed = {"meta": 0.0, "entropy": 0.0}  # what each term has asked of μ so far (balance/sum_delta_*)
    for r, nxt in zip(mixed, mixed[1:]):
        pushed["meta"] += cfg.eta_meta * r["balance/meta_grad"] if r["balance/meta_update"] else 0.0
        pushed["entropy"] += r["balance/entropy_term"]
        assert r["balance/sum_delta_meta"] == pytest.approx(pushed["meta"], abs=1e-12)
        assert r["balance/sum_delta_entropy"] == pytest.approx(pushed["entropy"], abs=1e-12)
        assert DESIGN_KEYS <= r.keys() and all(r[k] is not None for k in DESIGN_KEYS)
        assert r["balance/entropy_term"] == pytest.approx(cfg.eta_entropy * (target - r["policy/entropy"]), abs=1e-12)
        delta_meta = cfg.eta_meta * r["balance/meta_grad"] if r["balance/meta_update"] else 0.0
        expected = min(max(r["balance/mu"] + delta_meta + r["balance/entropy_term"], cfg.mu_min), cfg.mu_max)
        assert nxt["balance/mu"] == pytest.approx(expected, abs=1e-12)
    assert all(-1.0 <= r["balance/meta_grad"] <= 1.0 for r in mixed)  # cosine normalisation


@pytest.mark.slow
def test_tiny_gp_preset_trains_sft_and_amft(tmp_path, data_dir):
    if not (Path(__file__).resolve().parent.parent / "presets" / "tiny-gp.toml").is_file():
        pytest.skip("presets/tiny-gp.toml does not exist yet")
    gp_data = tmp_path / "gp-data"
    prepare(resolve_config("tiny-gp", small_sets(gp_data)), log=lambda msg: None)
    for algo in ("sft", "amft"):
        records = run_algo(tmp_path / algo, gp_data, algo, "train.steps=6", preset="tiny-gp")
        mus = [r["balance/mu"] for r in records]
        assert mus[:W] == [1.0] * W and (algo == "sft") == (mus[W:] == [1.0, 1.0])
    # the 24-game verifier scored the rollouts: rewards in {5, 1, -1, -2, -3, -4}, an untrained model earns < 0
    assert all(-4.0 <= r["reward/mean"] < 0.0 for r in records[W:])


# ---------------------------------------------------------------------------
# resume and crash safety (subprocesses: real signals, the real `amft` entry point)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([AMFT, *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") >= count:
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{path} never reached {count} lines")


def comparable(records: list[dict]) -> list[dict]:
    """Metrics minus wall-clock quantities."""
    return [{k: v for k, v in r.items() if k not in ("time", "rollout/tokens_per_s") and not k.startswith("time/")}
            for r in records]


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    extra = ["train.steps=16", "train.save_every=4", SUBPROCESS_REWARD]
    sets = [a for s in small_sets(data_dir) + extra for a in ("--set", s)]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    proc_a = start(["train", *sets, "--run-dir", str(run_a), "--plain"], tmp_path)
    proc_b = start(["train", *sets, "--run-dir", str(run_b), "--plain"], tmp_path)
    wait_for_lines(run_b / "metrics.jsonl", 9, proc_b)
    proc_b.send_signal(signal.SIGINT)
    out_b, err_b = proc_b.communicate(timeout=120)
    assert proc_b.returncode == 130, err_b
    reached = read_metrics(run_b)[-1]["step"]
    assert 9 <= reached < 16 and max(checkpoint_dirs(run_b)) == reached
    assert f"--resume {run_b}" in out_b.replace("\n", "")
    resumed = subprocess.run([AMFT, "train", "--resume", str(run_b), "--plain"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {reached}" in resumed.stdout
    out_a, err_a = proc_a.communicate(timeout=120)
    assert proc_a.returncode == 0, err_a
    assert comparable(read_metrics(run_b)) == comparable(read_metrics(run_a))
    final_a, final_b = weights(run_a / "checkpoints" / "step-16"), weights(run_b / "checkpoints" / "step-16")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (run_a, run_b))
    assert summary_a == summary_b


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["chord", "luffy", "relift", "srft"])
def test_each_method_resumes_exactly(tmp_path, data_dir, algo):
    """Stop after 2 steps, resume to 4: metrics and weights equal a straight 4-step run (the
    method's own state, e.g. ReLIFT's buffer and optimizer, travels in the checkpoint)."""
    sets = small_sets(data_dir) + [
        REWARD, "train.eval_at_end=false", "train.prompts_per_step=2", "rl.max_new_tokens=8", "train.lr_schedule=constant",
        "train.save_every=2", "chord.mu_warmup_steps=1", "chord.mu_decay_steps=2",
        "relift.sft_data_size=3", "relift.format_failures=[]", "relift.lr=1e-3"]
    quiet = dict(on_message=lambda msg: None)
    train(resolve_config("tiny-math", sets + ["train.steps=4"], algo=algo), tmp_path / "whole", **quiet)
    train(resolve_config("tiny-math", sets + ["train.steps=2"], algo=algo), tmp_path / "split", **quiet)
    train(resolve_config("tiny-math", sets + ["train.steps=4"], algo=algo), tmp_path / "split", resume=True, **quiet)
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4] and comparable(split) == comparable(whole)
    if algo == "relift":  # 2 hardest prompts a step, 3 per update: the checkpoint at step 2 holds 1 in the buffer
        assert [r["relift/sft_update"] for r in whole] == [0.0, 1.0, 1.0, 0.0]
        assert [r["relift/buffer"] for r in whole] == [2.0, 1.0, 0.0, 2.0]
    a, b = weights(tmp_path / "whole" / "checkpoints" / "step-4"), weights(tmp_path / "split" / "checkpoints" / "step-4")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_leaves_only_complete_checkpoints(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    sets = [a for s in small_sets(data_dir) + ["train.save_every=1", "train.eval_at_end=false"] for a in ("--set", s)]
    run = tmp_path / "run"
    proc = start(["train", *sets, "--algo", "sft", "--run-dir", str(run), "--plain"], tmp_path)
    wait_for_lines(run / "metrics.jsonl", 4, proc)
    deadline = time.monotonic() + 3.0  # aim the kill at a checkpoint being written, if we can catch one
    while time.monotonic() < deadline and not list((run / "checkpoints").glob(".tmp-step-*")):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    (run / "checkpoints" / ".tmp-step-99-1").mkdir()  # a killed write's leftover, whether or not we caught one
    (run / "checkpoints" / ".tmp-step-99-1" / "config.json").write_text("{")
    found = checkpoint_dirs(run)
    named = sorted(int(d.name[5:]) for d in (run / "checkpoints").iterdir() if re.fullmatch(r"step-\d+", d.name))
    assert len(found) >= 1 and named == list(found) and 99 not in found
    for step, folder in found.items():
        state = load_trainer_state(folder)
        assert state["cursors"]["step"] == step and set(state["optimizers"]) >= {"sft"}
        AutoModelForCausalLM.from_pretrained(folder)
    newest = max(found)
    resumed = subprocess.run([AMFT, "train", "--resume", str(run), "--plain"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {newest}" in resumed.stdout
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-11", "step-12"]


@pytest.fixture(scope="module")
def tiny_model(data_dir):
    from amft_cli.model import load_policy

    return load_policy(resolve_config("tiny-math", small_sets(data_dir)).model, torch.device("cpu"))


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model
    save_checkpoint(tmp_path, 1, model, tokenizer, {"cursors": {"step": 1}})

    weights_written = []

    def crash(obj, path, *args, **kwargs):
        weights_written.append((Path(path).parent / "model.safetensors").is_file())
        raise OSError("a library failed")

    monkeypatch.setattr(torch, "save", crash)  # the trainer state is written after the weights
    with pytest.raises(OSError, match="a library failed"):  # not a disk problem: the error as raised
        save_checkpoint(tmp_path, 2, model, tokenizer, {"cursors": {"step": 2}})
    monkeypatch.undo()
    assert weights_written == [True]  # it crashed mid-write ...
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # ... and left no debris
    assert list(checkpoint_dirs(tmp_path)) == [1]
    assert load_trainer_state(tmp_path / "checkpoints" / "step-1") == {"cursors": {"step": 1}}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step-1")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    save_checkpoint(tmp_path, 2, model, tokenizer, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]


def test_kill_while_pruning_never_leaves_a_half_step_folder(tmp_path, tiny_model, monkeypatch):
    import shutil

    model, tokenizer = tiny_model
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, tokenizer, {}, keep=2)
    real_rmtree = shutil.rmtree

    class Killed(BaseException):
        pass

    def killed_midway(path, *args, **kwargs):  # deletes the weights, then the process "dies"
        if (Path(path) / "model.safetensors").is_file():
            (Path(path) / "model.safetensors").unlink()
            raise Killed

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 3, model, tokenizer, {}, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert list(checkpoint_dirs(tmp_path)) == [2, 3]
    assert all((d / "model.safetensors").is_file() for d in (tmp_path / "checkpoints").glob("step-*"))
    save_checkpoint(tmp_path, 4, model, tokenizer, {}, keep=2)  # and the hidden half folder is swept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-4"]


# ---------------------------------------------------------------------------
# apply_update: shared vs split optimizers


def toy_policy() -> Policy:
    torch.manual_seed(0)
    return Policy(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)),
                  tokenizer=None, device=torch.device("cpu"))


def toy_grads(policy: Policy, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, generator=gen) for p in policy.params]


def manual_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
                 opt: torch.optim.Optimizer | None = None, clip: float = 0.0) -> torch.optim.Optimizer:
    """One reference AdamW step on detached copies; returns the optimizer for further steps."""
    opt = opt or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for group in opt.param_groups:
        group["lr"] = lr
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return opt


def toy_cfg(rl_lr: float, grad_clip: float = 0.0) -> Config:
    cfg = Config()
    cfg.train.lr, cfg.train.rl_lr, cfg.train.grad_clip, cfg.train.weight_decay = 0.1, rl_lr, grad_clip, 0.0
    return cfg


def test_split_mode_with_mu_one_is_one_sft_adamw_step():
    policy, cfg = toy_policy(), toy_cfg(rl_lr=0.01)
    ref = [p.detach().clone().requires_grad_(True) for p in policy.params]
    optimizers = make_optimizers(policy, cfg)
    g_sft, g_rl = toy_grads(policy, 1), toy_grads(policy, 2)
    apply_update(policy, optimizers, g_sft, g_rl, 1.0, cfg, lr_scale=1.0)
    assert len(optimizers["rl"].state) == 0 and len(optimizers["sft"].state) == len(policy.params)
    manual_adamw(ref, g_sft, lr=0.1)
    assert all(torch.equal(p, r) for p, r in zip(policy.params, ref))


def adamw_delta(start: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    params = [s.clone().requires_grad_(True) for s in start]
    manual_adamw(params, grads, lr)
    return [p.detach() - s for p, s in zip(params, start)]


def test_split_mode_mixes_the_two_updates_by_mu():
    policy, cfg = toy_policy(), toy_cfg(rl_lr=0.01)
    start = [p.detach().clone() for p in policy.params]
    optimizers = make_optimizers(policy, cfg)
    g_sft, g_rl = toy_grads(policy, 1), toy_grads(policy, 2)
    apply_update(policy, optimizers, g_sft, g_rl, 0.3, cfg, lr_scale=0.5)
    # μ·Δ_SFT + (1−μ)·Δ_RL: each AdamW at its own rate times its weight (and the lr warm-up scale)
    step_sft, step_rl = adamw_delta(start, g_sft, 0.3 * 0.1 * 0.5), adamw_delta(start, g_rl, 0.7 * 0.01 * 0.5)
    assert len(optimizers["rl"].state) == len(policy.params)
    for p, s, a, b in zip(policy.params, start, step_sft, step_rl):
        torch.testing.assert_close(p.detach(), s + a + b, rtol=0, atol=1e-7)


def test_the_trainers_adamws_use_torchs_fused_kernel():
    """The fused kernel (one pass per tensor; 2.8x faster on SmolLM2, README) for the loop's optimizers
    and ReLIFT's; the tests around this one check that its steps equal torch's default AdamW's, and
    test_parallel.py's FSDP runs step it on sharded weights."""
    from amft_cli import methods

    policy, cfg = toy_policy(), toy_cfg(rl_lr=0.01)
    cfg.train.weight_decay, cfg.relift.lr, cfg.relift.weight_decay = 0.05, 0.02, 0.03
    built = {name: (o.defaults["fused"], o.defaults["lr"], o.defaults["weight_decay"])
             for name, o in make_optimizers(policy, cfg).items()}
    assert built == {"sft": (True, 0.1, 0.05), "rl": (True, 0.01, 0.05)}
    cfg.train.algo = "relift"
    relift = methods.get("relift")(cfg, policy).optimizer.defaults
    assert (relift["fused"], relift["lr"], relift["weight_decay"]) == (True, 0.02, 0.03)


def test_shared_mode_is_one_adamw_step_on_the_weighted_gradient():
    policy, cfg = toy_policy(), toy_cfg(rl_lr=0.0, grad_clip=0.5)
    clipped = [p.detach().clone().requires_grad_(True) for p in policy.params]
    unclipped = [p.detach().clone().requires_grad_(True) for p in policy.params]
    optimizers = make_optimizers(policy, cfg)
    assert set(optimizers) == {"sft"}
    opts = [None, None]
    for seed, scale in ((1, 1.0), (3, 4.0)):  # a second, larger step: clipping then changes the update
        g_sft, g_rl = toy_grads(policy, seed, scale), toy_grads(policy, seed + 1, scale)
        norm = apply_update(policy, optimizers, g_sft, g_rl, 0.3, cfg, lr_scale=1.0)
        combined = [0.3 * a + 0.7 * b for a, b in zip(g_sft, g_rl)]
        assert norm == pytest.approx(torch.cat([c.flatten() for c in combined]).norm().item(), rel=1e-6)
        opts = [manual_adamw(clipped, combined, 0.1, opts[0], clip=0.5),
                manual_adamw(unclipped, combined, 0.1, opts[1])]
    for p, c in zip(policy.params, clipped):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=0, atol=1e-7)
    assert not all(torch.allclose(p, u, atol=1e-5) for p, u in zip(policy.params, unclipped))
