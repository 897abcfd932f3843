"""Creating images: QedImage.validate_create_options and qedkit.create's errors.

Create refuses anything QEMU could not open (qed-facts §1.8, §2.12); every refusal
happens before the target file is created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import qedkit
from qedkit.engine.qed import QedImage
from qedkit.errors import (
    BackingFileError,
    InvalidRequestError,
    QedError,
    UnsupportedFeatureError,
)
from qedkit.format.header import Header

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
validate = QedImage.validate_create_options


def invalid(size: int, cs: int = 64 * KiB, ts: int = 4, backing: str | None = None) -> str:
    with pytest.raises(QedError) as info:
        validate(size, cs, ts, backing)
    assert type(info.value) is InvalidRequestError
    return str(info.value)


# ---- validate_create_options -----------------------------------------------------------


@pytest.mark.parametrize("cs", [0, 1000, 2048, 12345, 65537, 128 * MiB])
def test_bad_cluster_size(cs: int) -> None:
    assert invalid(MiB, cs=cs) == (
        f"invalid cluster_size {cs}: must be a power of two from 4096 to 67108864"
    )


@pytest.mark.parametrize("ts", [0, 3, 5, 32])
def test_bad_table_size(ts: int) -> None:
    assert invalid(MiB, ts=ts) == f"invalid table_size {ts}: must be a power of two from 1 to 16"


def test_table_size_1_is_refused_because_qemu_cannot_open_it() -> None:
    assert invalid(MiB, ts=1) == (
        "table_size 1 is valid QED but QEMU cannot open such images; use 2 or more"
    )


def test_cluster_size_is_checked_before_table_size() -> None:
    assert invalid(MiB, cs=1000, ts=3).startswith("invalid cluster_size 1000")


@pytest.mark.parametrize("size", [-512, -1, 1, 1000, MiB + 1])
def test_size_not_a_multiple_of_512(size: int) -> None:
    assert invalid(size) == f"invalid image size {size}: must be a multiple of 512"


def test_size_above_qemus_limit() -> None:
    assert invalid(64 * TiB + 512) == (
        f"image size {64 * TiB + 512} exceeds the maximum {64 * TiB} that QEMU accepts for "
        "cluster_size 65536 and table_size 4"
    )


def test_size_exactly_qemus_limit_is_accepted() -> None:
    validate(64 * TiB, 64 * KiB, 4, None)
    validate(4 * GiB, 4 * KiB, 2, None)


def test_geometry_where_qemus_limit_wraps_to_0_accepts_only_size_0() -> None:
    validate(0, 2 * MiB, 16, None)
    assert invalid(512, cs=2 * MiB, ts=16) == (
        "image size 512 exceeds the maximum 0 that QEMU accepts for cluster_size 2097152 "
        "and table_size 16"
    )


def test_size_zero_and_odd_sector_multiples_are_accepted() -> None:
    validate(0, 64 * KiB, 4, None)
    validate(1536, 64 * KiB, 4, None)


def test_backing_name_longer_than_qemus_4095_bytes() -> None:
    assert invalid(MiB, backing="b" * 4096) == (
        "backing file name of 4096 bytes does not fit in the header (at most 4095)"
    )
    validate(MiB, 64 * KiB, 4, "b" * 4095)


def test_backing_name_must_fit_after_the_header_struct_in_cluster_0() -> None:
    assert invalid(MiB, cs=4 * KiB, backing="b" * 4033) == (
        "backing file name of 4033 bytes does not fit in the header (at most 4032)"
    )
    validate(MiB, 4 * KiB, 4, "b" * 4032)


def test_backing_name_length_counts_utf8_bytes() -> None:
    assert invalid(MiB, cs=4 * KiB, backing="é" * 2017) == (
        "backing file name of 4034 bytes does not fit in the header (at most 4032)"
    )


# ---- qedkit.create -----------------------------------------------------------------


def test_create_writes_qemus_layout(tmp_path: Path) -> None:
    path = tmp_path / "d.qed"
    assert qedkit.create(str(path), 10 * GiB) == 10 * GiB
    data = path.read_bytes()
    assert len(data) == 5 * 64 * KiB
    # First 64 bytes of `qemu-img create -f qed d.qed 10G`.
    assert data[:64] == bytes.fromhex(
        "51454400000001000400000001000000000000000000000000000000000000000000000000000000"
        "000001000000000000000080020000000000000000000000"
    )
    assert data[64:] == bytes(len(data) - 64)


def test_create_with_raw_backing_records_the_name_and_no_probe(
    new_image: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = new_image("top.qed", None, backing_file="base.raw", backing_format="raw")
    data = path.read_bytes()
    # First 72 bytes of `qemu-img create -f qed -b base.raw -F raw top.qed` (1 MiB base).
    assert data[:72] == bytes.fromhex(
        "51454400000001000400000001000000050000000000000000000000000000000000000000000000"
        "00000100000000000000100000000000400000000800000062617365" + "2e726177"
    )
    assert Header.parse(data[:64], len(data)).image_size == MiB


def test_create_backing_without_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = tmp_path / "top.qed"
    with pytest.raises(InvalidRequestError) as info:
        qedkit.create(str(path), MiB, backing_file="base.raw")
    assert info.value.message == (
        "backing file specified without backing format (use -F raw or -F qed)"
    )
    assert info.value.filename == str(path)
    assert not path.exists()


def test_create_with_missing_backing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "top.qed"
    with pytest.raises(BackingFileError) as info:
        qedkit.create(str(path), MiB, backing_file="missing.raw", backing_format="raw")
    full = os.path.join(str(tmp_path), "missing.raw")
    assert info.value.message == (
        f"cannot open backing file: {full}: cannot open: No such file or directory"
    )
    assert info.value.filename == str(path)
    assert str(info.value).startswith(f"{path}: cannot open backing file: ")
    assert not path.exists()


def test_create_resolves_the_backing_name_against_the_images_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "base.raw").write_bytes(bytes(2 * MiB))
    monkeypatch.chdir(tmp_path)  # base.raw is not in the working directory
    assert qedkit.create("sub/top.qed", None, backing_file="base.raw", backing_format="raw") == (
        2 * MiB
    )


def test_create_qcow2_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(UnsupportedFeatureError) as info:
        qedkit.create(str(path), MiB, format="qcow2")
    assert info.value.message == "qedkit cannot create qcow2 images"
    assert not path.exists()


def test_create_with_a_qcow2_backing_format_that_is_not_qcow2_fails(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path = tmp_path / "top.qed"
    with pytest.raises(BackingFileError) as info:
        qedkit.create(str(path), MiB, backing_file="base.raw", backing_format="qcow2")
    assert info.value.message.startswith("cannot open backing file: ")
    assert "not a qcow2 image" in info.value.message
    assert not path.exists()


def test_create_unknown_format_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "x.vmdk"
    with pytest.raises(UnsupportedFeatureError) as info:
        qedkit.create(str(path), MiB, format="vmdk")
    assert info.value.message == "unknown image format 'vmdk' (supported: qed, raw, qcow2)"
    assert not path.exists()


def test_create_raw_with_backing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    with pytest.raises(InvalidRequestError) as info:
        qedkit.create(str(path), MiB, format="raw", backing_file="b", backing_format="raw")
    assert info.value.message == "format raw has no backing file"
    assert not path.exists()


def test_create_without_size_or_backing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.qed"
    with pytest.raises(InvalidRequestError) as info:
        qedkit.create(str(path))
    assert info.value.message == "image size is required"
    assert not path.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_size": 1000}, "invalid cluster_size 1000"),
        ({"table_size": 1}, "table_size 1 is valid QED but QEMU cannot open"),
        ({"table_size": 3}, "invalid table_size 3"),
    ],
)
def test_create_with_bad_options_creates_no_file(
    tmp_path: Path, kwargs: dict[str, int], message: str
) -> None:
    path = tmp_path / "x.qed"
    with pytest.raises(InvalidRequestError) as info:
        qedkit.create(str(path), MiB, **kwargs)  # type: ignore[arg-type]
    assert info.value.message.startswith(message)
    assert not path.exists()


def test_create_with_bad_size_leaves_an_existing_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "x.qed"
    path.write_bytes(b"precious")
    with pytest.raises(InvalidRequestError):
        qedkit.create(str(path), 1000)
    assert path.read_bytes() == b"precious"
