"""The options several `amft` commands share, the config and run directory they resolve to,
the --json stdout discipline, one fix to how typer's help shows flags, and how a mistake
(typer's own usage errors included) is told from a bug, to be shown as one line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

import typer

from amft_cli import methods
from amft_cli.config import Config, ConfigError, validate
from amft_cli.config_io import apply_overrides, load_preset, preset_path

DEFAULT_PRESET = "tiny-math"


def _show_flags_as_flags() -> None:
    """Show `--ood`, not `--ood <bool>`, in --help.

    typer 0.29 vendors click (typer._click) and its rich help prints a type column
    for EVERY option via TyperOption.display_type_rich, flags included; typer 0.28's
    rich help skipped bool metavars, and typer's own plain formatter
    (TyperOption.get_help_record) still skips `is_flag` options. A flag takes no
    value, so it gets no type. Versions without that method are left alone.
    """
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_as_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)
    display_type_rich.flags_as_flags = True
    TyperOption.display_type_rich = display_type_rich


_show_flags_as_flags()


@contextlib.contextmanager
def stdout_reserved(json_out: bool):
    """With --json, stdout is kept for the one JSON document: whatever is printed
    meanwhile (progress, tables, library chatter) goes to stderr. Yields the real stdout."""
    real = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
        yield real


def emit_json(document: dict, stream) -> None:
    stream.write(json.dumps(document, indent=2) + "\n")
    stream.flush()


PRESET = typer.Option(None, "--preset", "-p", metavar="NAME|FILE", help=f"Preset name in presets/ or a path to a "
                      f"TOML file (default: {DEFAULT_PRESET}). `amft presets` lists them.")
SET = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a config key, e.g. --set "
                   "train.lr=1e-5 (repeatable; type-checked). `amft presets --keys` lists every key.")
SEED = typer.Option(None, "--seed", help="Global seed (data order, sampling, LoRA init); same as --set seed=N. "
                    "A tiny base model is built with one fixed seed, so every --seed fine-tunes the same base.")
JSON_OUT = typer.Option(False, "--json", help="Print one JSON document of the headline results on stdout and "
                        "nothing else there (progress and messages go to stderr).")
FAIL_UNDER = typer.Option(None, "--fail-under", metavar="METRIC=VALUE", help="Exit with code 3 when METRIC is "
                          "below VALUE, e.g. id.greedy=0.9 or ood.avg@8=0.1 (repeatable). METRIC is SCOPE.NAME: "
                          "scope id, ood or a set name; name greedy, avg@k, pass@k (or avg@K/pass@K with the "
                          "eval's K), reward, step_accuracy, route_success.")


def resolve_config(preset: str | None, overrides: list[str] | None, seed: int | None = None,
                   algo: str | None = None, steps: int | None = None) -> Config:
    """Preset (or the embedded default) + shortcuts + --set overrides, validated."""
    cfg = load_preset(preset or DEFAULT_PRESET)
    shortcuts = [f"{k}={v}" for k, v in (("seed", seed), ("train.algo", algo), ("train.steps", steps)) if v is not None]
    sets = shortcuts + list(overrides or [])
    try:
        cfg = validate(apply_overrides(cfg, sets))
        methods.check(cfg.train.algo)
    except ConfigError as e:  # a value out of range: say where it came from, the command line or the file
        keys = str(e).split(":", 1)[0].split("/")
        keys = [keys[0]] + [keys[0].rsplit(".", 1)[0] + "." + k for k in keys[1:]]  # "amft.mu_min/mu_max"
        given = any(line.split("=", 1)[0].strip() in keys for line in sets)
        raise ConfigError(str(e) if given else f"{preset_path(preset or DEFAULT_PRESET)}: {e}") from None
    return cfg


def eval_flag_sets(**flags) -> list[str]:
    """`eval.<key>=value` overrides for the eval flags given (--k 4 -> eval.k=4), each checked as its
    key is, so a flag takes no value its --set would refuse; the one-line error names the flag."""
    sets = []
    for key, value in flags.items():
        if value is None:
            continue
        line = f"eval.{key}={value}"
        try:
            validate(apply_overrides(Config(), [line]))
        except ConfigError as e:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: {str(e).split(': ', 1)[-1]}") from None
        sets.append(line)
    return sets


def preset_name(preset: str | None) -> str:
    """'tiny-gp' -> 'tiny-gp', 'path/to/x.toml' -> 'x' (dots inside names like math-qwen2.5 are kept)."""
    preset = preset or DEFAULT_PRESET
    return Path(preset).stem if preset.endswith(".toml") else Path(preset).name


def default_run_dir(preset: str | None, cfg: Config, algo: str | None, seed: int | None) -> Path:
    name = preset_name(preset)
    name += f"-{algo}" if algo else ""
    name += f"-s{seed}" if seed is not None else ""
    return Path("runs") / name


def _print_version(value: bool) -> None:
    if value:
        from amft_cli.provenance import version_line

        typer.echo(version_line())
        raise typer.Exit()


def root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the versions of amft-cli (and its commit) and of the packages "
                                           "its numbers depend on, then exit.")) -> None:
    pass  # `amft` itself has one option; typer's app help stays the app's


def run_app(app: typer.Typer) -> None:
    """Run the typer app; click's own usage errors (an unknown flag, a value that is not an integer,
    a missing argument) become a ConfigError, one line like every other mistake, instead of
    typer's boxed usage panel. Ends in SystemExit like typer's own run (typer.Exit(3) exits 3)."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # typer 0.29 vendors click (typer._click): its UsageError is known by its exit code 2
        if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
            raise
        where = e.ctx.command_path if getattr(e, "ctx", None) else "amft"
        raise ConfigError(f"{where}: {' '.join(e.format_message().split())} (see {where} --help)") from None
    sys.exit(code if isinstance(code, int) else 0)  # as typer's standalone mode ends: main() reads the code


def is_user_error(e: BaseException) -> bool:
    """Our modules raise ValueError (ConfigError, ModelError, ...) only for user mistakes; one
    raised inside torch or transformers is a bug to show in full (AMFT_DEBUG=1 shows every one)."""
    if os.environ.get("AMFT_DEBUG") == "1":
        return False
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, FileNotFoundError) or not frames or "amft_cli" in frames[-1].filename
