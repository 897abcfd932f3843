"""Shared fixtures (the helpers behind them are in tests/qedtest.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qedtest import Qemu, qed


@pytest.fixture(scope="session")
def qemu() -> Qemu:
    return Qemu()


@pytest.fixture
def qed_cli() -> Callable[..., Any]:
    return qed


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (needs root; the one acceptable skip)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for real ENOSPC needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "qedkit-enospc", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
