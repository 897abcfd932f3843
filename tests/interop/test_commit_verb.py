"""``qed commit``: after a commit, ``qemu-img compare`` of the base against the
overlay as it was (converted to raw before) is identical, the overlay still reads
the same, it is empty (``qemu-img map`` shows nothing at depth 0, the file is back to
header + L1) and both check clean; over QED and raw bases, a base shorter than the
overlay, ``-d`` and ``-b`` deeper in the chain, and the errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qedoracle import qed_in_process

MiB = 1 << 20
WRITES = [
    "write -P 0x21 1M 100k",  # partial clusters over base data
    "write -z 2M 1M",  # zero clusters over base data
    "write -P 0x23 6M 64k",  # past the base's data
    "write -P 0x24 3M 4k",  # over base data, then zeroed partly
    "write -z 3M 1k",
]


def _make(qemu: Any, d: Path, base_fmt: str, base_size: str = "8M", top_size: str = "") -> Path:
    base = d / f"base.{base_fmt}"
    qemu.img("create", "-f", base_fmt, base, base_size)
    qemu.io("-f", base_fmt, "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 3584k 64k", base)
    top = d / "top.qed"
    args = [top_size] if top_size else []
    qemu.img("create", "-f", "qed", "-b", base.name, "-F", base_fmt, top, *args)
    cmds: list[str] = []
    for w in WRITES:
        cmds += ["-c", w]
    qemu.io(*cmds, top)
    return top


def _depth0(qemu: Any, path: Path) -> list[dict[str, Any]]:
    entries = json.loads(qemu.img("map", "--output=json", path).stdout)
    return [e for e in entries if e["depth"] == 0 and e["present"]]


@pytest.mark.parametrize(
    ("base_fmt", "base_size", "top_size"),
    [("qed", "8M", ""), ("raw", "8M", ""), ("qed", "4M", "8M"), ("raw", "4M", "9M")],
    ids=["qed", "raw", "qed-shorter-base", "raw-shorter-base"],
)
def test_the_base_equals_the_old_overlay_and_the_overlay_is_empty(
    qemu: Any, tmp_path: Path, base_fmt: str, base_size: str, top_size: str
) -> None:
    top = _make(qemu, tmp_path, base_fmt, base_size, top_size)
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, ref)
    res = qed_in_process("commit", top)
    assert (res.returncode, res.stdout) == (0, "Image committed.\n"), res.stderr
    base = tmp_path / f"base.{base_fmt}"
    qemu.img("compare", "-f", base_fmt, "-F", "raw", base, ref)
    qemu.img("compare", "-f", "qed", "-F", "raw", top, ref)
    assert _depth0(qemu, top) == []
    info = json.loads(qemu.img("info", "--output=json", top).stdout)
    assert top.stat().st_size == 5 * info["cluster-size"]  # header + a 4-cluster L1
    qemu.img("check", top)
    if base_fmt == "qed":
        qemu.img("check", base)


def test_keep_leaves_the_overlay_as_it_was(qemu: Any, tmp_path: Path) -> None:
    top = _make(qemu, tmp_path, "qed")
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, ref)
    before = top.read_bytes()
    assert qed_in_process("commit", "-d", top).returncode == 0
    assert top.read_bytes() == before
    qemu.img("compare", "-F", "raw", tmp_path / "base.qed", ref)


def test_commit_into_a_deeper_base_keeps_the_overlay_s_view(qemu: Any, tmp_path: Path) -> None:
    base = tmp_path / "base.qed"
    qemu.img("create", "-f", "qed", base, "8M")
    qemu.io("-c", "write -P 1 0 8M", base)
    mid = tmp_path / "mid.qed"
    qemu.img("create", "-f", "qed", "-b", "base.qed", "-F", "qed", mid)
    qemu.io("-c", "write -P 2 1M 1M", "-c", "write -z 5M 64k", mid)
    top = tmp_path / "top.qed"
    qemu.img("create", "-f", "qed", "-b", "mid.qed", "-F", "qed", top)
    qemu.io("-c", "write -P 3 1536k 1M", top)
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, ref)
    before = top.read_bytes()
    res = qed_in_process("commit", "-b", base, top)
    assert res.returncode == 0, res.stderr
    qemu.img("compare", "-F", "raw", base, ref)
    qemu.img("compare", "-F", "raw", top, ref)
    assert top.read_bytes() == before  # -b implies -d
    qemu.img("check", base)


def test_qemu_img_commit_of_the_same_overlay_gives_the_same_base(qemu: Any, tmp_path: Path) -> None:
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours, theirs = _make(qemu, ours_dir, "qed"), _make(qemu, theirs_dir, "qed")
    assert qed_in_process("commit", ours).returncode == 0
    qemu.img("commit", theirs)
    qemu.img("compare", ours_dir / "base.qed", theirs_dir / "base.qed")
    assert _depth0(qemu, theirs) != []  # QEMU leaves the QED overlay full


@pytest.mark.parametrize("case", ["no-backing", "missing-backing", "not-in-chain"])
def test_errors_name_the_file_and_change_nothing(qemu: Any, tmp_path: Path, case: str) -> None:
    top = tmp_path / "top.qed"
    if case == "no-backing":
        qemu.img("create", "-f", "qed", top, "1M")
        args: list[str | Path] = [top]
        needle = str(top)
    elif case == "missing-backing":
        qemu.img("create", "-f", "qed", "-u", "-b", "gone.qed", "-F", "qed", top, "1M")
        args = [top]
        needle = "gone.qed"
    else:
        top = _make(qemu, tmp_path, "raw")
        other = tmp_path / "other.raw"
        other.write_bytes(bytes(MiB))
        args = ["-b", other, top]
        needle = "other.raw"
    before = top.read_bytes()
    res = qed_in_process("commit", *args)
    assert res.returncode == 1 and needle in res.stderr, res.stderr
    assert top.read_bytes() == before
