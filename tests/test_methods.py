"""The method registry and each method's rule, pinned to hand-worked values."""

import pytest

from amft_cli import methods
from amft_cli.methods.base import Method
from amft_cli.config import Config, ConfigError

BUILT_IN = {"sft", "rl", "sft-rl", "mix", "amft"}


def make(name: str, **sections) -> Method:
    cfg = Config()
    for key, value in sections.items():
        section, knob = key.split("__")
        setattr(getattr(cfg, section), knob, value)
    return methods.get(name)(cfg, policy=None)


def test_registry_lists_every_module_and_names_the_choices_on_a_typo():
    assert BUILT_IN <= set(methods.names())
    assert all(methods.get(name).name == name for name in methods.names())
    with pytest.raises(ConfigError, match=r"train.algo: unknown method 'amtf'; choices: .*amft"):
        methods.get("amtf")


def test_a_method_must_live_in_the_module_of_its_name():
    with pytest.raises(RuntimeError, match="methods/chorus.py"):
        methods.register("chorus")(type("Chorus", (Method,), {"__module__": "amft_cli.methods.mix"}))


def test_fixed_balances():
    assert [make("sft").mu(s) for s in (0, 9)] == [1.0, 1.0]
    assert [make("rl").mu(s) for s in (0, 9)] == [0.0, 0.0]
    assert [make("sft-rl", sft_rl__switch_step=3).mu(s) for s in (0, 2, 3, 9)] == [1.0, 1.0, 0.0, 0.0]
    assert make("mix", mix__mu=0.3).mu(7) == 0.3
    assert not make("sft").uses_rollouts and make("rl").uses_rollouts


def test_amft_warms_up_then_uses_its_learned_mu_and_saves_it():
    amft = make("amft", amft__warmup_steps=5, amft__mu_init=0.42)
    assert [amft.mu(s) for s in (0, 4, 5, 50)] == [1.0, 1.0, 0.42, 0.42]
    amft.state.mu, amft.state.entropy_target = 0.6, 1.25
    again = make("amft", amft__warmup_steps=5)
    again.load_state_dict(amft.state_dict())
    assert again.mu(5) == 0.6 and again.state.entropy_target == 1.25
