"""qedkit.format.header: every open-time header rule, with the exact error each raises.

The rules and their order follow QEMU's bdrv_qed_do_open (qed-facts §1.10): magic,
unknown features, cluster size, table size, image size, L1 offset, header size,
backing name. Each failure names the field and its byte offset in the header.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from qedkit.errors import CorruptImageError, FormatError, QedError, UnsupportedFeatureError
from qedkit.format.header import (
    FIELD_OFFSETS,
    HEADER_SIZE_BYTES,
    KNOWN_FEATURES,
    MAGIC,
    Feature,
    Header,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CS = 64 * KiB
# A default image as QEMU creates it: header cluster, then a 4-cluster L1.
FILE_SIZE = 5 * CS


def header(**fields: int) -> Header:
    base = Header(
        cluster_size=CS,
        table_size=4,
        header_size=1,
        features=0,
        compat_features=0,
        autoclear_features=0,
        l1_table_offset=CS,
        image_size=GiB,
        backing_filename_offset=0,
        backing_filename_size=0,
    )
    return replace(base, **fields)


def parse_error(
    h: Header | bytes, file_size: int = FILE_SIZE, cls: type[QedError] = CorruptImageError
) -> QedError:
    buf = h if isinstance(h, bytes) else h.pack()
    with pytest.raises(QedError) as info:
        Header.parse(buf, file_size)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def assert_field_error(err: QedError, field: str, message: str) -> None:
    assert isinstance(err, FormatError)
    assert err.message == message
    assert err.field == field
    assert err.offset == FIELD_OFFSETS[field]
    assert err.filename is None


# ---- layout ------------------------------------------------------------------------


def test_field_offsets_match_the_spec_layout() -> None:
    assert FIELD_OFFSETS == {
        "magic": 0,
        "cluster_size": 4,
        "table_size": 8,
        "header_size": 12,
        "features": 16,
        "compat_features": 24,
        "autoclear_features": 32,
        "l1_table_offset": 40,
        "image_size": 48,
        "backing_filename_offset": 56,
        "backing_filename_size": 60,
    }
    assert HEADER_SIZE_BYTES == 64
    assert MAGIC == b"QED\x00"


def test_known_feature_bits_are_backing_need_check_and_no_probe() -> None:
    assert int(Feature.BACKING_FILE) == 0x01
    assert int(Feature.NEED_CHECK) == 0x02
    assert int(Feature.BACKING_FORMAT_NO_PROBE) == 0x04
    assert int(KNOWN_FEATURES) == 0x07


def test_pack_writes_64_little_endian_bytes_in_spec_order() -> None:
    h = header(
        features=0x05,
        compat_features=0x1122,
        autoclear_features=0x3344,
        image_size=10 * GiB,
        backing_filename_offset=64,
        backing_filename_size=8,
    )
    expected = (
        b"QED\x00"
        + struct.pack("<III", CS, 4, 1)
        + struct.pack("<QQQQQ", 0x05, 0x1122, 0x3344, CS, 10 * GiB)
        + struct.pack("<II", 64, 8)
    )
    assert h.pack() == expected
    assert len(h.pack()) == 64


def test_pack_equals_the_header_qemu_img_writes_for_a_10g_image() -> None:
    # First 64 bytes of `qemu-img create -f qed d.qed 10G` (qemu-img 7.2).
    qemu = bytes.fromhex(
        "51454400000001000400000001000000000000000000000000000000000000000000000000000000"
        "000001000000000000000080020000000000000000000000"
    )
    assert header(image_size=10 * GiB).pack() == qemu
    assert Header.parse(qemu, FILE_SIZE) == header(image_size=10 * GiB)


def test_unpack_of_qemu_header_with_raw_backing_file() -> None:
    # `qemu-img create -f qed -b base.raw -F raw top.qed` over a 1 MiB base: 0x05, name at 64.
    qemu = bytes.fromhex(
        "51454400000001000400000001000000050000000000000000000000000000000000000000000000"
        "00000100000000000000100000000000400000000800000062617365 2e726177".replace(" ", "")
    )
    h = Header.parse(qemu, FILE_SIZE)
    assert h == header(
        features=0x05, image_size=MiB, backing_filename_offset=64, backing_filename_size=8
    )
    assert h.has_backing_file
    assert h.has(Feature.BACKING_FORMAT_NO_PROBE)
    assert h.backing_filename(qemu) == "base.raw"


@pytest.mark.parametrize(
    "h",
    [
        header(),
        header(features=0x07, compat_features=2**64 - 1, autoclear_features=2**63),
        header(cluster_size=4 * KiB, table_size=1, header_size=3, l1_table_offset=12 * KiB),
        header(image_size=0, backing_filename_offset=2**32 - 1, backing_filename_size=2**32 - 1),
    ],
)
def test_pack_unpack_round_trip(h: Header) -> None:
    assert Header.unpack(h.pack()) == h


def test_unpack_ignores_bytes_after_the_64_byte_struct() -> None:
    h = header()
    assert Header.unpack(h.pack() + b"\xff" * 448) == h


# ---- magic and length --------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 4, 63])
def test_too_short_buffer_is_a_format_error(length: int) -> None:
    err = parse_error(header().pack()[:length], cls=FormatError)
    assert_field_error(
        err, "magic", f"file is too short for a QED header ({length} bytes, need 64)"
    )


def test_bad_magic_is_a_format_error_not_corruption() -> None:
    buf = b"QEX\x00" + header().pack()[4:]
    err = parse_error(buf, cls=FormatError)
    assert_field_error(
        err, "magic", "not a QED image: magic is b'QEX\\x00' at offset 0, expected b'QED\\x00'"
    )


def test_qcow2_magic_is_not_qed() -> None:
    err = parse_error(b"QFI\xfb" + bytes(60), cls=FormatError)
    assert err.message.startswith("not a QED image: magic is b'QFI\\xfb'")


def test_magic_is_checked_before_any_field() -> None:
    buf = b"\x00\x00\x00\x00" + header(cluster_size=3, features=0x80).pack()[4:]
    parse_error(buf, cls=FormatError)


# ---- features ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "unknown"),
    [(0x08, "0x8"), (0x0F, "0x8"), (0x10, "0x10"), (2**63, "0x8000000000000000")],
)
def test_unknown_feature_bit_is_unsupported(features: int, unknown: str) -> None:
    err = parse_error(header(features=features), cls=UnsupportedFeatureError)
    assert err.message == (f"unsupported QED feature bits {unknown} in features (header offset 16)")


def test_unknown_feature_error_carries_field_and_offset() -> None:
    err = parse_error(header(features=0x08), cls=UnsupportedFeatureError)
    assert getattr(err, "field", None) == "features"
    assert getattr(err, "offset", None) == 16


def test_unknown_feature_is_reported_before_a_bad_cluster_size() -> None:
    # QEMU's order: features come before cluster_size.
    parse_error(header(features=0x08, cluster_size=12345), cls=UnsupportedFeatureError)


def test_all_known_feature_bits_are_accepted() -> None:
    h = header(features=0x07, backing_filename_offset=64, backing_filename_size=4)
    assert Header.parse(h.pack(), FILE_SIZE) == h


@pytest.mark.parametrize("compat", [0x01, 0x08, 2**64 - 1])
def test_unknown_compat_feature_bits_are_ignored(compat: int) -> None:
    h = header(compat_features=compat)
    assert Header.parse(h.pack(), FILE_SIZE).compat_features == compat


def test_unknown_autoclear_bits_do_not_fail_parsing() -> None:
    h = header(autoclear_features=2**64 - 1)
    assert Header.parse(h.pack(), FILE_SIZE).autoclear_features == 2**64 - 1


# ---- cluster size ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cluster_size", [0, 1, 12345, 65535, 65537, 3 * 4096, 2048, 2 * KiB, 128 * MiB, 2**31]
)
def test_bad_cluster_size_is_corruption(cluster_size: int) -> None:
    err = parse_error(header(cluster_size=cluster_size))
    assert_field_error(
        err,
        "cluster_size",
        f"invalid cluster_size {cluster_size}: must be a power of two from 4096 to 67108864 "
        "(header offset 4)",
    )


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB, 64 * MiB])
def test_cluster_size_limits_are_accepted(cluster_size: int) -> None:
    h = header(cluster_size=cluster_size, l1_table_offset=cluster_size, image_size=0)
    assert Header.parse(h.pack(), 5 * cluster_size).cluster_size == cluster_size


# ---- table size --------------------------------------------------------------------


@pytest.mark.parametrize("table_size", [0, 3, 5, 32, 2**32 - 1])
def test_bad_table_size_is_corruption(table_size: int) -> None:
    err = parse_error(header(table_size=table_size))
    assert_field_error(
        err,
        "table_size",
        f"invalid table_size {table_size}: must be a power of two from 1 to 16 (header offset 8)",
    )


def test_table_size_is_checked_before_image_size() -> None:
    err = parse_error(header(table_size=3, image_size=1000))
    assert isinstance(err, FormatError)
    assert err.field == "table_size"


def test_table_size_1_is_accepted_although_qemu_cannot_open_it() -> None:
    # Valid per the spec; QEMU's table-offset test rejects every one-cluster table.
    h = header(table_size=1, image_size=4 * TiB)
    assert Header.parse(h.pack(), 2 * CS) == h


@pytest.mark.parametrize("table_size", [2, 8, 16])
def test_other_power_of_two_table_sizes_are_accepted(table_size: int) -> None:
    h = header(table_size=table_size)
    assert Header.parse(h.pack(), (1 + table_size) * CS) == h


# ---- image size --------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [1, 511, 1000, GiB + 1, GiB + 256])
def test_image_size_not_a_multiple_of_512_is_corruption(image_size: int) -> None:
    err = parse_error(header(image_size=image_size))
    assert_field_error(
        err,
        "image_size",
        f"invalid image_size {image_size}: must be a multiple of 512 (header offset 48)",
    )


def test_image_size_need_not_be_a_multiple_of_the_cluster_size() -> None:
    h = header(image_size=CS + 512)
    assert Header.parse(h.pack(), FILE_SIZE).image_size == CS + 512


def test_image_size_zero_is_accepted() -> None:
    assert Header.parse(header(image_size=0).pack(), FILE_SIZE).image_size == 0


def test_image_size_exactly_the_maximum_is_accepted() -> None:
    # 64 KiB clusters, table_size 4: 64 TiB (QEMU accepts exactly this, §1.8).
    h = header(image_size=64 * TiB)
    assert Header.parse(h.pack(), FILE_SIZE).image_size == 64 * TiB


def test_image_size_above_the_maximum_is_corruption() -> None:
    err = parse_error(header(image_size=64 * TiB + 512))
    assert_field_error(
        err,
        "image_size",
        f"invalid image_size {64 * TiB + 512}: exceeds the maximum {64 * TiB} for "
        "cluster_size 65536 and table_size 4 (header offset 48)",
    )


def test_image_size_above_the_maximum_of_small_clusters_and_table_size_1() -> None:
    h = header(cluster_size=4 * KiB, table_size=1, l1_table_offset=4 * KiB, image_size=GiB + 512)
    err = parse_error(h, 2 * 4 * KiB)
    assert_field_error(
        err,
        "image_size",
        f"invalid image_size {GiB + 512}: exceeds the maximum {GiB} for "
        "cluster_size 4096 and table_size 1 (header offset 48)",
    )
    assert Header.parse(replace(h, image_size=GiB).pack(), 2 * 4 * KiB).image_size == GiB


def test_image_size_above_qemus_wrapped_limit_is_still_valid_qed() -> None:
    # 2 MiB clusters with table_size 16: QEMU's u64 limit wraps to 0, the real one is 2**65.
    cs = 2 * MiB
    h = header(cluster_size=cs, table_size=16, l1_table_offset=cs, image_size=2**63)
    assert Header.parse(h.pack(), 17 * cs).image_size == 2**63


# ---- L1 table offset ---------------------------------------------------------------


def test_l1_offset_not_cluster_aligned_is_corruption() -> None:
    err = parse_error(header(l1_table_offset=CS + 512))
    assert_field_error(
        err,
        "l1_table_offset",
        "invalid l1_table_offset 0x10200: not aligned to the cluster size 65536 (header offset 40)",
    )


def test_l1_offset_inside_the_header_is_corruption() -> None:
    err = parse_error(header(l1_table_offset=0))
    assert_field_error(
        err,
        "l1_table_offset",
        "invalid l1_table_offset 0x0: inside the 65536-byte header area (header offset 40)",
    )


def test_l1_offset_inside_a_multi_cluster_header_is_corruption() -> None:
    err = parse_error(header(header_size=2, l1_table_offset=CS), 6 * CS)
    assert_field_error(
        err,
        "l1_table_offset",
        "invalid l1_table_offset 0x10000: inside the 131072-byte header area (header offset 40)",
    )


def test_l1_offset_past_eof_is_corruption() -> None:
    err = parse_error(header(l1_table_offset=GiB))
    assert_field_error(
        err,
        "l1_table_offset",
        "invalid l1_table_offset 0x40000000: the 262144-byte L1 table does not fit in the "
        "file (327680 bytes in whole clusters) (header offset 40)",
    )


def test_l1_whose_last_cluster_is_past_eof_is_corruption() -> None:
    # The first cluster of the table is inside the file, the last one is not.
    err = parse_error(header(l1_table_offset=2 * CS))
    assert_field_error(
        err,
        "l1_table_offset",
        "invalid l1_table_offset 0x20000: the 262144-byte L1 table does not fit in the "
        "file (327680 bytes in whole clusters) (header offset 40)",
    )


def test_l1_cut_by_a_partial_last_cluster_is_corruption() -> None:
    # The file length is rounded down to whole clusters: one byte short loses a cluster.
    err = parse_error(header(), FILE_SIZE - 1)
    assert_field_error(
        err,
        "l1_table_offset",
        "invalid l1_table_offset 0x10000: the 262144-byte L1 table does not fit in the "
        "file (262144 bytes in whole clusters) (header offset 40)",
    )


def test_l1_that_exactly_fills_the_file_is_accepted() -> None:
    assert Header.parse(header().pack(), FILE_SIZE).l1_table_offset == CS
    assert Header.parse(header().pack(), FILE_SIZE + 100).l1_table_offset == CS


def test_l1_offset_near_2_to_the_64_does_not_wrap() -> None:
    err = parse_error(header(l1_table_offset=2**64 - CS), 2**66)
    assert isinstance(err, FormatError)
    assert err.field == "l1_table_offset"


def test_l1_offset_is_checked_before_header_size() -> None:
    # QEMU iotest 116: header_size 0xffffffff fails as a bad table offset.
    err = parse_error(header(header_size=0xFFFFFFFF))
    assert_field_error(
        err,
        "l1_table_offset",
        f"invalid l1_table_offset 0x10000: inside the {0xFFFFFFFF * CS}-byte header area "
        "(header offset 40)",
    )


# ---- header size -------------------------------------------------------------------


def test_header_size_zero_is_corruption() -> None:
    err = parse_error(header(header_size=0))
    assert_field_error(
        err,
        "header_size",
        "invalid header_size 0: must be at least 1 cluster and at most 4294967295 bytes in all "
        "(header offset 12)",
    )


def test_header_size_whose_bytes_overflow_u32_is_corruption() -> None:
    # 65536 clusters of 64 KiB = 2**32 bytes: one more than a u32 holds. The L1 sits
    # after that header area so that the L1 test passes and the header test decides.
    h = header(header_size=65536, l1_table_offset=2**32)
    err = parse_error(h, 2**32 + 4 * CS)
    assert_field_error(
        err,
        "header_size",
        "invalid header_size 65536: must be at least 1 cluster and at most 4294967295 bytes "
        "in all (header offset 12)",
    )


def test_largest_header_size_that_fits_u32_is_accepted() -> None:
    h = header(header_size=65535, l1_table_offset=65535 * CS)
    assert Header.parse(h.pack(), (65535 + 4) * CS).header_size == 65535


# ---- backing file name -------------------------------------------------------------


def test_backing_name_outside_the_header_area_is_corruption() -> None:
    err = parse_error(
        header(features=0x01, backing_filename_offset=65530, backing_filename_size=100)
    )
    assert_field_error(
        err,
        "backing_filename_offset",
        "invalid backing_filename_offset 65530: the backing file name (100 bytes) ends at "
        "65630, outside the 65536-byte header area (header offset 56)",
    )


def test_backing_name_ending_exactly_at_the_header_end_is_accepted() -> None:
    h = header(features=0x01, backing_filename_offset=64, backing_filename_size=CS - 64)
    assert Header.parse(h.pack(), FILE_SIZE) == h


def test_backing_name_may_use_later_header_clusters() -> None:
    h = header(
        features=0x01,
        header_size=2,
        l1_table_offset=2 * CS,
        backing_filename_offset=CS + 10,
        backing_filename_size=100,
    )
    assert Header.parse(h.pack(), 6 * CS) == h


@pytest.mark.parametrize("features", [0x00, 0x02, 0x04])
def test_backing_fields_are_ignored_without_the_backing_bit(features: int) -> None:
    h = header(features=features, backing_filename_offset=2**32 - 1, backing_filename_size=99)
    parsed = Header.parse(h.pack(), FILE_SIZE)
    assert not parsed.has_backing_file
    assert parsed.backing_filename(h.pack()) is None


def test_backing_name_is_read_from_the_recorded_offset() -> None:
    h = header(features=0x01, backing_filename_offset=100, backing_filename_size=5)
    area = bytearray(512)
    area[:64] = h.pack()
    area[64:72] = b"old.name"
    area[100:105] = b"b.qed"
    assert h.backing_filename(bytes(area)) == "b.qed"


def test_empty_backing_name_with_the_bit_set_means_no_backing_file() -> None:
    h = header(features=0x01, backing_filename_offset=64, backing_filename_size=0)
    assert Header.parse(h.pack(), FILE_SIZE) == h
    assert not h.has_backing_file
    assert h.backing_filename(h.pack()) is None


def test_undecodable_backing_name_bytes_survive_as_surrogates() -> None:
    h = header(features=0x01, backing_filename_offset=64, backing_filename_size=3)
    name = h.backing_filename(h.pack() + b"a\xffb")
    assert name == "a\udcffb"
    assert name is not None and name.encode("utf-8", "surrogateescape") == b"a\xffb"


# ---- derived helpers ---------------------------------------------------------------


def test_with_features_sets_and_clears_bits() -> None:
    h = header(features=0x01)
    assert h.with_features(set_=Feature.NEED_CHECK).features == 0x03
    assert h.with_features(set_=0x02, clear=0x01).features == 0x02
    assert h.with_features(set_=0x02).needs_check
    assert not h.needs_check


def test_geometry_of_a_header_uses_its_sizes() -> None:
    geo = header(cluster_size=4 * KiB, table_size=2, header_size=3).geometry
    assert (geo.cluster_size, geo.table_size, geo.header_size) == (4 * KiB, 2, 3)
    assert geo.header_bytes == 12 * KiB


def test_errors_are_qed_errors_of_the_documented_classes() -> None:
    assert issubclass(CorruptImageError, FormatError)
    assert issubclass(FormatError, QedError)
    assert issubclass(UnsupportedFeatureError, QedError)
    assert not issubclass(UnsupportedFeatureError, FormatError)
