"""``qed`` error paths through the real command line: missing files, missing backing
files, a wrong -f, bad options and sizes, bad io scripts, check on raw images.

Every failure exits non-zero with one ``qed: ...`` line on stderr and no traceback,
and leaves existing files unchanged.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qedkit

Cli = Callable[..., Any]  # the qed_cli fixture of tests/conftest.py
IoRun = tuple[Path, str, str, "subprocess.CompletedProcess[str]"]

MiB = 1 << 20
NO_SUCH_FILE = "cannot open: No such file or directory"
SIZE_HINT = "(use a number with an optional k, M, G or T suffix)"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_failure(result: Any, stderr_prefix: str, returncode: int = 1) -> None:
    report = f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, report
    assert result.returncode == returncode, report
    assert result.stderr.startswith(stderr_prefix), report


OPENING_COMMANDS = {
    "info": ["info"],
    "info_json": ["info", "--output=json"],
    "map": ["map"],
    "check": ["check"],
    "io_read_only": ["io", "-r", "-c", "read 0 512"],
    "io_write": ["io", "-c", "write 0 512"],
}


# ---- missing files -----------------------------------------------------------------


@pytest.mark.parametrize("command", list(OPENING_COMMANDS))
def test_missing_image_file(qed_cli: Cli, tmp_path: Path, command: str) -> None:
    path = tmp_path / "nope.qed"
    result = qed_cli(*OPENING_COMMANDS[command], path)
    assert_clean_failure(result, f"qed: {path}: ")
    assert result.stderr == f"qed: {path}: {NO_SUCH_FILE}\n"
    assert result.stdout == ""
    assert not path.exists()


def test_convert_of_missing_source_creates_no_target(qed_cli: Cli, tmp_path: Path) -> None:
    src, dst = tmp_path / "nope.qed", tmp_path / "out.raw"
    result = qed_cli("convert", "-O", "raw", src, dst)
    assert_clean_failure(result, f"qed: {src}: ")
    assert result.stderr == f"qed: {src}: {NO_SUCH_FILE}\n"
    assert not dst.exists()


@pytest.fixture
def orphan(new_image: Callable[..., Path], tmp_path: Path) -> Path:
    """An overlay whose raw backing file has been deleted."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    overlay = new_image("ov.qed", None, backing_file="base.raw", backing_format="raw")
    base.unlink()
    return overlay


@pytest.mark.parametrize(
    "args",
    [
        ["map"],
        ["io", "-r", "-c", "read 0 512"],
        ["io", "-c", "write 0 512"],
        ["info", "--backing-chain"],
    ],
    ids=["map", "io_read_only", "io_write", "info_backing_chain"],
)
def test_missing_backing_file(qed_cli: Cli, orphan: Path, args: list[str]) -> None:
    before = sha256(orphan)
    result = qed_cli(*args, orphan)
    assert_clean_failure(result, f"qed: {orphan}: cannot open backing file: ")
    assert result.stderr == (
        f"qed: {orphan}: cannot open backing file: {orphan.parent / 'base.raw'}: {NO_SUCH_FILE}\n"
    )
    assert result.stdout == ""
    assert sha256(orphan) == before


def test_convert_with_missing_backing_file_creates_no_target(qed_cli: Cli, orphan: Path) -> None:
    dst = orphan.parent / "out.raw"
    result = qed_cli("convert", "-O", "raw", orphan, dst)
    assert_clean_failure(result, f"qed: {orphan}: cannot open backing file: ")
    assert not dst.exists()


@pytest.mark.parametrize("args", [["info"], ["check"]], ids=["info", "check"])
def test_info_and_check_do_not_need_the_backing_file(
    qed_cli: Cli, orphan: Path, args: list[str]
) -> None:
    # As qemu-img: info (without --backing-chain) and check open the top image alone.
    result = qed_cli(*args, orphan)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# ---- wrong format ------------------------------------------------------------------


@pytest.mark.parametrize("command", list(OPENING_COMMANDS))
def test_f_qed_on_a_raw_file_is_refused(qed_cli: Cli, tmp_path: Path, command: str) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    before = sha256(raw)
    argv = OPENING_COMMANDS[command]
    result = qed_cli(argv[0], "-f", "qed", *argv[1:], raw)
    assert_clean_failure(result, f"qed: {raw}: ")
    assert result.stderr == (
        f"qed: {raw}: not a QED image: magic is b'\\x00\\x00\\x00\\x00' at offset 0, "
        "expected b'QED\\x00'\n"
    )
    assert sha256(raw) == before


