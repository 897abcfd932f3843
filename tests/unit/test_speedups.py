"""qedkit/_speedups.c, the optional compiled helpers, and their pure-Python twins
against one contract (tests/unit/test_check_scan.py runs the check's quick scan
with each)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qedtest import require_speedups

from qedkit.engine.check import _mark_clusters_py

MARKED_TWICE = "marked twice"


def _mark_reference(table: bytes, used: bytearray, bits: int) -> tuple[int, int] | str | None:
    """mark_clusters' contract, entry by entry (MARKED_TWICE: a cluster already
    marked, which the compiled loop refuses and the Python twin leaves to the scan's
    final count)."""
    allocated = fragmented = last = 0
    twice = False
    for (entry,) in struct.iter_unpack("<Q", table):
        if entry <= 1:
            continue
        cluster = entry >> bits
        if entry % (1 << bits) or cluster >= len(used):
            return None
        twice = twice or bool(used[cluster])
        used[cluster] = 1
        allocated += 1
        if last and last + (1 << bits) != entry:
            fragmented += 1
        last = entry
    return MARKED_TWICE if twice else (allocated, fragmented)


@settings(max_examples=300, deadline=None)
@given(
    bits=st.sampled_from([12, 16, 21]),
    clusters=st.integers(1, 64),
    entries=st.lists(
        st.one_of(
            st.just(0),
            st.just(1),
            st.integers(0, 70).map(lambda c: ("cluster", c)),
            st.integers(0, 1 << 63),
        ),
        max_size=40,
    ),
    premarked=st.sets(st.integers(0, 63), max_size=4),
)
def test_mark_clusters_keeps_its_contract(
    bits: int, clusters: int, entries: list[Any], premarked: set[int]
) -> None:
    """Both loops: same counts, same marks, same None as the contract entry by entry
    (aligned, misaligned, past the bitmap, marked twice, huge values)."""
    values = [e[1] << bits if isinstance(e, tuple) else e for e in entries]
    table = struct.pack(f"<{len(values)}Q", *values)
    start = bytearray(clusters)
    for c in premarked:
        if c < clusters:
            start[c] = 1
    expected_used = bytearray(start)
    expected = _mark_reference(table, expected_used, bits)
    compiled = require_speedups().mark_clusters
    for mark in (compiled, _mark_clusters_py):
        used = bytearray(start)
        got = mark(table, used, bits)
        if expected == MARKED_TWICE:
            if mark is compiled:
                assert got is None
            else:  # counted: the scan's final count sees fewer marks than made
                assert got is not None and used == expected_used
                assert used.count(1) < start.count(1) + got[0]
            continue
        assert got == expected, mark
        if expected is not None:
            assert used == expected_used, mark


def test_mark_clusters_refuses_what_is_not_a_table() -> None:
    mark = require_speedups().mark_clusters
    with pytest.raises(ValueError, match="8-byte entries"):
        mark(bytes(12), bytearray(4), 16)
    with pytest.raises(ValueError, match="cluster_bits"):
        mark(bytes(8), bytearray(4), 70)
    with pytest.raises(TypeError):
        mark(bytes(8), bytes(4), 16)  # the bitmap must be writable
