"""Shared fixtures (the helpers behind them are in tests/qedtest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from qedtest import Qemu, qed


@pytest.fixture(scope="session")
def qemu() -> Qemu:
    return Qemu()


@pytest.fixture
def qed_cli() -> Callable[..., Any]:
    return qed
