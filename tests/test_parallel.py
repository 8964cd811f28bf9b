"""Two processes train ONE model as one process does: data parallel (torchrun, gloo;
amft_cli/parallel.py) and sharded (FSDP2 through README's `accelerate launch` with the
math-qwen2.5 accelerate config, on CPU over gloo; amft_cli/sharding.py).

12 AMFT steps (warm-up 3, then a meta-gradient step every 2: 5 of them) in one process, and
the same run in two processes: 6 steps, then --resume to 12 (the resume of a 2-process run).
Same global batch and seed, so the same prompts and, with per-row sampling draws, the same
completions and rewards. Losses, μ, metrics and weights agree up to float summation order
(two processes add their gradients in another order than one process adds its micro-batches;
AdamW then turns a relative 1e-7 into an absolute one of its step size on a few coordinates):
measured on this host, metrics within 9e-6 relative, weights within 1.4e-5 (lr 1e-3). The
meta-gradient's cosines (~0.02: nearly orthogonal vectors) amplify that noise: measured within
1.3e-6 absolute (7e-5 relative) between one process and FSDP, whose reduce-scatter and
shard-wise dot products add in yet another order.
Tolerances: metrics rel 1e-5 (abs 1e-6), the meta-gradient and its cosines abs 1e-5, the
sampler-vs-trainer log-prob gap and importance weights (float noise of two forwards, ~1e-7)
abs 1e-5, rewards and other rollout figures abs 1e-6, weights abs 1e-4 (a tenth of a step); μ, which the meta-gradient moves, stays at rel 1e-5.
Each check fails for a wiring slip: gradients averaged instead of summed, or normalised per
process, change optim/grad_norm and the losses; dot products over one shard only change μ;
sampling tied to a process changes rewards; replicas drifting apart stop the run
(parallel.check_same); a checkpoint that gives the RL AdamW a step it never took (torch's
get_optimizer_state_dict does) changes the meta-gradient after the resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from amft_cli.checkpoint import checkpoint_dirs
from amft_cli.cli import resolve_config
from amft_cli.config import ConfigError
from amft_cli.metrics import read_metrics
from amft_cli.parallel import Processes
from amft_cli.train import check_processes
from amft_runs import (SECOND_LONG_STEPS, assert_intact, comparable, flags, one_line_error, tiny_sets,
                       wait_until)

BIN = Path(sys.executable).parent
AMFT = str(BIN / "amft")
FSDP_CONFIG = Path(__file__).resolve().parent.parent / "presets" / "math-qwen2.5.accelerate.yaml"
# this checkout first (not whichever amft_cli is installed); test_train's scrambled_reward gives an untrained
# model reward signal. torchrun sets OMP_NUM_THREADS=1 per process
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
STEPS = 12
LAUNCHERS = {  # README's commands for two processes on CPUs
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "fsdp": [str(BIN / "accelerate"), "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2"],
}


def launch(launcher: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHERS[launcher], AMFT, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


def sets(data: Path) -> list[str]:
    return flags(tiny_sets(data) + ["amft.meta_prompts=2", "train.lr_schedule=constant", "train.eval_at_end=false",
                                    "task.reward=test_train:scrambled_reward"])


def close(a: float | None, b: float | None, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    return a == b or (a is not None and b is not None and abs(a - b) <= abs_ + rel * abs(b))


@pytest.fixture(scope="module")
def single(amft, tiny_data, tmp_path_factory) -> Path:
    """The one-process run both tests compare with."""
    one = tmp_path_factory.mktemp("single") / "one"
    result = amft("train", *sets(tiny_data), "--steps", str(STEPS), "--run-dir", str(one), "--plain")
    assert result.returncode == 0, result.stderr[-3000:]
    return one


@pytest.mark.parametrize("launcher", ["torchrun", "fsdp"])
def test_two_processes_train_the_same_model_as_one(launcher, single, amft, tiny_data, tmp_path):
    two = tmp_path / "two"
    first = launch(launcher, "train", *sets(tiny_data), "--steps", str(STEPS // 2), "--run-dir", str(two), "--plain",
                   cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("run directory:") == 1  # only the main process reports
    assert ("FSDP: weights, gradients and optimizer state sharded over 2 processes" in first.stdout) == (launcher == "fsdp")
    resumed = launch(launcher, "train", "--resume", str(two), "--steps", str(STEPS), "--plain", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"(step {STEPS // 2})" in resumed.stdout
    starts = [json.loads(line) for line in (two / "environment.jsonl").read_text().splitlines()]
    assert [(s["step"], s["processes"]) for s in starts] == [(0, 2), (STEPS // 2, 2)]  # the main process's lines

    a, b = comparable(read_metrics(single)), comparable(read_metrics(two))
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)) and [set(r) for r in a] == [set(r) for r in b]
    assert sum(r["balance/meta_update"] for r in a) == 5 and len({r["balance/mu"] for r in a}) > 5
    assert any(r.get("reward/std", 0) > 0 for r in a)  # rewards with signal: g_RL is not zero
    assert any(r.get("rl/forward_only_frac", 0) > 0 for r in a)  # zero-advantage groups ran forward only
    for ra, rb in zip(a, b):
        for key in ra:
            if key == "rl/forward_only_frac" and launcher == "fsdp":  # FSDP runs every row's backward
                assert rb[key] == 0.0
            elif key.startswith(("rollout/logprob_diff", "rollout/is_weight")):  # sampler vs trainer: float noise
                assert close(ra[key], rb[key], rel=0.0, abs_=1e-5), (ra["step"], key, ra[key], rb[key])
            elif key.startswith(("reward/", "rollout/")):  # the same sampled completions
                assert close(ra[key], rb[key], rel=0.0), (ra["step"], key, ra[key], rb[key])
            elif key.startswith(("balance/meta_grad", "balance/cos_")):  # cosines of near-orthogonal vectors
                assert close(ra[key], rb[key], rel=0.0, abs_=1e-5), (ra["step"], key, ra[key], rb[key])
            else:
                assert close(ra[key], rb[key]), (ra["step"], key, ra[key], rb[key])
    wa, wb = (load_file(str(run / "checkpoints" / f"step-{STEPS}" / "model.safetensors")) for run in (single, two))
    assert wa.keys() <= wb.keys()  # FSDP's full state dict also names the tied lm_head.weight
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    start = load_file(str(tiny_data / "model" / "model.safetensors"))
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 5e-3  # 12 AdamW steps at 1e-3 moved them

    other = amft("train", "--resume", str(two), "--plain")  # one process cannot continue a 2-process run
    one_line_error(other, "written by a run of 2 training process(es), this one has 1")


RELIFT = ["train.algo=relift", "relift.sft_data_size=4", "relift.format_failures=[]", "relift.lr=1e-3"]


@pytest.mark.parametrize("launcher", ["torchrun", "fsdp"])
def test_relift_in_two_processes_trains_the_same_model_as_one(launcher, amft, tiny_data, tmp_path):
    """ReLIFT steps its own AdamW on the buffered demonstrations of failed prompts (every prompt fails
    here: 2 a step, 4 per update, so updates at steps 2, 4 and 6). Two processes, stopped after step 3
    and resumed (ReLIFT's optimizer has stepped once, its buffer holds 2; with FSDP the optimizer's
    state is gathered from the shards and put back), end with the metrics and weights of one process."""
    args = [*sets(tiny_data), *flags(RELIFT), "--steps", "6", "--plain"]
    single = amft("train", *args, "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    first = launch(launcher, "train", *args[:-3], "--steps", "3", "--plain", "--run-dir", str(two), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = launch(launcher, "train", "--resume", str(two), "--steps", "6", "--plain", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [r["relift/sft_update"] for r in a] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(comparable(a), comparable(b)):
        for key in ra:
            if key == "rl/forward_only_frac" and launcher == "fsdp":  # FSDP runs every row's backward
                assert rb[key] == 0.0
            elif key.startswith(("rollout/logprob_diff", "rollout/is_weight")):  # sampler vs trainer: float noise
                assert close(ra[key], rb[key], rel=0.0, abs_=1e-5), (ra["step"], key, ra[key], rb[key])
            else:
                assert close(ra[key], rb[key]), (ra["step"], key, ra[key], rb[key])
    wa, wb = (load_file(str(run / "checkpoints" / "step-6" / "model.safetensors")) for run in (tmp_path / "one", two))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.parametrize("algo, knob, needed", [("amft", "amft.meta_prompts", True), ("sft", "amft.meta_prompts", False),
                                                ("relift", "relift.sft_data_size", True),
                                                ("rl", "train.prompts_per_step", True)])
def test_every_process_needs_a_share_of_each_batch_the_method_draws(algo, knob, needed):
    """A batch knob below the process count is a one-line error before any work, for the knobs
    the method shares out (its shared_batches), not for knobs it never reads."""
    cfg = resolve_config("tiny-math", [f"{knob}=1"], algo=algo)
    if needed:
        with pytest.raises(ConfigError, match=f"^{re.escape(knob)} = 1: fewer than the 2 training processes"):
            check_processes(cfg, Processes(count=2), None, None)
    else:
        check_processes(cfg, Processes(count=2), None, None)
    check_processes(cfg, Processes(count=1), None, None)  # one process takes every batch whole


@pytest.mark.parametrize("sets, message", [
    (["train.prompts_per_step=3"], "train.prompts_per_step = 3: not a multiple of the 2 training processes"),
    (["amft.meta_prompts=3"], "amft.meta_prompts = 3: not a multiple of the 2 training processes"),
    (["model.lora_rank=8"], "model.lora_rank > 0: LoRA models fit one GPU"),
    (["rl.backend=vllm"], 'rl.backend = "vllm": vLLM cannot sample from a sharded model')])
def test_fsdp_refuses_before_any_work_what_it_cannot_shard(sets, message):
    """With FSDP every process runs the same forwards (equal shares) on paths the CPU test ran."""
    cfg = resolve_config("tiny-math", ["train.prompts_per_step=4", "train.sft_batch_size=4", "amft.meta_prompts=2",
                                       "relift.sft_data_size=4", *sets])
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        check_processes(cfg, Processes(count=2, sharded=True), None, None)
    base = resolve_config("tiny-math", ["train.prompts_per_step=4", "train.sft_batch_size=4", "amft.meta_prompts=2"])
    check_processes(base, Processes(count=2, sharded=True), None, None)  # the test run's settings pass


LEAVE = '''
import atexit, sys
from amft_cli import parallel

class Probe:
    def __del__(self):  # runs in the interpreter's teardown, as __main__'s globals are cleared
        print("teardown ran", flush=True)

probe = Probe()
atexit.register(print, "atexit ran")
parallel.current().sum_floats([1.0])  # a collective: gloo's worker threads have run
print("unflushed", end="")
if sys.argv[1] == "none":  # the control: a normal exit (nothing holds the group here, its threads end)
    import torch.distributed
    torch.distributed.destroy_process_group()
else:
    parallel.shutdown(int(sys.argv[1]))
'''


@pytest.mark.parametrize("code", ["none", "0", "3"])
def test_processes_leave_without_the_interpreter_teardown(code, tmp_path):
    """Several processes end in parallel.shutdown: atexit handlers run and output is flushed, the
    exit status is the one asked for, and Python's teardown never runs (in it a gloo worker that
    releases a collective's tensors aborts the process; see shutdown). "none": the probe does see
    a normal teardown."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    result = subprocess.run([*LAUNCHERS["torchrun"], str(script), code], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=300)
    out = result.stdout + result.stderr
    assert out.count("atexit ran") == 2 and out.count("unflushed") == 2, out
    assert out.count("teardown ran") == (2 if code == "none" else 0), out
    assert result.returncode == (1 if code == "3" else 0), out  # torchrun: 1 when a process failed,
    assert ("exitcode  : 3" in out) == (code == "3"), out         # naming the process's own status


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, children first (from /proc: Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree = [pid]
    for p in tree:
        tree.extend(parents.get(p, []))
    return tree[::-1]


def test_a_schedulers_sigterm_to_every_process_checkpoints_once(tiny_data, tmp_path):
    """Slurm's time limit, preemption or scancel sends SIGTERM to every process of the job step
    (torchrun's workers run in sessions of their own, so a process group would miss them), and
    torchrun passes the one it gets on: each worker gets two. The second is the same request, not
    an abort: both processes end the same step, write its checkpoint and stop; the requeued job's
    command (--auto-resume) continues from there."""
    run = tmp_path / "run"
    argv = [*LAUNCHERS["torchrun"], AMFT, "train", *sets(tiny_data), *flags(SECOND_LONG_STEPS), "--run-dir", str(run), "--plain",
            "--auto-resume"]  # the requeued job's command is the same
    proc = subprocess.Popen([*argv, "--steps", "400"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 4,
               timeout=300)  # past warm-up: RL steps of ~1 s
    *workers, torchrun = process_tree(proc.pid)
    assert len(workers) == 2 and torchrun == proc.pid
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.1)  # handled by then (two signals before it would count as one)
    os.kill(torchrun, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    reached = read_metrics(run)[-1]["step"]
    assert 4 <= reached < 400 and list(checkpoint_dirs(run)) == [reached], out[-3000:]  # save_every never came
    assert f"--resume {run}" in out.replace("\n", ""), out[-3000:]
    requeued = subprocess.run([*argv, "--steps", str(reached + 2)], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert f"(step {reached})" in requeued.stdout and read_metrics(run)[-1]["step"] == reached + 2
    assert_intact(run)
