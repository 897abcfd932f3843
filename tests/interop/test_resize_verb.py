"""``qed resize``: growing and shrinking QED and raw images, judged by QEMU (``qemu-img
check`` clean, ``qemu-img info`` size, ``qemu-io`` reads of the data that stays and
zeros where a shrunk image grows again); a shrink is refused without ``--shrink``
and, naming the first data offset, when the cut tail holds data, unless ``--force``;
the cut clusters' space is given back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qedoracle import qed_in_process

MiB = 1 << 20


def _info(qemu: Any, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu.img("info", "--output=json", path).stdout)
    return out


def _clean(qemu: Any, path: Path) -> None:
    res = qemu.img("check", path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _reads(qemu: Any, path: Path, *checks: str, fmt: str = "qed") -> None:
    args: list[str] = []
    for c in checks:
        args += ["-c", f"read -P {c}"]
    res = qemu.io("-f", fmt, "-r", *args, path, check=False)
    assert "failed" not in res.stdout + res.stderr, res.stdout + res.stderr


def _qed(*args: str | Path) -> Any:
    res = qed_in_process("resize", *args)
    return res


@pytest.fixture
def image(qemu: Any, tmp_path: Path) -> Path:
    """20 MiB, 4 KiB clusters, table_size 2 (one L2 table maps 4 MiB): data in the
    first, second and third tables."""
    path = tmp_path / "img.qed"
    qemu.img("create", "-f", "qed", "-o", "cluster_size=4k,table_size=2", path, "20M")
    qemu.io(
        "-c", "write -P 1 0 1M", "-c", "write -P 3 5M 100", "-c", "write -P 2 9M 1M",
        "-c", "write -z 12M 1M", path,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("size", ["+1M", "64M", "20971520", "+512"])
def test_grow_checks_clean_and_reads_zeros_past_the_old_end(
    qemu: Any, image: Path, size: str
) -> None:
    res = _qed(image, size)
    assert (res.returncode, res.stdout) == (0, "Image resized.\n"), res.stderr
    new = 20 * MiB + (MiB if size == "+1M" else 512 if size == "+512" else 0)
    if size == "64M":
        new = 64 * MiB
    _clean(qemu, image)
    assert _info(qemu, image)["virtual-size"] == new
    _reads(qemu, image, "1 0 1M", "2 9M 1M", f"0 20M {new - 20 * MiB}")


@pytest.mark.parametrize(
    ("new", "data_end"),
    [(5 * MiB + 512, 5 * MiB + 100), (9 * MiB, 9 * MiB), (2 * MiB, MiB), (4 * MiB, MiB)],
    ids=["mid-cluster", "at-a-data-run", "inside-the-first-table", "at-a-table-boundary"],
)
def test_forced_shrink_checks_clean_keeps_the_rest_and_gives_space_back(
    qemu: Any, image: Path, new: int, data_end: int
) -> None:
    before = image.stat().st_blocks
    res = _qed("--shrink", "--force", image, str(new))
    assert res.returncode == 0, res.stderr
    _clean(qemu, image)
    assert _info(qemu, image)["virtual-size"] == new
    _reads(qemu, image, "1 0 1M")
    if new > 5 * MiB:
        _reads(qemu, image, f"3 {5 * MiB} 100")
    assert image.stat().st_blocks < before
    # The file holds nothing past what stays: header, L1, the remaining tables, data.
    entries = json.loads(qemu.img("map", "--output=json", image).stdout)
    assert all(e["start"] + e["length"] <= new for e in entries)
    assert (
        max(e["start"] + e["length"] for e in entries if e["data"])
        == data_end + (-data_end % 4096 if data_end % 4096 else 0)
        or data_end <= new
    )
    # Growing again shows zeros, never the old tail.
    assert _qed(image, "20M").returncode == 0
    _clean(qemu, image)
    _reads(qemu, image, f"0 {new} {20 * MiB - new}")


def test_a_shrink_needs_the_flag_and_refuses_to_cut_data(qemu: Any, image: Path) -> None:
    before = image.read_bytes()
    res = _qed(image, "-15M")
    assert res.returncode == 1 and "--shrink" in res.stderr and str(image) in res.stderr
    res = _qed("--shrink", image, "-15M")
    assert res.returncode == 1
    assert f"guest offset {5 * MiB}" in res.stderr and "--force" in res.stderr
    assert str(image) in res.stderr
    assert image.read_bytes() == before


def test_a_tail_of_zero_clusters_and_written_zeros_is_not_data(qemu: Any, image: Path) -> None:
    qemu.io("-c", "write -P 0 15M 1M", image)  # allocated zeros
    res = _qed("--shrink", image, "11M")  # 12M..13M are zero clusters
    assert res.returncode == 0, res.stderr
    _clean(qemu, image)
    assert _info(qemu, image)["virtual-size"] == 11 * MiB


def test_shrinking_an_overlay_ignores_the_backing_file_s_data(qemu: Any, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * (8 * MiB))
    top = tmp_path / "top.qed"
    qemu.img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", top)
    qemu.io("-c", "write -P 7 0 64k", top)
    res = _qed("--shrink", top, "1M")
    assert res.returncode == 0, res.stderr
    _clean(qemu, top)
    _reads(qemu, top, "7 0 64k", "0x42 64k 960k")
    assert _qed(top, "4M").returncode == 0
    _reads(qemu, top, "0x42 64k 960k", f"0 {MiB} {3 * MiB}")


def test_raw_images_grow_and_shrink_by_truncation(qemu: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    qemu.img("create", "-f", "raw", path, "4M")
    qemu.io("-f", "raw", "-c", "write -P 5 0 64k", "-c", "write -P 6 3M 4k", path)
    assert _qed("-f", "raw", "--shrink", path, "2M").returncode == 1
    assert _qed("-f", "raw", path, "+1000").returncode == 0
    assert path.stat().st_size == 4 * MiB + 1000
    assert _qed("-f", "raw", "--shrink", "--force", path, "1M").returncode == 0
    assert path.stat().st_size == MiB
    _reads(qemu, path, "5 0 64k", fmt="raw")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["IMG", "1000"], "multiple of 512"),
        (["IMG", "+1001"], "multiple of 512"),
        (["--shrink", "IMG", "-30M"], "negative"),
        (["IMG", "1Q"], "invalid size"),
        (["IMG", "100T"], "maximum"),
    ],
)
def test_bad_sizes_are_refused_naming_the_file(image: Path, args: list[str], needle: str) -> None:
    before = image.read_bytes()
    res = _qed(*[str(image) if a == "IMG" else a for a in args])
    assert res.returncode == 1 and needle in res.stderr, res.stderr
    if needle != "invalid size":
        assert str(image) in res.stderr
    assert image.read_bytes() == before


def test_qcow2_and_missing_files_are_errors_naming_the_file(qemu: Any, tmp_path: Path) -> None:
    q = tmp_path / "x.qcow2"
    qemu.img("create", "-f", "qcow2", q, "1M")
    res = _qed(q, "2M")
    assert res.returncode == 1 and str(q) in res.stderr
    res = _qed(tmp_path / "missing.qed", "2M")
    assert res.returncode == 1 and "missing.qed" in res.stderr
