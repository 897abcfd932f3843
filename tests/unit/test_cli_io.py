"""``qed io``: the qemu-io subset. Line formats are checked in-process through
run_script (fast); exit statuses and -r through the real command.

Expected lines are qemu-io 7.2's first line per command.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import qedkit
from qedkit.cli.io import run_script

KiB, MiB = 1 << 10, 1 << 20
Cli = Callable[..., Any]


def script(path: Path, commands: Sequence[str], readonly: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with qedkit.open(str(path), readonly=readonly) as img:
        status = run_script(img, commands, out, err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def image(new_image: Callable[..., Path]) -> Path:
    return new_image(size=4 * MiB)


# ---- output lines ----------------------------------------------------------------


def test_write_line(image: Path) -> None:
    assert script(image, ["write 0 4096"]) == (0, "wrote 4096/4096 bytes at offset 0\n", "")


def test_read_line(image: Path) -> None:
    assert script(image, ["read 0 4096"]) == (0, "read 4096/4096 bytes at offset 0\n", "")


def test_discard_line(image: Path) -> None:
    assert script(image, ["discard 0 64k"]) == (0, "discard 65536/65536 bytes at offset 0\n", "")


def test_write_zeroes_line(image: Path) -> None:
    assert script(image, ["write -z 64k 64k"]) == (
        0,
        "wrote 65536/65536 bytes at offset 65536\n",
        "",
    )


def test_flush_prints_nothing(image: Path) -> None:
    assert script(image, ["flush"]) == (0, "", "")


def test_q_suppresses_the_line(image: Path) -> None:
    commands = ["write -q 0 512", "read -q 0 512", "write -z -q 0 512", "discard -q 0 64k"]
    assert script(image, commands) == (0, "", "")


@pytest.mark.parametrize(
    ("command", "line"),
    [
        ("write 1k 2k", "wrote 2048/2048 bytes at offset 1024"),
        ("write 1M 4k", "wrote 4096/4096 bytes at offset 1048576"),
        ("write 0x1000 0x200", "wrote 512/512 bytes at offset 4096"),
        ("write 1.5k 1k", "wrote 1024/1024 bytes at offset 1536"),
        ("read 2M 1M", "read 1048576/1048576 bytes at offset 2097152"),
        ("read 4M 0", "read 0/0 bytes at offset 4194304"),
        ("discard 1M 64K", "discard 65536/65536 bytes at offset 1048576"),
    ],
)
def test_numbers_take_binary_suffixes_and_hex(image: Path, command: str, line: str) -> None:
    assert script(image, [command]) == (0, line + "\n", "")


# ---- data and patterns ----------------------------------------------------------------


def test_write_uses_qemu_ios_default_pattern_0xcd(image: Path) -> None:
    script(image, ["write 4k 4k"])
    with qedkit.open(str(image), readonly=True) as img:
        assert img.read(4 * KiB, 4 * KiB) == b"\xcd" * 4096
        assert img.read(0, 4 * KiB) == bytes(4096)


def test_write_with_pattern_then_read_verifies(image: Path) -> None:
    status, out, err = script(image, ["write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"])
    assert (status, err) == (0, "")
    assert (
        out
        == "wrote 65536/65536 bytes at offset 1048576\nread 65536/65536 bytes at offset 1048576\n"
    )
    with qedkit.open(str(image), readonly=True) as img:
        assert img.read(MiB, 64 * KiB) == b"\x5a" * 65536


def test_write_zeroes_reads_back_zeros(image: Path) -> None:
    status, _, _ = script(
        image, ["write -P 7 0 128k", "write -z 0 64k", "read -P 0 0 64k", "read -P 7 64k 64k"]
    )
    assert status == 0


def test_pattern_mismatch_reports_like_qemu_io_and_fails(image: Path) -> None:
    status, out, err = script(image, ["write 0 4k", "read -P 0xab 0 4k"])
    assert status == 1
    assert out.splitlines()[1:] == [
        "Pattern verification failed at offset 0, 4096 bytes",
        "read 4096/4096 bytes at offset 0",
    ]
    assert err == ""


def test_pattern_mismatch_names_the_request_offset_like_qemu_io(image: Path) -> None:
    # qemu-io: "read -P 0xcd 0 8k" after "write 0 4k" says "at offset 0, 8192 bytes":
    # the offset and length of the request, not of the first differing byte.
    status, out, _ = script(image, ["write 0 4k", "read -P 0xcd 0 8k"])
    assert status == 1
    assert out.splitlines()[1:] == [
        "Pattern verification failed at offset 0, 8192 bytes",
        "read 8192/8192 bytes at offset 0",
    ]


def test_pattern_mismatch_at_a_nonzero_request_offset(image: Path) -> None:
    status, out, _ = script(image, ["read -P 0xab 1k 4k"])
    assert status == 1
    assert out == (
        "Pattern verification failed at offset 1024, 4096 bytes\n"
        "read 4096/4096 bytes at offset 1024\n"
    )


def test_a_failed_verification_does_not_stop_the_script(image: Path) -> None:
    status, out, _ = script(image, ["read -P 1 0 512", "write 0 512"])
    assert status == 1
    assert out.splitlines()[-1] == "wrote 512/512 bytes at offset 0"


# ---- read-only -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["write 0 512", "write -z 0 64k", "discard 0 64k"])
def test_read_only_refuses_modifications(image: Path, command: str) -> None:
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    status, out, err = script(image, [command, "read 0 512"], readonly=True)
    assert status == 1
    assert out == "read 512/512 bytes at offset 0\n"
    assert err == f"qed: {image}: image is open read-only\n"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


# ---- through the command -----------------------------------------------------------------


def test_cli_io_success_exits_0(qed_cli: Cli, image: Path) -> None:
    result = qed_cli("io", "-c", "write -P 0x11 0 4k", "-c", "read -P 0x11 0 4k", image)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "wrote 4096/4096 bytes at offset 0\nread 4096/4096 bytes at offset 0\n"


def test_cli_io_pattern_failure_exits_1(qed_cli: Cli, image: Path) -> None:
    result = qed_cli("io", "-c", "read -P 0x11 0 4k", image)
    assert result.returncode == 1
    assert result.stdout == (
        "Pattern verification failed at offset 0, 4096 bytes\nread 4096/4096 bytes at offset 0\n"
    )


def test_cli_io_r_refuses_writes_and_leaves_the_file_alone(qed_cli: Cli, image: Path) -> None:
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    result = qed_cli("io", "-r", "-c", "write 0 512", "-c", "read 0 512", image)
    assert result.returncode == 1
    assert result.stdout == "read 512/512 bytes at offset 0\n"
    assert result.stderr == f"qed: {image}: image is open read-only\n"
    assert "Traceback" not in result.stderr
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_cli_io_without_commands_does_nothing(qed_cli: Cli, image: Path) -> None:
    result = qed_cli("io", image)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
