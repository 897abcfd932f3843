"""Sizes as qemu-img and qemu-io read them: 4096, 4k, 1.5G, 0x1000 (suffixes binary)."""

from __future__ import annotations

import re

_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE = re.compile(r"^(?:(0x[0-9a-f]+)|(\d+(?:\.\d+)?))([bkmgtpe]?)$", re.IGNORECASE)


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
        return int(hex_part, 16)
    if "." in dec_part:
        value = float(dec_part) * (1 << shift)
        if value != int(value) and shift == 0:
            raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
        return int(value)
    return int(dec_part) << shift
