"""``qed rebase``: safe mode over QED and raw bases with differing data (and sizes)
leaves the overlay's view equal to the old one (``qemu-img compare`` against the
overlay converted before), records the new name (``qemu-img info``) and checks
clean; clusters where only the new base has data become zero clusters, not copies;
``-u`` only rewrites the name; ``-b ""`` flattens; names resolve against the
overlay's directory; errors name the file and change nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from qedoracle import qed_in_process

MiB = 1 << 20


def _make(qemu: Any, d: Path, old_fmt: str, new_fmt: str, new_size: str = "8M") -> Path:
    old = d / f"old.{old_fmt}"
    qemu.img("create", "-f", old_fmt, old, "8M")
    qemu.io("-f", old_fmt, "-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 6M 1M", old)
    new = d / f"new.{new_fmt}"
    qemu.img("create", "-f", new_fmt, new, new_size)
    differ = "write -P 0x33 2M 2M" if new_size == "8M" else "write -P 0x33 2M 1M"
    cmds = ["-c", "write -P 0x11 0 1M", "-c", differ]  # equal, then differing
    if new_size == "8M":
        cmds += ["-c", "write -P 0x34 7M 512k"]  # data where the old chain reads zeros
    qemu.io("-f", new_fmt, *cmds, new)
    top = d / "top.qed"
    qemu.img("create", "-f", "qed", "-b", old.name, "-F", old_fmt, top)
    qemu.io("-c", "write -P 0x21 512k 100k", "-c", "write -z 2560k 64k", top)
    return top


def _info(qemu: Any, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu.img("info", "--output=json", path).stdout)
    return out


@pytest.mark.parametrize(
    ("old_fmt", "new_fmt", "new_size"),
    [("qed", "qed", "8M"), ("raw", "raw", "8M"), ("qed", "raw", "8M"), ("raw", "qed", "3M")],
    ids=["qed-qed", "raw-raw", "qed-raw", "raw-shorter-qed"],
)
def test_safe_rebase_keeps_the_view_and_records_the_new_name(
    qemu: Any, tmp_path: Path, old_fmt: str, new_fmt: str, new_size: str
) -> None:
    top = _make(qemu, tmp_path, old_fmt, new_fmt, new_size)
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, ref)
    res = qed_in_process("rebase", "-b", f"new.{new_fmt}", "-F", new_fmt, top)
    assert res.returncode == 0, res.stderr
    info = _info(qemu, top)
    assert info["backing-filename"] == f"new.{new_fmt}"
    assert info.get("backing-filename-format") == ("raw" if new_fmt == "raw" else None)
    qemu.img("compare", "-F", "raw", top, ref)
    qemu.img("check", top)
    # qemu-img's own rebase of the same overlay reads the same.
    again = tmp_path / "again"
    again.mkdir()
    theirs = _make(qemu, again, old_fmt, new_fmt, new_size)
    qemu.img("rebase", "-b", f"new.{new_fmt}", "-F", new_fmt, theirs)
    qemu.img("compare", top, theirs)


def test_where_only_the_new_base_has_data_the_overlay_gets_zero_clusters(
    qemu: Any, tmp_path: Path
) -> None:
    top = _make(qemu, tmp_path, "qed", "qed")
    assert qed_in_process("rebase", "-b", "new.qed", top).returncode == 0
    entries = json.loads(qemu.img("map", "--output=json", top).stdout)
    at_7m = [e for e in entries if e["start"] <= 7 * MiB < e["start"] + e["length"]]
    assert at_7m and at_7m[0]["depth"] == 0 and at_7m[0]["zero"] and not at_7m[0]["data"]
    # Clusters equal in both chains stay unallocated: nothing at depth 0 in 0..512k.
    first = next(e for e in entries if e["start"] == 0)
    assert first["depth"] == 1


def test_unsafe_only_rewrites_the_name_even_to_a_missing_file(qemu: Any, tmp_path: Path) -> None:
    top = _make(qemu, tmp_path, "qed", "raw")
    before = top.read_bytes()
    res = qed_in_process("rebase", "-u", "-b", "nowhere.raw", "-F", "raw", top)
    assert res.returncode == 0, res.stderr
    after = top.read_bytes()
    assert after[512:] == before[512:]
    assert _info(qemu, top)["backing-filename"] == "nowhere.raw"
    res = qed_in_process("rebase", "-u", "-b", "old.qed", "-F", "qed", top)
    assert res.returncode == 0 and top.read_bytes()[512:] == before[512:]
    assert _info(qemu, top)["backing-filename"] == "old.qed"


def test_an_empty_name_flattens(qemu: Any, tmp_path: Path) -> None:
    top = _make(qemu, tmp_path, "raw", "raw")
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, ref)
    res = qed_in_process("rebase", "-b", "", top)
    assert res.returncode == 0, res.stderr
    assert "backing-filename" not in _info(qemu, top)
    qemu.img("compare", "-F", "raw", top, ref)
    qemu.img("check", top)


def test_the_new_name_is_resolved_against_the_overlay_s_directory(
    qemu: Any, tmp_path: Path
) -> None:
    top = _make(qemu, tmp_path, "qed", "qed")
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, ref)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = os.getcwd()
    try:
        os.chdir(elsewhere)
        res = qed_in_process("rebase", "-b", "new.qed", "-F", "qed", top)
    finally:
        os.chdir(old)
    assert res.returncode == 0, res.stderr
    qemu.img("compare", "-F", "raw", top, ref)


@pytest.mark.parametrize("case", ["missing-new", "not-qed", "missing-old"])
def test_errors_name_the_file_and_change_nothing(qemu: Any, tmp_path: Path, case: str) -> None:
    top = _make(qemu, tmp_path, "qed", "qed")
    args: list[str | Path] = ["-b", "missing.qed", "-F", "qed", top]
    needle = "missing.qed"
    if case == "not-qed":
        raw = tmp_path / "disk.raw"
        raw.write_bytes(bytes(MiB))
        top, args, needle = raw, ["-f", "qed", "-b", "", raw], "disk.raw"
    elif case == "missing-old":
        (tmp_path / "old.qed").unlink()
        args, needle = ["-b", "new.qed", top], "old.qed"
    before = top.read_bytes()
    res = qed_in_process("rebase", *args)
    assert res.returncode != 0 and needle in res.stderr, res.stderr
    assert top.read_bytes() == before
