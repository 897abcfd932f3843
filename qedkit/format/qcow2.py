"""The qcow2 format, read side: header, extensions, tables and their entries.

References: qemu docs/interop/qcow2.txt sections "Header", "Additional fields",
"Header extensions", "Feature name table", "Bitmaps extension", "Full disk encryption
header pointer", "Host cluster management", "Cluster mapping", "Extended L2 Entries",
"Snapshots"; QEMU block/qcow2.h (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_*,
qcow2_get_cluster_type, qcow2_get_subcluster_type), block/qcow2.c (qcow2_do_open,
qcow2_read_extensions, validate_compression_type), block/qcow2-cluster.c
(qcow2_parse_compressed_l2_entry).

Layout (all integers big-endian; v2 headers end at 72, v3 headers at header_length)::

    off size field                     rule (as QEMU 7.2 enforces it on open)
      0    4 magic                     "QFI\\xfb"
      4    4 version                   2 or 3
      8    8 backing_file_offset       0: none; else inside cluster 0
     16    4 backing_file_size         <= 1023 bytes, no terminator
     20    4 cluster_bits              9 .. 21 (512 B .. 2 MiB); >= 14 with extended L2
     24    8 size                      guest bytes
     32    4 crypt_method              0 none, 1 AES, 2 LUKS
     36    4 l1_size                   L1 entries, enough for size, <= 32 MiB of table
     40    8 l1_table_offset           cluster-aligned
     48    8 refcount_table_offset     cluster-aligned
     56    4 refcount_table_clusters   1 .. 8 MiB of table
     60    4 nb_snapshots              <= 65536
     64    8 snapshots_offset          cluster-aligned
     72    8 incompatible_features     v3; unknown bits: refuse
     80    8 compatible_features       v3; unknown bits: ignore
     88    8 autoclear_features        v3; unknown bits: clear before writing
     96    4 refcount_order            v3 (v2: 4); refcount_bits = 1 << order, order <= 6
    100    4 header_length             v3: >= 104 (v2: 72), <= cluster size
    104    1 compression_type          v3, if header_length > 104: 0 zlib, 1 zstd

Then header extensions (u32 type, u32 length, data padded to 8 bytes; type 0 ends
them) up to the backing file name or the end of cluster 0.

Address translation (``l2_entries = cluster_size / 8``, or ``/ 16`` with extended L2
entries, where every entry is followed by a 64-bit subcluster bitmap)::

    l1_index = guest >> (cluster_bits + l2_bits)
    l2_index = (guest >> cluster_bits) & (l2_entries - 1)

L1 entries: bits 9-55 the L2 table's offset (0: unallocated), bit 63 COPIED.
L2 entries: bit 63 COPIED, bit 62 compressed, bits 0-61 the descriptor; a standard
descriptor has the host cluster offset in bits 9-55 and the zero flag in bit 0; a
compressed one splits bits 0-61 at ``x = 62 - (cluster_bits - 8)``: host byte offset
below, additional 512-byte sectors above.

Everything here is pure: bytes in, frozen values out, errors from qedkit.errors with
the file offset and the field. The engine reads the bytes (engine.qcow2); an
in-place converter reuses the same values (every L2 entry classified, the host
clusters the metadata occupies, the refcount structures).
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ..errors import CorruptImageError, FormatError, UnsupportedFeatureError

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
V3_FIELDS = struct.Struct(">QQQII")  # 32 bytes at offset 72
V2_HEADER_LENGTH = V2_HEADER.size  # 72
V3_MIN_HEADER_LENGTH = V2_HEADER.size + V3_FIELDS.size  # 104
COMPRESSION_TYPE_OFFSET = 104

MIN_CLUSTER_BITS = 9  # the spec's minimum, 512-byte clusters
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit, 2 MiB (the spec allows more)
MIN_EXTENDED_L2_CLUSTER_BITS = 14  # 32 subclusters of at least 512 bytes
SUBCLUSTERS_PER_CLUSTER = 32  # with extended L2 entries
MAX_BACKING_NAME = 1023  # bytes (spec)
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes, then extra, id, name, padding
MAX_BACKING_FORMAT = 15  # QEMU keeps it in a 16-byte buffer with the terminator
MAX_REFCOUNT_ORDER = 6  # 64-bit refcounts
V2_REFCOUNT_ORDER = 4  # 16-bit refcounts, implied by version 2
COMPRESSED_SECTOR = 512  # compressed descriptors count in 512-byte sectors

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 (QEMU L1E_OFFSET_MASK, L2E_OFFSET_MASK)
REFCOUNT_TABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00  # bits 9-63 (QEMU REFT_OFFSET_MASK)
OFLAG_COPIED = 1 << 63  # refcount is exactly 1 (active tables only)
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1  # standard descriptor bit 0 (v3, no extended L2)
SUBCLUSTER_ALLOC_MASK = 0xFFFF_FFFF  # bitmap bits 0-31
HIGH_OFFSET_BITS = ~((1 << 56) - 1)  # must be 0 in a compressed host offset

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


# ==========================================================================================
# Enumerations
# ==========================================================================================


class IncompatibleFeature(enum.IntFlag):
    """``incompatible_features``: a reader that does not know a set bit must refuse."""

    DIRTY = 1 << 0  # refcounts may be stale (lazy refcounts); reading is fine
    CORRUPT = 1 << 1  # metadata may be damaged: never write (reading is allowed)
    DATA_FILE = 1 << 2  # guest data lives in an external file
    COMPRESSION_TYPE = 1 << 3  # compression_type is present and not zlib
    EXTENDED_L2 = 1 << 4  # 128-bit L2 entries with 32 subclusters


class CompatibleFeature(enum.IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class AutoclearFeature(enum.IntFlag):
    BITMAPS = 1 << 0  # the bitmaps extension is consistent
    DATA_FILE_RAW = 1 << 1  # the external data file is a valid raw image by itself


KNOWN_INCOMPATIBLE = int(
    IncompatibleFeature.DIRTY
    | IncompatibleFeature.CORRUPT
    | IncompatibleFeature.DATA_FILE
    | IncompatibleFeature.COMPRESSION_TYPE
    | IncompatibleFeature.EXTENDED_L2
)

INCOMPATIBLE_NAMES = {
    IncompatibleFeature.DIRTY: "dirty bit",
    IncompatibleFeature.CORRUPT: "corrupt bit",
    IncompatibleFeature.DATA_FILE: "external data file",
    IncompatibleFeature.COMPRESSION_TYPE: "compression type",
    IncompatibleFeature.EXTENDED_L2: "extended L2 entries",
}


class CryptMethod(enum.IntEnum):
    NONE = 0
    AES = 1  # legacy AES-CBC
    LUKS = 2


class CompressionType(enum.IntEnum):
    ZLIB = 0  # raw deflate, window bits 12 (QEMU inflateInit2 with -12)
    ZSTD = 1


class ExtensionType(enum.IntEnum):
    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_NAME_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    FULL_DISK_ENCRYPTION = 0x0537BE77
    EXTERNAL_DATA_FILE = 0x44415441


class FeatureKind(enum.IntEnum):
    """The feature bitmap a feature-name-table entry names a bit of."""

    INCOMPATIBLE = 0
    COMPATIBLE = 1
    AUTOCLEAR = 2


class ClusterType(enum.Enum):
    """QEMU's QCow2ClusterType: what a whole L2 entry describes."""

    UNALLOCATED = "unallocated"  # offset 0, no zero flag: the backing file or zeros
    ZERO_PLAIN = "zero-plain"  # zero flag, no host cluster
    ZERO_ALLOC = "zero-alloc"  # zero flag with a (preallocated) host cluster
    NORMAL = "normal"  # data at the host cluster (or, extended L2: see the bitmap)
    COMPRESSED = "compressed"


