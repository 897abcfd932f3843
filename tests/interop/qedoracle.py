"""Helpers for the interop tests: QEMU (qemu-img, qemu-io) is the oracle.

Three kinds of helper live here:

* **The expected disk.** ``Expected`` is a sparse raw file holding the bytes the guest
  must see. Tests write the same bytes to it and to the QED image (``Shadow`` does both
  at once), then ask QEMU whether the image reads the same (``qemu-img compare``,
  ``qemu-io read -P``).
* **The judges.** ``Judge`` runs qemu-img/qemu-io and the ``qed`` command and asserts:
  a clean ``qemu-img check``, an identical ``qemu-img compare``, pattern reads, and
  output parity between ``qed X`` and ``qemu-img X``.
* **An independent look at the bytes.** ``Layout`` parses a QED file with ``struct``
  alone (no qedkit code), to poke corruptions into it and to prove facts about it
  (every cluster referenced, header bits) without trusting the code under test.

QEMU 7.2 bugs the oracle steps around (see the fact sheet §2.12, and the last one
observed while writing these tests):

* table_size 1 images cannot be opened (never ask QEMU about them);
* check reports phantom leaks once a file holds >= cluster_size - 1 clusters;
* an allocating write of >= cluster_size - 1 clusters in one L2 table corrupts the image
  (never let QEMU write large single requests);
* a partial write into a zero cluster over a backing file copies backing data (never
  let QEMU do that);
* **block status aborts** (``bdrv_co_block_status`` assertion, SIGABRT) on images
  whose L2 tables map more than 4 GiB: ``qed_find_cluster`` computes
  ``n * cluster_size`` in 32 bits, so a run of clusters worth a multiple of 4 GiB
  yields a length of 0. Reproduce: ``qemu-img create -f qed -o
  cluster_size=65536,table_size=16 t.qed 8G; qemu-io -c 'write 0 4k' t.qed;
  qemu-img map t.qed``. ``qemu-img map/compare/convert`` all use block status, so they
  are only asked about images where no run can get that long (``block_status_safe``);
  reads (``qemu-io read``) go through a path with short requests and are safe.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import qedkit

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

CLUSTER_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 2 * MiB)
TABLE_SIZES = (2, 4, 8, 16)

# Images up to this size are verified byte for byte; larger ones in windows around
# their data (a sparse 4 TiB image cannot be read whole).
FULL_READ_LIMIT = 64 * MiB
# Longest single qemu-io read (qemu-io allocates a buffer of the request's length).
MAX_READ_CHUNK = 16 * MiB


def human_size(n: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def qemu_max_size(cluster_size: int, table_size: int) -> int:
    """QEMU's maximum image size, computed in u64 as QEMU does (0 when it wraps)."""
    entries = table_size * cluster_size // 8
    return (entries * entries * cluster_size) & (2**64 - 1)


def l2_span(cluster_size: int, table_size: int) -> int:
    """Guest bytes mapped by one L2 table."""
    return table_size * cluster_size // 8 * cluster_size


def geometry_params() -> list[Any]:
    """(cluster_size, table_size) pairs QEMU can handle, as pytest params."""
    out = []
    for cs in CLUSTER_SIZES:
        for ts in TABLE_SIZES:
            if qemu_max_size(cs, ts) == 0:  # 2 MiB with table_size 16 wraps to 0
                continue
            out.append(pytest.param(cs, ts, id=f"c{human_size(cs)}-t{ts}"))
    return out


GEOMETRIES = geometry_params()


def block_status_safe(size: int, cluster_size: int, table_size: int) -> bool:
    """True when QEMU 7.2's block status (map, compare, convert) cannot abort on an
    image of this geometry and size: no run inside one L2 table can reach 4 GiB, either
    because one table maps at most 4 GiB (and our images never fill a whole table with
    one kind of entry) or because the image is smaller than 3 GiB."""
    return l2_span(cluster_size, table_size) <= 4 * GiB or size <= 3 * GiB


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


# =====================================================================================
# the expected disk
# =====================================================================================