def test_check_on_a_raw_image_exits_63(qed_cli: Cli, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    result = qed_cli("check", raw)
    assert_clean_failure(result, f"qed: {raw}: ", returncode=63)
    assert result.stderr == f"qed: {raw}: this image format (raw) does not support checks\n"


def test_check_json_on_a_raw_image_exits_63(qed_cli: Cli, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    result = qed_cli("check", "--output=json", raw)
    assert result.returncode == 63
    assert result.stdout == ""


# ---- create options and sizes ------------------------------------------------------


def test_create_unknown_o_option(qed_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "new.qed"
    result = qed_cli("create", "-o", "foo=1", path, "1M")
    assert_clean_failure(result, "qed: ")
    assert result.stderr == (
        "qed: unknown option 'foo' (known: size, backing_file, backing_fmt, cluster_size, "
        "table_size, allocation)\n"
    )
    assert not path.exists()


def test_create_o_option_without_value(qed_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "new.qed"
    result = qed_cli("create", "-o", "cluster_size", path, "1M")
    assert_clean_failure(result, "qed: ")
    assert result.stderr == "qed: invalid option 'cluster_size': expected name=value\n"
    assert not path.exists()


def test_convert_unknown_o_option_creates_no_target(
    qed_cli: Cli, new_image: Callable[..., Path], tmp_path: Path
) -> None:
    src, dst = new_image(), tmp_path / "out.qed"
    result = qed_cli("convert", "-O", "qed", "-o", "foo=1", src, dst)
    assert_clean_failure(result, "qed: unknown option 'foo'")
    assert not dst.exists()


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("1X", f"invalid size '1X' {SIZE_HINT}"),
        ("1.5", "invalid size '1.5': not a whole number of bytes"),
    ],
)
def test_create_bad_size_string(qed_cli: Cli, tmp_path: Path, size: str, message: str) -> None:
    path = tmp_path / "new.qed"
    result = qed_cli("create", path, size)
    assert_clean_failure(result, "qed: ")
    assert result.stderr == f"qed: {message}\n"
    assert not path.exists()


def test_create_bad_table_size_option_is_reported_without_python_internals(
    qed_cli, tmp_path: Path
) -> None:
    path = tmp_path / "new.qed"
    result = qed_cli("create", "-o", "table_size=x", path, "1M")
    assert_clean_failure(result, "qed: ")
    assert "table_size" in result.stderr
    assert "int()" not in result.stderr, result.stderr
    assert not path.exists()


def test_convert_bad_table_size_option_fails_cleanly(
    qed_cli: Cli, new_image: Callable[..., Path], tmp_path: Path
) -> None:
    src, dst = new_image(), tmp_path / "out.qed"
    result = qed_cli("convert", "-O", "qed", "-o", "table_size=x", src, dst)
    assert_clean_failure(result, "qed: ")
    assert "table_size" in result.stderr
    assert not dst.exists()


def test_create_invalid_table_size_names_the_file(qed_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "new.qed"
    result = qed_cli("create", "-o", "table_size=3", path, "1M")
    assert_clean_failure(result, f"qed: {path}: ")
    assert (
        result.stderr == f"qed: {path}: invalid table_size 3: must be a power of two from 1 to 16\n"
    )
    assert not path.exists()


def test_create_backing_without_format(qed_cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = tmp_path / "top.qed"
    result = qed_cli("create", "-b", "base.raw", path)
    assert_clean_failure(result, f"qed: {path}: ")
    assert result.stderr == (
        f"qed: {path}: backing file specified without backing format (use -F raw or -F qed)\n"
    )
    assert not path.exists()


def test_create_missing_backing_file(qed_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "top.qed"
    result = qed_cli("create", "-b", "nope.raw", "-F", "raw", path)
    assert_clean_failure(result, f"qed: {path}: cannot open backing file: ")
    assert not path.exists()


def test_create_with_a_wrong_qcow2_backing_format_fails_cleanly(
    qed_cli: Cli, tmp_path: Path
) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = tmp_path / "top.qed"
    result = qed_cli("create", "-b", "base.raw", "-F", "qcow2", path)
    assert_clean_failure(result, f"qed: {path}: cannot open backing file: ")
    assert "not a qcow2 image" in result.stderr
    assert not path.exists()


def test_map_start_offset_past_the_end_prints_an_empty_map_like_qemu_img(
    qed_cli: Cli, new_image: Callable[..., Path]
) -> None:
    path = new_image()
    result = qed_cli("map", "--output=json", "-s", "2M", path)
    assert result.returncode == 0
    assert result.stdout == (
        '[{ "start": 2097152, "length": 0, "depth": 0, "present": false, "zero": false, '
        '"data": false}]\n'
    )


# ---- qed io scripts ----------------------------------------------------------------

# (command, stderr message after "qed: FILE: 'COMMAND': "); a failing command does not
# stop the script, so all of these run in one ``qed io`` process (see bad_io_script).
BAD_IO_COMMANDS = [
    ("frob 0 1", "unknown command 'frob' (read, write, discard, flush)"),
    ("read x 4k", f"invalid size 'x' {SIZE_HINT}"),
    ("read 0 1Q", f"invalid size '1Q' {SIZE_HINT}"),
    ("read -1 512", f"invalid size '-1' {SIZE_HINT}"),
    ("read 0", "read needs OFFSET and LENGTH"),
    ("write 0 512 512", "write needs OFFSET and LENGTH"),
    ("read -P", "option -P needs a value"),
    ("write -x 0 1", "invalid option -x"),
    ("write -P abc 0 512", "invalid pattern 'abc'"),
    ("read -P 0x1ff 0 512", "pattern '0x1ff' is not a byte"),
    ("write -z -P 1 0 512", "-z and -P cannot be combined"),
    ("write -u 0 512", "-u needs -z"),
    ("flush extra", "flush takes no arguments"),
]
# (command, start, end) of requests outside a 1 MiB image.
OUTSIDE_IO_COMMANDS = [
    ("read 1M 1", 1048576, 1048577),
    ("read 512 1M", 512, 1049088),
    ("write 1020k 8k", 1044480, 1052672),
    ("write -z 1M 64k", 1048576, 1114112),
    ("discard 0 2M", 0, 2097152),
]


@pytest.fixture(scope="module")
def bad_io_script(tmp_path_factory: pytest.TempPathFactory) -> IoRun:
    path = tmp_path_factory.mktemp("io") / "img.qed"
    qedkit.create(str(path), MiB)
    before = sha256(path)
    argv = [sys.executable, "-m", "qedkit", "io"]
    for command, *_ in BAD_IO_COMMANDS + OUTSIDE_IO_COMMANDS:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=120)
    return path, before, sha256(path), result


def test_io_script_of_bad_commands_fails_cleanly_and_writes_nothing(bad_io_script: IoRun) -> None:
    _, before, after, result = bad_io_script
    assert_clean_failure(result, "qed: ")
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == len(BAD_IO_COMMANDS) + len(OUTSIDE_IO_COMMANDS)
    assert after == before


@pytest.mark.parametrize(
    ("index", "command", "message"),
    [(i, c, m) for i, (c, m) in enumerate(BAD_IO_COMMANDS)],
    ids=[c for c, _ in BAD_IO_COMMANDS],
)
def test_io_bad_command_line(bad_io_script: IoRun, index: int, command: str, message: str) -> None:
    path, _, _, result = bad_io_script
    assert result.stderr.splitlines()[index] == f"qed: {path}: {command!r}: {message}"


@pytest.mark.parametrize(
    ("index", "command", "start", "end"),
    [(len(BAD_IO_COMMANDS) + i, c, s, e) for i, (c, s, e) in enumerate(OUTSIDE_IO_COMMANDS)],
    ids=[c for c, *_ in OUTSIDE_IO_COMMANDS],
)
def test_io_request_outside_the_image(
    bad_io_script: IoRun, index: int, command: str, start: int, end: int
) -> None:
    path, _, _, result = bad_io_script
    assert result.stderr.splitlines()[index] == (
        f"qed: {path}: request [{start}, {end}) is outside the image (size 1048576)"
    )


def test_io_unbalanced_quote_fails_cleanly(qed_cli: Cli, new_image: Callable[..., Path]) -> None:
    path = new_image()
    result = qed_cli("io", "-c", 'read "0 512', path)
    assert_clean_failure(result, "qed: ")


def test_io_failed_command_does_not_stop_the_script(
    qed_cli: Cli, new_image: Callable[..., Path]
) -> None:
    path = new_image()
    result = qed_cli(
        "io", "-c", "frob", "-c", "write 0 512", "-c", "read 0 x", "-c", "read 0 512", path
    )
    assert result.returncode == 1
    assert result.stdout == "wrote 512/512 bytes at offset 0\nread 512/512 bytes at offset 0\n"
    assert result.stderr.splitlines() == [
        f"qed: {path}: 'frob': unknown command 'frob' (read, write, discard, flush)",
        f"qed: {path}: 'read 0 x': invalid size 'x' {SIZE_HINT}",
    ]
