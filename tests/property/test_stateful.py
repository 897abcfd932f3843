"""Random programs of I/O against a real QED image, compared with a bytearray model.

A hypothesis RuleBasedStateMachine (in the manner of zarr-python's
``zarr/testing/stateful.py``) creates a QED image in a fresh temporary directory and
applies the same random operations to it, through the synchronous API, and to
``model``, a bytearray holding what the guest must see:

* write: any offset and length, unaligned, crossing clusters and L2 tables;
* write_zeroes: aligned or not, ``unmap`` True or False;
* discard: advisory, so each byte may read back old or zero, never anything else;
  the model then takes what was read;
* read, flush, a live ``check``, block status and the chain map;
* resize: grow (the new range reads zeros, whatever the backing file holds there);
  shrink, unaligned and too-large sizes are refused and change nothing;
* reopen: close, reopen (sometimes read-only first); ``check`` must find no
  corruption and no leak, and every byte must equal the model;
* repair of the consistent image: finds nothing, changes nothing;
* leak and reclaim: clusters appended to the closed file are leaks, and repair
  truncates them away; later allocations go on from the old end.

Three backing layouts: none; a raw file shorter than the image (zeros past its end,
possibly with holes); a QED image with written data and zero clusters, itself on a raw
file half the time, shorter, as long as or longer than the overlay. Two geometries:
4 KiB clusters with table_size 2 (one L2 table maps 4 MiB, so a few MiB crosses L2
tables) and QEMU's default 64 KiB / 4. When qemu-img is installed, each closed image
must pass ``qemu-img check`` and read back through QEMU equal to the model.

Settings come from the hypothesis profile chosen in tests/property/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import qedkit
from qedkit.engine.base import ExtentKind
from qedkit.engine.l2cache import DEFAULT_BUDGET
from qedkit.errors import InvalidRequestError, QedError, UnsupportedFeatureError
from qedkit.format.geometry import qemu_max_image_size
from qedkit.format.header import Feature, Header

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


@dataclass(frozen=True)
class Layout:
    """An image geometry and the sizes the machine uses with it."""

    cluster_size: int
    table_size: int
    max_initial: int  # largest size at create
    max_size: int  # largest size resize grows to; keeps the file below the size at
    # which qemu-img check reports phantom leaks (about cluster_size - 1 clusters)

    @property
    def l2_span(self) -> int:
        return self.table_size * self.cluster_size // 8 * self.cluster_size


SMALL = Layout(4 * KiB, 2, max_initial=6 * MiB, max_size=12 * MiB)  # an L2 table maps 4 MiB
DEFAULT = Layout(64 * KiB, 4, max_initial=4 * MiB, max_size=16 * MiB)  # QEMU's defaults
LAYOUTS = [SMALL, DEFAULT]
assert SMALL.l2_span == 4 * MiB

MAX_IO = 1 * MiB  # longest single request
PATTERN_PERIOD = 4099  # a prime: the pattern never lines up with sectors or clusters
ZEROS = bytes(MAX_IO + 64 * KiB)


# ---- data helpers ------------------------------------------------------------


def pattern(seed: int, n: int) -> bytes:
    """``n`` bytes of a seeded pattern with no zero byte (so a zero read where data was
    written is always a mismatch) that changes with the position."""
    block = random.Random(seed).randbytes(PATTERN_PERIOD).replace(b"\0", b"\x5a")
    return (block * (n // PATTERN_PERIOD + 1))[:n]


def first_difference(got: bytes, want: bytes) -> int | None:
    if got == want:
        return None
    step = 4096
    common = min(len(got), len(want))
    for start in range(0, common, step):
        stop = min(start + step, common)
        g, w = got[start:stop], want[start:stop]
        if g != w:
            return start + next(i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b)
    return min(len(got), len(want))


def assert_same(got: bytes, want: bytes, base: int, what: str) -> None:
    i = first_difference(got, want)
    if i is not None:
        raise AssertionError(
            f"{what}: first difference at guest offset {base + i} (of [{base}, "
            f"{base + len(want)})): got {got[i : i + 16].hex()} want {want[i : i + 16].hex()}"
        )


def not_old_nor_zero(old: bytes, got: bytes) -> int | None:
    """Index of the first byte of ``got`` that is neither ``old`` there nor zero."""
    if got == old:
        return None
    step = 4096
    for start in range(0, len(got), step):
        g, o = got[start : start + step], old[start : start + step]
        if g == o or g == ZEROS[: len(g)]:
            continue
        for i, (a, b) in enumerate(zip(o, g, strict=True)):
            if b not in (a, 0):
                return start + i
    return None


def read_features(path: str) -> int:
    with open(path, "rb") as f:
        return Header.unpack(f.read(64)).features


# ---- strategies --------------------------------------------------------------


def image_sizes(layout: Layout) -> st.SearchStrategy[int]:
    """Sizes up to max_initial, biased to a few clusters and (when an L2 table maps
    no more than that) to around one L2 span."""
    options = [
        st.just(0),
        st.integers(1, layout.max_initial // SECTOR),
        st.integers(1, 3 * layout.cluster_size // SECTOR),
    ]
    if layout.l2_span < layout.max_initial:
        span = layout.l2_span // SECTOR
        options.append(st.integers(span - 16, span + 16))
    return st.one_of(options).map(lambda sectors: sectors * SECTOR)


def ranges(
    size: int,
    cs: int,
    span: int,
    *,
    hot: Sequence[int] = (),
    aligned: bool = False,
    short: bool = False,
) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) inside ``[0, size)``, biased towards cluster and L2-table
    boundaries, the end of the image and ``hot`` offsets (where earlier operations
    started or ended, so that operations meet: a write into a zeroed cluster, a
    discard of written data). ``aligned``: whole clusters, or from a cluster start
    to the end of the image. ``short``: at most two sectors."""
    if size == 0:
        return st.just((0, 0))
    hot = sorted({h for h in hot if 0 <= h <= size})
    if aligned:
        whole = size // cs
        starts = st.integers(0, whole)
        if hot:
            starts = st.one_of(starts, st.sampled_from(hot).map(lambda h: min(h // cs, whole)))
        return starts.flatmap(
            lambda k: st.one_of(
                st.integers(min(1, whole - k), min(whole - k, 64)).map(lambda m: (k * cs, m * cs)),
                st.just((k * cs, size - k * cs)),
            )
        )

    deltas = st.one_of(st.just(0), st.integers(-3, 3), st.integers(-cs, cs))

    def near(points: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
        return st.builds(lambda p, d: min(max(p + d, 0), size), points, deltas)

    start_options = [
        st.integers(0, size),
        near(st.integers(0, size // cs).map(lambda k: k * cs)),
        st.integers(max(0, size - 2 * cs), size),
    ]
    if size > span:
        start_options.append(near(st.integers(1, size // span).map(lambda k: k * span)))
    if short:
        lengths = st.integers(1, 2 * SECTOR)
    else:
        lengths = st.one_of(
            st.integers(0, 2 * SECTOR),
            st.integers(1, 3 * cs + SECTOR),
            st.sampled_from([cs, 2 * cs, cs - 1, cs + 1]),
            st.integers(0, MAX_IO),
        )
    start = st.one_of(start_options)
    if hot:  # half the time
        start = st.one_of(near(st.sampled_from(hot)), start)
    return st.tuples(start, lengths).map(lambda sl: (sl[0], min(sl[1], size - sl[0])))


seeds = st.integers(0, 2**16)


# ---- the machine -------------------------------------------------------------


class QedImageMachine(RuleBasedStateMachine):
    """One QED image (and its backing chain) in a fresh temporary directory."""

    def __init__(self, backing: str, qemu_img: str | None) -> None:
        super().__init__()
        assert backing in ("none", "raw", "qed")
        self.backing_kind = backing
        self.qemu_img = qemu_img
        self.dir = tempfile.mkdtemp(prefix="qedkit-stateful-")
        self.path = os.path.join(self.dir, "top.qed")
        self.img: qedkit.Image | None = None
        self.model = bytearray()
        self.layout = SMALL
        self.cache_budget = DEFAULT_BUDGET
        self.hot: list[int] = []  # where recent operations started and ended

    # ---- set-up --------------------------------------------------------------

    def _write_raw_backing(self, data: st.DataObject, name: str, length: int) -> bytes:
        """A raw file of ``length`` bytes of pattern data with a few zeroed ranges;
        zeroed 4 KiB blocks are left as holes in the file. Returns its content."""
        content = bytearray(pattern(data.draw(seeds, label="seed"), length))
        holes = data.draw(
            st.lists(st.tuples(st.integers(0, length), st.integers(1, 512 * KiB)), max_size=4),
            label=f"{name} zeroed ranges",
        )
        for start, n in holes:
            content[start : start + n] = bytes(min(n, length - start))
        block = 4 * KiB
        with open(os.path.join(self.dir, name), "wb") as f:
            f.truncate(length)
            for pos in range(0, length, block):
                piece = content[pos : pos + block]
                if piece != ZEROS[: len(piece)]:
                    f.seek(pos)
                    f.write(piece)
        note(f"{name}: {length} bytes, zeroed ranges {holes}")
        return bytes(content)

    def _make_qed_backing(self, data: st.DataObject, size: int) -> bytes:
        """mid.qed, possibly on base.raw, with writes and zero clusters. Returns the
        guest content of mid.qed."""
        layout = data.draw(st.sampled_from(LAYOUTS), label="mid layout")
        # At least as long as the overlay two times in three: growing the overlay must hide
        # what mid.qed holds past the old size.
        # (Lengths are drawn as distances from the interesting case, which hypothesis
        # then favours: it draws small integers more often than large ones.)
        longer = st.integers(0, 2 * MiB // SECTOR).map(lambda d: size + d * SECTOR)
        shorter = st.integers(0, size // SECTOR).map(lambda d: size - d * SECTOR)
        mid_size = data.draw(st.one_of(longer, shorter, longer), label="mid size")
        mid = os.path.join(self.dir, "mid.qed")
        ops = data.draw(
            st.lists(st.sampled_from(["write", "zero-clusters", "zeroes"]), min_size=1, max_size=8),
            label="mid ops",
        )
        if data.draw(st.booleans(), label="mid has a raw backing file"):
            base_len = data.draw(
                st.integers(0, mid_size + 64 * KiB).map(lambda d: mid_size + 64 * KiB - d),
                label="base length",
            )
            base = self._write_raw_backing(data, "base.raw", base_len)
            qedkit.create(
                mid,
                mid_size,
                cluster_size=layout.cluster_size,
                table_size=layout.table_size,
                backing_file="base.raw",
                backing_format="raw",
            )
        else:
            base = b""
            qedkit.create(
                mid, mid_size, cluster_size=layout.cluster_size, table_size=layout.table_size
            )
            if data.draw(st.booleans(), label="mid filled first"):
                ops.insert(0, "fill")
        model = bytearray(base[:mid_size].ljust(mid_size, b"\0"))
        cs, span = layout.cluster_size, layout.l2_span
        with qedkit.open(mid) as img:
            for op in ops:
                if op == "fill":
                    off, n = 0, mid_size
                else:
                    off, n = data.draw(ranges(mid_size, cs, span, aligned=op == "zero-clusters"))
                if op in ("write", "fill"):
                    payload = pattern(data.draw(seeds, label="seed"), n)
                    img.write(off, payload)
                    model[off : off + n] = payload
                else:
                    img.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                note(f"mid.qed: {op} [{off}, {off + n})")
            assert_same(img.read(0, mid_size), bytes(model), 0, "mid.qed after set-up")
        return bytes(model)

    @initialize(data=st.data())
    def create(self, data: st.DataObject) -> None:
        self.layout = layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
        size = data.draw(image_sizes(layout), label="size")
        self.cache_budget = data.draw(st.sampled_from([1, DEFAULT_BUDGET]), label="cache budget")
        backing_file = backing_format = None
        below = b""
        if self.backing_kind == "raw":
            length = data.draw(  # shorter than the image, by as little as one byte
                st.integers(1, size).map(lambda d: size - d) if size else st.just(0),
                label="raw backing length",
            )
            below = self._write_raw_backing(data, "base.raw", length)
            backing_file, backing_format = "base.raw", "raw"
        elif self.backing_kind == "qed":
            below = self._make_qed_backing(data, size)
            backing_file, backing_format = "mid.qed", "qed"
        qedkit.create(
            self.path,
            size,
            cluster_size=layout.cluster_size,
            table_size=layout.table_size,
            backing_file=backing_file,
            backing_format=backing_format,
        )
        note(
            f"top.qed: {size} bytes, cluster_size {layout.cluster_size}, table_size "
            f"{layout.table_size}, backing {backing_file}, cache budget {self.cache_budget}"
        )
        self.model = bytearray(below[:size].ljust(size, b"\0"))
        self.img = qedkit.open(self.path, cache_budget=self.cache_budget)

    # ---- helpers -------------------------------------------------------------

    @property
    def image(self) -> qedkit.Image:
        assert self.img is not None
        return self.img

    @property
    def size(self) -> int:
        return len(self.model)

    def draw_range(
        self, data: st.DataObject, *, aligned: bool = False, short: bool = False
    ) -> tuple[int, int]:
        off, n = data.draw(
            ranges(
                self.size,
                self.layout.cluster_size,
                self.layout.l2_span,
                hot=self.hot,
                aligned=aligned,
                short=short,
            ),
            label="range",
        )
        self.hot = [*self.hot[-14:], off, off + n]
        return off, n

    def assert_matches_model(self, img: qedkit.Image, what: str) -> None:
        assert img.size == self.size, f"{what}: size {img.size}, model {self.size}"
        assert_same(img.read(0, self.size), bytes(self.model), 0, what)

    def assert_clean_check(self, img: qedkit.Image, what: str) -> None:
        report = img.check()
        assert (report.corruptions, report.leaks, report.check_errors) == (0, 0, 0), (
            f"{what}: {report.corruptions} corruptions, {report.leaks} leaks, "
            f"{report.check_errors} check errors: {report.problems[:5]}"
        )

    # ---- rules ---------------------------------------------------------------

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        off, n = self.draw_range(data)
        seed = data.draw(seeds, label="seed")
        note(f"write [{off}, {off + n}) pattern {seed}")
        payload = pattern(seed, n)
        self.image.write(off, payload)
        self.model[off : off + n] = payload

    @rule(data=st.data())
    def write_small(self, data: st.DataObject) -> None:
        """A few bytes to a sector or two: partial clusters, the COW path."""
        off, n = self.draw_range(data, short=True)
        seed = data.draw(seeds, label="seed")
        note(f"write [{off}, {off + n}) pattern {seed}")
        payload = pattern(seed, n)
        self.image.write(off, payload)
        self.model[off : off + n] = payload

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        self._write_zeroes(data, aligned=False, unmap=unmap)

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes_aligned(self, data: st.DataObject, unmap: bool) -> None:
        """Whole clusters: unallocated ones become zero clusters."""
        self._write_zeroes(data, aligned=True, unmap=unmap)

    def _write_zeroes(self, data: st.DataObject, *, aligned: bool, unmap: bool) -> None:
        off, n = self.draw_range(data, aligned=aligned)
        note(f"write_zeroes [{off}, {off + n}) unmap={unmap}")
        self.image.write_zeroes(off, n, unmap=unmap)
        self.model[off : off + n] = bytes(n)
        # Whole clusters read zeros without falling through to the backing file:
        # none of them may be left unallocated.
        cs = self.layout.cluster_size
        first = -(-off // cs) * cs
        last = (off + n) // cs * cs
        if last > first:
            for ext in self.image.block_status(first, last - first):
                assert ext.kind is not ExtentKind.UNALLOCATED, (
                    f"write_zeroes left whole clusters unallocated: {ext}"
                )

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self.draw_range(data)
        note(f"discard [{off}, {off + n})")
        cs = self.layout.cluster_size
        lo, hi = max(0, off - cs), min(self.size, off + n + cs)
        before = bytes(self.model[lo:hi])
        self.image.discard(off, n)
        got = self.image.read(lo, hi - lo)
        inner = slice(off - lo, off - lo + n)
        assert_same(got[: off - lo], before[: off - lo], lo, "before a discarded range")
        assert_same(got[inner.stop :], before[inner.stop :], off + n, "after a discarded range")
        bad = not_old_nor_zero(before[inner], got[inner])
        assert bad is None, (
            f"discard [{off}, {off + n}): byte at {off + bad} reads {got[off - lo + bad]:#x}, "
            f"neither the old {before[off - lo + bad]:#x} nor zero"
        )
        self.model[off : off + n] = got[inner]

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        off, n = self.draw_range(data)
        assert_same(self.image.read(off, n), bytes(self.model[off : off + n]), off, "read")

    @rule()
    def flush(self) -> None:
        self.image.flush()
        # Flush with no allocation in flight leaves the metadata whole: not dirty.
        assert not read_features(self.path) & Feature.NEED_CHECK, "NEED_CHECK set after flush"

    @rule()
    def check_live(self) -> None:
        self.assert_clean_check(self.image, "check of the open image")

    @rule(data=st.data())
    def block_status_and_map(self, data: st.DataObject) -> None:
        off, n = self.draw_range(data)
        extents = self.image.block_status(off, n)
        pos = off
        for ext in extents:
            assert ext.start == pos and ext.length > 0, f"extents do not tile the range: {extents}"
            if ext.kind is ExtentKind.ZERO or (
                ext.kind is ExtentKind.UNALLOCATED and self.backing_kind == "none"
            ):
                assert_same(
                    bytes(self.model[ext.start : ext.end]),
                    ZEROS[: ext.length],
                    ext.start,
                    f"a {ext.kind.value} extent",
                )
            pos = ext.end
        assert pos == off + n, f"extents end at {pos}, not {off + n}"
        pos = off
        for entry in self.image.map(off, n):
            assert entry.start == pos and entry.length > 0, "map entries do not tile the range"
            if entry.zero or not entry.present:
                assert_same(
                    bytes(self.model[entry.start : entry.end]),
                    ZEROS[: entry.length],
                    entry.start,
                    f"map entry {entry.as_qemu_dict()}",
                )
            pos = entry.end
        assert pos == off + n

    @precondition(lambda self: self.size < self.layout.max_size)
    @rule(data=st.data())
    def resize_grow(self, data: st.DataObject) -> None:
        room = (self.layout.max_size - self.size) // SECTOR
        cs_sectors = self.layout.cluster_size // SECTOR
        grow = data.draw(
            st.one_of(
                st.integers(1, min(room, 8)),
                st.integers(1, min(room, 3 * cs_sectors)),
                st.integers(1, room),
            ),
            label="grow by sectors",
        )
        new = self.size + grow * SECTOR
        note(f"resize {self.size} -> {new}")
        self.image.resize(new)
        self.model.extend(bytes(new - self.size))

    @rule(data=st.data())
    def resize_refused(self, data: st.DataObject) -> None:
        """Shrinking, sizes that are not a multiple of 512 and sizes above the
        geometry's limit are refused, and leave the image as it was."""
        size = self.size
        limit = qemu_max_image_size(self.layout.cluster_size, self.layout.table_size)
        cases: list[st.SearchStrategy[tuple[int, type[QedError]]]] = [
            st.integers(size + 1, size + 4 * self.layout.cluster_size)
            .filter(lambda s: s % SECTOR)
            .map(lambda s: (s, InvalidRequestError)),
            st.integers(limit + 1, limit + 4 * SECTOR).map(lambda s: (s, InvalidRequestError)),
        ]
        if size:
            cases.append(st.integers(0, size - 1).map(lambda s: (s, UnsupportedFeatureError)))
        new, error = data.draw(st.one_of(cases), label="refused size")
        note(f"resize {size} -> {new} (must raise {error.__name__})")
        with pytest.raises(error):
            self.image.resize(new)
        assert self.image.size == size
        tail = max(0, size - 2 * self.layout.cluster_size)
        assert_same(
            self.image.read(tail, size - tail),
            bytes(self.model[tail:]),
            tail,
            "the end of the image after a refused resize",
        )

    @rule(readonly_first=st.booleans())
    def reopen(self, readonly_first: bool) -> None:
        self.image.close()
        self.img = None
        assert not read_features(self.path) & Feature.NEED_CHECK, "NEED_CHECK set after close"
        if readonly_first:
            with qedkit.open(self.path, readonly=True) as ro:
                self.assert_clean_check(ro, "check after close (read-only open)")
                self.assert_matches_model(ro, "read-only reopen")
        self.img = qedkit.open(self.path, cache_budget=self.cache_budget)
        self.assert_clean_check(self.image, "check after reopen")
        self.assert_matches_model(self.image, "after reopen")

    @rule(mode=st.sampled_from(["leaks", "all"]))
    def repair_consistent_image(self, mode: str) -> None:
        """Repair finds nothing to do on a consistent image and changes no byte."""
        report = self.image.check(mode)
        found = (report.corruptions, report.corruptions_fixed, report.leaks, report.leaks_fixed)
        assert found == (0, 0, 0, 0), f"check({mode!r}) on a consistent image: {report}"
        self.assert_matches_model(self.image, f"after check({mode!r})")

    @rule(data=st.data())
    def leak_and_reclaim(self, data: st.DataObject) -> None:
        """Clusters left past the end of the file (as by a crash after an allocation)
        are leaks; repair truncates them away and later allocations go on from there."""
        self.image.close()
        self.img = None
        cs = self.layout.cluster_size
        clusters = data.draw(st.integers(1, 4), label="leaked clusters")
        partial = data.draw(st.sampled_from([0, 1, cs // 2, cs - 1]), label="extra bytes")
        size_before = os.path.getsize(self.path)
        assert size_before % cs == 0, f"file of {size_before} bytes ends inside a cluster"
        with open(self.path, "ab") as f:
            f.write(pattern(clusters, clusters * cs + partial))
        note(f"appended {clusters} clusters and {partial} bytes to the file")
        self.img = qedkit.open(self.path, cache_budget=self.cache_budget)
        report = self.image.check()
        assert (report.corruptions, report.leaks) == (0, clusters), f"after appending: {report}"
        report = self.image.check(data.draw(st.sampled_from(["leaks", "all"]), label="mode"))
        assert (report.corruptions, report.leaks_fixed) == (0, clusters), f"repair: {report}"
        assert os.path.getsize(self.path) == size_before
        self.assert_clean_check(self.image, "check after reclaiming leaks")
        self.assert_matches_model(self.image, "after reclaiming leaks")

    @invariant()
    def size_agrees(self) -> None:
        if self.img is not None:
            assert self.img.size == self.size, f"image size {self.img.size}, model {self.size}"

    # ---- teardown ------------------------------------------------------------

    def teardown(self) -> None:
        failing = sys.exc_info()[0] is not None  # a step failed: only clean up
        try:
            if self.img is not None:
                img, self.img = self.img, None
                if failing:  # the step's error is the one to report
                    with contextlib.suppress(Exception):
                        img.close()
                else:
                    img.close()
            if not failing and self.qemu_img and os.path.exists(self.path):
                self.qemu_oracle()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def qemu_oracle(self) -> None:
        """The closed image passes qemu-img check and QEMU reads the model's bytes."""
        assert self.qemu_img is not None
        proc = subprocess.run(
            [self.qemu_img, "check", "-f", "qed", self.path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (
            f"qemu-img check: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
        out = os.path.join(self.dir, "qemu-view.raw")
        proc = subprocess.run(
            [self.qemu_img, "convert", "-f", "qed", "-O", "raw", self.path, out],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"qemu-img convert: rc {proc.returncode}\n{proc.stderr}"
        with open(out, "rb") as f:
            seen = f.read()
        assert_same(seen, bytes(self.model), 0, "the image as QEMU reads it")


@pytest.mark.parametrize("backing", ["none", "raw", "qed"])
def test_image_behaves_like_a_bytearray(backing: str, qemu_img: str | None) -> None:
    run_state_machine_as_test(
        lambda: QedImageMachine(backing, qemu_img),  # type: ignore[arg-type] # any factory works
        settings=settings.get_profile("qedkit-property"),  # fast or thorough (conftest)
    )
