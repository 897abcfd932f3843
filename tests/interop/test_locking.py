"""Image locks that QEMU honours: one writer at a time across QEMU and qedkit."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qedtest import Qemu, qed, require_tool

import qedkit
from qedkit.errors import ImageLockedError


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for_lock(path: Path, timeout: float = 10.0) -> None:
    """Until someone holds a lock byte of ``path`` (seen in /proc/locks)."""
    inode = path.stat().st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines()):
            return
        time.sleep(0.02)
    raise AssertionError(f"nobody locked {path}")


@contextmanager
def held_by(argv: list[str], path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        wait_for_lock(path)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()


def test_qed_cannot_write_an_image_qemu_nbd_serves_and_changes_nothing(
    qemu: Qemu, tmp_path: Path
) -> None:
    nbd = require_tool("qemu-nbd")
    path = tmp_path / "img.qed"
    qedkit.create(str(path), 4 << 20)
    sock = tmp_path / "nbd.sock"
    with held_by([nbd, "-f", "qed", "-k", str(sock), "-t", str(path)], path):
        before = sha(path)
        result = qed("io", "-c", "write -P 0x11 0 4k", path)
        assert result.returncode != 0
        assert result.stderr == (
            f'qed: {path}: failed to get "write" lock: the image is in use by another process\n'
        )
        assert result.stdout == ""
        assert sha(path) == before
        # read-only needs -U while a writer holds it, as with qemu-img
        assert qed("info", path).returncode != 0
        assert qed("info", "-U", path).returncode == 0


def test_qemu_io_cannot_write_an_image_qedkit_holds(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "img.qed"
    qedkit.create(str(path), 4 << 20)
    holder = [
        sys.executable,
        "-c",
        "import sys, qedkit; img = qedkit.open(sys.argv[1]); sys.stdin.read()",
        str(path),
    ]
    with held_by(holder, path):
        result = qemu.io("-c", "write 0 4k", path, check=False)
        assert result.returncode != 0
        assert 'Failed to get "write" lock' in result.stderr
        # qemu-img info without -U is refused too; with -U it reads
        assert qemu.img("info", path, check=False).returncode != 0
        assert qemu.img("info", "-U", path, check=False).returncode == 0


def test_readers_share_across_tools(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "img.qed"
    qedkit.create(str(path), 4 << 20)
    with held_by([qemu.io_path, "-r", "-c", "sleep 100000", str(path)], path):
        with qedkit.open(str(path), readonly=True) as img:
            assert img.read(0, 512) == bytes(512)
        with pytest.raises(ImageLockedError):
            qedkit.open(str(path))
