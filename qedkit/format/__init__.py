"""The pure QED format core: bytes in, values out.

Nothing in this package does I/O or imports os, io, asyncio, time or logging; a test
enforces it. The engine reads bytes and hands them here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Which submodule defines each name: the names are loaded on first use, so that
# importing one submodule (format.geometry, as most of qedkit does) does not load
# the others (format.qcow2 alone is ~8 ms of start-up).
_WHERE = {
    "DEFAULT_CLUSTER_SIZE": "geometry",
    "DEFAULT_TABLE_SIZE": "geometry",
    "MAX_CLUSTER_SIZE": "geometry",
    "MAX_TABLE_SIZE": "geometry",
    "MIN_CLUSTER_SIZE": "geometry",
    "MIN_TABLE_SIZE": "geometry",
    "Geometry": "geometry",
    "max_image_size": "geometry",
    "qemu_max_image_size": "geometry",
    "HEADER_SIZE_BYTES": "header",
    "KNOWN_FEATURES": "header",
    "MAGIC": "header",
    "Feature": "header",
    "Header": "header",
    "probe_format": "probe",
    "L2_UNALLOCATED": "tables",
    "L2_ZERO_CLUSTER": "tables",
    "pack_table": "tables",
    "unpack_table": "tables",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "DEFAULT_TABLE_SIZE",
    "HEADER_SIZE_BYTES",
    "KNOWN_FEATURES",
    "L2_UNALLOCATED",
    "L2_ZERO_CLUSTER",
    "MAGIC",
    "MAX_CLUSTER_SIZE",
    "MAX_TABLE_SIZE",
    "MIN_CLUSTER_SIZE",
    "MIN_TABLE_SIZE",
    "Feature",
    "Geometry",
    "Header",
    "max_image_size",
    "pack_table",
    "probe_format",
    "qemu_max_image_size",
    "unpack_table",
]
