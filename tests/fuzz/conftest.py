"""Fuzz-suite plumbing: count the cases executed and report them in the terminal summary.

Tests take the session fixture ``fuzz_counter`` and call ``hit(kind)`` once per
example they execute (hypothesis runs the test body once per example, shrinking
included), and ``note(outcome)`` for what the example did. The summary prints::

    ======================== qedkit fuzz ========================
    fuzz cases executed: 412 (engine 380, cli 32); cli commands run: 192
    outcomes: ...
"""

from __future__ import annotations

from collections import Counter

import pytest


class FuzzCounter:
    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def hit(self, kind: str) -> None:
        self.cases[kind] += 1

    def note(self, outcome: str, n: int = 1) -> None:
        self.outcomes[outcome] += n

    def __repr__(self) -> str:
        return f"FuzzCounter({self.total} cases)"

    @property
    def total(self) -> int:
        return sum(self.cases.values())


COUNTER = pytest.StashKey[FuzzCounter]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[COUNTER] = FuzzCounter()


@pytest.fixture(scope="session")
def fuzz_counter(request: pytest.FixtureRequest) -> FuzzCounter:
    return request.config.stash[COUNTER]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    counter = config.stash.get(COUNTER, None)
    if counter is None or not counter.total:
        return
    terminalreporter.section("qedkit fuzz")
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(counter.cases.items()))
    terminalreporter.write_line(f"fuzz cases executed: {counter.total} ({kinds})")
    if counter.outcomes:
        outcomes = ", ".join(f"{name} {n}" for name, n in sorted(counter.outcomes.items()))
        terminalreporter.write_line(f"outcomes: {outcomes}")
