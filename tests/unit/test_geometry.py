"""qedkit.format.geometry: limits, maximum sizes, address translation and the
cluster/table offset validity tests (qed-facts §1.6-1.8)."""

from __future__ import annotations

import pytest

from qedkit.format.geometry import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_TABLE_SIZE,
    MAX_CLUSTER_SIZE,
    MAX_TABLE_SIZE,
    MIN_CLUSTER_SIZE,
    MIN_TABLE_SIZE,
    Geometry,
    is_power_of_two,
    is_valid_cluster_size,
    is_valid_table_size,
    max_image_size,
    qemu_max_image_size,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TiB, PiB, EiB = 1 << 40, 1 << 50, 1 << 60
TABLE_SIZES = (1, 2, 4, 8, 16)

# qed-facts §1.8: QEMU's maximum virtual size per cluster size (rows) and table_size
# (columns 1, 2, 4, 8, 16); 0 where QEMU's u64 product wraps to 0.
QEMU_MAX = {
    4 * KiB: (1 * GiB, 4 * GiB, 16 * GiB, 64 * GiB, 256 * GiB),
    8 * KiB: (8 * GiB, 32 * GiB, 128 * GiB, 512 * GiB, 2 * TiB),
    16 * KiB: (64 * GiB, 256 * GiB, 1 * TiB, 4 * TiB, 16 * TiB),
    32 * KiB: (512 * GiB, 2 * TiB, 8 * TiB, 32 * TiB, 128 * TiB),
    64 * KiB: (4 * TiB, 16 * TiB, 64 * TiB, 256 * TiB, 1 * PiB),
    128 * KiB: (32 * TiB, 128 * TiB, 512 * TiB, 2 * PiB, 8 * PiB),
    256 * KiB: (256 * TiB, 1 * PiB, 4 * PiB, 16 * PiB, 64 * PiB),
    512 * KiB: (2 * PiB, 8 * PiB, 32 * PiB, 128 * PiB, 512 * PiB),
    1 * MiB: (16 * PiB, 64 * PiB, 256 * PiB, 1 * EiB, 4 * EiB),
    2 * MiB: (128 * PiB, 512 * PiB, 2 * EiB, 8 * EiB, 0),
    4 * MiB: (1 * EiB, 4 * EiB, 0, 0, 0),
    8 * MiB: (8 * EiB, 0, 0, 0, 0),
    16 * MiB: (0, 0, 0, 0, 0),
    32 * MiB: (0, 0, 0, 0, 0),
    64 * MiB: (0, 0, 0, 0, 0),
}
CASES = [
    (cs, ts, limit)
    for cs, row in QEMU_MAX.items()
    for ts, limit in zip(TABLE_SIZES, row, strict=True)
]


def test_limits_are_qemus() -> None:
    assert MIN_CLUSTER_SIZE == 4096
    assert MAX_CLUSTER_SIZE == 67108864  # 64 MiB
    assert MIN_TABLE_SIZE == 1
    assert MAX_TABLE_SIZE == 16
    assert DEFAULT_CLUSTER_SIZE == 65536
    assert DEFAULT_TABLE_SIZE == 4


@pytest.mark.parametrize(("cs", "ts", "limit"), CASES)
def test_qemu_max_image_size_matches_the_fact_sheet_table(cs: int, ts: int, limit: int) -> None:
    assert qemu_max_image_size(cs, ts) == limit


@pytest.mark.parametrize(("cs", "ts", "limit"), CASES)
def test_max_image_size_is_exact_and_never_wraps(cs: int, ts: int, limit: int) -> None:
    exact = ts * ts * cs**3 // 64
    assert max_image_size(cs, ts) == exact
    if limit:
        assert exact == limit
    else:
        assert exact >= 2**64


def test_default_geometry_maximum_is_64_tib() -> None:
    assert max_image_size(64 * KiB, 4) == 64 * TiB == qemu_max_image_size(64 * KiB, 4)
    assert Geometry(64 * KiB, 4).max_image_size == 64 * TiB


