"""format.qcow2: headers, extensions, entries and refcounts, from bytes packed here with
``struct`` (independently of the code under test), and every validation error."""

from __future__ import annotations

import struct
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qedkit.errors import CorruptImageError, FormatError, QedError, UnsupportedFeatureError
from qedkit.format import qcow2 as q
from qedkit.format.probe import probe_format

KiB, MiB = 1 << 10, 1 << 20


def header_bytes(**fields: int) -> bytearray:
    """A valid v3 header (64 KiB clusters, 1 MiB disk) in a 64 KiB cluster 0, with the
    L1 table at 3 * 64 KiB and the refcount table at 64 KiB; ``fields`` override."""
    f = {
        "version": 3, "backing_file_offset": 0, "backing_file_size": 0, "cluster_bits": 16,
        "size": MiB, "crypt_method": 0, "l1_size": 1, "l1_table_offset": 0x30000,
        "refcount_table_offset": 0x10000, "refcount_table_clusters": 1, "nb_snapshots": 0,
        "snapshots_offset": 0, "incompatible_features": 0, "compatible_features": 0,
        "autoclear_features": 0, "refcount_order": 4, "header_length": 112,
        "compression_type": 0,
    }  # fmt: skip
    f.update(fields)
    buf = bytearray(64 * KiB)
    struct.pack_into(
        ">4sIQIIQIIQQIIQQQQII",
        buf,
        0,
        b"QFI\xfb",
        *(f[k] for k in list(f)[:-1]),
    )
    buf[104] = f["compression_type"]
    return buf


FILE_SIZE = 4 * 64 * KiB


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)


def parse(buf: bytes | bytearray, file_size: int = FILE_SIZE) -> q.Metadata:
    return q.Metadata.parse(bytes(buf), file_size)


def error_of(buf: bytes | bytearray, cls: type[QedError], file_size: int = FILE_SIZE) -> QedError:
    with pytest.raises(cls) as info:
        parse(buf, file_size)
    assert type(info.value) is cls
    return info.value


# ---- header ---------------------------------------------------------------------------


def test_a_valid_v3_header_parses_with_its_derived_values() -> None:
    meta = parse(header_bytes())
    h = meta.header
    assert (h.version, h.cluster_size, h.size, h.l1_size, h.refcount_bits) == (3, 65536, MiB, 1, 16)
    assert h.compat == "1.1" and not h.extended_l2 and h.compression is q.CompressionType.ZLIB
    assert meta.backing_filename is None and meta.extensions.items == ()
    geo = h.geometry
    assert (geo.l2_entries, geo.l2_span, geo.subclusters) == (8192, 8192 * 65536, 1)


def test_a_v2_header_implies_the_v3_fields() -> None:
    buf = header_bytes(version=2, incompatible_features=0xFF, refcount_order=9)
    meta = parse(buf)  # the v3 fields are not read: bytes 72.. are extension space
    h = meta.header
    assert (h.version, h.header_length, h.refcount_order, h.incompatible_features) == (2, 72, 4, 0)
    assert h.compat == "0.10"


def test_the_compression_type_byte_is_read_only_when_header_length_covers_it() -> None:
    buf = header_bytes(header_length=104, compression_type=1)
    assert parse(buf).header.compression_type == 0


