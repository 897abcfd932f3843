"""Round trips of the pure format core and the size parser, for generated values.

Each test names the property it proves: bytes -> value -> bytes and value -> bytes ->
value are identities, the layout is the little-endian one the spec draws, and
address translation is a bijection between a guest offset and its
(l1_index, l2_index, offset_in_cluster) triple.
"""

from __future__ import annotations

import re
import struct
from array import array

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qedkit.errors import FormatError
from qedkit.format import (
    HEADER_SIZE_BYTES,
    KNOWN_FEATURES,
    MAGIC,
    MAX_CLUSTER_SIZE,
    MAX_TABLE_SIZE,
    MIN_CLUSTER_SIZE,
    MIN_TABLE_SIZE,
    Geometry,
    Header,
    max_image_size,
    pack_table,
    qemu_max_image_size,
    unpack_table,
)
from qedkit.format.sizes import parse_size
from qedkit.format.tables import pack_entries

# The profile chosen in conftest.py (fast or thorough), applied to every test here;
# these examples cost microseconds, so four times as many as it says.
_profile = settings.get_profile("qedkit-property")
PROFILE = settings(_profile, max_examples=4 * _profile.max_examples)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)

CLUSTER_SIZES = st.sampled_from(
    [1 << bits for bits in range(MIN_CLUSTER_SIZE.bit_length() - 1, MAX_CLUSTER_SIZE.bit_length())]
)
TABLE_SIZES = st.sampled_from(
    [1 << bits for bits in range(MIN_TABLE_SIZE.bit_length() - 1, MAX_TABLE_SIZE.bit_length())]
)
GEOMETRIES = st.builds(Geometry, CLUSTER_SIZES, TABLE_SIZES)

headers = st.builds(
    Header,
    cluster_size=U32,
    table_size=U32,
    header_size=U32,
    features=U64,
    compat_features=U64,
    autoclear_features=U64,
    l1_table_offset=U64,
    image_size=U64,
    backing_filename_offset=U32,
    backing_filename_size=U32,
)


# ---- header ------------------------------------------------------------------


@PROFILE
@given(headers)
def test_header_pack_then_unpack_is_identity_for_any_field_values(header: Header) -> None:
    packed = header.pack()
    assert len(packed) == HEADER_SIZE_BYTES == 64
    assert Header.unpack(packed) == header


@PROFILE
@given(headers)
def test_header_pack_is_the_little_endian_layout_of_the_spec(header: Header) -> None:
    packed = header.pack()
    assert packed[0:4] == MAGIC
    le = int.from_bytes
    assert le(packed[4:8], "little") == header.cluster_size
    assert le(packed[8:12], "little") == header.table_size
    assert le(packed[12:16], "little") == header.header_size
    assert le(packed[16:24], "little") == header.features
    assert le(packed[24:32], "little") == header.compat_features
    assert le(packed[32:40], "little") == header.autoclear_features
    assert le(packed[40:48], "little") == header.l1_table_offset
    assert le(packed[48:56], "little") == header.image_size
    assert le(packed[56:60], "little") == header.backing_filename_offset
    assert le(packed[60:64], "little") == header.backing_filename_size


@PROFILE
@given(
    st.binary(min_size=HEADER_SIZE_BYTES - 4, max_size=HEADER_SIZE_BYTES - 4),
    st.binary(max_size=64),
)
def test_header_unpack_then_pack_is_identity_on_bytes(fields: bytes, trailer: bytes) -> None:
    """Any 64 bytes that begin with the magic decode and re-encode unchanged; bytes
    after the struct are ignored by unpack."""
    buf = MAGIC + fields
    assert Header.unpack(buf + trailer).pack() == buf


@PROFILE
@given(
    st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC),
    st.binary(min_size=60, max_size=60),
)
def test_header_unpack_rejects_any_other_magic(magic: bytes, rest: bytes) -> None:
    with pytest.raises(FormatError):
        Header.unpack(magic + rest)


