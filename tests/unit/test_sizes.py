"""qedkit.format.sizes.parse_size: sizes as qemu-img and qemu-io read them.

Expected values were checked against `qemu-img create -f raw FILE SIZE` (7.2).
"""

from __future__ import annotations

import pytest

from qedkit.format.sizes import parse_size

KiB, MiB, GiB, TiB, PiB, EiB = (1 << s for s in (10, 20, 30, 40, 50, 60))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4096b", 4096),
        ("4096B", 4096),
        ("1k", KiB),
        ("1K", KiB),
        ("4k", 4 * KiB),
        ("1M", MiB),
        ("1m", MiB),
        ("10G", 10 * GiB),
        ("1t", TiB),
        ("1T", TiB),
        ("1P", PiB),
        ("1E", EiB),
        (" 12", 12),
        ("12 ", 12),
    ],
)
def test_decimal_with_binary_suffixes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("0x1000", 4096), ("0X1000", 4096), ("0xffff", 65535), ("0x0", 0)]
)
def test_hex(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1.5k", 1536),
        ("1.5G", 3 * GiB // 2),
        ("0.5M", MiB // 2),
        ("1.3k", 1331),
        ("0.1k", 102),
        ("1.0", 1),
    ],
)
def test_fractions_with_a_suffix(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_fraction_without_suffix_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("1.5")
    assert str(info.value) == "invalid size '1.5': not a whole number of bytes"


def test_hex_with_suffix_is_refused() -> None:
    # QEMU accepts it with a deprecation warning; refusing is deliberate.
    with pytest.raises(ValueError) as info:
        parse_size("0x1000k")
    assert str(info.value) == "invalid size '0x1000k': hex numbers take no suffix"


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "1X", "1KB", "k", "-1", "+1", "1e3", ".5k", "0x", "1 k", "1,5k", "\u0661"],
)
def test_bad_sizes_are_refused_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == (
        f"invalid size {text!r} (use a number with an optional k, M, G or T suffix)"
    )


@pytest.mark.parametrize("text", ["16E", "17179869184G", "0x10000000000000000"])
def test_sizes_that_do_not_fit_in_64_bits_are_refused(text: str) -> None:
    # qemu_strtosz fails with ERANGE above UINT64_MAX; a size that large is never valid.
    with pytest.raises(ValueError):
        parse_size(text)


def test_largest_64_bit_size_is_accepted() -> None:
    assert parse_size("0xffffffffffffffff") == 2**64 - 1
    assert parse_size("15E") == 15 * EiB
