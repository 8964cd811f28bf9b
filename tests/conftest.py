"""Fixtures shared by the tests that run `amft` as a user does (test_reliability, test_run_safety)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amft_cli.cli import resolve_config
from amft_cli.data import prepare
from amft_runs import ForkedAmft, tiny_sets


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Prepared tiny-math splits and model for `amft_runs.tiny_sets`."""
    path = tmp_path_factory.mktemp("tiny-data")
    prepare(resolve_config("tiny-math", tiny_sets(path)), log=lambda msg: None)
    return path


@pytest.fixture(scope="session")
def amft(tmp_path_factory) -> ForkedAmft:
    return ForkedAmft(tmp_path_factory.mktemp("work"))