class SubclusterType(enum.Enum):
    """QEMU's QCow2SubclusterType: what one subcluster (or, without extended L2
    entries, the whole cluster) reads as."""

    NORMAL = "normal"  # data at the host offset
    COMPRESSED = "compressed"  # data in a compressed cluster (the whole cluster)
    ZERO_PLAIN = "zero-plain"  # zeros, no host space
    ZERO_ALLOC = "zero-alloc"  # zeros, host space reserved
    UNALLOCATED_PLAIN = "unallocated-plain"  # the backing file (or zeros), no host space
    UNALLOCATED_ALLOC = "unallocated-alloc"  # the backing file, host space reserved
    INVALID = "invalid"  # the bitmap contradicts itself or the entry

    @property
    def has_host_cluster(self) -> bool:
        """True when the entry's host cluster offset is used (or reserved)."""
        return self in _HOST_CLUSTER_TYPES

    @property
    def reads_zero(self) -> bool:
        return self in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC)

    @property
    def unallocated(self) -> bool:
        return self in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC)


_HOST_CLUSTER_TYPES = frozenset(
    (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC)
)


# ==========================================================================================
# Header
# ==========================================================================================

# Byte offsets of the header fields, for error messages.
FIELD_OFFSETS = {
    "magic": 0,
    "version": 4,
    "backing_file_offset": 8,
    "backing_file_size": 16,
    "cluster_bits": 20,
    "size": 24,
    "crypt_method": 32,
    "l1_size": 36,
    "l1_table_offset": 40,
    "refcount_table_offset": 48,
    "refcount_table_clusters": 56,
    "nb_snapshots": 60,
    "snapshots_offset": 64,
    "incompatible_features": 72,
    "compatible_features": 80,
    "autoclear_features": 88,
    "refcount_order": 96,
    "header_length": 100,
    "compression_type": 104,
}


def _corrupt(field: str, message: str) -> CorruptImageError:
    offset = FIELD_OFFSETS[field]
    return CorruptImageError(
        f"invalid qcow2 {field} {message} (header offset {offset})", offset=offset, field=field
    )


def _unsupported(field: str, message: str) -> UnsupportedFeatureError:
    offset = FIELD_OFFSETS[field]
    return UnsupportedFeatureError(
        f"{message} (qcow2 header field {field} at offset {offset})", offset=offset, field=field
    )


@dataclass(frozen=True, slots=True)
class Geometry:
    """Address arithmetic of one image (derived from cluster_bits and extended L2)."""

    cluster_bits: int
    extended_l2: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_words(self) -> int:
        """u64 words per L2 entry: 1, or 2 with extended L2 (entry, bitmap)."""
        return 2 if self.extended_l2 else 1

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return 1 << (self.cluster_bits + self.l2_bits)

    @property
    def subclusters(self) -> int:
        return SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_bits(self) -> int:
        return self.cluster_bits - (5 if self.extended_l2 else 0)

    @property
    def subcluster_size(self) -> int:
        return 1 << self.subcluster_bits

    @property
    def compressed_offset_bits(self) -> int:
        """x = 62 - (cluster_bits - 8): bits 0..x-1 hold a compressed host offset."""
        return 62 - (self.cluster_bits - 8)

    def l1_index(self, guest: int) -> int:
        return guest >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) & (self.l2_entries - 1)

    def l1_entries_for(self, size: int) -> int:
        """L1 entries needed to map ``size`` guest bytes (QEMU size_to_l1)."""
        span = self.l2_span
        return (size + span - 1) // span

    def clusters_for(self, nbytes: int) -> int:
        return (nbytes + self.cluster_size - 1) >> self.cluster_bits


