"""``qed amend``: a new cluster size (larger, smaller) or table size keeps the data
identical (``qemu-img compare`` against the image converted before), checks clean
with ``qemu-img check``, shows the new geometry in ``qemu-img info`` and leaves no
space behind (the file is no larger than header, L1, tables and data); overlays keep
reading through their backing file; ``backing_fmt=raw`` sets the no-probe bit and
another format clears it; bad options are refused, naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qedoracle import qed_in_process

from qedkit.format.header import Feature, Header

WRITES = [
    "write -P 0x11 0 1M",
    "write -P 0x12 100M 70k",
    "write -z 5M 1M",
    "write -P 0x13 5M 3k",
    "write -P 0x14 250M 1k",
    "write -P 0x15 6000k 4k",
]


def _make(qemu: Any, d: Path, opts: str = "", backing: bool = False) -> Path:
    path = d / "img.qed"
    args = ["-o", opts] if opts else []
    if backing:
        base = d / "base.raw"
        base.write_bytes(bytes(range(256)) * (300 * 4096))
        qemu.img("create", "-f", "qed", *args, "-b", "base.raw", "-F", "raw", path)
    else:
        qemu.img("create", "-f", "qed", *args, path, "300M")
    cmds: list[str] = []
    for w in WRITES:
        cmds += ["-c", w]
    qemu.io(*cmds, path)
    return path


def _info(qemu: Any, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu.img("info", "--output=json", path).stdout)
    return out


@pytest.mark.parametrize(
    ("start", "amend"),
    [
        ("", "cluster_size=4k"),
        ("", "cluster_size=256k"),
        ("", "table_size=2"),
        ("", "table_size=16"),
        ("cluster_size=4k,table_size=2", "cluster_size=64k,table_size=4"),
        ("cluster_size=16k", "cluster_size=8k,table_size=8"),
        ("", "cluster_size=1M,table_size=2"),
    ],
)
@pytest.mark.parametrize("backing", [False, True], ids=["alone", "overlay"])
def test_amend_keeps_the_data_and_checks_clean(
    qemu: Any, tmp_path: Path, start: str, amend: str, backing: bool
) -> None:
    path = _make(qemu, tmp_path, start, backing)
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", path, ref)
    res = qed_in_process("amend", "-o", amend, path)
    assert res.returncode == 0, res.stderr
    qemu.img("compare", "-F", "raw", path, ref)
    check = qemu.img("check", "--output=json", path)
    report = json.loads(check.stdout)
    assert "leaks" not in report and "corruptions" not in report, report
    info = _info(qemu, path)
    want = dict(item.split("=") for item in amend.split(","))
    if "cluster_size" in want:
        assert info["cluster-size"] == int(want["cluster_size"].rstrip("kM")) * (
            1 << 20 if want["cluster_size"].endswith("M") else 1024
        )
    header = Header.unpack(path.read_bytes()[:64])
    if "table_size" in want:
        assert header.table_size == int(want["table_size"])
    cs, ts = header.cluster_size, header.table_size
    used = (
        1 + ts + report["allocated-clusters"] + ts * (-(-header.image_size // (cs * ts * cs // 8)))
    )
    assert path.stat().st_size <= used * cs
    if backing:
        assert info["backing-filename"] == "base.raw"


def test_backing_fmt_raw_sets_and_another_format_clears_no_probe(qemu: Any, tmp_path: Path) -> None:
    path = _make(qemu, tmp_path, backing=True)
    data = bytearray(path.read_bytes())  # record the backing file without its format
    data[16] &= ~int(Feature.BACKING_FORMAT_NO_PROBE)
    path.write_bytes(data)
    assert not Header.unpack(path.read_bytes()[:64]).has(Feature.BACKING_FORMAT_NO_PROBE)
    assert qed_in_process("amend", "-o", "backing_fmt=raw", path).returncode == 0
    assert Header.unpack(path.read_bytes()[:64]).has(Feature.BACKING_FORMAT_NO_PROBE)
    assert _info(qemu, path).get("backing-filename-format") == "raw"
    assert qed_in_process("amend", "-o", "backing_fmt=qed", path).returncode == 0
    assert not Header.unpack(path.read_bytes()[:64]).has(Feature.BACKING_FORMAT_NO_PROBE)


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ("cluster_size=1000", "cluster_size"),
        ("table_size=1", "table_size 1"),
        ("size=1G", "qed resize"),
        ("backing_fmt=raw", "no"),  # the image has no backing file
        ("backing_fmt=vmdk", "unknown backing_fmt"),
        ("cluster_size=4k,table_size=2", "maximum"),  # 300M > 1 GiB? no: 4k/2 max 4 GiB
    ],
)
def test_bad_options_are_refused_and_change_nothing(
    qemu: Any, tmp_path: Path, opts: str, needle: str
) -> None:
    path = _make(qemu, tmp_path)
    if needle == "maximum":
        qemu.img("resize", path, "5G")
    before = path.read_bytes()
    res = qed_in_process("amend", "-o", opts, path)
    assert res.returncode == 1 and needle in res.stderr, res.stderr
    assert path.read_bytes() == before


def test_tables_larger_than_the_whole_old_file_fit(qemu: Any, tmp_path: Path) -> None:
    """One data cluster in a small file, amended to 1 MiB tables: the new L2 table
    lies across the used space after the switch and is moved twice."""
    path = tmp_path / "small.qed"
    qemu.img("create", "-f", "qed", path, "64M")
    qemu.io("-c", "write -P 0x5a 1M 64k", path)
    ref = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", path, ref)
    res = qed_in_process("amend", "-o", "cluster_size=128k,table_size=8", path)
    assert res.returncode == 0, res.stderr
    qemu.img("compare", "-F", "raw", path, ref)
    qemu.img("check", path)
    assert path.stat().st_size == (1 + 8 + 8 + 1) * 128 * 1024