def _data_regions(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the non-hole parts of ``[start, end)`` of a file."""
    out = []
    pos = start
    file_end = os.fstat(fd).st_size
    end_in_file = min(end, file_end)
    while pos < end_in_file:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= end_in_file:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end_in_file)
        out.append((data, hole - data))
        pos = hole
    return out


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge (start, end) ranges."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


_OTHER_BYTE = [re.compile(b"[^" + re.escape(bytes([b])) + b"]") for b in range(256)]


class RawRef:
    """A raw file seen as a guest disk of ``size`` bytes (zeros past its end)."""

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = Path(path)
        self.size = os.path.getsize(self.path) if size is None else size

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        return data + bytes(length - len(data))

    def data_regions(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        end = self.size if end is None else end
        with open(self.path, "rb") as f:
            return _data_regions(f.fileno(), start, end)

    def runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Constant-byte runs (offset, length, byte) covering ``[start, end)``."""
        out: list[tuple[int, int, int]] = []

        def add(off: int, length: int, byte: int) -> None:
            if out and out[-1][2] == byte and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + length, byte)
            else:
                out.append((off, length, byte))

        pos = start
        for off, length in self.data_regions(start, end):
            if off > pos:
                add(pos, off - pos, 0)
            data = self.read(off, length)
            i = 0
            while i < length:
                byte = data[i]
                other = _OTHER_BYTE[byte].search(data, i)
                j = other.start() if other else length
                add(off + i, j - i, byte)
                i = j
            pos = off + length
        if pos < end:
            add(pos, end - pos, 0)
        return out

    def windows(self, cluster_size: int) -> list[tuple[int, int]]:
        """Ranges worth reading: everything for small disks, else the data regions
        widened by a cluster on each side, plus the first and last clusters."""
        if self.size <= FULL_READ_LIMIT:
            return [(0, self.size)]
        ranges = [
            (0, min(self.size, 2 * cluster_size)),
            (max(0, self.size - 2 * cluster_size), self.size),
        ]
        for off, length in self.data_regions():
            ranges.append((max(0, off - cluster_size), min(self.size, off + length + cluster_size)))
        return _merge(ranges)


class Expected(RawRef):
    """A sparse raw file the tests keep in step with an image: the guest's truth."""

    def __init__(self, path: Path, size: int, base: RawRef | Path | None = None) -> None:
        path = Path(path)
        with open(path, "wb") as f:
            f.truncate(size)
        super().__init__(path, size)
        if base is not None:
            src = base if isinstance(base, RawRef) else RawRef(Path(base))
            limit = min(size, src.size)
            for off, length in src.data_regions(0, limit):
                for pos in range(off, off + length, 4 * MiB):
                    n = min(4 * MiB, off + length - pos)
                    self.write(pos, src.read(pos, n))

    def write(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= self.size, (offset, len(data), self.size)
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), data, offset)

    def zero(self, offset: int, length: int) -> None:
        for pos in range(offset, offset + length, 4 * MiB):
            self.write(pos, bytes(min(4 * MiB, offset + length - pos)))

    def resize(self, size: int) -> None:
        assert size >= self.size
        with open(self.path, "r+b") as f:
            f.truncate(size)
        self.size = size