@dataclass(frozen=True, slots=True)
class Header:
    """A qcow2 header. ``unpack`` decodes, ``validate`` checks (the constructor does
    neither, so tests can build bad ones). v2 images get the v3 fields' implied
    values: no feature bits, refcount_order 4, header_length 72, zlib."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = V2_REFCOUNT_ORDER
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = CompressionType.ZLIB

    # ---- derived -----------------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_bits, self.extended_l2)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & IncompatibleFeature.EXTENDED_L2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def compat(self) -> str:
        """qemu-img's name of the version: "0.10" (v2) or "1.1" (v3)."""
        return "0.10" if self.version == 2 else "1.1"

    def has(self, feature: IncompatibleFeature) -> bool:
        return bool(self.incompatible_features & feature)

    @property
    def dirty(self) -> bool:
        return self.has(IncompatibleFeature.DIRTY)

    @property
    def corrupt(self) -> bool:
        return self.has(IncompatibleFeature.CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & CompatibleFeature.LAZY_REFCOUNTS)

    @property
    def compression(self) -> CompressionType | None:
        """The compression type, or None when the value is unknown."""
        try:
            return CompressionType(self.compression_type)
        except ValueError:
            return None

    @property
    def refcount_table_bytes(self) -> int:
        return self.refcount_table_clusters << self.cluster_bits

    @property
    def has_backing_file(self) -> bool:
        return self.backing_file_offset != 0 and self.backing_file_size != 0

    # ---- bytes -------------------------------------------------------------------------

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        """Decode the header at the start of ``buf`` (only length and magic checked)."""
        if len(buf) < V2_HEADER_LENGTH:
            raise FormatError(
                f"file is too short for a qcow2 header ({len(buf)} bytes, need {V2_HEADER_LENGTH})",
                offset=0,
                field="magic",
            )
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
         l1_offset, rc_offset, rc_clusters, nb_snapshots, snapshots_offset,
         ) = V2_HEADER.unpack_from(buf)  # fmt: skip
        if magic != MAGIC:
            raise FormatError(
                f"not a qcow2 image: magic is {magic!r} at offset 0, expected {MAGIC!r}",
                offset=0,
                field="magic",
            )
        v2 = cls(version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
                 l1_offset, rc_offset, rc_clusters, nb_snapshots, snapshots_offset)  # fmt: skip
        if version != 3:
            return v2
        if len(buf) < V3_MIN_HEADER_LENGTH:
            raise FormatError(
                f"file is too short for a qcow2 v3 header ({len(buf)} bytes, "
                f"need {V3_MIN_HEADER_LENGTH})",
                offset=V2_HEADER_LENGTH,
                field="incompatible_features",
            )
        incompatible, compatible, autoclear, order, header_length = V3_FIELDS.unpack_from(
            buf, V2_HEADER_LENGTH
        )
        compression = 0
        if header_length > COMPRESSION_TYPE_OFFSET and len(buf) > COMPRESSION_TYPE_OFFSET:
            compression = buf[COMPRESSION_TYPE_OFFSET]
        return replace(
            v2,
            incompatible_features=incompatible,
            compatible_features=compatible,
            autoclear_features=autoclear,
            refcount_order=order,
            header_length=header_length,
            compression_type=compression,
        )

    def validate(self, file_size: int) -> None:
        """Raise if a field is invalid, in the order QEMU checks them on open (so the
        first problem reported is QEMU's). FormatError subclasses for damage,
        UnsupportedFeatureError for what QEMU cannot open either (a version other
        than 2 or 3, clusters over 2 MiB, unknown incompatible features: see
        ``check_incompatible``, which needs the feature name table).

        Tables must lie inside the file (``file_size`` bytes): QEMU would read zeros
        past its end, but no writer leaves metadata there."""
        if self.version not in (2, 3):
            raise _unsupported("version", f"unsupported qcow2 version {self.version}")
        if self.cluster_bits < MIN_CLUSTER_BITS:
            raise _corrupt(
                "cluster_bits", f"{self.cluster_bits}: clusters must be at least 512 bytes"
            )
        if self.cluster_bits > MAX_CLUSTER_BITS:
            raise _unsupported(
                "cluster_bits",
                f"unsupported cluster size 2^{self.cluster_bits} (QEMU and qedkit read "
                f"up to 2^{MAX_CLUSTER_BITS})",
            )
        cs = self.cluster_size
        if self.version == 3 and self.header_length < V3_MIN_HEADER_LENGTH:
            raise _corrupt(
                "header_length", f"{self.header_length}: a v3 header has at least 104 bytes"
            )
        if self.header_length > cs:
            raise _corrupt(
                "header_length", f"{self.header_length}: the header exceeds the cluster size {cs}"
            )
        if self.backing_file_offset:
            if self.backing_file_offset > cs:
                raise _corrupt(
                    "backing_file_offset",
                    f"{self.backing_file_offset}: the backing file name must be in cluster 0",
                )
            if self.backing_file_size > min(MAX_BACKING_NAME, cs - self.backing_file_offset):
                raise _corrupt(
                    "backing_file_size",
                    f"{self.backing_file_size}: the backing file name is too long "
                    f"(at most {MAX_BACKING_NAME} bytes, inside cluster 0)",
                )
        if self.refcount_order > MAX_REFCOUNT_ORDER:
            raise _corrupt(
                "refcount_order",
                f"{self.refcount_order}: refcounts are at most 64 bits (order 6)",
            )
        self._validate_compression_type()
        if self.extended_l2 and self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
            raise _corrupt(
                "cluster_bits",
                f"{self.cluster_bits}: extended L2 entries need clusters of at least 16 KiB",
            )
        self._validate_refcount_table(file_size)
        self._validate_snapshot_table(file_size)
        self._validate_l1(file_size)

    def _validate_compression_type(self) -> None:
        flag = self.has(IncompatibleFeature.COMPRESSION_TYPE)
        if self.compression is None:
            raise _unsupported(
                "compression_type", f"unknown compression type {self.compression_type}"
            )
        if self.compression is not CompressionType.ZLIB and not flag:
            raise _corrupt(
                "compression_type",
                f"{self.compression_type}: a non-zlib compression type needs the "
                "compression type incompatible feature bit",
            )
        if self.compression is CompressionType.ZLIB and flag:
            raise _corrupt(
                "incompatible_features",
                "compression type bit set with the zlib compression type",
            )

    def _validate_refcount_table(self, file_size: int) -> None:
        cs = self.cluster_size
        if self.refcount_table_clusters == 0:
            raise _corrupt("refcount_table_clusters", "0: the image has no refcount table")
        if self.refcount_table_bytes > MAX_REFCOUNT_TABLE_BYTES:
            raise _corrupt(
                "refcount_table_clusters",
                f"{self.refcount_table_clusters}: the refcount table exceeds QEMU's "
                f"limit of {MAX_REFCOUNT_TABLE_BYTES} bytes",
            )
        if self.refcount_table_offset % cs:
            raise _corrupt(
                "refcount_table_offset",
                f"{self.refcount_table_offset:#x}: not aligned to the cluster size {cs}",
            )
        if self.refcount_table_offset + self.refcount_table_bytes > file_size:
            raise _corrupt(
                "refcount_table_offset",
                f"{self.refcount_table_offset:#x}: the {self.refcount_table_bytes}-byte "
                f"refcount table does not fit in the file ({file_size} bytes)",
            )

    def _validate_snapshot_table(self, file_size: int) -> None:
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise _corrupt(
                "nb_snapshots", f"{self.nb_snapshots}: more than {MAX_SNAPSHOTS} snapshots"
            )
        if self.nb_snapshots == 0:
            return
        if self.snapshots_offset % self.cluster_size:
            raise _corrupt(
                "snapshots_offset",
                f"{self.snapshots_offset:#x}: not aligned to the cluster size {self.cluster_size}",
            )
        if self.snapshots_offset + SNAPSHOT_HEADER.size * self.nb_snapshots > file_size:
            raise _corrupt(
                "snapshots_offset",
                f"{self.snapshots_offset:#x}: the table of {self.nb_snapshots} snapshots "
                f"does not fit in the file ({file_size} bytes)",
            )

    def _validate_l1(self, file_size: int) -> None:
        geo = self.geometry
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise _corrupt(
                "l1_size",
                f"{self.l1_size}: the L1 table exceeds QEMU's limit of {MAX_L1_BYTES} bytes",
            )
        needed = geo.l1_entries_for(self.size)
        if self.l1_size < needed:
            raise _corrupt(
                "l1_size",
                f"{self.l1_size}: the L1 table is too small for the virtual size "
                f"{self.size} (needs {needed} entries)",
            )
        if self.l1_table_offset % self.cluster_size:
            raise _corrupt(
                "l1_table_offset",
                f"{self.l1_table_offset:#x}: not aligned to the cluster size {self.cluster_size}",
            )
        if self.l1_size and self.l1_table_offset + 8 * self.l1_size > file_size:
            raise _corrupt(
                "l1_table_offset",
                f"{self.l1_table_offset:#x}: the {8 * self.l1_size}-byte L1 table does "
                f"not fit in the file ({file_size} bytes)",
            )


