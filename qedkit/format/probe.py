"""Image format probing from the first bytes of a file.

References: QEMU block/qed.c (bdrv_qed_probe), block/qcow2.c (qcow2_probe), block/raw-format.c.

QEMU's probes are weak: QED needs only the 4-byte magic, so raw data that happens to
begin with ``QED\\0`` probes as QED. That is why a raw backing file is recorded with
the BACKING_FORMAT_NO_PROBE bit and never probed.
"""

from __future__ import annotations

from .header import MAGIC as QED_MAGIC

# qcow2 spec: "QFI\xfb" (format.qcow2.MAGIC; a unit test keeps them equal). Spelled out
# here so that probing, done on every open, does not import the qcow2 module.
QCOW2_MAGIC = b"QFI\xfb"

PROBE_BYTES = 512  # what a probe needs to see; QEMU probes with the first 2 KiB

FORMATS = ("qed", "raw", "qcow2", "qcow")


def probe_format(first_bytes: bytes) -> str:
    """'qed', 'qcow2', 'qcow' or 'raw' (the fallback, as in QEMU). As in QEMU, the
    qcow magic with version 1 is the old qcow format (which qedkit does not read),
    with a version of 2 or more it is qcow2."""
    if first_bytes[:4] == QED_MAGIC and len(first_bytes) >= 64:
        return "qed"
    if first_bytes[:4] == QCOW2_MAGIC and len(first_bytes) >= 8:
        version = int.from_bytes(first_bytes[4:8], "big")
        if version >= 2:
            return "qcow2"
        if version == 1:
            return "qcow"
    return "raw"
