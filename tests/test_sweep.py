"""`amft sweep`: the grid comes from the method registry, finished cells are kept, interrupted ones
resumed, a folder of another config refused; the table's means and t-intervals are hand-checked;
a tiny real grid runs end to end through the CLI and `amft plot sweep` draws it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from typer.testing import CliRunner

from amft_cli import methods, provenance, report, sweep
from amft_cli.checkpoint import checkpoint_dirs
from amft_cli.cli import app
from amft_cli.config_io import to_toml
from amft_cli.sweep import Grid, SweepError
from amft_cli.tasks import verifier_version
from amft_runs import one_line_error, wait_until

AMFT = str(Path(sys.executable).parent / "amft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------
# the grid


def test_algos_come_from_the_registry():
    assert sweep.parse_algos("sft, rl") == ["sft", "rl"]
    assert sweep.parse_algos("all") == methods.names()
    with pytest.raises(SweepError, match="'sft, rl,sft': sft given twice"):  # a typo does not shrink the sweep
        sweep.parse_algos("sft, rl,sft")
    with pytest.raises(SweepError, match="unknown method 'bogus'"):
        sweep.parse_algos("sft,bogus")


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("3-5", [3, 4, 5]), ("7", [7])])
def test_parse_seeds(text, seeds):
    assert sweep.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a,b", "0.5", "1,1", "0,1,0,1", "2-0"])
def test_bad_seeds(text):
    with pytest.raises(SweepError, match="--seeds .*(expected integers|given twice)"):
        sweep.parse_seeds(text)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".", " ", "a\\b"])
def test_a_sweep_name_is_one_folder_under_sweeps(name):
    with pytest.raises(SweepError, match=r"--name .*: expected a folder name under sweeps/"):
        sweep.parse_name(name)
    assert sweep.parse_name("tiny-gp-250") == "tiny-gp-250"


def test_sweep_eval_flags_and_name_are_checked_before_anything_is_written(tmp_path):
    for args, fragment in ((["--k", "0"], "--k 0: expected an integer >= 1"),
                           (["--limit", "-1"], "--limit -1: expected an integer >= 0"),
                           (["--name", "../out"], "--name '../out': expected a folder name")):
        bad = subprocess.run([AMFT, "sweep", "--algo", "sft", "--seeds", "0", "--plain", *args], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=120)
        one_line_error(bad, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_second_sweep_of_the_same_folder_is_refused(tmp_path):
    """Two sweeps with one --name failed each other's cells (eval locks) and wrote the tables in
    turn; the second now stops at once in one line naming the first, and touches nothing."""
    folder = tmp_path / "sweeps" / "s"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom amft_cli.rundir import RunLock\n"
                               f"with RunLock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([AMFT, "sweep", "--algo", "sft", "--seeds", "0", "--name", "s", "--plain"],
                                cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        one_line_error(second, "sweeps/s is in use by another amft process", f"pid {holder.pid}",
                       "wait for that sweep to end (rerunning it then continues it) or pick another --name")
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_cells_carry_algo_and_seed_into_their_config(tmp_path):
    grid = Grid("g", "tiny-gp", ["sft", "amft"], [0, 2], ["train.steps=7"], root=tmp_path)
    cells = grid.cells()
    assert [(c.algo, c.seed) for c in cells] == [("sft", 0), ("sft", 2), ("amft", 0), ("amft", 2)]
    assert [(c.config.train.algo, c.config.seed, c.config.train.steps) for c in cells] == \
        [("sft", 0, 7), ("sft", 2, 7), ("amft", 0, 7), ("amft", 2, 7)]
    assert cells[3].run_dir == tmp_path / "g" / "runs" / "amft-s2"


def fake_run(cell, steps_saved: list[int], config=None) -> None:
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    (cell.run_dir / "config.toml").write_text(to_toml(config or cell.config))
    for step in steps_saved:
        (cell.run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)


def test_train_state_keeps_resumes_or_starts(tmp_path):
    grid = Grid("g", "tiny-math", ["sft"], [0, 1, 2, 3], ["train.steps=5"], root=tmp_path)
    done, short, empty, debris = grid.cells()
    fake_run(done, [3, 5])
    fake_run(short, [2])
    fake_run(debris, [])
    assert [sweep.train_state(c) for c in (done, short, empty, debris)] == ["done", "resume", "new", "new"]
    resume = sweep.train_argv(grid, short, "resume")
    assert resume[-2:] == ["--resume", str(short.run_dir)] and "--preset" not in resume  # the run's own config
    fresh = sweep.train_argv(grid, empty, "new")
    assert fresh[fresh.index("--preset") + 1] == "tiny-math" and "--overwrite" in fresh
    assert " ".join(fresh).endswith("--set train.steps=5 --set train.algo=sft --set seed=2")


def test_a_run_of_another_config_is_refused(tmp_path):
    cell = Grid("g", "tiny-math", ["sft"], [0], ["train.steps=5"], root=tmp_path).cells()[0]
    other = Grid("g", "tiny-math", ["sft"], [0], ["train.steps=9", "train.lr=0.5"], root=tmp_path).cells()[0]
    fake_run(cell, [5], config=other.config)
    with pytest.raises(SweepError, match=r"train\.lr, train\.steps differ"):
        sweep.train_state(cell)


def test_other_methods_knobs_do_not_make_another_config(tmp_path):
    """A preset edit to CHORD's schedule keeps a finished sft cell; the same edit refuses the chord cell,
    and sft's own knobs still count (the sft_rl section is not sft's: the names must match whole)."""
    edit = ["train.steps=5", "chord.mu_warmup_steps=7", "sft_rl.switch_step=2"]
    sft, chord = Grid("g", "tiny-math", ["sft", "chord"], [0], ["train.steps=5"], root=tmp_path).cells()
    edited_sft, edited_chord = Grid("g", "tiny-math", ["sft", "chord"], [0], edit, root=tmp_path).cells()
    fake_run(sft, [5], config=edited_sft.config)
    fake_run(chord, [5], config=edited_chord.config)
    assert sweep.train_state(sft) == "done"
    with pytest.raises(SweepError, match=r"chord\.mu_warmup_steps differ"):
        sweep.train_state(chord)
    lr = Grid("g", "tiny-math", ["sft"], [0], ["train.steps=5", "train.lr=0.5"], root=tmp_path).cells()[0]
    with pytest.raises(SweepError, match=r"train\.lr differ"):
        sweep.train_state(lr)


def fake_eval(cell, step: int, k: int, limit: int, verifier: str | None = None, **settings) -> None:
    """eval/<split>.json as `amft eval --run CELL --k K --limit L` writes it (settings: others by hand)."""
    (cell.run_dir / "eval").mkdir(exist_ok=True)
    e = cell.config.eval
    settings = {"temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
                "batch_size": e.batch_size, "seed": cell.config.seed, "greedy_only": False, **settings}
    for split, ood in (("test", False), ("ood", True)):
        record = {"split": split, "checkpoint": f"{cell.run_dir}/checkpoints/step-{step}",
                  "settings": {**settings, "k": k, "limit": limit}, "metrics": {"greedy_accuracy": 0.5, "ood": ood},
                  "verifier": verifier or verifier_version()}
        (cell.run_dir / "eval" / f"{split}.json").write_text(json.dumps(record))


def test_an_eval_is_kept_only_on_the_final_checkpoint_with_the_same_settings(tmp_path):
    cell = Grid("g", "tiny-math", ["sft"], [0], ["train.steps=5", "eval.k=4"], root=tmp_path).cells()[0]
    fake_run(cell, [5])
    fake_eval(cell, 5, k=4, limit=0)
    assert sweep.eval_done(cell, None, None)
    assert not sweep.eval_done(cell, 8, None) and not sweep.eval_done(cell, None, 16)
    for other in ({"temperature": 1.5}, {"top_p": 0.9}, {"max_new_tokens": 12}, {"seed": 3}, {"greedy_only": True}):
        fake_eval(cell, 5, k=4, limit=0, **other)  # `amft eval` by hand with other sampling: not the table's
        assert not sweep.eval_done(cell, None, None), other
    fake_eval(cell, 5, k=4, limit=0, batch_size=8)  # batching does not change what is sampled
    assert sweep.eval_done(cell, None, None)
    fake_eval(cell, 4, k=4, limit=0)
    assert not sweep.eval_done(cell, None, None)  # an older checkpoint's eval
    fake_eval(cell, 5, k=4, limit=0)
    final = cell.run_dir / "checkpoints" / "step-5"
    os.utime(final, (final.stat().st_atime, final.stat().st_mtime + 60))  # saved again after the eval (resumed)
    assert not sweep.eval_done(cell, None, None)


def test_an_eval_scored_by_other_verifier_code_is_done_again(tmp_path):
    """Scores from another version of the tasks' parsers and verifiers (or from before evals said
    which) are not tabulated beside this version's."""
    cell = Grid("g", "tiny-math", ["sft"], [0], ["train.steps=5"], root=tmp_path).cells()[0]
    fake_run(cell, [5])
    fake_eval(cell, 5, k=cell.config.eval.k, limit=cell.config.eval.limit)
    assert sweep.eval_done(cell, None, None)
    fake_eval(cell, 5, k=cell.config.eval.k, limit=cell.config.eval.limit, verifier="0123456789ab")
    assert not sweep.eval_done(cell, None, None)