# ==========================================================================================
# Header extensions
# ==========================================================================================


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension as stored: ``offset`` is where its data starts."""

    type: int
    offset: int
    data: bytes

    @property
    def known(self) -> ExtensionType | None:
        try:
            return ExtensionType(self.type)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class FeatureName:
    kind: int  # FeatureKind value (unknown kinds are kept)
    bit: int
    name: str


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(frozen=True, slots=True)
class EncryptionHeaderPointer:
    """Where the LUKS header clusters are (offset, length in bytes)."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Extensions:
    """The header extensions of an image; ``end`` is the first byte after them (the
    end-of-extensions marker included)."""

    items: tuple[Extension, ...]
    end: int
    backing_format: str | None = None
    feature_names: tuple[FeatureName, ...] = ()
    bitmaps: BitmapsExtension | None = None
    encryption: EncryptionHeaderPointer | None = None
    data_file: str | None = None

    @property
    def unknown(self) -> tuple[Extension, ...]:
        return tuple(e for e in self.items if e.known is None)

    def feature_name(self, kind: FeatureKind, bit: int) -> str | None:
        for f in self.feature_names:
            if f.kind == kind and f.bit == bit:
                return f.name
        return None


def _ext_error(message: str, offset: int) -> CorruptImageError:
    return CorruptImageError(
        f"invalid qcow2 header extension at offset {offset}: {message}",
        offset=offset,
        field="header_extension",
    )