class Shadow:
    """An open qedkit image and its Expected twin; every change goes to both."""

    def __init__(self, image: qedkit.Image, expected: Expected) -> None:
        self.image = image
        self.expected = expected
        assert image.size == expected.size

    @classmethod
    def create(
        cls,
        path: Path,
        size: int,
        *,
        cluster_size: int = 64 * KiB,
        table_size: int = 4,
        backing: Path | None = None,
        backing_name: str | None = None,
        backing_format: str | None = None,
        backing_expected: RawRef | None = None,
    ) -> Shadow:
        """Create ``path`` with qedkit and open it. ``backing_name`` (default: the
        backing path relative to the image's directory) is stored in the header;
        ``backing_expected`` is what the backing chain reads as (default: the backing
        file itself, for raw backing files)."""
        name = None
        if backing is not None:
            name = backing_name or os.path.relpath(backing, Path(path).parent)
            backing_format = backing_format or ("raw" if backing.suffix == ".raw" else "qed")
            if backing_expected is None:
                assert backing_format == "raw", "give the expected bytes of a qed backing file"
                backing_expected = RawRef(backing)
        qedkit.create(
            str(path),
            size,
            cluster_size=cluster_size,
            table_size=table_size,
            backing_file=name,
            backing_format=backing_format,
        )
        expected = Expected(Path(str(path) + ".expected.raw"), size, base=backing_expected)
        return cls(qedkit.open(str(path)), expected)

    @classmethod
    def reopen(cls, path: Path, expected: Expected) -> Shadow:
        return cls(qedkit.open(str(path)), expected)

    @property
    def size(self) -> int:
        return self.image.size

    def write(self, offset: int, length: int, byte: int) -> None:
        data = pattern(byte, length)
        self.image.write(offset, data)
        self.expected.write(offset, data)

    def write_bytes(self, offset: int, data: bytes) -> None:
        self.image.write(offset, data)
        self.expected.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.image.write_zeroes(offset, length)
        self.expected.zero(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Discard is advisory: afterwards every byte of the range reads either as it
        did or as zero (never backing data), a whole cluster at a time. Learn which
        from qedkit and hold it to that; QEMU then judges the result."""
        cs = self.image.cluster_size or 512
        before = self.expected.read(offset, length)
        self.image.discard(offset, length)
        after = self.image.read(offset, length)
        if after == before:
            return
        start = offset
        while start < offset + length:
            end = min(offset + length, (start // cs + 1) * cs)
            got = after[start - offset : end - offset]
            old = before[start - offset : end - offset]
            assert got in (old, bytes(len(got))), (
                f"discard of [{offset}, {offset + length}) left bytes at {start} that are "
                "neither the old data nor zeros"
            )
            if got != old:
                # only whole clusters inside the range may change
                assert (start % cs == 0 and end % cs == 0) or end == self.size, (
                    f"discard changed a partial cluster at {start}"
                )
            start = end
        self.expected.write(offset, after)

    def resize(self, new_size: int) -> None:
        self.image.resize(new_size)
        self.expected.resize(new_size)

    def read_check(self, offset: int, length: int) -> None:
        """qedkit reads the same as the expected disk."""
        assert self.image.read(offset, length) == self.expected.read(offset, length)

    def close(self) -> None:
        self.image.close()


# =====================================================================================
# an independent parser (struct only)
# =====================================================================================

HEADER = struct.Struct("<4sIIIQQQQQII")


@dataclass
class Layout:
    """A QED file's header and tables, read without qedkit."""

    path: Path
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    @classmethod
    def read(cls, path: Path) -> Layout:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        fields = HEADER.unpack(raw)
        assert fields[0] == b"QED\0", f"{path} is not a QED file"
        return cls(Path(path), *fields[1:])

    @property
    def entries(self) -> int:
        return self.table_size * self.cluster_size // 8

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    def table(self, offset: int) -> list[int]:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), self.table_bytes, offset)
        assert len(data) == self.table_bytes, f"table at {offset:#x} is cut by EOF"
        return list(struct.unpack(f"<{self.entries}Q", data))

    def l1(self) -> list[int]:
        return self.table(self.l1_table_offset)

    def l2_offset(self, l1_index: int) -> int:
        return self.l1()[l1_index]

    def l2_entry_offset(self, l1_index: int, l2_index: int) -> int:
        """File offset of one L2 entry."""
        return self.l2_offset(l1_index) + 8 * l2_index

    def file_clusters(self) -> int:
        return os.path.getsize(self.path) // self.cluster_size

    def references(self) -> dict[int, int]:
        """Cluster index -> how many times the L1 table, L2 tables and L2 entries refer
        to it (zero clusters and unallocated entries refer to nothing)."""
        cs = self.cluster_size
        refs: dict[int, int] = {}

        def ref(offset: int, count: int) -> None:
            for k in range(count):
                idx = offset // cs + k
                refs[idx] = refs.get(idx, 0) + 1

        ref(self.l1_table_offset, self.table_size)
        for l2 in self.l1():
            if l2 == 0:
                continue
            ref(l2, self.table_size)
            for entry in self.table(l2):
                if entry > 1:
                    assert entry % cs == 0, f"unaligned L2 entry {entry:#x}"
                    ref(entry, 1)
        return refs


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", os.pread(f.fileno(), 8, offset))[0]


def poke_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), struct.pack("<Q", value), offset)


def header_features(path: Path) -> int:
    """The features word (header bytes 16..23) straight from the file."""
    return read_u64(path, 16)


