"""plot.py: each figure's plotted data equals what the synthetic run directory
holds (lines, bars, table cells), not pixels; and plot.py never imports torch."""

import json
import math
import subprocess
import sys

import pytest

from amft_cli import plot
from amft_cli.config import Config
from amft_cli.config_io import to_toml
from amft_cli.plot import PlotError, compare, compare_eval_figure, compare_figure, curriculum, curriculum_figure, ema

WARMUP = 5
STEPS = range(1, 21)


def mu_at(step):
    return 1.0 if step <= WARMUP else round(0.8 - 0.01 * (step - WARMUP), 4)


def make_run(root, name, algo="amft", seed=1, rewards=True, sums=False):
    """A run folder as `amft train` leaves it: config.toml and metrics.jsonl (last line cut off)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = Config()
    cfg.train.algo, cfg.seed, cfg.amft.warmup_steps = algo, seed, WARMUP
    (run / "config.toml").write_text(to_toml(cfg))
    lines = []
    for step in STEPS:
        rec = {"step": step, "time": 0.0, "loss/sft": 1.0 / step, "balance/mu": mu_at(step),
               "balance/meta_update": 1.0 if step in (10, 20) else 0.0,
               "balance/entropy_target": None if step < WARMUP else 1.5,
               **({"balance/warmup": float(step <= WARMUP)} if algo == "amft" else {}),
               "policy/entropy": 2.0 - 0.05 * step + (0.1 if step % 2 else 0.0)}
        if sums:  # what each controller term has asked of μ (0 in the warm-up)
            rec["balance/sum_delta_meta"] = -0.02 * max(0, step - WARMUP)
            rec["balance/sum_delta_entropy"] = 0.003 * max(0, step - WARMUP)
        if rewards and step > WARMUP:  # no rollouts during warm-up
            rec["reward/mean"] = (-1.0) ** step * 0.5 + 0.1 * step
            rec["reward/accuracy"] = min(1.0, 0.04 * step)
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "balance/m')
    return run


def write_eval(run, split, ood, **metrics):
    path = run / "eval" / f"{split}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"split": split, "metrics": {"ood": ood, "n_examples": 10, **metrics}}))


def data(line):
    return list(line.get_xdata()), list(line.get_ydata())


def by_label(ax):
    return {line.get_label(): line for line in ax.lines}


# ---------------------------------------------------------------------------
# curriculum


def test_curriculum_series_equal_the_metrics_file(tmp_path):
    fig = curriculum_figure(make_run(tmp_path, "r", seed=3))
    mu_ax, reward_ax, acc_ax, entropy_ax = fig.axes
    mu = by_label(mu_ax)
    assert data(mu["μ (SFT weight)"]) == (list(STEPS), [mu_at(s) for s in STEPS])
    assert data(mu["meta-gradient update"]) == ([10, 20], [mu_at(10), mu_at(20)])
    after = [s for s in STEPS if s > WARMUP]
    raw_reward = [(-1.0) ** s * 0.5 + 0.1 * s for s in after]
    reward = by_label(reward_ax)
    assert data(reward["reward, per step"]) == (after, raw_reward)
    assert data(reward["reward, EMA"])[1] == pytest.approx(ema(raw_reward))
    assert data(by_label(acc_ax)["accuracy, per step"])[1] == [min(1.0, 0.04 * s) for s in after]
    entropy = by_label(entropy_ax)
    assert data(entropy["entropy H, per step"])[1] == pytest.approx([2.0 - 0.05 * s + (0.1 if s % 2 else 0) for s in STEPS])
    target = entropy["target H*"]
    assert data(target) == (list(range(WARMUP, 21)), [1.5] * (21 - WARMUP))
    assert target.get_linestyle() == "--"
    for ax in fig.axes:  # warm-up shaded on every panel
        spans = [p for p in ax.patches if p.get_x() == 0 and p.get_width() == WARMUP]
        assert len(spans) == 1
    assert "amft (seed 3)" in fig.get_suptitle()
    assert fig.axes[-1].get_xlabel() == "step"


def test_curriculum_shows_where_each_controller_term_alone_would_take_mu(tmp_path):
    """μ at the first mixed step plus balance/sum_delta_*, a row's sums drawn one step on (they
    include that row's update, so they pair with the next row's μ); the axis makes room for them."""
    mu_ax = curriculum_figure(make_run(tmp_path, "r", sums=True)).axes[0]
    lines, first = by_label(mu_ax), WARMUP + 1
    steps = [first] + list(range(first + 1, 22))
    assert data(lines["μ₀ + meta-gradient alone"]) == (
        steps, pytest.approx([mu_at(first)] + [mu_at(first) - 0.02 * (s - WARMUP) for s in range(first, 21)]))
    assert data(lines["μ₀ + entropy term alone"])[1] == pytest.approx(
        [mu_at(first)] + [mu_at(first) + 0.003 * (s - WARMUP) for s in range(first, 21)])
    assert mu_ax.get_ylim()[0] <= mu_at(first) - 0.02 * 15 and mu_ax.get_ylim()[1] >= mu_at(first) + 0.003 * 15
    assert "μ₀ + meta-gradient alone" not in by_label(curriculum_figure(make_run(tmp_path, "old")).axes[0])


@pytest.mark.parametrize("values, limits", [([0.8, 0.83], (0.78, 0.85)), ([0.8], (0.77, 0.83)),
                                            ([1.0], (0.96, 1.02)), ([0.0, 0.01], (-0.02, 0.04)),
                                            ([0.0, 1.0], (-0.02, 1.02)), ([0.5, 0.9], (0.48, 0.92))])
def test_mu_axis_zooms_to_mu_at_least_0_02_wide_inside_zero_one(values, limits):
    assert plot.mu_limits(values) == pytest.approx(limits)


def test_curriculum_and_compare_zoom_their_mu_axis(tmp_path):
    """curriculum: to μ after the warm-up (the warm-up's μ = 1 named in the panel); compare: to
    every run's μ."""
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", algo="sft")]
    after = [mu_at(s) for s in STEPS if s > WARMUP]  # 0.79 .. 0.65
    mu_ax = curriculum_figure(runs[0]).axes[0]
    assert mu_ax.get_ylim() == pytest.approx(plot.mu_limits(after))
    assert plot.mu_limits(after) == pytest.approx((0.63, 0.81))
    assert [t.get_text() for t in mu_ax.texts] == ["warm-up: μ = 1 (off this scale)"]
    assert compare_figure(runs).axes[-1].get_ylim() == pytest.approx((0.63, 1.02))  # μ = 1: the warm-up, sft


def test_curriculum_without_rewards_says_so_and_has_no_warmup_for_sft(tmp_path):
    fig = curriculum_figure(make_run(tmp_path, "r", algo="sft", rewards=False))
    reward_ax = fig.axes[1]
    assert len(reward_ax.lines) == 0 and "not logged" in reward_ax.texts[0].get_text()
    assert all(len(ax.patches) == 0 for ax in fig.axes)


def test_curriculum_saves_under_run_plots_and_honours_format(tmp_path):
    run = make_run(tmp_path, "r")
    assert curriculum(run) == run / "plots" / "curriculum.png"
    assert (run / "plots" / "curriculum.png").read_bytes()[:4] == b"\x89PNG"
    assert curriculum(run, out=tmp_path / "figs", fmt="svg") == tmp_path / "figs" / "curriculum.svg"
    assert curriculum(run, out=tmp_path / "mine.png", fmt="svg") == tmp_path / "mine.png"
    with pytest.raises(PlotError, match="--format 'jpg'"):
        curriculum(run, fmt="jpg")


def test_curriculum_on_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError) as e:
        curriculum(tmp_path)
    assert str(e.value) == f"{tmp_path}: no metrics.jsonl — is this a run directory?"
    assert not (tmp_path / "plots").exists()  # nothing written for a failed plot