@PROFILE
@given(st.binary(max_size=HEADER_SIZE_BYTES - 1))
def test_header_unpack_rejects_buffers_shorter_than_64_bytes(buf: bytes) -> None:
    """Even with the magic in place: a truncated header is not a header."""
    with pytest.raises(FormatError):
        Header.unpack((MAGIC + buf)[: len(buf)])


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[Header, int]:
    """A header that passes validation, and a file size it is valid for."""
    geo = draw(GEOMETRIES)
    cs, ts = geo.cluster_size, geo.table_size
    header_size = draw(st.integers(1, 4))
    l1_cluster = draw(st.integers(header_size, header_size + 8))
    l1_offset = l1_cluster * cs
    file_size = l1_offset + ts * cs + draw(st.integers(0, 3 * cs))
    # the field is a u64: for the largest geometries the limit is above what it holds
    image_size = draw(st.integers(0, min(max_image_size(cs, ts), 2**64 - 1) // 512)) * 512
    features = draw(st.integers(0, int(KNOWN_FEATURES)))
    name_size = draw(st.integers(0, min(4095, header_size * cs - 64)))
    name_offset = draw(st.integers(64, header_size * cs - name_size))
    header = Header(
        cluster_size=cs,
        table_size=ts,
        header_size=header_size,
        features=features,
        compat_features=draw(U64),
        autoclear_features=draw(U64),
        l1_table_offset=l1_offset,
        image_size=image_size,
        backing_filename_offset=name_offset,
        backing_filename_size=name_size,
    )
    return header, file_size


@PROFILE
@given(valid_headers())
def test_valid_header_parses_back_to_itself(case: tuple[Header, int]) -> None:
    header, file_size = case
    assert Header.parse(header.pack(), file_size) == header


# ---- tables ------------------------------------------------------------------

entries = st.lists(U64, max_size=300)


@PROFILE
@given(entries)
def test_table_pack_then_unpack_is_identity(values: list[int]) -> None:
    table = array("Q", values)
    packed = pack_table(table)
    assert packed == struct.pack(f"<{len(values)}Q", *values)  # little-endian u64s
    assert unpack_table(packed) == table


@PROFILE
@given(st.integers(0, 300).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n)))
def test_table_unpack_then_pack_is_identity_on_bytes(buf: bytes) -> None:
    table = unpack_table(buf)
    assert len(table) == len(buf) // 8
    assert pack_table(table) == buf
    assert unpack_table(memoryview(buf)) == table
    assert unpack_table(bytearray(buf)) == table


@PROFILE
@given(entries, st.data())
def test_pack_entries_is_a_slice_of_the_packed_table(
    values: list[int], data: st.DataObject
) -> None:
    table = array("Q", values)
    first = data.draw(st.integers(0, len(values)))
    count = data.draw(st.integers(0, len(values) - first))
    assert pack_entries(table, first, count) == pack_table(table)[8 * first : 8 * (first + count)]


# ---- geometry ----------------------------------------------------------------