@pytest.mark.parametrize(
    ("fields", "cls", "field", "text"),
    [
        ({"version": 1}, UnsupportedFeatureError, "version", "unsupported qcow2 version 1"),
        ({"version": 4}, UnsupportedFeatureError, "version", "unsupported qcow2 version 4"),
        ({"cluster_bits": 8}, CorruptImageError, "cluster_bits", "at least 512 bytes"),
        ({"cluster_bits": 22}, UnsupportedFeatureError, "cluster_bits", "2^22"),
        ({"header_length": 96}, CorruptImageError, "header_length", "at least 104"),
        ({"header_length": 70000}, CorruptImageError, "header_length", "exceeds the cluster"),
        ({"backing_file_offset": 70000, "backing_file_size": 4}, CorruptImageError,
         "backing_file_offset", "in cluster 0"),
        ({"backing_file_offset": 512, "backing_file_size": 1024}, CorruptImageError,
         "backing_file_size", "too long"),
        ({"refcount_order": 7}, CorruptImageError, "refcount_order", "at most 64 bits"),
        ({"compression_type": 2, "incompatible_features": 8}, UnsupportedFeatureError,
         "compression_type", "unknown compression type 2"),
        ({"compression_type": 1}, CorruptImageError, "compression_type", "needs the"),
        ({"incompatible_features": 8}, CorruptImageError, "incompatible_features", "zlib"),
        ({"incompatible_features": 16, "cluster_bits": 13, "l1_size": 16}, CorruptImageError,
         "cluster_bits", "16 KiB"),
        ({"refcount_table_clusters": 0}, CorruptImageError, "refcount_table_clusters", "no "),
        ({"refcount_table_clusters": 129}, CorruptImageError, "refcount_table_clusters",
         "limit"),
        ({"refcount_table_offset": 0x10200}, CorruptImageError, "refcount_table_offset",
         "not aligned"),
        ({"refcount_table_offset": 0x40000}, CorruptImageError, "refcount_table_offset",
         "does not fit"),
        ({"nb_snapshots": 65537}, CorruptImageError, "nb_snapshots", "more than 65536"),
        ({"nb_snapshots": 1, "snapshots_offset": 0x20100}, CorruptImageError,
         "snapshots_offset", "not aligned"),
        ({"nb_snapshots": 4000, "snapshots_offset": 0x20000}, CorruptImageError,
         "snapshots_offset", "does not fit"),
        ({"l1_size": 4 * MiB + 1}, CorruptImageError, "l1_size", "limit"),
        ({"size": 1 << 40}, CorruptImageError, "l1_size", "too small"),
        ({"l1_table_offset": 0x30008}, CorruptImageError, "l1_table_offset", "not aligned"),
        ({"l1_table_offset": 0x40000}, CorruptImageError, "l1_table_offset", "does not fit"),
    ],
)  # fmt: skip
def test_each_invalid_header_field_is_named_with_its_offset(
    fields: dict[str, int], cls: type[QedError], field: str, text: str
) -> None:
    err = error_of(header_bytes(**fields), cls)
    assert isinstance(err, CorruptImageError | UnsupportedFeatureError)
    assert err.field == field
    assert err.offset == q.FIELD_OFFSETS[field]
    assert text in err.message
    assert f"offset {q.FIELD_OFFSETS[field]}" in err.message


def test_not_qcow2_and_too_short_are_format_errors() -> None:
    err = error_of(b"QED\0" + bytes(100), FormatError)
    assert "not a qcow2 image" in err.message
    err = error_of(header_bytes()[:50], FormatError)
    assert "too short" in err.message
    err = error_of(header_bytes()[:90], FormatError)  # v3 needs 104 bytes
    assert "v3 header" in err.message


def test_unknown_incompatible_bits_are_named_from_the_feature_name_table() -> None:
    buf = header_bytes(incompatible_features=1 << 40 | 1 << 5)
    table = bytes([0, 40]) + b"frobnication".ljust(46, b"\0")
    buf[112 : 112 + 56] = ext(q.ExtensionType.FEATURE_NAME_TABLE, table)
    err = error_of(buf, UnsupportedFeatureError)
    assert err.message.startswith(
        "unsupported qcow2 incompatible features: unknown feature bit 5, frobnication (bit 40)"
    )
    assert err.field == "incompatible_features"


def test_known_feature_bits_are_accepted_and_reported() -> None:
    buf = header_bytes(incompatible_features=0b10011, compatible_features=1, cluster_bits=16)
    h = parse(buf).header
    assert h.dirty and h.corrupt and h.extended_l2 and h.lazy_refcounts
    assert h.geometry.l2_entries == 4096 and h.geometry.subcluster_size == 2048


@pytest.mark.parametrize(("method", "name"), [(1, "AES"), (2, "LUKS"), (7, "unknown method 7")])
def test_encryption_is_refused_naming_the_method(method: int, name: str) -> None:
    meta = parse(header_bytes(crypt_method=method))
    with pytest.raises(UnsupportedFeatureError) as info:
        meta.check_readable()
    assert f"encrypted qcow2 images ({name}) are not supported" in info.value.message
    assert info.value.field == "crypt_method"


def test_an_external_data_file_is_refused_naming_the_file() -> None:
    buf = header_bytes(incompatible_features=4)
    buf[112 : 112 + 16] = ext(q.ExtensionType.EXTERNAL_DATA_FILE, b"disk.raw")
    meta = parse(buf)
    assert meta.extensions.data_file == "disk.raw"
    with pytest.raises(UnsupportedFeatureError, match=r"external data file \('disk.raw'\)"):
        meta.check_readable()


