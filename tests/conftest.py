"""Fixtures shared by the exporter's tests: settings on a fresh SQLite file and an engine
with a frozen clock. Helpers live in tests/helpers.py (importable as `helpers`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import T0, Clock, settings_for  # noqa: E402

from exporter.config import Settings  # noqa: E402
from exporter.engine import Engine  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings on a SQLite file under tmp_path (no environment, no YAML)."""
    return settings_for(tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def engine(settings: Settings, clock: Clock) -> Iterator[Engine]:
    """An engine with its own registry and a frozen clock at T0; closed afterwards."""
    e = Engine(settings, clock=clock)
    yield e
    e.close()
