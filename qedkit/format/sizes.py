"""Sizes as qemu-img and qemu-io read them: 4096, 4k, 1.5G, 0x1000 (suffixes binary).

References: qemu-img(1) "size" notes; QEMU util/cutils.c (qemu_strtosz).

Unlike qemu-img 7.2, a hex number with a suffix (0x10k) is refused: QEMU accepts it
with a deprecation warning and plans to drop it."""

from __future__ import annotations

import re

_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE = re.compile(r"^(?:(0x[0-9a-f]+)|(\d+(?:\.\d+)?))([bkmgtpe]?)$", re.IGNORECASE | re.ASCII)
MAX_SIZE = 2**64 - 1  # QEMU parses sizes into a uint64_t


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError naming the text if it is not a size."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(
            f"invalid size {text!r} (use a number with an optional k, M, G or T suffix)"
        )
    hex_part, dec_part, suffix = match.groups()
    shift = _SUFFIXES[suffix.lower()]
    if hex_part:
        if suffix and suffix.lower() != "b":
            raise ValueError(f"invalid size {text!r}: hex numbers take no suffix")
        value = int(hex_part, 16)
    elif "." in dec_part:
        scaled = float(dec_part) * (1 << shift)
        if scaled != int(scaled) and shift == 0:
            raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
        value = int(scaled)
    else:
        value = int(dec_part) << shift
    if value > MAX_SIZE:
        raise ValueError(f"invalid size {text!r}: larger than 2^64 - 1 bytes")
    return value