# ---- extensions and the backing file name --------------------------------------------------


def test_every_known_extension_is_decoded_and_unknown_ones_kept() -> None:
    buf = header_bytes(backing_file_offset=1024, backing_file_size=9)
    area = (
        ext(q.ExtensionType.BACKING_FORMAT, b"qcow2")
        + ext(q.ExtensionType.BITMAPS, struct.pack(">IIQQ", 2, 0, 96, 0x50000))
        + ext(q.ExtensionType.FULL_DISK_ENCRYPTION, struct.pack(">QQ", 0x20000, 2048))
        + ext(0x12345678, b"future")
        + ext(q.ExtensionType.FEATURE_NAME_TABLE, bytes([1, 0]) + b"lazy".ljust(46, b"\0"))
        + ext(q.ExtensionType.END, b"")
    )  # fmt: skip
    buf[112 : 112 + len(area)] = area
    buf[1024 : 1024 + 9] = b"base.qcow"
    meta = parse(buf)
    e = meta.extensions
    assert meta.backing_filename == "base.qcow" and meta.backing_format == "qcow2"
    assert e.bitmaps == q.BitmapsExtension(2, 96, 0x50000)
    assert e.encryption == q.EncryptionHeaderPointer(0x20000, 2048)
    assert [u.data for u in e.unknown] == [b"future"]
    assert e.feature_name(q.FeatureKind.COMPATIBLE, 0) == "lazy"
    assert e.end == 112 + len(area)


@pytest.mark.parametrize(
    ("area", "text"),
    [
        (struct.pack(">II", 0x12345678, 70000), "runs past the end"),
        (ext(q.ExtensionType.BACKING_FORMAT, b"x" * 16), "too long"),
        (ext(q.ExtensionType.BITMAPS, bytes(16)), "expected 24"),
        (ext(q.ExtensionType.FULL_DISK_ENCRYPTION, bytes(8)), "expected 16"),
        (ext(q.ExtensionType.BACKING_FORMAT, b"raw") * 2, "a second BACKING_FORMAT"),
    ],
)
def test_bad_extensions_are_corruption_with_their_offset(area: bytes, text: str) -> None:
    buf = header_bytes()
    buf[112 : 112 + len(area)] = area
    err = error_of(buf, CorruptImageError)
    assert text in err.message
    assert err.field == "header_extension"


def test_extensions_end_at_the_backing_name_without_an_end_marker() -> None:
    buf = header_bytes(backing_file_offset=120, backing_file_size=4)
    buf[112:120] = struct.pack(">II", 0x777, 0)  # an empty unknown extension, then the name
    buf[120:124] = b"base"
    meta = parse(buf)
    assert meta.backing_filename == "base"
    assert meta.extensions.end == 120


# ---- L1/L2 entries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "extended", "ctype"),
    [
        (0, False, q.ClusterType.UNALLOCATED),
        (1 << 63, False, q.ClusterType.UNALLOCATED),  # COPIED alone
        (1, False, q.ClusterType.ZERO_PLAIN),
        (0x50000 | 1, False, q.ClusterType.ZERO_ALLOC),
        (0x8000000000050000, False, q.ClusterType.NORMAL),
        (1 << 62 | 0x1234, False, q.ClusterType.COMPRESSED),
        (1, True, q.ClusterType.UNALLOCATED),  # no zero flag with extended L2
        (0x50000, True, q.ClusterType.NORMAL),
    ],
)
def test_cluster_types_follow_qemu(entry: int, extended: bool, ctype: q.ClusterType) -> None:
    assert q.cluster_type(entry, extended_l2=extended) is ctype


