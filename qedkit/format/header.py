"""The QED header: parse, validate and pack.

References: qed_spec "Header"; QEMU block/qed.c (bdrv_qed_do_open, qed_header_le_to_cpu).

Layout (64 bytes at file offset 0, all integers little-endian)::

    off size field                     rule
      0    4 magic                     "QED\\0"
      4    4 cluster_size              power of two, 4 KiB .. 64 MiB
      8    4 table_size                power of two, 1 .. 16 (clusters per table)
     12    4 header_size               clusters of header area, >= 1
     16    8 features                  incompatible bits: unknown -> refuse to open
     24    8 compat_features           compatible bits: unknown -> ignore
     32    8 autoclear_features        unknown bits are cleared on read-write open
     40    8 l1_table_offset           a valid table offset (whole L1 inside the file)
     48    8 image_size                multiple of 512, <= max for the geometry
     56    4 backing_filename_offset   the name lies inside the header clusters
     60    4 backing_filename_size     bytes, no terminator

Bytes 64 .. header_size * cluster_size belong to the header area (QEMU stores the
backing file name at 64). Rewrites touch only the 64-byte struct, so anything a
newer writer keeps there survives.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from ..errors import CorruptImageError, FormatError, UnsupportedFeatureError
from .geometry import (
    MAX_CLUSTER_SIZE,
    MAX_TABLE_SIZE,
    MIN_CLUSTER_SIZE,
    MIN_TABLE_SIZE,
    SECTOR_SIZE,
    U32_MAX,
    Geometry,
    is_valid_cluster_size,
    is_valid_table_size,
    max_image_size,
)

MAGIC = b"QED\x00"
HEADER_STRUCT = struct.Struct("<4sIIIQQQQQII")
HEADER_SIZE_BYTES = HEADER_STRUCT.size  # 64
# QEMU reads the backing name into a PATH_MAX buffer and refuses names of 4096 bytes
# or more; we read longer names, but never write them.
QEMU_MAX_BACKING_NAME = 4095


class Feature(enum.IntFlag):
    """Bits of the ``features`` word (incompatible features)."""

    BACKING_FILE = 0x01
    NEED_CHECK = 0x02
    BACKING_FORMAT_NO_PROBE = 0x04


# A plain int: the complement of an IntFlag stays inside the flag's own bits.
KNOWN_FEATURES = int(Feature.BACKING_FILE | Feature.NEED_CHECK | Feature.BACKING_FORMAT_NO_PROBE)


class AutoclearFeature(enum.IntFlag):
    """Bits of ``autoclear_features`` defined by qedkit (the spec defines none).

    An autoclear bit is a promise that holds only while every writer knows the bit:
    QEMU clears bits it does not know whenever it opens the image read-write, so a
    hint stored here can never outlive an image QEMU modified.

    HOME_ALLOCATION: allocate a new data cluster at its home position (guest offset
    plus the data area's start) when that slot is free, instead of at the end of the
    file, so that the image stays laid out like a raw file. QEMU ignores it (and
    clears it when it writes), which is right: its own allocations do not follow it.
    """

    HOME_ALLOCATION = 0x01


KNOWN_AUTOCLEAR = int(AutoclearFeature.HOME_ALLOCATION)

# Byte offsets of the fields, for error messages and in-place patches.
FIELD_OFFSETS = {
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


def _bad(field: str, message: str) -> CorruptImageError:
    return CorruptImageError(
        f"invalid {field} {message} (header offset {FIELD_OFFSETS[field]})",
        offset=FIELD_OFFSETS[field],
        field=field,
    )


@dataclass(frozen=True, slots=True)
class Header:
    """A QED header. ``parse`` validates; the constructor does not (tests build bad ones)."""

    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int = 0
    backing_filename_size: int = 0

    # ---- derived -------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_size, self.table_size, self.header_size)

    @property
    def data_start(self) -> int:
        """Where the data area begins: the first whole cluster past the header area
        and the L1 table (QEMU's layout puts the L1 right after a one-cluster header,
        so this is ``(1 + table_size) * cluster_size``)."""
        geo = self.geometry
        return geo.round_up(max(geo.header_bytes, self.l1_table_offset + geo.table_bytes))

    def has(self, feature: Feature) -> bool:
        # int(): ``int & IntFlag`` goes through the enum's Python-level __rand__
        # (~1 us), and allocating writes ask this several times each.
        return (int(self.features) & int(feature)) != 0

    @property
    def has_backing_file(self) -> bool:
        """True when a (non-empty) backing file name is recorded. An empty name with the
        bit set means no backing file, as in QEMU."""
        return self.has(Feature.BACKING_FILE) and self.backing_filename_size > 0

    @property
    def needs_check(self) -> bool:
        return self.has(Feature.NEED_CHECK)

    def with_features(self, set_: int = 0, clear: int = 0) -> Header:
        return replace(self, features=int((self.features | set_) & ~clear))

    # ---- bytes ---------------------------------------------------------------

    def pack(self) -> bytes:
        """The 64-byte on-disk struct."""
        return HEADER_STRUCT.pack(
            MAGIC,
            self.cluster_size,
            self.table_size,
            self.header_size,
            self.features,
            self.compat_features,
            self.autoclear_features,
            self.l1_table_offset,
            self.image_size,
            self.backing_filename_offset,
            self.backing_filename_size,
        )

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        """Decode without validating anything but the length and the magic."""
        if len(buf) < HEADER_SIZE_BYTES:
            raise FormatError(
                f"file is too short for a QED header ({len(buf)} bytes, need {HEADER_SIZE_BYTES})",
                offset=0,
                field="magic",
            )
        magic, *fields = HEADER_STRUCT.unpack_from(buf)
        if magic != MAGIC:
            raise FormatError(
                f"not a QED image: magic is {magic!r} at offset 0, expected {MAGIC!r}",
                offset=0,
                field="magic",
            )
        return cls(*fields)

    @classmethod
    def parse(cls, buf: bytes, file_size: int) -> Header:
        """Decode and validate a header read from a file of ``file_size`` bytes.

        Checks run in QEMU's order, so the first problem reported is the one QEMU
        reports. Raises FormatError (not QED at all), UnsupportedFeatureError
        (unknown incompatible feature) or CorruptImageError (a field out of range).
        """
        header = cls.unpack(buf)
        header.validate(file_size)
        return header

    def validate(self, file_size: int) -> None:
        """Raise if any field is invalid for a file of ``file_size`` bytes."""
        unknown = self.features & ~KNOWN_FEATURES
        if unknown:
            raise UnsupportedFeatureError(
                f"unsupported QED feature bits {unknown:#x} in features "
                f"(header offset {FIELD_OFFSETS['features']})",
                offset=FIELD_OFFSETS["features"],
                field="features",
            )
        if not is_valid_cluster_size(self.cluster_size):
            raise _bad(
                "cluster_size",
                f"{self.cluster_size}: must be a power of two from "
                f"{MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}",
            )
        if not is_valid_table_size(self.table_size):
            raise _bad(
                "table_size",
                f"{self.table_size}: must be a power of two from "
                f"{MIN_TABLE_SIZE} to {MAX_TABLE_SIZE}",
            )
        limit = max_image_size(self.cluster_size, self.table_size)
        if self.image_size % SECTOR_SIZE:
            raise _bad("image_size", f"{self.image_size}: must be a multiple of {SECTOR_SIZE}")
        if self.image_size > limit:
            raise _bad(
                "image_size",
                f"{self.image_size}: exceeds the maximum {limit} for cluster_size "
                f"{self.cluster_size} and table_size {self.table_size}",
            )
        geo = self.geometry
        file_end = file_size - file_size % self.cluster_size
        if not geo.is_valid_table_offset(self.l1_table_offset, file_end):
            raise _bad(
                "l1_table_offset", f"{self.l1_table_offset:#x}: {self._table_problem(file_end)}"
            )
        if self.header_size < 1 or self.header_size * self.cluster_size > U32_MAX:
            raise _bad(
                "header_size",
                f"{self.header_size}: must be at least 1 cluster and at most "
                f"{U32_MAX} bytes in all",
            )
        if self.has(Feature.BACKING_FILE):
            end = self.backing_filename_offset + self.backing_filename_size
            if end > geo.header_bytes:
                raise _bad(
                    "backing_filename_offset",
                    f"{self.backing_filename_offset}: the backing file name "
                    f"({self.backing_filename_size} bytes) ends at {end}, outside the "
                    f"{geo.header_bytes}-byte header area",
                )

    def _table_problem(self, file_end: int) -> str:
        geo = self.geometry
        off = self.l1_table_offset
        if off % self.cluster_size:
            return f"not aligned to the cluster size {self.cluster_size}"
        if off < geo.header_bytes:
            return f"inside the {geo.header_bytes}-byte header area"
        return (
            f"the {geo.table_bytes}-byte L1 table does not fit in the file "
            f"({file_end} bytes in whole clusters)"
        )

    # ---- backing file name ---------------------------------------------------

    def backing_filename(self, header_area: bytes) -> str | None:
        """The backing file name, decoded from the header area (bytes 0 .. header end).
        None when there is no backing file. Undecodable bytes survive as surrogates."""
        if not self.has_backing_file:
            return None
        raw = header_area[
            self.backing_filename_offset : self.backing_filename_offset + self.backing_filename_size
        ]
        return raw.decode("utf-8", "surrogateescape")


def encode_backing_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")