# ---------------------------------------------------------------------------
# compare


def test_ema_by_hand():
    assert ema([0.0, 3.0], span=2) == pytest.approx([0.0, 2.0])  # alpha = 2/3
    assert ema([4.0, 1.0, 1.0], span=3) == pytest.approx([4.0, 2.5, 1.75])  # alpha = 1/2


def test_compare_has_one_labelled_line_per_run_per_panel(tmp_path):
    runs = [make_run(tmp_path, "a", "amft", 1), make_run(tmp_path, "b", "mix", 2)]
    fig = compare_figure(runs)
    reward_ax, entropy_ax, mu_ax = fig.axes
    for ax in (reward_ax, entropy_ax, mu_ax):
        assert [line.get_label() for line in ax.lines] == ["amft (seed 1)", "mix (seed 2)"]
    after = [s for s in STEPS if s > WARMUP]
    assert data(reward_ax.lines[1])[1] == pytest.approx(ema([(-1.0) ** s * 0.5 + 0.1 * s for s in after]))
    assert data(mu_ax.lines[0]) == (list(STEPS), [mu_at(s) for s in STEPS])
    assert reward_ax.lines[0].get_color() == mu_ax.lines[0].get_color()  # one colour per run
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["amft (seed 1)", "mix (seed 2)"]


