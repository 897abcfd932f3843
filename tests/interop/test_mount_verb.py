"""``qed mount``: the guest disk through FUSE. mkfs.ext4 on the mounted file, files
written into the file system (through a loop mount when this machine allows one,
else with ``debugfs -w``), a clean unmount on SIGTERM, then ``qemu-img check`` clean
and every file read back (``debugfs cat``) from ``qemu-img convert``'s copy of the
image; concurrent readers and writers through the mount read and leave exactly what
was written; a read-only mount refuses writers.

Skips where /dev/fuse is absent (or mfusepy, fusermount3, mkfs.ext4, debugfs are
missing) on a developer machine; fails under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qedtest import IN_CI, require_tool

MiB = 1 << 20


def _need_fuse() -> None:
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is absent")
    try:
        import mfusepy  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError) as exc:
        problems.append(f"mfusepy cannot load: {exc}")
    if problems:
        message = "; ".join(problems)
        if IN_CI:
            pytest.fail(message + " (CI=true: FUSE must work)")
        pytest.skip(message)
    for tool in ("fusermount3", "mkfs.ext4", "debugfs"):
        require_tool(tool)


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, *flags: str) -> Iterator[subprocess.Popen[str]]:
    """``qed mount FLAGS IMAGE MOUNTPOINT`` in a subprocess, until the block ends
    (then SIGTERM, and the exit code must be 0)."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qedkit", "mount", *flags, str(image), str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=5) if proc.poll() is not None else ("", "")
                raise AssertionError(f"qed mount did not come up: rc {proc.poll()} {out} {err}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if os.path.ismount(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert not os.path.ismount(mountpoint)


def _loop_mount(disk: Path, where: Path) -> bool:
    where.mkdir(exist_ok=True)
    res = subprocess.run(
        ["mount", "-o", "loop", str(disk), str(where)], capture_output=True, text=True
    )
    return res.returncode == 0


def _debugfs(image: Path, *requests: str, write: bool = False) -> str:
    args = ["debugfs", *(["-w"] if write else [])]
    for r in requests:
        args += ["-R", r] if len(requests) == 1 else []
    if len(requests) > 1:
        script = image.parent / "debugfs.cmds"
        script.write_text("\n".join(requests) + "\n")
        args += ["-f", str(script)]
    res = subprocess.run([*args, str(image)], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode("latin-1")


FILES = {
    "hello.txt": b"hello from qed mount\n",
    "random.bin": random.Random(7).randbytes(3 * MiB + 123),
    "zeros.bin": bytes(256 * 1024),
}


def test_mkfs_files_and_a_clean_unmount_then_qemu_reads_them(qemu: Any, tmp_path: Path) -> None:
    _need_fuse()
    image = tmp_path / "disk.qed"
    qemu.img("create", "-f", "qed", image, "64M")
    src = tmp_path / "src"
    src.mkdir()
    for name, data in FILES.items():
        (src / name).write_bytes(data)
    mnt = tmp_path / "mnt"
    with mounted(image, mnt):
        disk = mnt / "disk"
        assert disk.stat().st_size == 64 * MiB
        res = subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], capture_output=True)
        assert res.returncode == 0, res.stderr
        loop = tmp_path / "loop"
        if _loop_mount(disk, loop):
            method = "loop mount"
            try:
                for name in FILES:
                    (loop / name).write_bytes((src / name).read_bytes())
                os.sync()
            finally:
                subprocess.run(["umount", str(loop)], check=True)
        else:
            method = "debugfs -w"
            _debugfs(disk, *(f"write {src / n} {n}" for n in FILES), write=True)
        print(f"\nfiles written into the ext4 file system with: {method}")
    qemu.img("check", image)
    flat = tmp_path / "flat.raw"
    qemu.img("convert", "-O", "raw", image, flat)
    fsck = subprocess.run(["e2fsck", "-n", "-f", str(flat)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, data in FILES.items():
        out = tmp_path / f"out-{name}"
        _debugfs(flat, f"dump /{name} {out}")
        assert out.read_bytes() == data, name


def test_concurrent_readers_and_writers_through_the_mount(qemu: Any, tmp_path: Path) -> None:
    _need_fuse()
    image = tmp_path / "c.qed"
    qemu.img("create", "-f", "qed", image, "32M")
    # The first half is allocated (in-place writes), the second not (allocating
    # writes, serialized by the engine's allocation lock, from four writers at once).
    qemu.io("-c", "write -P 0x77 0 16M", image)
    regions = [(i * 2 * MiB + (i % 3) * 1000, 300 * 1024 + i * 17) for i in range(15)]
    mnt = tmp_path / "mnt"
    errors: list[str] = []
    with mounted(image, mnt):
        disk = str(mnt / "c")

        def writer(k: int) -> None:
            fd = os.open(disk, os.O_RDWR)
            try:
                for i in range(k, len(regions), 4):
                    offset, length = regions[i]
                    data = bytes([i + 1]) * length
                    for pos in range(0, length, 64 * 1024):  # many requests each
                        os.pwrite(fd, data[pos : pos + 64 * 1024], offset + pos)
                os.fsync(fd)
            finally:
                os.close(fd)

        def reader() -> None:
            fd = os.open(disk, os.O_RDONLY)
            try:
                for _ in range(40):
                    offset = random.randrange(0, 31 * MiB)
                    got = os.pread(fd, 128 * 1024, offset)
                    if len(got) != 128 * 1024 or not set(got) <= {0, 0x77, *range(1, 17)}:
                        errors.append(f"read at {offset}: {set(got)}")
            finally:
                os.close(fd)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        threads += [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(disk, "rb") as f:
            for i, (offset, length) in enumerate(regions):
                f.seek(offset)
                assert f.read(length) == bytes([i + 1]) * length, i
    assert not errors, errors[:3]
    qemu.img("check", image)
    cmds: list[str] = []
    for i, (offset, length) in enumerate(regions):
        cmds += ["-c", f"read -P {i + 1} {offset} {length}"]
    cmds += ["-c", f"read -P 0x77 {15 * MiB} {MiB}", "-c", f"read -P 0 {31 * MiB} {MiB}"]
    qemu.io("-r", *cmds, image)


def test_a_read_only_mount_refuses_writers(qemu: Any, tmp_path: Path) -> None:
    _need_fuse()
    image = tmp_path / "r.qed"
    qemu.img("create", "-f", "qed", image, "4M")
    qemu.io("-c", "write -P 9 0 64k", image)
    before = image.read_bytes()
    with mounted(image, tmp_path / "mnt", "-r", "--name", "ro.img"):
        disk = tmp_path / "mnt" / "ro.img"
        assert disk.read_bytes()[: 64 * 1024] == b"\x09" * 65536
        with pytest.raises(OSError) as info:
            os.open(disk, os.O_RDWR)
        assert info.value.errno in (30, 13)  # EROFS (or EACCES from the ro mount)
    assert image.read_bytes() == before


def test_mount_errors_name_the_problem(tmp_path: Path) -> None:
    _need_fuse()
    res = subprocess.run(
        [sys.executable, "-m", "qedkit", "mount", str(tmp_path / "missing.qed"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "missing.qed" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "qedkit", "mount", str(tmp_path / "x.qed"), str(tmp_path / "nodir")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "not a directory" in res.stderr
