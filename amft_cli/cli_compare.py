"""`amft compare A B`: two evaluated runs, paired problem by problem (the work is in compare.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from amft_cli.cli_options import JSON_OUT, emit_json, stdout_reserved
from amft_cli.dashboard import output_console

console = output_console()


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _diff(stat: dict) -> str:
    """'+1.2 ± 3.4' in points (B − A, half-width of the 95 % t-interval)."""
    half = "" if stat["half"] is None else f"±{100 * stat['half']:.1f}"
    return f"{100 * stat['mean']:+.1f}{half}"


def compare_cmd(run_a: Path = typer.Argument(..., help="Run directory (or eval folder) A."),
                run_b: Path = typer.Argument(..., help="Run directory (or eval folder) B."),
                json_out: bool = JSON_OUT):
    """Two evaluated runs on the same test problems, paired problem by problem (B − A).

    Greedy: McNemar's exact test on the problems only one run solves, and a 95 % t-interval of
    the per-problem difference; avg@k: the same interval over per-problem sample accuracy. It
    covers the test set's chance, not the training seed's (amft sweep --baseline pairs seeds).

    Example: amft compare runs/smol-math-sft runs/smol-math-amft
    """
    from amft_cli.compare import compare

    with stdout_reserved(json_out) as stdout:
        result = compare(run_a, run_b)
        table = Table(title=f"A = {run_a}\nB = {run_b}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        for header in ("split", "n", "greedy", "Δ", "A/B only", "p", "avg@k", "Δ"):
            table.add_column(header, justify="left" if header == "split" else "right", no_wrap=True)
        for split, s in result["splits"].items():
            if "skipped" in s:
                table.add_row(split, *["—"] * 7)
                continue
            g, a = s.get("greedy"), s.get("avg@k")
            table.add_row(split, str(s["n"]),
                          *((f"{_pct(g['a'])}→{_pct(g['b'])}", _diff(g["b_minus_a"]), f"{g['only_a']}/{g['only_b']}",
                             f"{g['p_mcnemar']:.2g}") if g else ["—"] * 4),
                          *((f"{_pct(a['a'])}→{_pct(a['b'])}", _diff(a["b_minus_a"])) if a else ["—"] * 2))
        console.print(table)
        console.print("Rates in %, A→B; Δ = B − A in points, mean ± half-width of the 95 % t-interval over "
                      "problems; A/B only: problems only A's or only B's greedy answer solves; p: McNemar's exact "
                      "test on them.", highlight=False)
        for split, s in result["splits"].items():
            if s.get("skipped"):
                console.print(f"{split}: {s['skipped']}", highlight=False)
            if s.get("differs"):
                console.print(f"[bold]Not like for like[/] ({split}): {'; '.join(s['differs'])}", highlight=False)
            if s.get("only_in_one"):
                console.print(f"{split}: {s['only_in_one']} problem(s) evaluated by one run only, left out",
                              highlight=False)
        for line in result["mixed_checkpoints"]:
            console.print(f"[bold]Not one model[/]: {line}", highlight=False)
        if json_out:
            emit_json({"command": "compare", **result}, stdout)
