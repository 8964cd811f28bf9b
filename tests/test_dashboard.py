"""The dashboard: sparklines, the plain log line, plain and live modes."""

import io
import re
import subprocess
import sys

from rich.console import Console

from amft_cli.dashboard import Dashboard, format_duration, format_plain_line, sparkline

NAN = float("nan")


# ---------------------------------------------------------------------------
# sparkline


def test_sparkline_maps_min_to_max_onto_the_eight_blocks():
    assert sparkline(list(range(8)), 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([10.0, 20.0, 15.0], 8) == "▁█▅"  # 15 is 4/7 ≈ 0.57 of the way -> index 4 (▅)


def test_sparkline_keeps_only_the_last_width_values():
    assert sparkline(list(range(100)) + [0.0], 3) == "██▁"  # window 98, 99, 0
    assert sparkline([5, 0, 7], 2) == "▁█"


def test_sparkline_constant_series_is_a_flat_mid_line():
    assert sparkline([0.3] * 5, 10) == "▄▄▄▄▄"


def test_sparkline_gaps_for_nan_none_and_inf():
    assert sparkline([0.0, NAN, None, 1.0, float("inf")], 5) == "▁  █ "
    assert sparkline([NAN, None], 4) == "  "
    assert sparkline([], 4) == "" and sparkline([1.0, 2.0], 0) == ""


# ---------------------------------------------------------------------------
# plain line


def test_plain_line_has_every_present_key_rate_and_eta():
    metrics = {"balance/mu": 0.8123, "reward/mean": 1.234, "reward/accuracy": 0.4071,
               "policy/entropy": 0.853, "loss/sft": 0.5213, "loss/rl": -0.0087, "time/step_s": 0.8}
    line = format_plain_line(120, 500, metrics, 1.2)
    # eta: 380 steps / 1.2 step/s = 316.7 s -> 5m17s
    assert line == ("step 120/500 | mu 0.812 | reward 1.23 | acc 0.41 | H 0.85 | "
                    "loss/sft 0.52 loss/rl -8.70e-03 | 1.2 step/s | eta 5m17s")


def test_plain_line_only_present_keys_and_robust_to_none_nan():
    line = format_plain_line(10, 50, {"loss/sft": 2.5, "balance/mu": None, "policy/entropy": NAN}, None)
    assert line == "step 10/50 | mu n/a | H n/a | loss/sft 2.50"


def test_plain_line_slow_steps_show_seconds_per_step():
    line = format_plain_line(3, 10, {}, 1 / 40)  # 40 s a step, 7 steps left
    assert line == "step 3/10 | 40.0 s/step | eta 4m40s"


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 * 3 + 7 * 60 + 5)] == ["0s", "59s", "1m01s", "3h07m"]


# ---------------------------------------------------------------------------
# plain mode


def _fake_metrics(step):
    return {"balance/mu": 0.8 - step / 100, "reward/mean": step / 10, "loss/sft": 1.0, "loss/rl": NAN}


def test_plain_mode_prints_one_line_per_log_every_plus_the_last_step():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    ticks = iter(range(100))
    with Dashboard("amft", {"run": "t"}, total_steps=25, log_every=10, console=console) as dash:
        assert dash.live is False
        dash._clock = lambda: next(ticks) * 0.5  # one update every 0.5 s -> 2 step/s
        for step in range(1, 26):
            dash.update(step, _fake_metrics(step))
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 10/25", "step 20/25", "step 25/25"]
    assert lines[0].startswith("step 10/25 | mu 0.700 | reward 1.00 | loss/sft 1.00 loss/rl n/a | 2.0 step/s")
    assert lines[0].endswith("eta 8s")  # 15 steps at 2 step/s = 7.5 s
    assert lines[2] == "step 25/25 | mu 0.550 | reward 2.50 | loss/sft 1.00 loss/rl n/a | 2.0 step/s | eta 0s"


def test_plain_mode_messages_and_no_wrap_of_long_lines():
    out = io.StringIO()
    dash = Dashboard("amft", {}, total_steps=4, log_every=4, console=Console(file=out, width=40), live=False)
    with dash:
        dash.message("warm-up done, H*=1.23 [not markup]")
        dash.update(4, {"balance/mu": 0.5, "reward/mean": 1.0, "reward/accuracy": 0.5,
                        "policy/entropy": 1.0, "loss/sft": 1.0, "loss/rl": 1.0})
    lines = out.getvalue().splitlines()
    assert lines[0] == "warm-up done, H*=1.23 [not markup]"
    assert len(lines) == 2 and lines[1].startswith("step 4/4 | mu 0.500")  # longer than 40 cols, one line


def test_auto_mode_is_plain_under_ci_even_on_a_terminal(monkeypatch):
    console = Console(file=io.StringIO(), force_terminal=True)
    monkeypatch.setenv("CI", "true")
    assert Dashboard("t", {}, 10, console=console).live is False
    monkeypatch.delenv("CI")
    assert Dashboard("t", {}, 10, console=console).live is True


# ---------------------------------------------------------------------------
# live mode


def test_live_mode_renders_the_step_counter_mu_and_losses():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, record=True)
    with Dashboard("amft", {"run": "demo", "preset": "tiny-math", "algo": "amft"},
                   total_steps=5, console=console, live=True) as dash:
        for step in range(1, 6):
            dash.update(step, {**_fake_metrics(step), "reward/accuracy": 0.25, "policy/entropy": 1.5,
                               "rollout/tokens_per_s": 12345.0, "time/step_s": 0.2,
                               "reward/zero_std_frac": 0.125 * step})
        dash.message("warm-up done, H*=1.23")
    text = console.export_text()
    assert "step 5/5" in text and "100%" in text
    assert "0.750" in text  # the last mu: 0.8 - 5/100
    assert "run demo" in text and "preset tiny-math" in text
    assert "12,345" in text and "warm-up done, H*=1.23" in text
    assert "█▆▅▃▁" in text  # mu's sparkline row for 0.79 .. 0.75
    assert re.search(r"no signal +▁▃▅▆█ +0\.62", text)  # groups without GRPO signal, 0.125 .. 0.625


def test_modules_do_not_import_torch():
    code = "import sys, amft_cli.metrics, amft_cli.dashboard; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