def test_subcluster_types_follow_qemu() -> None:
    st_ = q.SubclusterType
    normal, unalloc = q.ClusterType.NORMAL, q.ClusterType.UNALLOCATED
    assert q.subcluster_type(normal, 0xC, 2, extended_l2=True) is st_.NORMAL
    assert q.subcluster_type(normal, 0xC, 1, extended_l2=True) is st_.UNALLOCATED_ALLOC
    assert q.subcluster_type(normal, 1 << 33, 1, extended_l2=True) is st_.ZERO_ALLOC
    assert q.subcluster_type(normal, 1 << 33 | 2, 0, extended_l2=True) is st_.INVALID
    assert q.subcluster_type(unalloc, 0xF << 32, 3, extended_l2=True) is st_.ZERO_PLAIN
    assert q.subcluster_type(unalloc, 0xF << 32, 4, extended_l2=True) is st_.UNALLOCATED_PLAIN
    assert q.subcluster_type(unalloc, 1, 5, extended_l2=True) is st_.INVALID
    assert q.subcluster_type(q.ClusterType.COMPRESSED, 0, 0, extended_l2=True) is st_.COMPRESSED
    assert q.subcluster_type(normal, 0, 0, extended_l2=False) is st_.NORMAL


@given(
    bits=st.integers(9, 21),
    offset=st.integers(0, (1 << 56) - 1),
    sectors=st.integers(1, 1 << 13),
)
def test_compressed_descriptors_split_where_cluster_bits_says(
    bits: int, offset: int, sectors: int
) -> None:
    x = 62 - (bits - 8)
    offset &= (1 << x) - 1
    sectors = 1 + (sectors - 1) % (1 << (bits - 8))
    entry = 1 << 62 | 1 << 63 | (sectors - 1) << x | offset
    desc = q.compressed_descriptor(entry, bits)
    assert desc == q.CompressedDescriptor(offset, sectors)
    assert desc.length == sectors * 512 - offset % 512
    assert desc.host_end == offset + desc.length
    assert list(desc.host_clusters(bits)) == list(
        range(offset >> bits, ((desc.host_end - 1) >> bits) + 1)
    )


def test_decoded_entries_give_a_converter_what_it_needs() -> None:
    geo = q.Geometry(16, True)
    e = q.decode_l2_entry(0x8000000000050000, 0xC, geo)
    assert e.type is q.ClusterType.NORMAL and e.copied and e.host_cluster == 0x50000
    assert e.uniform is None and e.subclusters[2] is q.SubclusterType.NORMAL
    full = q.decode_l2_entry(0x50000, 0xFFFFFFFF, geo)
    assert full.uniform is q.SubclusterType.NORMAL
    comp = q.decode_l2_entry(1 << 62 | 2 << 54 | 0x12345, 0, q.Geometry(16, False))
    assert comp.compressed == q.CompressedDescriptor(0x12345, 3) and comp.host_cluster is None


def _table(words: list[int], geo: q.Geometry) -> array[int]:
    table = array("Q", bytes(geo.cluster_size))
    table[: len(words)] = array("Q", words)
    return table


def test_table_runs_merge_contiguous_clusters_and_keep_compressed_apart() -> None:
    geo = q.Geometry(12, False)  # 4 KiB clusters, 512 entries
    cs = 4096
    t = _table([0x10000, 0x11000, 0x13000, 1, 1, 1 << 62 | 0x20000, 1 << 62 | 0x20100, 0], geo)
    runs = list(q.table_runs(geo, t, 0x5000, 0, 100, 8 * cs))
    S = q.SubclusterType
    assert [(r.start, r.length, r.kind, r.host_offset) for r in runs] == [
        (100, 2 * cs - 100, S.NORMAL, 0x10000 + 100),
        (2 * cs, cs, S.NORMAL, 0x13000),
        (3 * cs, 2 * cs, S.ZERO_PLAIN, None),
        (5 * cs, cs, S.COMPRESSED, None),
        (6 * cs, cs, S.COMPRESSED, None),
        (7 * cs, cs, S.UNALLOCATED_PLAIN, None),
    ]
    assert runs[3].compressed == q.CompressedDescriptor(0x20000, 1)
    assert runs[4].entry_offset == 0x5000 + 6 * 8


def test_table_runs_follow_subclusters() -> None:
    geo = q.Geometry(16, True)  # 2 KiB subclusters
    t = _table([0x50000, 0xC, 0, 0xF << 32], geo)
    runs = list(q.table_runs(geo, t, 0, 0, 0, 2 * 65536))
    S = q.SubclusterType
    assert [(r.start, r.length, r.kind, r.host_offset) for r in runs] == [
        (0, 4096, S.UNALLOCATED_ALLOC, 0x50000),
        (4096, 4096, S.NORMAL, 0x51000),
        (8192, 65536 - 8192, S.UNALLOCATED_ALLOC, 0x52000),
        (65536, 8192, S.ZERO_PLAIN, None),
        (65536 + 8192, 65536 - 8192, S.UNALLOCATED_PLAIN, None),
    ]