def _decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_extensions(cluster0: bytes, header: Header) -> Extensions:
    """Decode the extensions between the header and the backing file name (or the end
    of cluster 0), as QEMU's qcow2_read_extensions does: a length reaching past that
    end is an error; running into the end without an end marker is not."""
    start = header.header_length
    end = header.backing_file_offset or header.cluster_size
    end = min(end, header.cluster_size)
    items: list[Extension] = []
    fields: dict[str, object] = {}
    offset = start
    while offset < end:
        if offset + 8 > end or offset + 8 > len(cluster0):
            raise _ext_error("the extension header runs past the end of the extension area", offset)
        ext_type, length = struct.unpack_from(">II", cluster0, offset)
        data_at = offset + 8
        if length > end - data_at or data_at + length > len(cluster0):
            raise _ext_error(
                f"length {length} runs past the end of the extension area ({end})", offset
            )
        if ext_type == ExtensionType.END:
            return _extensions(items, data_at, fields)
        data = bytes(cluster0[data_at : data_at + length])
        item = Extension(ext_type, data_at, data)
        if item.known is not None and any(e.type == ext_type for e in items):
            raise _ext_error(f"a second {item.known.name} extension", offset)
        items.append(item)
        fields.update(_decode_extension(item, header, offset))
        offset = data_at + (length + 7) // 8 * 8
    return _extensions(items, offset, fields)


def _extensions(items: list[Extension], end: int, fields: dict[str, object]) -> Extensions:
    return Extensions(tuple(items), end, **fields)  # type: ignore[arg-type]


def _decode_extension(item: Extension, header: Header, offset: int) -> dict[str, object]:
    data = item.data
    kind = item.known
    if kind is ExtensionType.BACKING_FORMAT:
        if len(data) > MAX_BACKING_FORMAT:
            raise _ext_error(f"backing format name of {len(data)} bytes is too long", offset)
        return {"backing_format": _decode_name(data)}
    if kind is ExtensionType.FEATURE_NAME_TABLE:
        names = []
        for pos in range(0, len(data) - len(data) % 48, 48):
            raw = data[pos + 2 : pos + 48].split(b"\0", 1)[0]
            names.append(FeatureName(data[pos], data[pos + 1], _decode_name(raw)))
        return {"feature_names": tuple(names)}
    if kind is ExtensionType.BITMAPS:
        if len(data) != 24:
            raise _ext_error(f"bitmaps extension of {len(data)} bytes (expected 24)", offset)
        nb, _reserved, size, where = struct.unpack(">IIQQ", data)
        return {"bitmaps": BitmapsExtension(nb, size, where)}
    if kind is ExtensionType.FULL_DISK_ENCRYPTION:
        if len(data) != 16:
            raise _ext_error(
                f"encryption header pointer of {len(data)} bytes (expected 16)", offset
            )
        where, length = struct.unpack(">QQ", data)
        return {"encryption": EncryptionHeaderPointer(where, length)}
    if kind is ExtensionType.EXTERNAL_DATA_FILE:
        return {"data_file": _decode_name(data)}
    return {}


# ==========================================================================================
# The whole header area
# ==========================================================================================


@dataclass(frozen=True, slots=True)
class Metadata:
    """What cluster 0 says: the validated header, its extensions, the backing name."""

    header: Header
    extensions: Extensions
    backing_filename: str | None

    @property
    def backing_format(self) -> str | None:
        return self.extensions.backing_format

    @property
    def geometry(self) -> Geometry:
        return self.header.geometry

    @classmethod
    def parse(cls, cluster0: bytes, file_size: int) -> Metadata:
        """Decode and validate cluster 0 (``cluster0`` holds its bytes, or the whole
        file if shorter) of a file of ``file_size`` bytes. Raises FormatError (not
        qcow2), CorruptImageError (a field or extension out of range) or
        UnsupportedFeatureError (a version, cluster size or incompatible feature
        qedkit cannot read; the message names the feature)."""
        header = Header.unpack(cluster0)
        header.validate(file_size)
        extensions = parse_extensions(cluster0, header)
        check_incompatible(header, extensions)
        name = None
        if header.has_backing_file:
            start = header.backing_file_offset
            raw = cluster0[start : start + header.backing_file_size]
            if len(raw) < header.backing_file_size:
                raise _corrupt("backing_file_offset", "the backing file name is cut off by EOF")
            name = _decode_name(bytes(raw))
        return cls(header, extensions, name)

    def check_readable(self) -> None:
        """Refuse what qedkit cannot read (UnsupportedFeatureError naming the feature):
        encryption and external data files."""
        header = self.header
        if header.crypt_method != CryptMethod.NONE:
            try:
                method = CryptMethod(header.crypt_method).name
            except ValueError:
                method = f"unknown method {header.crypt_method}"
            raise _unsupported(
                "crypt_method",
                f"encrypted qcow2 images ({method}) are not supported: decrypt it "
                "first (qemu-img convert with --object secret)",
            )
        if header.has(IncompatibleFeature.DATA_FILE):
            where = f" ({self.extensions.data_file!r})" if self.extensions.data_file else ""
            raise _unsupported(
                "incompatible_features",
                f"qcow2 images with an external data file{where} are not supported",
            )