@st.composite
def geometry_and_position(draw: st.DrawFn) -> tuple[Geometry, int]:
    geo = draw(GEOMETRIES)
    limit = geo.max_image_size
    pos = draw(
        st.one_of(
            st.integers(0, limit - 1),
            # near a cluster or an L2-span boundary, where off-by-one bugs live
            st.builds(
                lambda k, d: k * geo.cluster_size + d,
                st.integers(0, limit // geo.cluster_size - 1),
                st.integers(-1, 1),
            ),
            st.builds(
                lambda k, d: k * geo.l2_span + d,
                st.integers(0, geo.l2_entries - 1),
                st.integers(-1, 1),
            ),
        ).filter(lambda p: 0 <= p < limit)
    )
    return geo, pos


@PROFILE
@given(geometry_and_position())
def test_translate_recomposes_to_the_guest_offset(case: tuple[Geometry, int]) -> None:
    geo, pos = case
    l1_index, l2_index, offset = geo.translate(pos)
    assert l1_index * geo.l2_span + l2_index * geo.cluster_size + offset == pos
    assert 0 <= l1_index < geo.l2_entries  # one L1 table covers every valid offset
    assert 0 <= l2_index < geo.l2_entries
    assert 0 <= offset < geo.cluster_size
    assert (l1_index, l2_index, offset) == (
        geo.l1_index(pos),
        geo.l2_index(pos),
        geo.offset_in_cluster(pos),
    )
    assert geo.start_of_cluster(pos) + offset == pos


@PROFILE
@given(GEOMETRIES)
def test_geometry_derived_constants_agree(geo: Geometry) -> None:
    cs, ts = geo.cluster_size, geo.table_size
    assert 1 << geo.cluster_bits == cs
    assert geo.l2_entries == ts * cs // 8 == 1 << geo.l2_bits
    assert geo.table_bytes == ts * cs
    assert geo.l2_span == geo.l2_entries * cs
    assert geo.max_image_size == max_image_size(cs, ts) == geo.l2_entries * geo.l2_span
    assert geo.max_image_size == ts * ts * cs**3 // 64
    assert qemu_max_image_size(cs, ts) == geo.max_image_size % 2**64


@PROFILE
@given(GEOMETRIES, st.integers(0, 2**64))
def test_round_up_and_bytes_to_clusters_are_ceilings(geo: Geometry, nbytes: int) -> None:
    cs = geo.cluster_size
    clusters = -(-nbytes // cs)
    assert geo.bytes_to_clusters(nbytes) == clusters
    assert geo.round_up(nbytes) == clusters * cs
    assert geo.round_up(nbytes) - cs < nbytes <= geo.round_up(nbytes)


@PROFILE
@given(GEOMETRIES, st.integers(0, 64), st.integers(-1, 1), st.integers(0, 64))
def test_cluster_offset_validity_matches_its_definition(
    geo: Geometry, cluster: int, delta: int, file_clusters: int
) -> None:
    offset = cluster * geo.cluster_size + delta
    assume(offset >= 0)
    file_end = file_clusters * geo.cluster_size
    expect = delta == 0 and cluster >= geo.header_size and cluster < file_clusters
    assert geo.is_valid_cluster_offset(offset, file_end) is expect
    table_ok = expect and cluster + geo.table_size <= file_clusters
    assert geo.is_valid_table_offset(offset, file_end) is table_ok


# ---- sizes -------------------------------------------------------------------

SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
suffixes = st.sampled_from(sorted(SUFFIXES)).flatmap(
    lambda s: st.sampled_from(sorted({s, s.upper()}))
)
blanks = st.sampled_from(["", " ", "\t", "  "])


U64_MAX = 2**64 - 1  # QEMU parses sizes into a uint64_t


def assert_parses_to(text: str, value: int) -> None:
    """``text`` means ``value`` bytes: parsed when it fits in a u64, refused if not."""
    if value <= U64_MAX:
        assert parse_size(text) == value
    else:
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(text)


@PROFILE
@given(st.one_of(st.integers(0, 2**20), st.integers(0, 2**70)), suffixes, blanks, blanks)
def test_parse_size_of_an_integer_with_suffix(
    value: int, suffix: str, left: str, right: str
) -> None:
    assert_parses_to(f"{left}{value}{suffix}{right}", value << SUFFIXES[suffix.lower()])


@PROFILE
@given(st.integers(0, 2**68), st.booleans())
def test_parse_size_of_hex(value: int, upper: bool) -> None:
    text = f"{value:#x}"
    assert_parses_to(text.upper().replace("0X", "0x") if upper else text, value)


@PROFILE
@given(
    st.integers(0, 2**40),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
    st.sampled_from(["k", "M", "g", "T", "P", "E"]),
)
def test_parse_size_of_an_exact_binary_fraction_with_suffix(
    whole: int, eighths: int, suffix: str
) -> None:
    """1.5G and friends: a fraction that is exact in binary scales exactly."""
    fraction = str(eighths / 8)[1:]  # ".0", ".125", ... ".875"
    shift = SUFFIXES[suffix.lower()]
    assert_parses_to(f"{whole}{fraction}{suffix}", (whole << shift) + (eighths << shift) // 8)


@PROFILE
@given(st.integers(0, 2**40), st.sampled_from(["", "b", "B"]))
def test_parse_size_of_a_whole_decimal_without_suffix(whole: int, suffix: str) -> None:
    assert parse_size(f"{whole}.0{suffix}") == whole
    with pytest.raises(ValueError, match="not a whole number"):
        parse_size(f"{whole}.5{suffix}")


# What parse_size accepts, written independently of its own pattern.
ACCEPTED = re.compile(r"\s*(?:0x[0-9a-f]+|[0-9]+(?:\.[0-9]+)?[bkmgtpe]?)\s*", re.IGNORECASE)


@PROFILE
@given(
    st.text(alphabet="0123456789abcdefxXkKmMgGtTpPeEbB.-+ _", max_size=12).filter(
        lambda t: not ACCEPTED.fullmatch(t)
    )
)
def test_parse_size_rejects_everything_else_with_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