def test_2_mib_clusters_with_table_size_16_wrap_to_0_in_qemu() -> None:
    assert qemu_max_image_size(2 * MiB, 16) == 0
    assert max_image_size(2 * MiB, 16) == 2**65


def test_overflow_rule_from_the_fact_sheet() -> None:
    # QEMU's product overflows iff 2*log2(ts) + 3*log2(cs) - 6 >= 64.
    for cs, ts, limit in CASES:
        overflows = 2 * (ts.bit_length() - 1) + 3 * (cs.bit_length() - 1) - 6 >= 64
        assert (limit == 0) == overflows, (cs, ts)


@pytest.mark.parametrize("value", [1, 2, 4096, 2**26, 2**63])
def test_is_power_of_two_true(value: int) -> None:
    assert is_power_of_two(value)


@pytest.mark.parametrize("value", [0, -4, 3, 6, 4095, 12345])
def test_is_power_of_two_false(value: int) -> None:
    assert not is_power_of_two(value)


def test_valid_cluster_sizes_are_powers_of_two_from_4k_to_64m() -> None:
    valid = [cs for cs in range(0, 2**27 + 1, 1024) if is_valid_cluster_size(cs)]
    assert valid == [2**k for k in range(12, 27)]
    assert not is_valid_cluster_size(2**27)


def test_valid_table_sizes_are_powers_of_two_from_1_to_16() -> None:
    assert [ts for ts in range(0, 40) if is_valid_table_size(ts)] == [1, 2, 4, 8, 16]


# ---- derived constants and translation ----------------------------------------------


def test_default_geometry_constants() -> None:
    geo = Geometry(64 * KiB, 4)
    assert geo.cluster_bits == 16
    assert geo.l2_entries == 32768
    assert geo.l2_bits == 15
    assert geo.table_bytes == 256 * KiB
    assert geo.l2_span == 2 * GiB
    assert geo.header_size == 1
    assert geo.header_bytes == 64 * KiB


def test_small_geometry_constants() -> None:
    geo = Geometry(4 * KiB, 1, header_size=3)
    assert geo.cluster_bits == 12
    assert geo.l2_entries == 512
    assert geo.l2_bits == 9
    assert geo.table_bytes == 4 * KiB
    assert geo.l2_span == 2 * MiB
    assert geo.header_bytes == 12 * KiB


@pytest.mark.parametrize(
    ("pos", "expected"),
    [
        (0, (0, 0, 0)),
        (1, (0, 0, 1)),
        (64 * KiB - 1, (0, 0, 65535)),
        (64 * KiB, (0, 1, 0)),
        (2 * GiB - 1, (0, 32767, 65535)),
        (2 * GiB, (1, 0, 0)),
        (5 * 2 * GiB + 7 * 64 * KiB + 123, (5, 7, 123)),
        (64 * TiB - 1, (32767, 32767, 65535)),
    ],
)
def test_translate_default_geometry(pos: int, expected: tuple[int, int, int]) -> None:
    geo = Geometry(64 * KiB, 4)
    assert geo.translate(pos) == expected
    assert (geo.l1_index(pos), geo.l2_index(pos), geo.offset_in_cluster(pos)) == expected


@pytest.mark.parametrize(
    ("pos", "expected"),
    [
        (0, (0, 0, 0)),
        (4095, (0, 0, 4095)),
        (2 * MiB - 1, (0, 511, 4095)),
        (2 * MiB + 3 * 4096 + 1, (1, 3, 1)),
        (GiB - 1, (511, 511, 4095)),
    ],
)
def test_translate_4k_clusters_table_size_1(pos: int, expected: tuple[int, int, int]) -> None:
    assert Geometry(4 * KiB, 1).translate(pos) == expected


