"""`pytest tests/golden --regen-golden` (or NVMPROV_REGEN_GOLDEN=1) rewrites the golden XML files."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.xml from the current renderer")


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden", default=False)) or os.environ.get(
        "NVMPROV_REGEN_GOLDEN") == "1"