NEED_CHECK = 0x02


def needs_check(path: Path) -> bool:
    return bool(header_features(path) & NEED_CHECK)


def settle(paths: Iterable[Path]) -> None:
    """fsync files so that st_blocks (``actual-size``, ``disk size``) is final before
    two tools are asked about it: ext4 reports delayed allocations late."""
    for p in paths:
        if Path(p).is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# =====================================================================================
# the judges
# =====================================================================================


@dataclass
class Outputs:
    args: tuple[str, ...]
    qemu_rc: int
    qemu_out: str
    qemu_err: str
    qed_rc: int
    qed_out: str
    qed_err: str

    def describe(self) -> str:
        return (
            f"args: {' '.join(self.args)}\n"
            f"--- qemu-img (rc {self.qemu_rc}):\n{self.qemu_out}{self.qemu_err}"
            f"--- qed (rc {self.qed_rc}):\n{self.qed_out}{self.qed_err}"
        )


_DIRTY_LINE = re.compile(r'"dirty-flag": (true|false)')


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def qed_in_process(*args: str | os.PathLike[str], cwd: Path | None = None) -> CliResult:
    """``qed ARGS`` through the CLI's ``main`` in this process: the same parsing and
    output code as the ``qed`` command without an interpreter start-up per call (the
    parity matrix makes hundreds of calls). Tests taking the ``cli_judge`` fixture run
    the real command in a subprocess instead (tests/conftest.py's ``qed``)."""
    from qedkit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as exc:  # argparse errors
                rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
    return CliResult(rc, out.getvalue(), err.getvalue())


