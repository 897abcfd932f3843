"""``qed bench``: the requests go through the engine (writes land where the offsets
say, with the pattern, in allocated clusters a check finds clean), offsets wrap as
qemu-img bench's, ``-t none`` reads and writes aligned data with O_DIRECT, and the
output says how many requests per second and MB/s."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import qedkit
from qedkit.cli.main import main
from qedkit.errors import StoreError
from qedkit.jobs.bench import offsets
from qedkit.store.file import FileStore

MiB = 1 << 20


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def qed_in_process(*args: str | Path) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return Ran(rc, out.getvalue(), err.getvalue())


def test_offsets_step_from_the_start_and_wrap_like_qemu_img() -> None:
    # Measured with qemu-img bench -w on a 1 MiB raw file: 0, 400k, 800k, 176k.
    assert offsets(MiB, 64 * 1024, 4, 0, 400 * 1024) == [k * 1024 for k in (0, 400, 800, 176)]
    assert offsets(16384, 4096, 5, 8192, 4096) == [8192, 12288, 0, 4096, 8192]
    assert offsets(4096, 4096, 3, 0, 4096) == [0, 0, 0]
    assert offsets(MiB, 4096, 3, 0, 0) == [0, 0, 0]


def test_a_write_benchmark_writes_the_pattern_through_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "b.qed"
    qedkit.create(str(path), 8 * MiB, cluster_size=4096, table_size=2)
    res = qed_in_process(
        "bench", "-w", "-c", "300", "-s", "8k", "-S", "16k", "-o", "1M", "--pattern", "0x5a",
        "-d", "4", path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == (
        "Sending 300 write requests, 8192 bytes each, 4 in parallel "
        "(starting at offset 1048576, step size 16384)"
    )
    assert lines[1].startswith("Run completed in ") and "requests per second" in lines[2]
    with qedkit.open(str(path), readonly=True) as img:
        for i in range(300):
            pos = MiB + i * 16384
            assert img.read(pos, 8192) == b"\x5a" * 8192
            assert img.read(pos + 8192, 8192) == bytes(8192)
        assert img.check().corruptions == 0


def test_json_output_has_the_rates(tmp_path: Path) -> None:
    path = tmp_path / "b.qed"
    qedkit.create(str(path), 4 * MiB)
    res = qed_in_process("bench", "--output=json", "-c", "1000", "-d", "8", path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["requests"] == 1000 and out["request-size"] == 4096 and out["depth"] == 8
    assert out["iops"] > 0 and out["mb-per-second"] > 0 and out["write"] is False


def test_cache_none_uses_o_direct_for_aligned_data(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(b"\x11" * MiB)
    try:
        store = FileStore.open(str(path), direct=True)
    except StoreError as exc:
        pytest.skip(f"no O_DIRECT on {tmp_path}: {exc}")
    try:
        assert store.direct_fd is not None
        info = Path(f"/proc/self/fdinfo/{store.direct_fd}").read_text()
        assert int(info.split("flags:")[1].split()[0], 8) & os.O_DIRECT
    finally:
        asyncio.run(store.close())
    res = qed_in_process("bench", "-f", "raw", "-t", "none", "-w", "--pattern", "7", "-c", "64",
                         "-s", "64k", path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == b"\x07" * MiB
    res = qed_in_process("bench", "-f", "raw", "-t", "none", "-c", "100", "-s", "1000", path)
    assert res.returncode == 0, res.stderr  # unaligned: buffered, still correct


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-o", "4M"], "outside the image"),
        (["-s", "64k", "-S", "1000k"], "cross the end"),
        (["-c", "0"], "positive"),
        (["--flush-interval", "4"], "only for write"),
        (["--pattern", "300"], "not a byte"),
    ],
)
def test_bad_requests_are_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    path = tmp_path / "b.qed"
    qedkit.create(str(path), 4 * MiB)
    res = qed_in_process("bench", *args, path)
    assert res.returncode != 0 and needle in res.stderr, res.stderr