def test_compare_falls_back_to_demo_entropy_for_runs_without_rollouts(tmp_path):
    sft = make_run(tmp_path, "s", "sft", 3, rewards=False)
    lines = [json.loads(l) for l in (sft / "metrics.jsonl").read_text().splitlines()[:-1]]
    for rec in lines:
        rec["policy/entropy_demo"] = rec.pop("policy/entropy")
    (sft / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    fig = compare_figure([make_run(tmp_path, "a", "amft", 1), sft])
    entropy_ax = fig.axes[1]
    assert [line.get_linestyle() for line in entropy_ax.lines] == ["-", "--"]
    assert data(entropy_ax.lines[1])[1] == pytest.approx(ema([2.0 - 0.05 * s + (0.1 if s % 2 else 0) for s in STEPS]))


def test_compare_labels_clash_gets_folder_names(tmp_path):
    runs = [make_run(tmp_path, "x", "rl", 0), make_run(tmp_path, "y", "rl", 0)]
    assert plot.run_labels(runs) == ["rl (seed 0) [x]", "rl (seed 0) [y]"]


def test_grouped_bars_heights_equal_eval_json(tmp_path):
    runs = [make_run(tmp_path, "a", "amft", 1), make_run(tmp_path, "b", "sft", 1)]
    assert compare_eval_figure(runs) is None
    write_eval(runs[0], "test", False, **{"avg@k": 0.6, "greedy_accuracy": 0.7})
    write_eval(runs[0], "ood", True, **{"avg@k": 0.3})
    write_eval(runs[1], "ood", True, **{"avg@k": 0.1})  # run b has no ID result
    ax = compare_eval_figure(runs).axes[0]
    heights = [[bar.get_height() for bar in c] for c in ax.containers]
    assert heights[0] == [0.6, 0.3]
    assert math.isnan(heights[1][0]) and heights[1][1] == 0.1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["test\n(ID)", "ood\n(OOD)"]
    assert [c.get_label() for c in ax.containers] == ["amft (seed 1)", "sft (seed 1)"]
    assert "avg@k" in ax.get_title()


def test_compare_writes_the_bars_only_when_runs_have_eval(tmp_path):
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", "mix", 2)]
    assert compare(runs) == [runs[0] / "plots" / "compare.png"]
    write_eval(runs[1], "test", False, greedy_accuracy=0.5)
    written = compare(runs, out=tmp_path / "cmp.svg")
    assert written == [tmp_path / "cmp.svg", tmp_path / "cmp-eval.svg"] and all(p.is_file() for p in written)


# ---------------------------------------------------------------------------
# eval table


def test_eval_table_cells_show_every_run_and_split(tmp_path):
    runs = [make_run(tmp_path, "a", "amft", 1), make_run(tmp_path, "b", "rl", 4)]
    write_eval(runs[0], "test", False, **{"k": 8, "avg@k": 0.5, "pass@k": 0.75, "greedy_accuracy": 0.6,
                                          "reward_mean": 1.25})
    write_eval(runs[1], "ood", True, **{"greedy_accuracy": 0.2, "greedy_reward_mean": -1.0,
                                        "route_success": 0.2})
    table = plot.eval_table_figure(runs).axes[0].tables[0]
    cells = table.get_celld()
    text = [[cells[r, c].get_text().get_text() for c in range(9)] for r in range(3)]
    assert text[0] == ["run", "split", "set", "n", "avg@k", "pass@k", "greedy", "reward", "route_success"]
    assert text[1] == ["amft (seed 1)", "test", "ID", "10", "50.0% @8", "75.0% @8", "60.0%", "1.25", "—"]
    assert text[2] == ["rl (seed 4)", "ood", "OOD", "10", "—", "—", "20.0%", "-1.00", "20.0%"]
    assert plot.eval_table(runs) == runs[0] / "plots" / "eval.png"


def test_eval_table_of_a_run_without_eval_names_it(tmp_path):
    run = make_run(tmp_path, "a")
    with pytest.raises(PlotError) as e:
        plot.eval_table([run])
    assert str(e.value).startswith(f"{run}: no eval results") and "amft eval --run" in str(e.value)


def test_plot_module_never_imports_torch():
    code = "import amft_cli.plot, amft_cli.plot_sweep, sys; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