def test_the_verifier_version_changes_with_the_tasks_code(tmp_path, monkeypatch):
    import amft_cli.tasks as tasks

    copy = tmp_path / "tasks"
    copy.mkdir()
    for path in Path(tasks.__file__).parent.glob("*.py"):
        (copy / path.name).write_bytes(path.read_bytes())
    this = verifier_version()
    monkeypatch.setattr(tasks, "__file__", str(copy / "__init__.py"))
    assert verifier_version() == this  # the same code
    grader = copy / "math_grader.py"
    grader.write_text(grader.read_text() + "\n# a fix\n")
    assert verifier_version() != this


# ---------------------------------------------------------------------------
# the table (hand-computed values)


def record(algo, seed, id_greedy, ood_greedy, time_s, rollouts):
    block = {"n": 50, "k": 4, "avg@k": id_greedy / 2, "pass@k": 1.0}
    return {"algo": algo, "seed": seed, "id": {**block, "greedy": id_greedy},
            "ood": {**block, "greedy": ood_greedy}, "train_time_s": time_s, "rollouts": rollouts}


def test_table_means_and_t_intervals():
    grid = Grid("g", "tiny-gp", ["amft", "sft"], [0, 1, 2])
    records = [record("sft", 0, 0.026, 0.0, 60.0, None), record("amft", 0, 0.056, 0.0, 120.0, 1000),
               record("amft", 1, 0.018, 0.0, 150.0, 1000), record("amft", 2, 0.058, 0.0, 180.0, 1000)]
    table = report.sweep_table(grid, records)
    assert [r["algo"] for r in table["rows"]] == ["amft", "sft"]
    amft = table["rows"][0]
    # mean 0.044; s = sqrt((0.012² + 0.026² + 0.014²) / 2) = 0.0225389; half = 4.3027 · s / √3 = 0.0559902
    assert amft["id.greedy"]["mean"] == pytest.approx(0.044)
    assert amft["id.greedy"]["half"] == pytest.approx(0.0559902, rel=1e-4)
    assert amft["id.greedy"]["lo"] == pytest.approx(0.044 - 0.0559902, rel=1e-4)
    # 120, 150, 180 s: s = 30, half = 4.3027 · 30 / √3 = 74.525
    assert amft["train_time_s"]["mean"] == 150 and amft["train_time_s"]["half"] == pytest.approx(74.525, rel=1e-4)
    assert amft["ood.greedy"]["half"] == 0.0
    sft = table["rows"][1]
    assert sft["id.greedy"] == {"mean": 0.026, "half": None, "lo": None, "hi": None, "n": 1, "values": [0.026]}
    assert sft["rollouts"] is None
    md = report.sweep_markdown(table)
    assert "| `amft` | 3 | 4.4 ± 5.6 | 2.2 ± 2.8 | 100.0 ± 0.0 | 0.0 ± 0.0 |" in md
    assert "| 2.5 ± 1.2 | 1,000 ± 0 |" in md  # minutes: 150 s ± 74.5 s
    assert "| 1.0 | — |" in md  # sft's one seed: 60 s is 1.0 min, not "1"; no rollouts
    assert "| `sft` | 1 | 2.6 |" in md and "ID avg@4" in md and "95 % t-interval" in md
    rows = report.sweep_csv(table).splitlines()
    assert rows[0].startswith("algo,n_seeds,id.greedy_mean,id.greedy_lo,id.greedy_hi,")
    assert rows[2].startswith("sft,1,0.026,,,")


