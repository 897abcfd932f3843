"""``qed measure``: ``required`` is at least the size of a ``qed convert -O qed`` of
the same image and within one L2 table of it, on images QEMU wrote (partial and
whole clusters, several L2 spans, zero clusters, a backing chain, raw and qcow2
sources); ``fully-allocated`` is the size of the image once every cluster is
written; ``--size`` is the size of what ``qed create`` makes; the JSON is
qemu-img's layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qedoracle import qed_in_process

CASES: dict[str, tuple[str, str, list[str], list[str]]] = {
    # name: (source format, size, qemu-io commands, target -o)
    "empty": ("qed", "64M", [], []),
    "partial-clusters": ("qed", "64M", ["write -P 1 1000 3000", "write -P 2 5M 100"], []),
    "many-spans": (
        "qed",
        "5G",
        ["write -P 1 0 64k", "write -P 2 2G 1M", "write -P 3 4G 300k", "write -z 3G 1M"],
        [],
    ),
    "small-clusters": (
        "qed",
        "64M",
        ["write -P 1 0 1M", "write -P 2 30M 5k"],
        ["-o", "cluster_size=4k,table_size=2"],
    ),
    "raw-source": ("raw", "32M", ["write -P 9 1M 2M", "write -P 8 20M 4k"], []),
    "qcow2-source": ("qcow2", "32M", ["write -P 9 1M 2M", "write -P 8 20M 4k"], []),
    "odd-size": ("qed", "1000000", ["write -P 7 999000 1000"], []),
}


def _make(qemu: Any, d: Path, name: str) -> tuple[Path, list[str]]:
    fmt, size, cmds, target = CASES[name]
    path = d / f"{name}.{fmt}"
    # The source has the target's geometry when the target asks for one: measure
    # counts allocated clusters without reading them (see the last test).
    qemu.img("create", "-f", fmt, *target, path, size)
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    if args:
        qemu.io("-f", fmt, *args, path)
    return path, target


def _measure(*args: str | Path) -> dict[str, int]:
    res = qed_in_process("measure", "--output=json", *args)
    assert res.returncode == 0, res.stderr
    out: dict[str, int] = json.loads(res.stdout)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_required_is_at_least_a_converted_copy_and_within_one_l2_table(
    qemu: Any, tmp_path: Path, name: str
) -> None:
    src, target = _make(qemu, tmp_path, name)
    measured = _measure(*target, src)
    copy = tmp_path / "copy.qed"
    res = qed_in_process("convert", "-O", "qed", *target, src, copy)
    assert res.returncode == 0, res.stderr
    info = json.loads(qemu.img("info", "--output=json", copy).stdout)
    table = info["cluster-size"] * (2 if target else 4)
    converted = copy.stat().st_size
    assert converted <= measured["required"] <= converted + table, (measured, converted)
    assert measured["required"] <= measured["fully-allocated"]


def test_fully_allocated_is_the_size_of_a_fully_written_image(qemu: Any, tmp_path: Path) -> None:
    path = tmp_path / "full.qed"
    qemu.img("create", "-f", "qed", "-o", "cluster_size=4k,table_size=2", path, "9M")
    measured = _measure("-o", "cluster_size=4k,table_size=2", "--size", "9M")
    qemu.io("-c", "write -P 5 0 9M", path)
    assert measured["fully-allocated"] == path.stat().st_size
    assert _measure("-o", "cluster_size=4k,table_size=2", path) == {
        "required": path.stat().st_size,
        "fully-allocated": path.stat().st_size,
    }


@pytest.mark.parametrize("size", ["1G", "1000", "0", "60T"])
def test_size_measures_what_create_makes(qemu: Any, tmp_path: Path, size: str) -> None:
    path = tmp_path / "new.qed"
    res = qed_in_process("create", path, size)
    assert res.returncode == 0, res.stderr
    assert _measure("--size", size)["required"] == path.stat().st_size


def test_json_and_human_layouts_are_qemu_img_s(qemu: Any) -> None:
    theirs = qemu.img("measure", "--output=json", "-O", "qcow2", "--size", "1G").stdout
    ours = qed_in_process("measure", "--output=json", "--size", "1G").stdout
    assert list(json.loads(theirs)) == list(json.loads(ours))
    assert ours.startswith('{\n    "required": ') and ours.endswith("\n}\n")
    human = qed_in_process("measure", "--size", "1G").stdout.splitlines()
    assert [line.split(":")[0] for line in human] == [
        line.split(":")[0]
        for line in qemu.img("measure", "-O", "qcow2", "--size", "1G").stdout.splitlines()
    ]


def test_raw_target_needs_the_virtual_size_as_qemu_img_says(qemu: Any, tmp_path: Path) -> None:
    src, _ = _make(qemu, tmp_path, "partial-clusters")
    theirs = json.loads(qemu.img("measure", "--output=json", "-O", "raw", src).stdout)
    assert _measure("-O", "raw", src) == theirs


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--size", "1G", "x.qed"], "cannot be used together"),
        ([], "either --size"),
        (["-o", "cluster_size=1000", "--size", "1G"], "cluster_size"),
        (["-o", "table_size=1", "--size", "1G"], "table_size 1"),
        (["-o", "backing_file=x", "--size", "1G"], "only cluster_size"),
        (["missing.qed"], "missing.qed"),
    ],
)
def test_bad_requests_are_named(args: list[str], needle: str, tmp_path: Path) -> None:
    res = qed_in_process("measure", *args, cwd=tmp_path)
    assert res.returncode == 1 and needle in res.stderr, res.stderr


def test_allocated_zeros_are_counted_since_nothing_is_read(qemu: Any, tmp_path: Path) -> None:
    """Target clusters smaller than the source's: a partly written 64 KiB source
    cluster counts as 16 target clusters of 4 KiB, where convert writes only the
    non-zero ones. The over-count is bounded by the source clusters' zero parts."""
    src = tmp_path / "src.qed"
    qemu.img("create", "-f", "qed", src, "64M")
    qemu.io("-c", "write -P 2 30M 5k", src)
    target = ["-o", "cluster_size=4k,table_size=2"]
    measured = _measure(*target, src)
    copy = tmp_path / "copy.qed"
    assert qed_in_process("convert", "-O", "qed", *target, src, copy).returncode == 0
    over = measured["required"] - copy.stat().st_size
    assert over == (16 - 2) * 4096
