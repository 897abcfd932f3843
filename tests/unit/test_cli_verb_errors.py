"""The image verbs' errors name the file: a file that cannot be opened for writing
(immutable for root, mode 0444 for anyone else) for every verb that writes, a commit
whose base cannot be written, a missing backing file for the verbs that read
through one; and nothing is changed."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qedkit
from qedkit.cli.main import main

MiB = 1 << 20


def cli(*args: str | Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, err.getvalue()


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    if os.geteuid() == 0:  # root writes 0444 files: make it immutable instead
        res = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if res.returncode:
            pytest.skip(f"cannot make {path} immutable: {res.stderr!r}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o444)
        yield


@pytest.mark.parametrize(
    "args",
    [
        ["resize", "IMG", "2M"],
        ["resize", "--shrink", "IMG", "512K"],
        ["amend", "-o", "table_size=8", "IMG"],
        ["rebase", "-u", "-b", "x.raw", "-F", "raw", "IMG"],
        ["commit", "IMG"],
        ["bench", "-w", "-c", "10", "IMG"],
    ],
    ids=lambda a: a[0] + ("-shrink" if "--shrink" in a else ""),
)
def test_a_file_that_cannot_be_written_is_named(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = tmp_path / "img.qed"
    qedkit.create(str(path), MiB, backing_file="base.raw", backing_format="raw")
    before = path.read_bytes()
    with read_only(path):
        rc, err = cli(*[path if a == "IMG" else a for a in args])
    assert rc == 1 and str(path) in err, err
    assert path.read_bytes() == before


def test_a_commit_into_a_base_that_cannot_be_written_names_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qed"
    qedkit.create(str(base), MiB)
    top = tmp_path / "top.qed"
    qedkit.create(str(top), MiB, backing_file="base.qed", backing_format="qed")
    with qedkit.open(str(top)) as img:
        img.write(0, b"x" * 4096)
    before = top.read_bytes(), base.read_bytes()
    with read_only(base):
        rc, err = cli("commit", top)
    assert rc == 1 and str(base) in err, err
    assert (top.read_bytes(), base.read_bytes()) == before


@pytest.mark.parametrize(
    "args",
    [
        ["compare", "IMG", "IMG"],
        ["measure", "IMG"],
        ["commit", "IMG"],
        ["rebase", "-b", "", "IMG"],
        ["amend", "-o", "cluster_size=4k", "IMG"],
    ],
    ids=lambda a: a[0],
)
def test_a_missing_backing_file_is_named(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "img.qed"
    (tmp_path / "gone.raw").write_bytes(bytes(MiB))
    qedkit.create(str(path), MiB, backing_file="gone.raw", backing_format="raw")
    (tmp_path / "gone.raw").unlink()
    before = path.read_bytes()
    rc, err = cli(*[path if a == "IMG" else a for a in args])
    assert rc in (1, 2) and "gone.raw" in err, err
    assert path.read_bytes() == before