class Judge:
    """QEMU's verdicts on images, and parity between ``qed`` and ``qemu-img``."""

    def __init__(self, qemu: Any, qed: Callable[..., Any] | None = None) -> None:
        """``qed`` runs the qed command (default: in this process, qed_in_process)."""
        self.qemu = qemu
        self.qed = qed or qed_in_process

    # ---- qemu verdicts ---------------------------------------------------------

    def check_json(self, path: Path, *args: str) -> tuple[int, dict[str, Any]]:
        res = self.qemu.img("check", *args, "--output=json", path, check=False)
        assert res.stdout, f"qemu-img check printed nothing (rc {res.returncode}): {res.stderr}"
        return res.returncode, json.loads(res.stdout)

    def assert_clean(self, path: Path) -> None:
        """``qemu-img check`` exits 0 and reports no leaks, corruptions or errors."""
        rc, report = self.check_json(path)
        assert rc == 0, f"qemu-img check {path}: rc {rc}: {report}"
        assert "leaks" not in report and "corruptions" not in report, report
        assert report["check-errors"] == 0, report

    def assert_qed_clean(self, path: Path) -> dict[str, Any]:
        res = self.qed("check", "--output=json", path)
        assert res.returncode == 0, (
            f"qed check {path}: rc {res.returncode}\n{res.stdout}{res.stderr}"
        )
        report: dict[str, Any] = json.loads(res.stdout)
        assert "leaks" not in report and "corruptions" not in report, report
        return report

    def assert_compare(self, path: Path, expected: RawRef | Path) -> None:
        ref = expected.path if isinstance(expected, RawRef) else expected
        res = self.qemu.img("compare", "-f", "qed", "-F", "raw", path, ref, check=False)
        assert res.returncode == 0, (
            f"qemu-img compare {path} {ref}: rc {res.returncode}\n{res.stdout}{res.stderr}"
        )

    def assert_reads(
        self,
        path: Path,
        expected: RawRef,
        ranges: Sequence[tuple[int, int]] | None = None,
        *,
        cluster_size: int = 64 * KiB,
        fmt: str = "qed",
    ) -> None:
        """``qemu-io -r -c 'read -P BYTE OFF LEN'`` for every constant run of the
        expected disk inside ``ranges`` (default: ``expected.windows``)."""
        if ranges is None:
            ranges = expected.windows(cluster_size)
        commands = []
        for start, end in ranges:
            for off, length, byte in expected.runs(start, end):
                for pos in range(off, off + length, MAX_READ_CHUNK):
                    n = min(MAX_READ_CHUNK, off + length - pos)
                    commands.append(f"read -q -P {byte:#x} {pos} {n}")
        # qemu-io's command line has no limit we reach; split anyway to keep it tidy
        for k in range(0, len(commands), 400):
            args: list[str] = ["-r", "-f", fmt]
            for cmd in commands[k : k + 400]:
                args += ["-c", cmd]
            res = self.qemu.io(*args, path, check=False)
            assert res.returncode == 0 and "fail" not in (res.stdout + res.stderr).lower(), (
                f"qemu-io read verification of {path} failed:\n{res.stdout}{res.stderr}"
            )

    def judge(
        self,
        path: Path,
        expected: RawRef,
        *,
        cluster_size: int,
        table_size: int,
        extra_ranges: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Everything QEMU can say about an image we wrote: a clean check, an
        identical compare (when block status is safe) and pattern reads."""
        self.assert_clean(path)
        if block_status_safe(expected.size, cluster_size, table_size):
            self.assert_compare(path, expected)
        ranges = _merge([*expected.windows(cluster_size), *extra_ranges])
        self.assert_reads(path, expected, ranges, cluster_size=cluster_size)

    def convert_to_raw(self, path: Path, out: Path) -> RawRef:
        self.qemu.img("convert", "-O", "raw", path, out)
        return RawRef(out)

    # ---- parity ----------------------------------------------------------------

    def outputs(self, *args: str | os.PathLike[str], cwd: Path | None = None) -> Outputs:
        q = self.qemu.img(*args, check=False, cwd=cwd)
        ours = self.qed(*args, cwd=cwd)
        return Outputs(
            tuple(str(a) for a in args),
            q.returncode,
            q.stdout,
            q.stderr,
            ours.returncode,
            ours.stdout,
            ours.stderr,
        )

    def assert_parity(
        self,
        *args: str | os.PathLike[str],
        cwd: Path | None = None,
        files: Iterable[Path] = (),
        dirty_unreliable: bool = False,
    ) -> Outputs:
        """``qed ARGS`` and ``qemu-img ARGS`` exit alike and print the same text (and,
        for --output=json, the same JSON value). With ``dirty_unreliable`` (an image
        with NEED_CHECK set) the dirty flag is left out of the comparison."""
        settle(files)
        out = self.outputs(*args, cwd=cwd)
        qemu_text, qed_text = out.qemu_out, out.qed_out
        if dirty_unreliable:
            qemu_text = _DIRTY_LINE.sub('"dirty-flag": null', qemu_text)
            qed_text = _DIRTY_LINE.sub('"dirty-flag": null', qed_text)
        assert out.qed_rc == out.qemu_rc, "exit codes differ\n" + out.describe()
        if "--output=json" in out.args:
            assert _strip_dirty(json.loads(qed_text), dirty_unreliable) == _strip_dirty(
                json.loads(qemu_text), dirty_unreliable
            ), "JSON values differ\n" + out.describe()
        assert qed_text == qemu_text, "texts differ\n" + out.describe()
        return out


def _strip_dirty(value: Any, strip: bool) -> Any:
    if not strip:
        return value
    if isinstance(value, list):
        return [_strip_dirty(v, strip) for v in value]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "dirty-flag"}
    return value


def assert_qedkit_reads(
    path: Path, ref: RawRef, *, cluster_size: int, full: bool | None = None
) -> None:
    """qedkit reads the image exactly as the reference raw file: every byte for small
    images; for large (sparse) ones, every range either side has data in, and qedkit's
    own map must then call the rest zero."""
    with qedkit.open(str(path), readonly=True) as img:
        assert img.size == ref.size, (img.size, ref.size)
        if full is None:
            full = ref.size <= FULL_READ_LIMIT
        if full:
            ranges = [(0, ref.size)]
        else:
            ours = [(e.start, e.end) for e in img.map() if e.data or not e.zero]
            ranges = _merge([*ours, *ref.windows(cluster_size)])
        for start, end in ranges:
            for pos in range(start, end, 4 * MiB):
                n = min(4 * MiB, end - pos)
                got = img.read(pos, n)
                want = ref.read(pos, n)
                if got != want:
                    first = next(i for i in range(n) if got[i] != want[i])
                    raise AssertionError(
                        f"{path}: qedkit reads {got[first]:#x} at {pos + first}, "
                        f"QEMU's reference has {want[first]:#x}"
                    )
