"""Fixtures of the crash suite: every test's totals line, shown in pytest's terminal
summary (so a plain ``pytest tests/crash`` reports states, lost writes, corruptions
and qemu-img checks without ``-s``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

# The helpers' asserts (crashkit.assert_totals) report as the tests' own do.
pytest.register_assert_rewrite("crashkit")

_LINES = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def crash_summary(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``crash_summary(line)``: print a totals line and keep it for the summary."""
    lines = request.config.stash.setdefault(_LINES, [])

    def record(line: str) -> None:
        print("\n" + line)
        lines.append(line)

    return record


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    lines = config.stash.get(_LINES, [])
    if lines:
        scale = os.environ.get("QEDKIT_CRASH_SCALE", "1")
        terminalreporter.write_sep("=", f"crash and fault totals (QEDKIT_CRASH_SCALE={scale})")
        for line in lines:
            terminalreporter.write_line(line)
