"""Every ``qed`` command that opens an image, on every kind of corrupt header.

Each must exit 1 with ``qed: PATH: message`` on stderr, print no traceback and no
output, and leave the image byte-for-byte unchanged (a failed open writes nothing);
a failed convert creates no target.

The full matrix (every corruption x every command) runs in-process through
``qedkit.cli.main.main`` (an escaping exception fails the test with its traceback);
the diagonal, which still covers every corruption and every command once, runs
through the real ``python -m qedkit`` in subprocesses, in parallel.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import qedkit
from qedkit.cli.main import main

MiB = 1 << 20


@dataclass(frozen=True)
class Corruption:
    patches: tuple[tuple[int, str, tuple[object, ...]], ...]  # (offset, struct format, values)
    fmt: str | None  # -f option, None to probe
    message: str  # expected in stderr
    truncate: int | None = None  # cut the file to this many bytes after patching


CORRUPTIONS = {
    # Without -f a file with a bad magic probes as raw (as in QEMU); -f qed must refuse it.
    "bad_magic": Corruption(((0, "<4s", (b"QEX\x00",)),), "qed", "not a QED image: magic is"),
    "bad_cluster_size": Corruption(((4, "<I", (12345,)),), None, "invalid cluster_size 12345"),
    "bad_table_size": Corruption(((8, "<I", (3,)),), None, "invalid table_size 3"),
    "unknown_feature_bit": Corruption(
        ((16, "<Q", (0x08,)),), None, "unsupported QED feature bits 0x8"
    ),
    "l1_outside_file": Corruption(
        ((40, "<Q", (1 << 30,)),), None, "invalid l1_table_offset 0x40000000"
    ),
    "bad_image_size": Corruption(((48, "<Q", (1000,)),), None, "invalid image_size 1000"),
    "backing_name_outside_header": Corruption(
        ((16, "<Q", (0x01,)), (56, "<II", (65530, 100))),
        None,
        "invalid backing_filename_offset 65530",
    ),
    # Shorter than the 64-byte header: probes as raw, so -f qed.
    "truncated_header": Corruption(
        (), "qed", "file is too short for a QED header (10 bytes, need 64)", truncate=10
    ),
}

COMMANDS: dict[str, list[str]] = {
    "info": ["info"],
    "info_json": ["info", "--output=json"],
    "map": ["map"],
    "check": ["check"],
    "convert_raw": ["convert", "-O", "raw"],
    "io_read_only": ["io", "-r", "-c", "read 0 512"],
    "io_write": ["io", "-c", "write 0 512"],
}

CASES = [(kind, command) for kind in CORRUPTIONS for command in COMMANDS]
DIAGONAL = [(kind, list(COMMANDS)[i % len(COMMANDS)]) for i, kind in enumerate(CORRUPTIONS)]


def ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{kind}-{command}" for kind, command in cases]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_corrupt(template: Path, dest: Path, kind: str) -> Path:
    shutil.copyfile(template, dest)
    with open(dest, "r+b") as f:
        for offset, fmt, values in CORRUPTIONS[kind].patches:
            f.seek(offset)
            f.write(struct.pack(fmt, *values))
        if CORRUPTIONS[kind].truncate is not None:
            f.truncate(CORRUPTIONS[kind].truncate)
    return dest


def cli_args(kind: str, command: str, image: Path, target: Path) -> list[str]:
    args = list(COMMANDS[command])
    if CORRUPTIONS[kind].fmt:
        args[1:1] = ["-f", CORRUPTIONS[kind].fmt]
    args.append(str(image))
    if command == "convert_raw":
        args.append(str(target))
    return args


@dataclass
class Outcome:
    kind: str
    image: Path
    target: Path
    before: str
    after: str
    returncode: int | str | None
    stdout: str
    stderr: str


def assert_failed_cleanly(o: Outcome) -> None:
    report = f"rc={o.returncode}\nstdout: {o.stdout}\nstderr: {o.stderr}"
    assert "Traceback" not in o.stdout + o.stderr, report
    assert o.returncode == 1, report
    assert o.stderr.startswith(f"qed: {o.image}: "), report
    assert CORRUPTIONS[o.kind].message in o.stderr, report
    assert o.stderr.count("\n") == 1, report  # one line, no extra noise
    assert o.stdout == "", report
    assert o.after == o.before, "the image was modified by a failed command"
    assert not o.target.exists(), "convert created a target although the source failed"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.qed"
    qedkit.create(str(path), MiB)
    return path


# ---- in-process: the full matrix ---------------------------------------------------------


@pytest.mark.parametrize(("kind", "command"), CASES, ids=ids(CASES))
def test_command_on_corrupt_image_fails_cleanly_and_changes_nothing(
    template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, command: str
) -> None:
    image = make_corrupt(template, tmp_path / f"{kind}.qed", kind)
    target = tmp_path / "out.raw"
    before = sha256(image)
    try:
        rc: int | str | None = main(cli_args(kind, command, image, target))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    assert_failed_cleanly(Outcome(kind, image, target, before, sha256(image), rc, out, err))


# ---- subprocess: python -m qedkit -------------------------------------------------------


@pytest.fixture(scope="module")
def subprocess_outcomes(
    template: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Outcome]:
    root = tmp_path_factory.mktemp("corrupt")

    def run(case: tuple[str, str]) -> tuple[tuple[str, str], Outcome]:
        kind, command = case
        image = make_corrupt(template, root / f"{kind}-{command}.qed", kind)
        target = root / f"{kind}-{command}.out.raw"
        before = sha256(image)
        proc = subprocess.run(
            [sys.executable, "-m", "qedkit", *cli_args(kind, command, image, target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        outcome = Outcome(
            kind, image, target, before, sha256(image), proc.returncode, proc.stdout, proc.stderr
        )
        return case, outcome

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, DIAGONAL))


def test_diagonal_covers_every_corruption_and_every_command() -> None:
    assert {kind for kind, _ in DIAGONAL} == set(CORRUPTIONS)
    assert {command for _, command in DIAGONAL} == set(COMMANDS)


@pytest.mark.parametrize(("kind", "command"), DIAGONAL, ids=ids(DIAGONAL))
def test_qed_command_on_corrupt_image_fails_cleanly_and_changes_nothing(
    subprocess_outcomes: dict[tuple[str, str], Outcome], kind: str, command: str
) -> None:
    assert_failed_cleanly(subprocess_outcomes[kind, command])