def check_incompatible(header: Header, extensions: Extensions) -> None:
    """UnsupportedFeatureError for incompatible feature bits nobody defined, named
    from the image's feature name table when it has them (as QEMU reports them)."""
    unknown = header.incompatible_features & ~KNOWN_INCOMPATIBLE
    if not unknown:
        return
    names = []
    for bit in range(64):
        if unknown >> bit & 1:
            name = extensions.feature_name(FeatureKind.INCOMPATIBLE, bit)
            names.append(f"{name} (bit {bit})" if name else f"unknown feature bit {bit}")
    raise _unsupported(
        "incompatible_features", f"unsupported qcow2 incompatible features: {', '.join(names)}"
    )


# ==========================================================================================
# Tables
# ==========================================================================================


def unpack_table(buf: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian u64 words (an L1, L2 or refcount table) as an ``array('Q')``."""
    table = array("Q")
    table.frombytes(buf)
    if _LITTLE_ENDIAN_HOST:
        table.byteswap()
    return table


def l2_table_offset(l1_entry: int) -> int:
    """The L2 table offset of an L1 entry (0: unallocated); reserved bits dropped."""
    return l1_entry & OFFSET_MASK


def l1_entry_copied(l1_entry: int) -> bool:
    return bool(l1_entry & OFLAG_COPIED)


@dataclass(frozen=True, slots=True)
class CompressedDescriptor:
    """Where a compressed cluster's bytes are: ``length`` bytes from ``host_offset``
    (QEMU reads ``sectors * 512 - (host_offset & 511)``; decompression stops once a
    cluster of output is produced, so the tail may belong to the next cluster)."""

    host_offset: int
    sectors: int  # 512-byte sectors touched: 1 + the descriptor's additional sectors

    @property
    def length(self) -> int:
        return self.sectors * COMPRESSED_SECTOR - (self.host_offset & (COMPRESSED_SECTOR - 1))

    @property
    def host_end(self) -> int:
        return self.host_offset + self.length

    def host_clusters(self, cluster_bits: int) -> range:
        """Indexes of the host clusters the compressed bytes touch (for a converter
        listing what becomes free)."""
        return range(self.host_offset >> cluster_bits, ((self.host_end - 1) >> cluster_bits) + 1)


def compressed_descriptor(entry: int, cluster_bits: int) -> CompressedDescriptor:
    """Decode a compressed L2 entry (bit 62 set). The offset/size split moves with the
    cluster size: x = 62 - (cluster_bits - 8)."""
    x = 62 - (cluster_bits - 8)
    descriptor = entry & ((1 << 62) - 1)
    host = descriptor & ((1 << x) - 1)
    additional = (descriptor >> x) & ((1 << (cluster_bits - 8)) - 1)
    return CompressedDescriptor(host, additional + 1)


def cluster_type(entry: int, *, extended_l2: bool) -> ClusterType:
    """QEMU's qcow2_get_cluster_type (without external data files, which qedkit
    refuses: there COPIED with offset 0 is a cluster at host offset 0)."""
    if entry & OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & OFLAG_ZERO and not extended_l2:
        return ClusterType.ZERO_ALLOC if entry & OFFSET_MASK else ClusterType.ZERO_PLAIN
    if not entry & OFFSET_MASK:
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


def subcluster_type(
    ctype: ClusterType, bitmap: int, sc_index: int, *, extended_l2: bool
) -> SubclusterType:
    """QEMU's qcow2_get_subcluster_type: subcluster ``sc_index`` of an entry of type
    ``ctype`` with subcluster ``bitmap`` (ignored without extended L2)."""
    if ctype is ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
    if not extended_l2:
        return _PLAIN_SUBCLUSTER[ctype]
    alloc = 1 << sc_index
    zero = alloc << 32
    if ctype is ClusterType.NORMAL:
        if (bitmap >> 32) & bitmap & SUBCLUSTER_ALLOC_MASK:
            return SubclusterType.INVALID
        if bitmap & zero:
            return SubclusterType.ZERO_ALLOC
        if bitmap & alloc:
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    # UNALLOCATED (ZERO_* cannot happen with extended L2)
    if bitmap & SUBCLUSTER_ALLOC_MASK:
        return SubclusterType.INVALID
    if bitmap & zero:
        return SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_PLAIN


_PLAIN_SUBCLUSTER = {
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
}


@dataclass(frozen=True, slots=True)
class L2Entry:
    """One decoded L2 entry: what a converter needs to decide reuse or copy."""

    entry: int
    bitmap: int  # the subcluster bitmap (0 without extended L2)
    type: ClusterType
    copied: bool
    host_cluster: int | None  # the host cluster offset (NORMAL, ZERO_ALLOC; else None)
    compressed: CompressedDescriptor | None
    subclusters: tuple[SubclusterType, ...]  # one per subcluster (1 without extended L2)

    @property
    def uniform(self) -> SubclusterType | None:
        """The type every subcluster has, or None when they differ."""
        first = self.subclusters[0]
        return first if all(s is first for s in self.subclusters) else None


def decode_l2_entry(entry: int, bitmap: int, geo: Geometry) -> L2Entry:
    ctype = cluster_type(entry, extended_l2=geo.extended_l2)
    subs = tuple(
        subcluster_type(ctype, bitmap, i, extended_l2=geo.extended_l2)
        for i in range(geo.subclusters)
    )
    host = entry & OFFSET_MASK if ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else None
    compressed = (
        compressed_descriptor(entry, geo.cluster_bits) if ctype is ClusterType.COMPRESSED else None
    )
    return L2Entry(entry, bitmap, ctype, bool(entry & OFLAG_COPIED), host or None, compressed, subs)


# ==========================================================================================
# Runs: one L2 table and a guest range -> runs of one kind
# ==========================================================================================


@dataclass(frozen=True, slots=True)
class Run:
    """Guest bytes ``[start, start + length)`` of one kind in this layer.

    ``host_offset`` is the host byte of ``start`` for kinds with a host cluster
    (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC; runs of those are host-contiguous);
    ``compressed`` describes the cluster of a COMPRESSED run (one cluster, or part
    of one, per run). ``entry_offset`` is the file offset of the first L2 entry."""

    start: int
    length: int
    kind: SubclusterType
    host_offset: int | None = None
    compressed: CompressedDescriptor | None = None
    entry_offset: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


def _entry_error(entry_offset: int, message: str) -> CorruptImageError:
    return CorruptImageError(
        f"L2 entry at offset {entry_offset}: {message}", offset=entry_offset, field="l2_entry"
    )


def table_runs(
    geo: Geometry, table: array[int] | None, l2_offset: int, base: int, pos: int, end: int
) -> Iterator[Run]:
    """Runs of ``[pos, end)``, a range inside the L2 span starting at guest ``base``,
    from ``table`` (the decoded L2 table at file offset ``l2_offset``; None when the
    L1 entry is 0). Neighbouring pieces of one kind merge when their host bytes
    continue; compressed clusters never merge. Raises CorruptImageError (with the
    entry's file offset) for an invalid subcluster bitmap, a host cluster offset not
    aligned to the cluster, or a compressed offset with bits above 55."""
    if table is None:
        yield Run(pos, end - pos, SubclusterType.UNALLOCATED_PLAIN)
        return
    bits = geo.cluster_bits
    cs = 1 << bits
    words = geo.l2_entry_words
    extended = geo.extended_l2
    sc_bits = geo.subcluster_bits
    current: Run | None = None
    i = (pos - base) >> bits
    last = (end - 1 - base) >> bits
    while i <= last:
        entry = table[i * words]
        bitmap = table[i * words + 1] if extended else 0
        where = l2_offset + 8 * words * i
        cstart = base + (i << bits)
        ctype = cluster_type(entry, extended_l2=extended)
        host = entry & OFFSET_MASK
        if ctype is ClusterType.COMPRESSED:
            desc = compressed_descriptor(entry, bits)
            if desc.host_offset & HIGH_OFFSET_BITS:
                raise _entry_error(
                    where, f"compressed cluster offset {desc.host_offset:#x} is past 2^56"
                )
            piece = Run(max(pos, cstart), min(end, cstart + cs) - max(pos, cstart),
                        SubclusterType.COMPRESSED, None, desc, where)  # fmt: skip
            if current is not None:
                yield current
            yield piece
            current = None
            i += 1
            continue
        if host & (cs - 1) and ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            raise _entry_error(where, f"host cluster offset {host:#x} is not cluster-aligned")
        for kind, sub_start, sub_end in _cluster_pieces(ctype, bitmap, extended, sc_bits, cs):
            if kind is SubclusterType.INVALID:
                raise _entry_error(
                    where, f"invalid subcluster bitmap {bitmap:#018x} for entry {entry:#x}"
                )
            start = max(pos, cstart + sub_start)
            stop = min(end, cstart + sub_end)
            if start >= stop:
                continue
            h = host + (start - cstart) if kind.has_host_cluster else None
            if (
                current is not None
                and current.kind is kind
                and current.end == start
                and (h is None or current.host_offset == h - current.length)
            ):
                current = Run(current.start, current.length + stop - start, kind,
                              current.host_offset, None, current.entry_offset)  # fmt: skip
            else:
                if current is not None:
                    yield current
                current = Run(start, stop - start, kind, h, None, where)
        i += 1
    if current is not None:
        yield current


def _cluster_pieces(
    ctype: ClusterType, bitmap: int, extended: bool, sc_bits: int, cs: int
) -> Iterator[tuple[SubclusterType, int, int]]:
    """(kind, start, end) byte ranges inside one cluster, merged per kind."""
    if not extended:
        yield _PLAIN_SUBCLUSTER[ctype], 0, cs
        return
    first = subcluster_type(ctype, bitmap, 0, extended_l2=True)
    if (
        first is SubclusterType.INVALID
        or bitmap in (0, SUBCLUSTER_ALLOC_MASK)
        or (bitmap == SUBCLUSTER_ALLOC_MASK << 32)
    ):
        yield first, 0, cs
        return
    run_start = 0
    kind: SubclusterType = first
    for sc in range(1, SUBCLUSTERS_PER_CLUSTER):
        k = subcluster_type(ctype, bitmap, sc, extended_l2=True)
        if k is not kind:
            yield kind, run_start << sc_bits, sc << sc_bits
            kind, run_start = k, sc
    yield kind, run_start << sc_bits, cs


def metadata_clusters(header: Header) -> dict[str, range]:
    """Host cluster indexes of the fixed metadata: the header cluster, the active L1
    table and the refcount table (L2 tables and refcount blocks are found through
    them; the snapshot table's length is only known once it is read)."""
    bits = header.cluster_bits
    cs = header.cluster_size

    def span(offset: int, nbytes: int) -> range:
        return range(offset >> bits, (offset + nbytes + cs - 1) >> bits)

    return {
        "header": range(0, 1),
        "l1_table": span(header.l1_table_offset, 8 * header.l1_size),
        "refcount_table": span(header.refcount_table_offset, header.refcount_table_bytes),
    }


# ==========================================================================================
# Refcounts
# ==========================================================================================


def refcount_block_entries(header: Header) -> int:
    """Refcounts in one refcount block (one cluster)."""
    return (header.cluster_size * 8) >> header.refcount_order


def refcount_location(header: Header, host_offset: int) -> tuple[int, int]:
    """(refcount table index, index in the refcount block) of a host byte's cluster."""
    cluster = host_offset >> header.cluster_bits
    per_block = refcount_block_entries(header)
    return cluster // per_block, cluster % per_block


def refcount_block_offset(table_entry: int) -> int:
    """The refcount block offset of a refcount table entry (0: not allocated)."""
    return table_entry & REFCOUNT_TABLE_OFFSET_MASK


def refcount_entry(block: bytes | memoryview, index: int, refcount_order: int) -> int:
    """Refcount ``index`` of a refcount block's bytes. Widths under a byte are packed
    from the least significant bit; wider ones are big-endian."""
    bits = 1 << refcount_order
    if bits < 8:
        per_byte = 8 // bits
        byte = int(block[index // per_byte])
        return (byte >> (index % per_byte * bits)) & ((1 << bits) - 1)
    width = bits // 8
    return int.from_bytes(block[index * width : (index + 1) * width], "big")


# ==========================================================================================
# Bitmaps (listed, never used: QED has no equivalent)
# ==========================================================================================

BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, then extra data, name, padding
MAX_BITMAP_DIRECTORY = 64 * 1024 * 1024  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
BITMAP_IN_USE = 1 << 0
BITMAP_AUTO = 1 << 1


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One entry of the bitmap directory."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def flag_names(self) -> tuple[str, ...]:
        """QEMU's Qcow2BitmapInfoFlags, in its order."""
        names = []
        if self.flags & BITMAP_IN_USE:
            names.append("in-use")
        if self.flags & BITMAP_AUTO:
            names.append("auto")
        return tuple(names)


def parse_bitmap_directory(buf: bytes, count: int, offset: int) -> tuple[Bitmap, ...]:
    """Decode ``count`` entries of the directory read from file offset ``offset``."""
    out: list[Bitmap] = []
    pos = 0
    for _ in range(count):
        if pos + BITMAP_ENTRY.size > len(buf):
            raise CorruptImageError(
                f"the bitmap directory at offset {offset} is cut off at entry {len(out)}",
                offset=offset + pos,
                field="bitmap_directory",
            )
        table, size, flags, kind, gran, name_size, extra = BITMAP_ENTRY.unpack_from(buf, pos)
        start = pos + BITMAP_ENTRY.size + extra
        if start + name_size > len(buf):
            raise CorruptImageError(
                f"bitmap directory entry at offset {offset + pos} runs past the directory",
                offset=offset + pos,
                field="bitmap_directory",
            )
        name = _decode_name(buf[start : start + name_size])
        out.append(Bitmap(table, size, flags, kind, gran, name))
        pos = (start + name_size + 7) // 8 * 8
    return tuple(out)


# ==========================================================================================
# Snapshots
# ==========================================================================================


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One entry of the snapshot table (enough to list it, or to refuse it)."""

    offset: int  # file offset of the entry
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None  # from the extra data (v3 requires it)
    icount: int | None
    entry_size: int  # bytes, padding included


def snapshot_entry_size(fixed: bytes) -> int:
    """Total size of an entry from its first 40 bytes (padding to 8 included)."""
    _l1, _n, id_size, name_size, _s, _ns, _clock, _vm, extra = SNAPSHOT_HEADER.unpack_from(fixed)
    return int(SNAPSHOT_HEADER.size + extra + id_size + name_size + 7) // 8 * 8


def parse_snapshot(buf: bytes, offset: int) -> Snapshot:
    """Decode the entry in ``buf`` (at least ``snapshot_entry_size`` bytes, read from
    file offset ``offset``). CorruptImageError if the extra data is too large."""
    l1, n, id_size, name_size, sec, nsec, clock, vm, extra = SNAPSHOT_HEADER.unpack_from(buf)
    if extra > MAX_SNAPSHOT_EXTRA_DATA:
        raise CorruptImageError(
            f"snapshot table entry at offset {offset}: {extra} bytes of extra data "
            f"(QEMU's limit is {MAX_SNAPSHOT_EXTRA_DATA})",
            offset=offset,
            field="snapshot_table",
        )
    size = snapshot_entry_size(buf)
    if len(buf) < size:
        raise CorruptImageError(
            f"snapshot table entry at offset {offset} is cut off by the end of the file",
            offset=offset,
            field="snapshot_table",
        )
    pos = SNAPSHOT_HEADER.size
    extra_data = buf[pos : pos + extra]
    disk_size = icount = None
    if len(extra_data) >= 8:
        vm = struct.unpack_from(">Q", extra_data, 0)[0]
    if len(extra_data) >= 16:
        disk_size = struct.unpack_from(">Q", extra_data, 8)[0]
    if len(extra_data) >= 24:
        icount = struct.unpack_from(">Q", extra_data, 16)[0]
    pos += extra
    ident = _decode_name(buf[pos : pos + id_size])
    pos += id_size
    name = _decode_name(buf[pos : pos + name_size])
    return Snapshot(offset, l1, n, ident, name, sec, nsec, clock, vm, disk_size, icount, size)