def test_translate_agrees_with_the_spec_formula() -> None:
    for cs, ts in [(4 * KiB, 1), (4 * KiB, 16), (64 * KiB, 4), (2 * MiB, 8)]:
        geo = Geometry(cs, ts)
        n = ts * cs // 8
        for pos in (0, cs - 1, cs, n * cs - 1, n * cs, 3 * n * cs + 5 * cs + 17):
            assert geo.translate(pos) == (pos // (n * cs), (pos // cs) % n, pos % cs)


def test_cluster_rounding_helpers() -> None:
    geo = Geometry(64 * KiB, 4)
    assert geo.start_of_cluster(64 * KiB + 5) == 64 * KiB
    assert geo.round_up(0) == 0
    assert geo.round_up(1) == 64 * KiB
    assert geo.round_up(64 * KiB) == 64 * KiB
    assert geo.round_up(64 * KiB + 1) == 128 * KiB


@pytest.mark.parametrize(
    ("nbytes", "clusters"),
    [(0, 0), (1, 1), (4096, 1), (4097, 2), (4095 * 4096, 4095), (4096 * 4096 + 1, 4097)],
)
def test_bytes_to_clusters_is_the_exact_ceiling(nbytes: int, clusters: int) -> None:
    # QEMU divides by cluster_size - 1 here; qedkit must not copy that bug.
    assert Geometry(4 * KiB, 4).bytes_to_clusters(nbytes) == clusters


# ---- validity tests ------------------------------------------------------------------

GEO = Geometry(64 * KiB, 4)
FILE_END = 5 * 64 * KiB  # a fresh default image: header cluster + 4 L1 clusters


@pytest.mark.parametrize("offset", [64 * KiB, 128 * KiB, 4 * 64 * KiB])
def test_cluster_offset_valid(offset: int) -> None:
    assert GEO.is_valid_cluster_offset(offset, FILE_END)


@pytest.mark.parametrize(
    "offset",
    [
        0,  # the header cluster
        1,  # unaligned (in L1 this is not a zero marker: just invalid)
        64 * KiB + 512,  # unaligned
        0x50000 | 1,  # an aligned offset with a flag bit: invalid, not "zero + flags"
        FILE_END,  # at EOF
        FILE_END + 64 * KiB,  # past EOF
    ],
)
def test_cluster_offset_invalid(offset: int) -> None:
    assert not GEO.is_valid_cluster_offset(offset, FILE_END)


def test_cluster_offset_respects_a_multi_cluster_header() -> None:
    geo = Geometry(64 * KiB, 4, header_size=2)
    assert not geo.is_valid_cluster_offset(64 * KiB, FILE_END)
    assert geo.is_valid_cluster_offset(128 * KiB, FILE_END)


def test_table_offset_valid_when_the_whole_table_is_in_the_file() -> None:
    assert GEO.is_valid_table_offset(64 * KiB, FILE_END)
    assert GEO.is_valid_table_offset(2 * 64 * KiB, FILE_END + 64 * KiB)


@pytest.mark.parametrize("offset", [0, 64 * KiB + 4096, 2 * 64 * KiB, FILE_END, 2**40])
def test_table_offset_invalid(offset: int) -> None:
    assert not GEO.is_valid_table_offset(offset, FILE_END)


def test_table_offset_whose_last_cluster_is_past_eof_is_invalid() -> None:
    # First cluster inside the file, last one at the end: invalid.
    assert GEO.is_valid_cluster_offset(2 * 64 * KiB, FILE_END)
    assert not GEO.is_valid_table_offset(2 * 64 * KiB, FILE_END)


def test_table_offset_overflow_guard() -> None:
    offset = 2**64 - 64 * KiB  # aligned; its last cluster would lie past 2**64
    assert GEO.is_valid_cluster_offset(offset, 2**66)
    assert not GEO.is_valid_table_offset(offset, 2**66)


def test_table_size_1_tables_are_valid_unlike_in_qemu() -> None:
    geo = Geometry(64 * KiB, 1)
    assert geo.is_valid_table_offset(64 * KiB, 2 * 64 * KiB)
    assert not geo.is_valid_table_offset(2 * 64 * KiB, 2 * 64 * KiB)
    assert not geo.is_valid_table_offset(0, 2 * 64 * KiB)


def test_geometry_is_a_frozen_value() -> None:
    geo = Geometry(64 * KiB, 4)
    assert geo == Geometry(64 * KiB, 4)
    with pytest.raises(AttributeError):
        geo.cluster_size = 4096  # type: ignore[misc]
