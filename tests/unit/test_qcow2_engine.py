"""engine.qcow2 on qcow2 images packed here by hand (no QEMU): errors for damaged
tables name the entry's offset, compressed clusters decode (zlib raw deflate, zstd
frames one after another), and nothing is ever written."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

import qedkit
from qedkit.engine.qcow2 import Qcow2Image
from qedkit.engine.sync import run
from qedkit.errors import CorruptImageError, ReadOnlyError
from qedkit.format.qcow2 import SubclusterType

CS = 4096  # cluster_bits 12
SIZE = 16 * CS
L1_AT, L2_AT, DATA_AT = 3 * CS, 4 * CS, 5 * CS


def build(path: Path, l2: list[int], tail: bytes = b"", *, l1_entry: int | None = None) -> Path:
    """A v3 image: header, refcount table (cluster 1), block (2), L1 (3), L2 (4), then
    ``tail`` from cluster 5 (data, compressed bytes ...)."""
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        b"QFI\xfb", 3, 0, 0, 12, SIZE, 0, 1, L1_AT, CS, 1, 0, 0, 0, 0, 0, 4, 112,
    )  # fmt: skip
    image = bytearray(DATA_AT)
    image[: len(header)] = header
    image[CS : CS + 8] = struct.pack(">Q", 2 * CS)
    entry = (1 << 63 | L2_AT) if l1_entry is None else l1_entry
    image[L1_AT : L1_AT + 8] = struct.pack(">Q", entry)
    image[L2_AT : L2_AT + 8 * len(l2)] = struct.pack(f">{len(l2)}Q", *l2)
    path.write_bytes(bytes(image) + tail)
    return path


def compressed_entry(host: int, nbytes: int) -> int:
    x = 62 - (12 - 8)
    sectors = (host % 512 + nbytes + 511) // 512
    return 1 << 62 | (sectors - 1) << x | host


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def test_plain_zero_and_unallocated_clusters_read_and_map(tmp_path: Path) -> None:
    data = bytes(range(256)) * 32  # 8 KiB: two clusters
    path = build(tmp_path / "a.qcow2", [1 << 63 | DATA_AT, 1 << 63 | DATA_AT + CS, 1, 0], data)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, 3 * CS) == data + bytes(CS)
        kinds = [(e.start, e.length, e.kind.value, e.host_offset) for e in img.block_status()]
        assert kinds == [
            (0, 2 * CS, "data", DATA_AT),
            (2 * CS, CS, "zero", None),
            (3 * CS, SIZE - 3 * CS, "unallocated", None),
        ]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_data_cluster_past_the_end_of_the_file_reads_zeros_as_in_qemu(tmp_path: Path) -> None:
    path = build(tmp_path / "a.qcow2", [DATA_AT, DATA_AT + CS], b"\x01" * 100)
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, 2 * CS) == b"\x01" * 100 + bytes(2 * CS - 100)


def test_zlib_and_multi_frame_zstd_clusters_decode(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    one = b"cluster one " * 400
    one = one[:CS]
    blob = raw_deflate(one) + b"trailing bytes of the next cluster"
    path = build(tmp_path / "z.qcow2", [compressed_entry(DATA_AT + 100, len(blob))],
                 bytes(100) + blob)  # fmt: skip
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, CS) == one
        assert img.read(1000, 10) == one[1000:1010]
        assert img.block_status(0, CS)[0].host_offset is None  # compressed: no host offset
    # zstd: QEMU decodes frame after frame until the cluster is full
    c = zstandard.ZstdCompressor()
    frames = c.compress(one[:1000]) + c.compress(one[1000:])
    path = build(tmp_path / "zs.qcow2", [compressed_entry(DATA_AT, len(frames))], frames)
    with open(path, "r+b") as f:  # compression type zstd: bit 3 and byte 104
        f.seek(72)
        f.write(struct.pack(">Q", 8))
        f.seek(104)
        f.write(b"\x01")
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, CS) == one


@pytest.mark.parametrize(
    ("blob", "text"),
    [
        (b"\xff" * 600, "invalid"),  # not deflate at all
        (raw_deflate(b"short"), "inflates to 5 bytes, not a cluster of 4096"),
    ],
)
def test_a_bad_compressed_cluster_is_corruption_naming_the_entry(
    tmp_path: Path, blob: bytes, text: str
) -> None:
    path = build(tmp_path / "bad.qcow2", [0, compressed_entry(DATA_AT, len(blob))], blob)
    with qedkit.open(str(path), readonly=True) as img:
        assert img.read(0, CS) == bytes(CS)  # other clusters still read
        with pytest.raises(CorruptImageError) as info:
            img.read(CS, CS)
    assert text in info.value.message
    assert info.value.offset == L2_AT + 8 and info.value.field == "l2_entry"
    assert str(info.value).startswith(f"{path}: compressed cluster at {DATA_AT:#x}")


@pytest.mark.parametrize(
    ("l1_entry", "text"),
    [
        (L2_AT + 512, "not aligned to the cluster size"),
        (100 * CS, "past the end of the file"),
    ],
)
def test_a_bad_l1_entry_is_corruption_naming_its_offset(
    tmp_path: Path, l1_entry: int, text: str
) -> None:
    path = build(tmp_path / "l1.qcow2", [], l1_entry=l1_entry)
    with qedkit.open(str(path), readonly=True) as img, pytest.raises(CorruptImageError) as info:
        img.read(0, 512)
    assert text in info.value.message
    assert info.value.offset == L1_AT and info.value.field == "l1_entry"


def test_the_converter_helpers_list_entries_metadata_and_refcounts(tmp_path: Path) -> None:
    path = build(tmp_path / "m.qcow2", [1 << 63 | DATA_AT, 1, compressed_entry(DATA_AT, 10)])
    with open(path, "r+b") as f:  # refcount block: clusters 0-5 used once
        f.seek(2 * CS)
        f.write(struct.pack(">6H", 1, 1, 1, 1, 1, 1))
    with qedkit.open(str(path), readonly=True) as img:
        engine = img.engine
        assert isinstance(engine, Qcow2Image)
        entries = run(engine.entries(0))
        assert len(entries) == CS // 8
        assert [e.uniform for e in entries[:4]] == [
            SubclusterType.NORMAL,
            SubclusterType.ZERO_PLAIN,
            SubclusterType.COMPRESSED,
            SubclusterType.UNALLOCATED_PLAIN,
        ]
        meta = run(engine.metadata_clusters())
        assert (meta.header, meta.refcount_table, meta.refcount_blocks) == ((0,), (CS,), (2 * CS,))
        assert (meta.l1_table, meta.l2_tables, meta.snapshot_table) == ((L1_AT,), (L2_AT,), ())
        assert [run(engine.refcount(i * CS)) for i in range(7)] == [1, 1, 1, 1, 1, 1, 0]


def test_a_read_write_open_is_refused_with_the_remedy(tmp_path: Path) -> None:
    path = build(tmp_path / "rw.qcow2", [])
    with pytest.raises(ReadOnlyError) as info:
        qedkit.open(str(path))
    assert "qed convert --in-place makes it QED in the same file" in str(info.value)
    assert "qed serve --convert-qcow2" in str(info.value)
