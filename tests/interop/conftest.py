"""Fixtures of the interop tests (QEMU is the oracle; helpers in qedoracle.py).

Every test here takes the ``qemu`` fixture, directly or through ``judge``: without
qemu-img/qemu-io the tests skip on a developer machine and fail under CI=true.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qedoracle import Judge


@pytest.fixture
def judge(qemu: Any) -> Judge:
    """Runs ``qed`` through the CLI's main() in this process (fast)."""
    return Judge(qemu)


@pytest.fixture
def cli_judge(qemu: Any, qed_cli: Callable[..., Any]) -> Judge:
    """Runs ``qed`` as a subprocess, the way users run it (slower)."""
    return Judge(qemu, qed_cli)


# ---- disk space -------------------------------------------------------------------
# Images with 1-2 MiB clusters carry L1/L2 tables of up to 32 MiB each, so one run
# writes ~1.5 GB and pytest keeps the last three runs. Files of a passing test are
# removed; a failing test keeps everything for inspection.

BIG_FILE = 4 * 1024 * 1024
_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


@pytest.fixture(autouse=True)
def _remove_big_files_after_success(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[None]:
    yield
    if not request.node.stash.get(_PASSED, False):
        return
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_blocks * 512 > BIG_FILE:
            path.unlink()
