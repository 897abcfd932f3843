"""Shared test helpers (imported as ``qedtest``; tests/ is on sys.path).

Tests that need QEMU's tools use the ``qemu`` fixture (or ``require_tool``): when a
tool is missing they are skipped on a developer machine but FAIL when CI=true, so
that a CI image without qemu-utils can never pass by skipping the oracle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of ``name``; skip (or, under CI=true, fail) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: tools the tests need must be installed)")
        pytest.skip(message)
    return path


def require_speedups() -> ModuleType:
    """qedkit's compiled helpers (qedkit/_speedups.c); skip (or, under CI=true, fail:
    CI installs with a C compiler, so a missing module is a broken build) when they
    were not built."""
    try:
        from qedkit import _speedups
    except ImportError:
        if IN_CI:
            pytest.fail("qedkit._speedups was not built (CI=true: pip install needs gcc)")
        pytest.skip("qedkit._speedups was not built")
    return _speedups


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = False,
    cwd: Path | None = None,
    timeout: float = 300,
) -> Result:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return Result(proc.returncode, proc.stdout, proc.stderr)


class Qemu:
    """qemu-img / qemu-io runners; every call checks the exit status unless told."""

    def __init__(self) -> None:
        self.img_path = require_tool("qemu-img")
        self.io_path = require_tool("qemu-io")

    def img(
        self, *args: str | os.PathLike[str], check: bool = True, cwd: Path | None = None
    ) -> Result:
        return run([self.img_path, *args], check=check, cwd=cwd)

    def io(
        self, *args: str | os.PathLike[str], check: bool = True, cwd: Path | None = None
    ) -> Result:
        result = run([self.io_path, *args], check=check, cwd=cwd)
        # qemu-io exits 0 even when a command fails in some versions: look at stderr.
        if check and ("failed" in result.stderr or "failed" in result.stdout):
            raise AssertionError(f"qemu-io {args}: {result.stdout}{result.stderr}")
        return result


def qed(
    *args: str | os.PathLike[str],
    check: bool = False,
    cwd: Path | None = None,
    timeout: float = 300,
) -> Result:
    """Run the ``qed`` command in a subprocess (the installed entry point's module)."""
    return run([sys.executable, "-m", "qedkit", *args], check=check, cwd=cwd, timeout=timeout)