@pytest.mark.parametrize(
    ("words", "bits", "extended", "text"),
    [
        ([0x50200], 16, False, "not cluster-aligned"),
        ([0x50200 | 1], 16, False, "not cluster-aligned"),  # ZERO_ALLOC is checked too
        ([0x50000, 1 << 32 | 1], 16, True, "invalid subcluster bitmap"),
        ([0, 1], 16, True, "invalid subcluster bitmap"),
        # 512-byte clusters: 61 offset bits, of which those above 55 must be 0
        ([1 << 62 | ((1 << 56) + 512)], 9, False, "past 2^56"),
    ],
)
def test_bad_l2_entries_are_corruption_naming_the_entry(
    words: list[int], bits: int, extended: bool, text: str
) -> None:
    geo = q.Geometry(bits, extended)
    t = _table(words, geo)
    with pytest.raises(CorruptImageError) as info:
        list(q.table_runs(geo, t, 0x70000, 0, 0, geo.cluster_size))
    assert text in info.value.message
    assert info.value.offset == 0x70000 and info.value.field == "l2_entry"


# ---- refcounts ---------------------------------------------------------------------------


@given(order=st.integers(0, 6), values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=80))
def test_refcount_entries_read_at_every_width(order: int, values: list[int]) -> None:
    bits = 1 << order
    values = [v & ((1 << bits) - 1) for v in values]
    if bits < 8:
        packed = 0
        for i, v in enumerate(values):
            packed |= v << (i * bits)  # least significant bit first, byte by byte
        block = packed.to_bytes((len(values) * bits + 7) // 8, "little")
    else:
        block = b"".join(v.to_bytes(bits // 8, "big") for v in values)
    assert [q.refcount_entry(block, i, order) for i in range(len(values))] == values


def test_refcount_locations_and_block_offsets() -> None:
    h = parse(header_bytes(refcount_order=0)).header  # 1-bit refcounts
    assert q.refcount_block_entries(h) == 65536 * 8
    assert q.refcount_location(h, (65536 * 8 + 3) * 65536 + 17) == (1, 3)
    assert q.refcount_block_offset(0x50000 | 0x1FF) == 0x50000


# ---- snapshots ------------------------------------------------------------------------------


def snapshot_entry(ident: bytes, name: bytes, extra: bytes) -> bytes:
    fixed = struct.pack(">QIHHIIQII", 0x90000, 16, len(ident), len(name), 1700000000, 5,
                        3_000_000_123, 77, len(extra))  # fmt: skip
    raw = fixed + extra + ident + name
    return raw + bytes(-len(raw) % 8)


def test_snapshot_entries_parse_with_their_extra_data() -> None:
    extra = struct.pack(">QQQ", 1 << 33, 8 * MiB, 42)
    raw = snapshot_entry(b"1", b"before upgrade", extra)
    assert q.snapshot_entry_size(raw[:40]) == len(raw)
    s = q.parse_snapshot(raw + b"next entry", 0x60000)
    assert (s.id, s.name, s.l1_table_offset, s.l1_size) == ("1", "before upgrade", 0x90000, 16)
    assert (s.vm_state_size, s.disk_size, s.icount, s.entry_size) == (
        1 << 33,
        8 * MiB,
        42,
        len(raw),
    )
    old = q.parse_snapshot(snapshot_entry(b"7", b"", b""), 0)  # v2: no extra data
    assert (old.vm_state_size, old.disk_size, old.icount) == (77, None, None)


def test_bad_snapshot_entries_are_corruption() -> None:
    with pytest.raises(CorruptImageError, match="extra data"):
        q.parse_snapshot(snapshot_entry(b"1", b"x", bytes(2048)), 0x60000)
    raw = snapshot_entry(b"1", b"name", bytes(16))
    with pytest.raises(CorruptImageError, match="cut off"):
        q.parse_snapshot(raw[:-8], 0x60000)


def test_probe_needs_a_qcow2_version() -> None:
    assert probe_format(bytes(header_bytes()[:512])) == "qcow2"
    assert probe_format(bytes(header_bytes(version=1)[:512])) == "qcow"


def test_the_probe_knows_the_qcow2_magic_without_importing_the_module() -> None:
    from qedkit.format import probe

    assert probe.QCOW2_MAGIC == q.MAGIC
