"""Reading and writing configs: presets, --set overrides, TOML.

Separate from config.py, which holds the schema (the knobs and their
validation), so the schema reads on its own. This module turns TOML files and
`--set key=value` strings into a Config, type-checking each value against its
field, and writes a resolved Config back as TOML. It imports only config.py
from the project.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from amft_cli.config import SECTIONS, Config, ConfigError

# ---------------------------------------------------------------------------
# parsing: --set overrides and TOML data


def _parse_list(text: str) -> list:
    """A --set list: TOML (`["a", "b"]`, `[1, 2]`) or bare comma-separated words (`a,b`, `[a, b]`)."""
    if text.startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            if any(q in text for q in "\"'"):
                raise ValueError from None  # meant as TOML, but is not valid TOML
            text = text[1:-1] if text.endswith("]") else text[1:]
    return [t.strip() for t in text.split(",") if t.strip()]


def _coerce(value: Any, typ: type, key: str) -> Any:
    """Type-check a TOML value or parse a --set string into the field's type."""
    want = typ if get_origin(typ) is None else get_origin(typ)
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            if want is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if want is list:
                return _parse_list(text)
            return want(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if part not in SECTIONS or target is not cfg:
            raise ConfigError(f"unknown key {key!r} (sections: {', '.join(SECTIONS)})")
        target = getattr(target, part)
    hints = get_type_hints(type(target))
    name = parts[-1]
    if name not in hints or dataclasses.is_dataclass(hints[name]):
        known = ", ".join(f.name for f in dataclasses.fields(target) if not dataclasses.is_dataclass(f.type))
        raise ConfigError(f"unknown key {key!r} (known here: {known})")
    setattr(target, name, _coerce(value, hints[name], key))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--set key.sub=value` strings, each type-checked against its field."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        try:
            _set(cfg, key.strip(), value)
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
    return cfg


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from nested TOML-like data; unknown keys are errors."""
    cfg = Config()
    for key, value in data.items():
        try:
            if isinstance(value, dict):
                if key not in SECTIONS:
                    raise ConfigError(f"unknown section [{key}] (known: {', '.join(SECTIONS)})")
                for sub, v in value.items():
                    _set(cfg, f"{key}.{sub}", v)
            else:
                _set(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------
# presets


def presets_dir() -> Path:
    """presets/ of the checkout (editable install) or of the working directory."""
    here = Path(__file__).resolve().parent.parent / "presets"
    return here if here.is_dir() else Path.cwd() / "presets"


def list_presets() -> dict[str, str]:
    """name -> one-line description, for every presets/*.toml."""
    out = {}
    for path in sorted(presets_dir().glob("*.toml")):
        try:
            out[path.stem] = _read_toml(path).get("description", "")
        except ConfigError as e:
            out[path.stem] = f"(unusable: {e})"
    return out


def preset_path(name_or_path: str) -> Path:
    """The TOML file of a preset name (presets/NAME.toml) or path."""
    path = Path(name_or_path)
    return path if path.suffix == ".toml" and path.is_file() else presets_dir() / f"{name_or_path}.toml"


def load_preset(name_or_path: str) -> Config:
    """A preset by name (presets/NAME.toml) or by path to a TOML file."""
    path = preset_path(name_or_path)
    if not path.is_file():
        names = ", ".join(list_presets()) or "none found"
        raise ConfigError(f"--preset {name_or_path!r}: no such preset or TOML file (presets: {names})")
    data = _read_toml(path)
    data.setdefault("preset", path.stem)
    return from_dict(data, str(path))


def _read_toml(path: Path) -> dict:
    """A TOML file's data; an unreadable or non-TOML file is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a TOML text file (byte {e.start + 1} is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None


# ---------------------------------------------------------------------------
# writing


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML; `amft train --preset runs/X/config.toml` reproduces the run."""
    data = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def field_help() -> dict[str, str]:
    """key -> help text for every knob (used by `amft presets --keys` and docs)."""
    out = {}
    for name, cls in ([("", Config)] + list(SECTIONS.items())):
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS:
                continue
            out[f"{name + '.' if name else ''}{f.name}"] = f.metadata.get("help", "")
    return out
