"""The training methods, one module per `--algo`, behind a registry (as verl registers its
advantage estimators and policy losses in core_algos.py).

A method module defines a `Method` subclass and decorates it with `@register("<name>")`;
its file is `<name>.py` with '-' spelt '_' (sft-rl lives in sft_rl.py), and its knobs
are the config section of the same name. The loop calls the hooks of `base.Method`
and names no method.

Listing the names reads the folder and imports nothing, so `amft --help` and config
errors stay fast (a method module imports torch); `get` imports the one module asked for.
"""

from __future__ import annotations

import importlib
import pkgutil

from amft_cli.config import ConfigError

_REGISTRY: dict[str, type] = {}
_NOT_METHODS = {"base"}


def register(name: str):
    """Class decorator: make a Method subclass available as `--algo name`."""
    def wrap(cls: type) -> type:
        module = cls.__module__.rsplit(".", 1)[-1]
        if module != name.replace("-", "_"):
            raise RuntimeError(f"method {name!r} must live in methods/{name.replace('-', '_')}.py, not {module}.py")
        if _REGISTRY.get(name, cls) is not cls:
            raise RuntimeError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def names() -> list[str]:
    """Every method name, sorted (read from the folder; no module is imported)."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__)
                  if m.name not in _NOT_METHODS and not m.name.startswith("_"))


def check(name: str) -> str:
    """name if it is a method, else a one-line error listing the choices."""
    if name not in names():
        raise ConfigError(f"train.algo: unknown method {name!r}; choices: {', '.join(names())}")
    return name


def get(name: str) -> type:
    """The Method class registered as `name` (imports its module on first use)."""
    check(name)
    if name not in _REGISTRY:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    if name not in _REGISTRY:
        raise RuntimeError(f"methods/{name.replace('-', '_')}.py registers no method named {name!r}")
    return _REGISTRY[name]