def test_paired_differences_with_the_baseline_on_the_same_seeds(tmp_path):
    grid = Grid("g", "tiny-gp", ["sft", "amft", "mix"], [0, 1, 2], baseline="sft")
    records = [record("sft", 0, 0.50, 0.10, 60.0, None), record("sft", 1, 0.40, 0.20, 60.0, None),
               record("sft", 2, 0.60, 0.30, 60.0, None),
               # amft: +0.10, +0.12, +0.08 on ID greedy (its own interval overlaps sft's; the paired one does not)
               record("amft", 0, 0.60, 0.10, 60.0, 10), record("amft", 1, 0.52, 0.10, 60.0, 10),
               record("amft", 2, 0.68, 0.40, 60.0, 10),
               record("mix", 2, 0.55, 0.30, 60.0, 10), record("mix", 3, 0.90, 0.90, 60.0, 10)]  # seed 3: unpaired
    table = report.sweep_table(grid, records)
    sft, amft, mix = table["rows"]
    assert table["baseline"] == "sft" and "vs_baseline" not in sft
    paired = amft["vs_baseline"]
    assert paired["seeds"] == [0, 1, 2]
    # differences 0.10, 0.12, 0.08: mean 0.10, s = 0.02, half = 4.3027 · 0.02 / √3 = 0.0496833
    assert paired["id.greedy"]["values"] == pytest.approx([0.10, 0.12, 0.08])
    assert paired["id.greedy"]["mean"] == pytest.approx(0.10) and paired["id.greedy"]["half"] == pytest.approx(
        0.0496833, rel=1e-4)
    assert paired["ood.greedy"]["values"] == pytest.approx([0.0, -0.1, 0.1])  # amft − sft, not sft − amft
    assert amft["id.greedy"]["lo"] < sft["id.greedy"]["hi"]  # the unpaired intervals overlap
    assert mix["vs_baseline"]["seeds"] == [2] and mix["vs_baseline"]["id.greedy"]["values"] == pytest.approx([-0.05])
    md = report.sweep_markdown(table)
    assert "Paired with `sft` on the same seeds: method − sft" in md
    assert "| method | seeds | Δ ID greedy | Δ ID avg@4 |" in md
    assert "| `amft` | 3 | 10.0 ± 5.0 * | 5.0 ± 2.5 * | 0.0 ± 0.0 | 0.0 ± 24.8 |" in md  # OOD: excludes no 0
    assert "| `mix` | 1 | -5.0 | -2.5 |" in md
    header, sft_row, amft_row, _ = report.sweep_csv(table).splitlines()
    columns = header.split(",")
    assert columns[-3:] == ["vs_sft.ood.pass@k_mean", "vs_sft.ood.pass@k_lo", "vs_sft.ood.pass@k_hi"]
    at = columns.index("vs_sft.id.greedy_mean")
    assert float(amft_row.split(",")[at]) == pytest.approx(0.10) and sft_row.split(",")[at] == ""
    with pytest.raises(SweepError, match=r"--baseline 'rl': expected one of this sweep's methods \(sft, amft\)"):
        sweep.parse_baseline("rl", ["sft", "amft"])
    bad = subprocess.run([AMFT, "sweep", "--algo", "sft,amft", "--baseline", "rl", "--plain"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    one_line_error(bad, "--baseline 'rl'")
    assert not (tmp_path / "sweeps").exists()
    assert sweep.parse_baseline(None, ["sft"]) is None and "Paired" not in report.sweep_markdown(
        report.sweep_table(Grid("g", "tiny-gp", ["sft", "amft"], [0]), records))


def test_the_table_says_what_its_runs_were_trained_under_and_what_differs():
    grid = Grid("g", "tiny-gp", ["amft", "sft"], [0, 1])
    cpu = {"amft-cli": "0.1.0", "amft-cli commit": "abc1234", "torch": "2.13.0", "vllm": None, "device": "Xeon"}
    records = [dict(record("amft", 0, 0.5, 0.0, 60.0, 10), trained_on=[cpu]),
               dict(record("amft", 1, 0.5, 0.0, 60.0, 10), trained_on=[cpu]),
               dict(record("sft", 0, 0.5, 0.0, 60.0, None), trained_on=[cpu])]
    table = report.sweep_table(grid, records)
    assert table["trained_under"] == {"same": cpu, "differs": {}, "unrecorded": []}
    md = report.sweep_markdown(table)
    assert "Trained under amft-cli 0.1.0 (abc1234), torch 2.13.0 on Xeon." in md
    assert "like for like" not in md and "vllm" not in md
    # sft-s1 resumed on a GPU under another torch; amft-s1 uncommitted code; one run from before the record
    gpu = dict(cpu, torch="2.11.0", device="H100")
    records += [dict(record("sft", 1, 0.5, 0.0, 60.0, None), trained_on=[cpu, gpu]),
                record("amft", 2, 0.5, 0.0, 60.0, 10)]
    records[1]["trained_on"] = [dict(cpu, **{"amft-cli commit": "abc1234+dirty"})]
    under = report.sweep_table(grid, records)["trained_under"]
    assert under["same"] == {"amft-cli": "0.1.0", "vllm": None}
    assert under["differs"] == {"amft-cli commit": {"abc1234": ["amft-s0", "sft-s0", "sft-s1"],
                                                    "abc1234+dirty": ["amft-s1"]},
                                "torch": {"2.13.0": ["amft-s0", "amft-s1", "sft-s0", "sft-s1"], "2.11.0": ["sft-s1"]},
                                "device": {"Xeon": ["amft-s0", "amft-s1", "sft-s0", "sft-s1"], "H100": ["sft-s1"]}}
    assert under["unrecorded"] == ["amft-s2"]
    md = report.sweep_markdown(report.sweep_table(grid, records))
    assert "Trained under amft-cli 0.1.0." in md
    assert "**Not like for like:** torch differs across runs: 2.13.0 (amft-s0, amft-s1, sft-s0, sft-s1); " \
           "2.11.0 (sft-s1)." in md
    assert "No environment.jsonl (trained before it was recorded): amft-s2." in md


# ---------------------------------------------------------------------------
# amft plot sweep, on a synthetic sweep folder


def test_plot_sweep_draws_means_intervals_seeds_and_bands(tmp_path):
    from amft_cli import plot_sweep
    from amft_cli.rundir import sweep_cell_dir

    grid = Grid("s", "tiny-gp", ["amft", "sft"], [0, 1], root=tmp_path)
    records = [record("amft", 0, 0.2, 0.1, 60.0, 100), record("amft", 1, 0.4, 0.1, 60.0, 100),
               record("sft", 0, 0.3, 0.0, 30.0, 0), record("sft", 1, 0.5, 0.2, 30.0, 0)]
    sweep.write_tables(report.sweep_table(grid, records), grid.folder)
    for algo, seed, accuracy in (("amft", 0, 0.0), ("amft", 1, 1.0), ("sft", 0, None), ("sft", 1, None)):
        run = sweep_cell_dir(grid.folder, algo, seed)
        run.mkdir(parents=True)
        rows = [{"step": s, "loss/sft": 2.0 + seed, **({"reward/accuracy": accuracy} if accuracy is not None else {})}
                for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_sweep.sweep_figure(grid.folder)
    bars, accuracy, loss = fig.axes[:3]
    heights = [round(p.get_height(), 6) for p in bars.patches]
    # columns id.greedy, id.avg@k, id.pass@k, ood.greedy, ood.avg@k, ood.pass@k; amft's bars, then sft's
    assert heights == [0.3, 0.15, 1.0, 0.1, 0.15, 1.0] + [0.4, 0.2, 1.0, 0.1, 0.2, 1.0]
    whiskers = bars.collections[0].get_segments()[0]  # amft, id.greedy: 0.3 ± 12.7062 · 0.1414 / 1.414
    assert whiskers[0][1] == pytest.approx(0.3 - 1.27062) and whiskers[1][1] == pytest.approx(0.3 + 1.27062)
    dots = [[round(y, 6) for _, y in c.get_offsets()] for c in bars.collections if type(c).__name__ == "PathCollection"]
    assert len(dots) == 12 and dots[0] == [0.2, 0.4] and dots[9] == [0.0, 0.2]  # amft ID greedy; sft OOD greedy
    assert [line.get_label() for line in accuracy.lines] == ["amft"]  # sft draws no rollouts
    assert list(accuracy.lines[0].get_ydata()) == [0.5, 0.5, 0.5]
    assert [line.get_label() for line in loss.lines] == ["amft", "sft"]
    assert list(loss.lines[1].get_ydata()) == [2.5, 2.5, 2.5] and len(loss.collections) == 2  # two bands
    assert plot_sweep.sweep(grid.folder).name == "sweep.png"
    assert len(fig.axes) == 3  # no --baseline: no paired panel


def _cells_with_metrics(folder: Path, records: list[dict]) -> None:
    from amft_cli.rundir import sweep_cell_dir

    for r in records:
        run = sweep_cell_dir(folder, r["algo"], r["seed"])
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/sft": 1.0}) + "\n" for s in (1, 2)))


def test_plot_sweep_draws_the_paired_differences_with_the_baseline(tmp_path):
    from amft_cli import plot_sweep

    grid = Grid("s", "tiny-gp", ["amft", "mix", "sft"], [0, 1, 2], root=tmp_path, baseline="sft")
    records = [record("amft", 0, 0.20, 0.1, 60.0, 100), record("amft", 1, 0.40, 0.2, 60.0, 100),
               record("amft", 2, 0.30, 0.0, 60.0, 100), record("mix", 1, 0.90, 0.3, 60.0, 100),
               record("sft", 0, 0.25, 0.0, 30.0, 0), record("sft", 1, 0.50, 0.2, 30.0, 0),
               record("sft", 2, 0.30, 0.1, 30.0, 0)]
    _cells_with_metrics(grid.folder, records)
    sweep.write_tables(report.sweep_table(grid, records), grid.folder)
    fig = plot_sweep.sweep_figure(grid.folder)
    assert len(fig.axes) == 4
    bars, paired = fig.axes[:2]
    assert "each method − sft" in paired.get_title()
    assert paired.get_xlim() == bars.get_xlim() == (-0.5, 5.5)  # aligned columns
    points = [c for c in paired.collections if type(c).__name__ == "PathCollection"]
    # amft's means (diamonds), then one set of seed dots per column; then mix's; sft (the baseline) has none
    assert len(points) == 2 * 7
    assert [round(y, 6) for _, y in points[0].get_offsets()] == [-0.05, -0.025, 0.0, 0.0, -0.025, 0.0]
    assert [round(y, 6) for _, y in points[1].get_offsets()] == [-0.05, -0.1, 0.0]  # ID greedy, amft − sft by seed
    assert [round(y, 6) for _, y in points[4].get_offsets()] == [0.1, 0.0, -0.1]  # OOD greedy
    assert [round(y, 6) for _, y in points[7].get_offsets()] == [0.4, 0.2, 0.0, 0.1, 0.2, 0.0]  # mix: seed 1 only
    whiskers = [c for c in paired.collections if type(c).__name__ == "LineCollection"]
    low, high = whiskers[0].get_segments()[0]  # amft ID greedy: −0.05 ± 4.3027 · 0.05 / √3
    assert low[1] == pytest.approx(-0.05 - 0.124208, rel=1e-4) and high[1] == pytest.approx(-0.05 + 0.124208, rel=1e-4)
    assert list(paired.texts) == []  # no interval excludes 0 (mix's one seed has no interval)
    assert list(paired.lines[-1].get_ydata()) == [0.0, 0.0]  # the zero line, drawn last
    assert [t.get_text() for t in paired.get_legend().get_texts()] == ["amft − sft (n=3)", "mix − sft (n=1)"]
    # each method keeps its colour from the bars
    assert tuple(points[0].get_facecolor()[0][:3]) == tuple(bars.patches[0].get_facecolor()[:3])  # amft
    assert tuple(points[7].get_facecolor()[0][:3]) == tuple(bars.patches[6].get_facecolor()[:3])  # mix

    # amft 0.10, 0.11, 0.12 above sft on ID greedy: 0.11 ± 4.3027 · 0.01 / √3 excludes 0, a star tops the whisker
    better = [dict(r, id={**r["id"], "greedy": r["id"]["greedy"] + 0.1 + 0.01 * r["seed"]})
              for r in records if r["algo"] == "sft"]
    records = [dict(r, algo="amft") for r in better] + [r for r in records if r["algo"] == "sft"]
    sweep.write_tables(report.sweep_table(Grid("s", "tiny-gp", ["amft", "sft"], [0, 1, 2], root=tmp_path,
                                               baseline="sft"), records), grid.folder)
    paired = plot_sweep.sweep_figure(grid.folder).axes[1]
    (star,) = paired.texts
    assert star.get_text() == "*" and star.xy == pytest.approx((-0.2, 0.11 + 0.0248414), rel=1e-5)


# ---------------------------------------------------------------------------
# a real tiny grid through the CLI


def small_set_list(data_dir: Path) -> list[str]:
    return [f"task.data_dir={data_dir}", f"model.path={data_dir / 'model'}", "task.train_size=200",
            "task.val_size=8", "task.test_size=8", "task.ood_size=8", "train.steps=2", "train.save_every=1",
            "train.sft_batch_size=8", "train.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8",
            "train.eval_at_end=false"]


def small_sets(data_dir: Path) -> list[str]:
    return [a for s in small_set_list(data_dir) for a in ("--set", s)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """small_sets' data and tiny model, prepared once: the signal tests copy it to tmp_path/data, so
    their sweeps skip the prepare (test_tiny_sweep_end_to_end prepares its own; the record of a
    prepared folder names no path, so a copy is current)."""
    from amft_cli.cli import resolve_config
    from amft_cli.data import prepare

    data = tmp_path_factory.mktemp("sweep-data") / "data"
    prepare(resolve_config("tiny-math", small_set_list(data)), log=lambda msg: None)
    return data


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    args = ["sweep", "--preset", "tiny-math", "--algo", "sft,rl", "--seeds", "0,1", "--name", "t", "--baseline", "sft",
            "--limit", "4", "--k", "2", "--jobs", "2", "--json", *small_sets(tmp_path / "data")]
    # no data yet: the sweep prepares the shared folder once, before its two concurrent cells start
    first = subprocess.run([AMFT, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    prepare_log = (tmp_path / "sweeps" / "t" / "prepare.log").read_text()
    assert prepare_log.count("$ ") == 1 and "wrote" in prepare_log
    assert not any("preparing first" in p.read_text() for p in (tmp_path / "sweeps" / "t" / "runs").glob("*/sweep.log"))
    table = json.loads(first.stdout)
    folder = tmp_path / "sweeps" / "t"
    assert json.loads((folder / "table.json").read_text()) == table
    assert [r["algo"] for r in table["rows"]] == ["sft", "rl"] and table["k"] == 2 and table["n"] == 4
    for row in table["rows"]:
        assert row["seeds"] == [0, 1]
        for run in (r for r in table["runs"] if r["algo"] == row["algo"]):
            scores = json.loads((tmp_path / run["run"] / "eval" / "test.json").read_text())["metrics"]
            assert run["id"]["greedy"] == scores["greedy_accuracy"]
        assert row["id.greedy"]["values"] == [r["id"]["greedy"] for r in table["runs"] if r["algo"] == row["algo"]]
    rl_row = table["rows"][1]  # --baseline sft: rl − sft seed by seed
    scores = {(r["algo"], r["seed"]): r["id"]["greedy"] for r in table["runs"]}
    assert table["baseline"] == "sft" and rl_row["vs_baseline"]["id.greedy"]["values"] == [
        scores["rl", s] - scores["sft", s] for s in (0, 1)]
    rl_runs = [r for r in table["runs"] if r["algo"] == "rl"]
    assert all(r["rollouts"] == 2 * 2 * 2 for r in rl_runs)  # 2 steps × 2 prompts × 2 samples
    assert all(r["rollouts"] == 0 for r in table["runs"] if r["algo"] == "sft")
    assert (folder / "table.md").read_text().startswith("| method | seeds | ID greedy | ID avg@2 |")
    same = provenance.trained_on(folder / "runs" / "sft-s0")[0]  # every cell: this software, this CPU
    assert table["trained_under"] == {"same": same, "differs": {}, "unrecorded": []}
    torch = metadata.version("torch")
    assert same["torch"] == torch and f"torch {torch}" in (folder / "table.md").read_text()

    # an interrupted cell (its last checkpoint lost) is resumed; the others are kept as they are
    cell = folder / "runs" / "rl-s1"
    shutil.rmtree(cell / "checkpoints" / "step-2")
    kept = (folder / "runs" / "sft-s0" / "eval" / "test.json").stat().st_mtime_ns
    again = subprocess.run([AMFT, *args[:-len(small_sets(tmp_path / "data"))], "--plain",
                            *small_sets(tmp_path / "data")], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rl-s1: resumed, evaluated" in again.stderr and "sft-s0: kept, eval kept" in again.stderr
    assert (cell / "checkpoints" / "step-2").is_dir()
    assert (folder / "runs" / "sft-s0" / "eval" / "test.json").stat().st_mtime_ns == kept

    plotted = CliRunner().invoke(app, ["plot", "sweep", str(folder)])
    assert plotted.exit_code == 0, plotted.output
    assert (folder / "plots" / "sweep.png").is_file()


def _hangups_not_ignored() -> None:
    """A sweep started from a terminal, even when these tests run under nohup (whose ignored SIGHUP
    every child would inherit, and a sweep keeps ignoring)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "terminal Ctrl-C"])
def test_a_signal_to_the_sweep_stops_its_running_cell_with_a_checkpoint(how, tmp_path, prepared):
    """`kill PID` / `kill -INT PID` of the sweep alone, its terminal closing, or Ctrl-C in a terminal
    (SIGINT to the whole foreground group): the running cell gets ONE stop request (a second Ctrl-C
    would abort it without a checkpoint), ends its step with a checkpoint and exits; no further
    cell starts, no cell process is left behind, and the sweep exits 130 (rerunning it resumes)."""
    shutil.copytree(prepared, tmp_path / "data")
    folder = tmp_path / "sweeps" / "t"
    args = ["sweep", "--preset", "tiny-math", "--algo", "sft,rl", "--seeds", "0", "--name", "t", "--plain",
            *small_sets(tmp_path / "data"), "--set", "train.steps=400", "--set", "train.save_every=1000"]
    proc = subprocess.Popen([AMFT, *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,  # a group of its own, as a terminal's job
                            preexec_fn=_hangups_not_ignored)
    metrics = folder / "runs" / "sft-s0" / "metrics.jsonl"
    wait_until(lambda: (metrics.is_file() and metrics.read_text().count("\n") >= 3) or proc.poll() is not None,
               timeout=300)
    assert proc.poll() is None, proc.communicate()
    if how == "terminal Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    reached = max(checkpoint_dirs(folder / "runs" / "sft-s0"))
    log = (folder / "runs" / "sft-s0" / "sweep.log").read_text()
    assert 3 <= reached < 400 and f"interrupted: checkpoint sweeps/t/runs/sft-s0/checkpoints/step-{reached}" in log
    assert not (folder / "runs" / "rl-s0").exists()  # no new cell after the signal
    assert not (folder / "prepare.log").exists()  # the copied data counted as prepared
    with open(folder / "runs" / "sft-s0" / ".lock") as f:  # the cell's process has ended (its lock is free)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_under_nohup_a_hangup_does_not_stop_the_sweep(tmp_path, prepared):
    """`nohup amft sweep ... &` is how a sweep outlives its terminal: SIGHUP stays ignored, and the
    cell trains to its last step."""
    shutil.copytree(prepared, tmp_path / "data")
    folder = tmp_path / "sweeps" / "t"
    args = ["sweep", "--preset", "tiny-math", "--algo", "sft", "--seeds", "0", "--name", "t", "--plain",
            *small_sets(tmp_path / "data"), "--set", "train.steps=40"]
    proc = subprocess.Popen(["nohup", AMFT, *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = folder / "runs" / "sft-s0" / "metrics.jsonl"
    wait_until(lambda: (metrics.is_file() and metrics.read_text().count("\n") >= 3) or proc.poll() is not None,
               timeout=300)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGHUP)  # the terminal closing: its session's processes get SIGHUP
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert max(checkpoint_dirs(folder / "runs" / "sft-s0")) == 40


def test_a_killed_sweep_stops_its_running_cell_with_a_checkpoint(tmp_path, prepared):
    """SIGKILL of the sweep (or the OOM killer) passes nothing on, yet its running cell gets SIGTERM
    from Linux as the sweep dies (stop_with_parent): it ends its step with a checkpoint and exits,
    instead of training on with no sweep to evaluate it."""
    shutil.copytree(prepared, tmp_path / "data")
    folder = tmp_path / "sweeps" / "t"
    args = ["sweep", "--preset", "tiny-math", "--algo", "sft", "--seeds", "0", "--name", "t", "--plain",
            *small_sets(tmp_path / "data"), "--set", "train.steps=400", "--set", "train.save_every=1000"]
    proc = subprocess.Popen([AMFT, *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    cell = folder / "runs" / "sft-s0"
    wait_until(lambda: ((cell / "metrics.jsonl").is_file() and (cell / "metrics.jsonl").read_text().count("\n") >= 3)
               or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, proc.communicate()
    proc.kill()
    proc.communicate(timeout=60)
    wait_until(lambda: not _processes_mentioning("sweeps/t/runs/sft-s0"), timeout=120)  # the cell has ended
    reached = max(r for r in checkpoint_dirs(cell))
    assert 3 <= reached < 400 and f"interrupted: checkpoint sweeps/t/runs/sft-s0/checkpoints/step-{reached}" in (
        cell / "sweep.log").read_text()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return pids


def test_sigterm_while_the_sweep_prepares_stops_the_prepare_without_debris(tmp_path):
    """`kill PID` of the sweep while its shared `amft prepare` builds the tiny model: the prepare
    gets the SIGTERM, removes its half-built model folder and exits; the sweep says so, starts no
    run and exits 130. Before, the sweep died and its prepare went on as an orphan."""
    data = tmp_path / "data"
    sets = [f"task.data_dir={data}", f"model.path={data / 'model'}", "task.train_size=200", "task.val_size=8",
            "task.test_size=8", "task.ood_size=8", "task.pretrain_size=200", "model.pretrain_steps=100000",
            "model.pretrain_batch_size=4"]
    args = ["sweep", "--preset", "tiny-gp", "--algo", "sft", "--seeds", "0", "--name", "t", "--plain",
            *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen([AMFT, *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: (data.is_dir() and any(data.glob(".model-*"))) or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "preparing the shared data stopped" in out + err, (out, err)
    prepare_log = (tmp_path / "sweeps" / "t" / "prepare.log").read_text()
    assert "interrupted: stopped by SIGTERM (nothing half-written is kept" in prepare_log
    assert not list(data.glob(".model-*")) and not (data / "model").exists()  # no half-built model left
    assert not (tmp_path / "sweeps" / "t" / "runs").exists()  # no run started
    assert not _processes_mentioning(str(data))  # the prepare has ended too



def test_cells_share_the_sweeps_thread_budget_and_wandb_group_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    env = sweep._child_env(2, "grid-a")
    assert env["WANDB_RUN_GROUP"] == "grid-a" and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = sweep._child_env(2, "grid-a")
    assert env["WANDB_RUN_GROUP"] == "mine" and env["OMP_NUM_THREADS"] == "3"
