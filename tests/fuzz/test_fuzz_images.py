"""Fuzzing: mutated images through the engine and the CLI.

Start from a few valid images (made by qedkit and by qemu-img: data, zero clusters,
a partial last cluster, a raw backing file; small geometry so the files are small),
apply hypothesis-drawn mutations (header fields overwritten with interesting values,
bit flips, L1/L2 entries overwritten or duplicated, truncation, junk appended,
NEED_CHECK set) and run every kind of access on the result.

In process (``test_fuzzed_image_engine``), each case runs, in a worker thread under a
time bound (``QEDKIT_FUZZ_CASE_TIMEOUT``, default 30 s; a case that exceeds it is a
hang and fails):

1. a read-only open through a *recording store* (below): info, map of the whole
   image, and a read of the guest bytes in 64 KiB chunks (the first 12 MiB and
   everything the map says may hold data, up to 32 MiB);
2. ``check`` (read-only, no repair), through a recording store;
3. ``check -r all`` on a copy (opened read-write without the open-time repair, as
   ``qed check -r all`` does), then a second check: with every table readable it
   must find no corruption, and every chunk of guest bytes step 1 could read must
   read the same from the repaired copy (repair clears only entries that cannot be
   read, and gives clusters referenced twice their own copies);
4. a read-write open with the open-time repair of another copy, then requests: a
   whole-cluster write, an unaligned write across a cluster boundary, whole and
   partial write-zeroes, a discard and a resize (grow). If step 2 found the image
   clean, each must succeed and read back (zeros for write-zeroes and for the range
   the resize adds), and the image must still check clean afterwards;
5. ``convert -O raw`` (qedkit.jobs.convert, the real open path); if it and step 1
   succeeded, the target must hold the bytes step 1 read;
6. ``qed info``, ``qed info --output=json --backing-chain``, ``qed map
   --output=json`` and ``qed check`` through ``qedkit.cli.main.main`` in process:
   exit codes {0, 1} ({0, 1, 2, 3} for check), ``qed: `` messages.

Only :class:`~qedkit.errors.QedError` may escape a step; anything else fails the case.
Memory is bounded too: the test process's address space is capped at its size plus
4 GiB while the fuzzer runs (2 GiB for a CLI process), so an image that makes qedkit
allocate gigabytes fails with MemoryError instead of waking the OOM killer.
The read-only steps (1, 2, 5, 6) must leave the image and its backing file
byte-for-byte unchanged (sha256).

**Recording store.** Steps 1 to 4 open the image the way ``engine.chain.open_image``
does, but on a ``FileStore`` wrapped in :class:`RecordingStore`, which checks every
access against the file size *at the time of the access*:

* reads: a non-empty read may not start at or past the end of the file nor run past
  it, except at offset 0 (the fixed-size probe and header reads, which are how an
  empty or short file shows itself). Every other read the engine makes is of a
  table or data cluster that passed the offset tests against the file end rounded
  down to a whole cluster, so it lies entirely inside the file; a read of the last,
  partial cluster past that rounded end would be a bug too, and is caught by the
  same rule as soon as it crosses the end of the file;
* writes (and write-zeroes, discard, truncate): none at all on a read-only open.
  On a read-write open a write lies inside the file, or extends it from the
  allocation pointer. It may start past the current end only by clusters the same
  operation has reserved and not yet written (repair reserves moved tables before
  it writes the data copies after them), so anything more than 64 MiB past the end
  is flagged at once, and when the image is closed every byte the file grew by must
  have been written (no gap, hence no write at an absurd offset: those would make
  the file sparse). Exception: an image with the home allocation policy (an
  autoclear bit) puts a new cluster at ``data_start`` + its guest offset, so below
  ``data_start`` + the image size, writes past the end and gaps are the policy.
  Truncation may only shrink the file; discard and hole punching stay inside it.

The backing file is opened with the real ``open_image`` (read-only); its bytes are
covered by the sha256 check.

Through the CLI (``test_fuzzed_image_cli``, a smaller sample): ``info``, ``map``,
``check``, ``check -r all`` (on a copy), ``io -r -c "read 0 4k"`` and ``convert -O
raw`` in real ``python -m qedkit`` processes: exit codes {0, 1} ({0, 1, 2, 3} for
check), stderr empty or starting with ``qed: ``, never a traceback, no hang, the
image unchanged by the read-only commands.

Sizes and seeds: the runs are derandomized (fixed seed), 320 in-process and 24 CLI
cases by default. ``QEDKIT_FUZZ_SCALE=N`` multiplies both; ``QEDKIT_FUZZ_SEED=S``
draws random cases from seed S instead of the derandomized sequence. The number of
cases executed is printed in the terminal summary (tests/fuzz/conftest.py). Failing
images are saved under the pytest temporary directory (the path is in the failure
message), or under ``QEDKIT_FUZZ_ARTIFACTS`` when set.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fuzzkit import capped_address_space
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from qedtest import IN_CI

import qedkit
from qedkit.cli.main import main as qed_main
from qedkit.engine.base import BlockImage
from qedkit.engine.chain import open_image, open_qed
from qedkit.engine.check import CheckReport, RepairMode, check_and_repair, check_image
from qedkit.engine.mapping import MapEntry, map_chain
from qedkit.engine.names import full_backing_filename
from qedkit.engine.qed import QedImage
from qedkit.engine.sync import close_thread_loop
from qedkit.errors import BackingFileError, QedError
from qedkit.format.geometry import qemu_max_image_size
from qedkit.format.header import FIELD_OFFSETS, HEADER_STRUCT, Feature, Header
from qedkit.format.tables import unpack_table
from qedkit.jobs.convert import convert
from qedkit.store import ByteStore, FileStore
from qedkit.store.base import Buffer, StoreExtent

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20
U64 = 2**64 - 1


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise pytest.UsageError(f"{name}={text!r} is not a number") from None


SCALE = max(1, round(_env_number("QEDKIT_FUZZ_SCALE", 1)))
ENGINE_EXAMPLES = 320 * SCALE
CLI_EXAMPLES = 24 * SCALE
CASE_TIMEOUT = _env_number("QEDKIT_FUZZ_CASE_TIMEOUT", 30.0)
HEAD_READ = 12 * MiB  # guest bytes read from offset 0
READ_CAP = 32 * MiB  # at most this many guest bytes read per case
CHUNK = 64 * KiB  # guest bytes per read
GAP_LIMIT = 64 * MiB  # how far past the end of the file a write may start (see above)
CLI_TIMEOUT = 60.0  # seconds per CLI command (python start-up included)
MEMORY_MARGIN = 4 << 30  # address space a case may add to the test process
CLI_MEMORY = 2 << 30  # address space of a CLI process

_seed_env = os.environ.get("QEDKIT_FUZZ_SEED")


def fuzz_settings(max_examples: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    base = settings(
        max_examples=max_examples,
        derandomize=_seed_env is None,
        database=None,
        deadline=None,  # the watchdog bounds each case instead: timing is not flaky there
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = base(fn)
        if _seed_env is not None:
            fn = seed(int(_seed_env))(fn)
        return fn

    return apply


# =====================================================================================
# Seed images
# =====================================================================================


@dataclass(frozen=True)
class SeedMeta:
    """What the mutations need to know about a seed image."""

    cluster_size: int
    table_size: int
    l1_offset: int
    l2_offsets: tuple[int, ...]
    data_offsets: tuple[int, ...]
    file_size: int

    @property
    def table_bytes(self) -> int:
        return self.cluster_size * self.table_size

    @property
    def entries(self) -> int:
        return self.table_bytes // 8

    @classmethod
    def of(cls, data: bytes) -> SeedMeta:
        header = Header.parse(data[:4096], len(data))
        tb = header.cluster_size * header.table_size
        l1 = unpack_table(data[header.l1_table_offset : header.l1_table_offset + tb])
        l2s = tuple(e for e in l1 if e)
        datas: list[int] = []
        for off in l2s:
            datas += [e for e in unpack_table(data[off : off + tb]) if e > 1]
        return cls(
            header.cluster_size,
            header.table_size,
            header.l1_table_offset,
            l2s,
            tuple(datas),
            len(data),
        )


@dataclass(frozen=True)
class SeedImage:
    name: str
    data: bytes
    meta: SeedMeta

    def __repr__(self) -> str:
        return f"SeedImage({self.name!r}, {len(self.data)} bytes)"


SEED_NAMES = (
    "qedkit-data",
    "qedkit-backing",
    "qedkit-home",
    "qemu-data",
    "qemu-backing",
    "qemu-default",
)
# Seeds that may be missing (no QEMU tools; a qedkit without the home policy).
FALLBACK = {
    "qemu-data": "qedkit-data",
    "qemu-backing": "qedkit-backing",
    "qemu-default": "qedkit-data",
    "qedkit-home": "qedkit-data",
}


class FuzzEnv:
    """The session's seed images and working directory (a plain class: hypothesis
    pretty-prints dataclass arguments field by field, seed bytes included)."""

    def __init__(
        self, workdir: Path, artifacts: Path, seeds: dict[str, SeedImage], backing_sha: str
    ) -> None:
        self.workdir = workdir  # holds base.raw; case images are written here
        self.artifacts = artifacts
        self.seeds = seeds
        self.backing_sha = backing_sha
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.serial = 0

    def __repr__(self) -> str:  # hypothesis prints the test's arguments
        return f"FuzzEnv({str(self.workdir)!r})"

    def pick(self, name: str) -> SeedImage:
        if name not in self.seeds:
            name = FALLBACK[name]
        return self.seeds[name]

    def next_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"


def _make_backing(path: Path) -> None:
    rng = random.Random(20240611)
    with open(path, "wb") as f:
        f.truncate(5 * MiB + 512)
        for start, length in ((0, 64 * KiB), (4 * MiB - 32 * KiB, 64 * KiB)):
            f.seek(start)
            f.write(rng.randbytes(length))


def _build_qedkit_seeds(workdir: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    path = workdir / "seed-qedkit-data.qed"
    qedkit.create(str(path), 8 * MiB + 1536, cluster_size=4096, table_size=2)
    with qedkit.open(str(path)) as img:
        img.write(0, b"\x11" * 12 * KiB)
        img.write(4 * MiB - 2 * KiB, b"\x22" * 8 * KiB)  # crosses the L2 boundary
        img.write_zeroes(64 * KiB, 16 * KiB)  # zero clusters
        img.write(100 * KiB + 100, b"\x44" * 300)  # partial cluster
        img.write(8 * MiB, b"\x33" * 1536)  # the partial last cluster
    out["qedkit-data"] = path
    path = workdir / "seed-qedkit-backing.qed"
    qedkit.create(
        str(path),
        8 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="base.raw",
        backing_format="raw",
    )
    with qedkit.open(str(path)) as img:
        img.write(1000, b"\x55" * 3000)  # copy-on-write from the backing file
        img.write_zeroes(8 * KiB, 8 * KiB)  # zero clusters over backing data
        img.write(4 * MiB - 100, b"\x66" * 300)  # crosses the L2 boundary
        img.write(7 * MiB, b"\x77" * 4096)  # past the end of the backing file
    out["qedkit-backing"] = path
    path = workdir / "seed-qedkit-home.qed"
    try:  # the home allocation policy (an autoclear bit): data at guest offset + data start
        qedkit.create(
            str(path),
            1 * MiB + 1536,
            cluster_size=4096,
            table_size=2,
            allocation="home",  # type: ignore[call-arg]
        )
    except TypeError:
        return out
    with qedkit.open(str(path)) as img:
        img.write(0, b"\x88" * 8 * KiB)
        img.write(512 * KiB + 100, b"\x99" * 5000)
        img.write_zeroes(64 * KiB, 8 * KiB)
        img.write(1 * MiB, b"\xaa" * 1536)  # the partial last cluster
    out["qedkit-home"] = path
    return out


def _build_qemu_seeds(workdir: Path, qemu_img: str, qemu_io: str) -> dict[str, Path]:
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir, timeout=120)

    out: dict[str, Path] = {}
    small = "cluster_size=4096,table_size=2"
    run(qemu_img, "create", "-q", "-f", "qed", "-o", small, "seed-qemu-data.qed", "8M")
    run(
        qemu_io,
        *("-c", "write -P 0x55 0 12k", "-c", "write -z 64k 16k"),
        *("-c", "write -P 0x66 4092k 8k", "-c", "write -P 0x77 8188k 4k"),
        "seed-qemu-data.qed",
    )
    out["qemu-data"] = workdir / "seed-qemu-data.qed"
    run(
        qemu_img,
        *("create", "-q", "-f", "qed", "-o", small, "-b", "base.raw", "-F", "raw"),
        "seed-qemu-backing.qed",
        "8M",
    )
    run(
        qemu_io,
        *("-c", "write -P 0x12 4k 4k", "-c", "write -z 16k 8k"),
        *("-c", "write -P 0x13 4094k 4k", "-c", "write -P 0x14 6m 4k"),
        "seed-qemu-backing.qed",
    )
    out["qemu-backing"] = workdir / "seed-qemu-backing.qed"
    run(qemu_img, "create", "-q", "-f", "qed", "seed-qemu-default.qed", "4G")
    run(
        qemu_io,
        *("-c", "write -P 0x21 0 64k", "-c", "write -P 0x22 1m 128k"),
        *("-c", "write -z 2m 64k"),
        "seed-qemu-default.qed",
    )
    out["qemu-default"] = workdir / "seed-qemu-default.qed"
    return out


@pytest.fixture(scope="session")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    workdir = tmp_path_factory.mktemp("fuzz")
    backing = workdir / "base.raw"
    _make_backing(backing)
    paths = _build_qedkit_seeds(workdir)
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if qemu_img and qemu_io:
        paths.update(_build_qemu_seeds(workdir, qemu_img, qemu_io))
    elif IN_CI:
        pytest.fail("qemu-img/qemu-io are not installed (CI=true: they make seed images)")
    seeds = {}
    for name, path in paths.items():
        data = path.read_bytes()
        seeds[name] = SeedImage(name, data, SeedMeta.of(data))
    artifacts = Path(os.environ.get("QEDKIT_FUZZ_ARTIFACTS") or workdir / "failures")
    env = FuzzEnv(workdir, artifacts, seeds, _sha(backing))
    yield env
    if env.executor is not None:
        env.executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="module", autouse=True)
def memory_cap() -> Iterator[None]:
    """Cap the address space of the test process while the fuzzer runs: an image
    must not make qedkit allocate gigabytes (a table entry is an untrusted number),
    and with the cap such an allocation fails with MemoryError (a failure naming
    the culprit) instead of waking the OOM killer. Restored afterwards."""
    with capped_address_space(MEMORY_MARGIN):
        yield


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# =====================================================================================
# Mutations
# =====================================================================================


@dataclass(frozen=True)
class HeaderField:
    """Overwrite one header field with an interesting value (relative to its width and
    its old value)."""

    field: str
    value: str
    k: int


@dataclass(frozen=True)
class FlipBit:
    region: str  # header, header_area, l1, l2, any
    pos: int
    bit: int


@dataclass(frozen=True)
class SetEntry:
    table: str  # l1 or l2
    which: int  # which L2 table
    index: int
    used: bool  # pick among the entries in use
    value: str
    k: int


@dataclass(frozen=True)
class CopyEntry:
    """Duplicate an entry: copy (table, which, index) over another one."""

    src_table: str
    src_which: int
    src_index: int
    dst_table: str
    dst_which: int
    dst_index: int


@dataclass(frozen=True)
class Truncate:
    mode: str
    k: int


@dataclass(frozen=True)
class Append:
    n: int


@dataclass(frozen=True)
class SetNeedCheck:
    pass


Mutation = HeaderField | FlipBit | SetEntry | CopyEntry | Truncate | Append | SetNeedCheck

HEADER_FIELDS = [name for name in FIELD_OFFSETS if name != "magic"]
_FORMATS = dict(
    zip(FIELD_OFFSETS, HEADER_STRUCT.format.lstrip("<").replace("4s", "s"), strict=True)
)
HEADER_VALUES = [
    "zero",
    "one",
    "max",
    "pow2",
    "pow2-1",
    "pow2+1",
    "old+k",
    "old-k",
    "old<<k",
    "old>>k",
    "setbit",
    "clearbit",
    "random",
]
ENTRY_VALUES = [
    "zero",
    "one",
    "two",
    "header",
    "l1",
    "l2",
    "data",
    "eof",
    "last-cluster",
    "past-eof",
    "huge",
    "unaligned",
    "random",
]
HUGE = (2**63, U64, 2**60, 2**64 - 4096, 2**32, 2**40, 2**63 - 65536, 2**62 + 4096)

u64 = st.integers(0, U64)
small = st.integers(0, 2**16)
mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.builds(HeaderField, st.sampled_from(HEADER_FIELDS), st.sampled_from(HEADER_VALUES), u64),
    st.builds(
        FlipBit,
        st.sampled_from(["header", "header", "header_area", "l1", "l2", "any"]),
        u64,
        st.integers(0, 7),
    ),
    st.builds(
        SetEntry,
        st.sampled_from(["l1", "l2", "l2"]),
        small,
        u64,
        st.booleans(),
        st.sampled_from(ENTRY_VALUES),
        u64,
    ),
    st.builds(
        SetEntry,
        st.just("l2"),
        small,
        u64,
        st.just(True),
        st.sampled_from(ENTRY_VALUES),
        u64,
    ),
    st.builds(
        CopyEntry,
        st.sampled_from(["l1", "l2"]),
        small,
        u64,
        st.sampled_from(["l1", "l2"]),
        small,
        u64,
    ),
    st.builds(
        Truncate,
        st.sampled_from(["any", "cluster", "cluster-minus", "in-l1", "in-l2", "last", "header"]),
        u64,
    ),
    st.builds(Append, st.integers(1, 9000)),
    st.just(SetNeedCheck()),
)


@dataclass(frozen=True)
class Case:
    seed: str
    mutations: tuple[Mutation, ...]
    write_at: int  # selects the cluster step 4 writes


cases = st.builds(
    Case,
    st.sampled_from(SEED_NAMES),
    st.lists(mutations, min_size=1, max_size=4).map(tuple),
    u64,
)


def _header_value(name: str, kind: str, k: int, old: int) -> int:
    width = 32 if _FORMATS[name] == "I" else 64
    mask = (1 << width) - 1
    j = k % width
    step = k % 8 + 1
    values = {
        "zero": 0,
        "one": 1,
        "max": mask,
        "pow2": 1 << j,
        "pow2-1": (1 << j) - 1,
        "pow2+1": (1 << j) + 1,
        "old+k": old + step,
        "old-k": old - step,
        "old<<k": old << step,
        "old>>k": old >> step,
        "setbit": old | 1 << j,
        "clearbit": old & ~(1 << j),
        "random": k,
    }
    return values[kind] & mask


def _entry_value(meta: SeedMeta, kind: str, k: int) -> int:
    cs = meta.cluster_size
    end = meta.file_size - meta.file_size % cs
    tables = meta.l2_offsets or (meta.l1_offset,)
    datas = meta.data_offsets or tables
    values = {
        "zero": 0,
        "one": 1,
        "two": 2,
        "header": (k % cs) & ~7 if k % 2 else 0,
        "l1": meta.l1_offset + (k % meta.table_size) * cs,
        "l2": tables[k % len(tables)] + (k // 7 % meta.table_size) * cs * (k % 2),
        "data": datas[k % len(datas)],
        "eof": end,
        "last-cluster": end - cs,
        "past-eof": end + cs * (1 + k % 1000),
        "huge": HUGE[k % len(HUGE)],
        "unaligned": datas[k % len(datas)] + 1 + k % (cs - 1),
        "random": k,
    }
    return values[kind] & U64


def _table_at(meta: SeedMeta, table: str, which: int) -> int:
    if table == "l1" or not meta.l2_offsets:
        return meta.l1_offset
    return meta.l2_offsets[which % len(meta.l2_offsets)]


def _entry_index(meta: SeedMeta, data: bytearray, table_off: int, index: int, used: bool) -> int:
    if used:
        table = unpack_table(
            bytes(data[table_off : table_off + meta.table_bytes]).ljust(meta.table_bytes, b"\0")
        )
        in_use = [i for i, e in enumerate(table) if e]
        if in_use:
            return in_use[index % len(in_use)]
    # Mostly the first entries (where the guest data is), sometimes anywhere.
    return index % 64 if index % 4 else index % meta.entries


def _put(data: bytearray, offset: int, raw: bytes) -> bool:
    """Overwrite inside the (possibly already truncated) file; False if outside."""
    if offset + len(raw) > len(data):
        return False
    data[offset : offset + len(raw)] = raw
    return True


def mutate(seed_image: SeedImage, muts: Sequence[Mutation]) -> tuple[bytes, list[str]]:
    """Apply ``muts`` in order; returns the bytes and what each mutation did."""
    meta = seed_image.meta
    data = bytearray(seed_image.data)
    cs = meta.cluster_size
    done: list[str] = []
    for m in muts:
        if isinstance(m, HeaderField):
            fmt = "<" + _FORMATS[m.field]
            off = FIELD_OFFSETS[m.field]
            if off + struct.calcsize(fmt) > len(data):
                continue
            (old,) = struct.unpack_from(fmt, data, off)
            new = _header_value(m.field, m.value, m.k, old)
            struct.pack_into(fmt, data, off, new)
            done.append(f"header {m.field} {old:#x} -> {new:#x}")
        elif isinstance(m, FlipBit):
            if m.region == "header":
                pos = m.pos % 64
            elif m.region == "header_area":
                pos = m.pos % cs
            elif m.region == "l1":
                pos = meta.l1_offset + m.pos % meta.table_bytes
            elif m.region == "l2":
                pos = _table_at(meta, "l2", m.pos) + m.pos % meta.table_bytes
            else:
                pos = m.pos % max(1, len(data))
            if pos < len(data):
                data[pos] ^= 1 << m.bit
                done.append(f"flip bit {m.bit} of byte {pos:#x}")
        elif isinstance(m, SetEntry):
            base = _table_at(meta, m.table, m.which)
            index = _entry_index(meta, data, base, m.index, m.used)
            value = _entry_value(meta, m.value, m.k)
            if _put(data, base + 8 * index, struct.pack("<Q", value)):
                done.append(f"{m.table} table at {base:#x} entry {index} = {value:#x} ({m.value})")
        elif isinstance(m, CopyEntry):
            src = _table_at(meta, m.src_table, m.src_which)
            src_i = _entry_index(meta, data, src, m.src_index, True)
            dst = _table_at(meta, m.dst_table, m.dst_which)
            dst_i = _entry_index(meta, data, dst, m.dst_index, False)
            raw = bytes(data[src + 8 * src_i : src + 8 * src_i + 8])
            if len(raw) == 8 and _put(data, dst + 8 * dst_i, raw):
                value = struct.unpack("<Q", raw)[0]
                done.append(
                    f"{m.dst_table} table at {dst:#x} entry {dst_i} = {value:#x} "
                    f"(copy of entry {src_i} of the table at {src:#x})"
                )
        elif isinstance(m, Truncate):
            n = len(data)
            clusters = max(1, n // cs)
            cut = {
                "any": m.k % (n + 1),
                "cluster": (m.k % clusters) * cs,
                "cluster-minus": max(0, (m.k % clusters) * cs - 1 - m.k % 100),
                "in-l1": meta.l1_offset + m.k % meta.table_bytes,
                "in-l2": _table_at(meta, "l2", m.k) + m.k % meta.table_bytes,
                "last": max(0, n - cs + m.k % (cs // 2)),
                "header": m.k % 80,
            }[m.mode]
            if cut < n:
                del data[cut:]
                done.append(f"truncate to {cut} bytes ({m.mode})")
        elif isinstance(m, Append):
            data += random.Random(m.n).randbytes(m.n)
            done.append(f"append {m.n} junk bytes")
        elif isinstance(m, SetNeedCheck) and len(data) >= 24:
            data[16] |= int(Feature.NEED_CHECK)
            done.append("set NEED_CHECK")
    return bytes(data), done


# =====================================================================================
# The recording store
# =====================================================================================


class Recorder:
    """Access checks for one open of one file (see the module docstring)."""

    def __init__(self, path: Path, *, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self.open_size = path.stat().st_size
        self.violations: list[str] = []
        self.grown: list[tuple[int, int]] = []  # written ranges past the original end
        self.reads = self.writes = 0
        # With the home allocation policy a new cluster goes to data_start + guest
        # offset, possibly past the end of the file: below this limit, writes past the
        # end and the gaps they leave are the policy (the file is sparse like a raw one).
        self.sparse_limit = 0

    def flag(self, message: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(message)

    def read(self, offset: int, length: int, size: int) -> None:
        self.reads += 1
        if length <= 0 or offset == 0:
            return  # the probe and header reads: how an empty or short file shows
        if offset < 0 or offset >= size:
            self.flag(
                f"read of {length} bytes at offset {offset:#x}: at or past the end "
                f"of the file ({size} bytes)"
            )
        elif offset + length > size:
            self.flag(
                f"read of {length} bytes at offset {offset:#x} runs past the end "
                f"of the file ({size} bytes)"
            )

    def write(self, what: str, offset: int, length: int, size: int, *, extends: bool) -> None:
        self.writes += 1
        if self.readonly:
            self.flag(f"{what} of {length} bytes at offset {offset:#x} on a read-only open")
            return
        if offset < 0 or length < 0:
            self.flag(f"{what} of {length} bytes at offset {offset}")
            return
        if not extends:
            if offset + length > size:
                self.flag(
                    f"{what} of {length} bytes at offset {offset:#x} past the end of "
                    f"the file ({size} bytes)"
                )
            return
        if offset > max(size, self.sparse_limit) + GAP_LIMIT:
            self.flag(
                f"{what} of {length} bytes at offset {offset:#x}, far past the end "
                f"of the file ({size} bytes)"
            )
        if offset + length > self.open_size and length:
            self.grown.append((max(offset, self.open_size), offset + length))

    def truncate(self, new_size: int, size: int) -> None:
        self.writes += 1
        if self.readonly:
            self.flag(f"truncate to {new_size} on a read-only open")
        elif new_size > size:
            self.flag(f"truncate grows the file from {size} to {new_size} bytes")

    def finish(self) -> None:
        """After close: every byte the file grew by was written."""
        final = self.path.stat().st_size
        if self.readonly:
            if final != self.open_size:
                self.flag(f"file size changed from {self.open_size} to {final} (read-only)")
            return
        pos = max(self.open_size, min(self.sparse_limit, final))
        for start, end in sorted(self.grown):
            if end <= pos:
                continue
            if start > pos and pos < final:
                self.flag(
                    f"the file grew to {final} bytes but [{pos:#x}, {min(start, final):#x})"
                    f" was never written (a write past the end of the file)"
                )
                break
            pos = max(pos, end)
        if pos < final:
            self.flag(
                f"the file grew to {final} bytes but [{pos:#x}, {final:#x}) was never written"
            )

    def assert_clean(self, step: str) -> None:
        assert not self.violations, f"{step}: out-of-file access:\n  " + "\n  ".join(
            self.violations
        )


class RecordingStore(ByteStore):
    """A FileStore that reports every access to a Recorder before making it."""

    def __init__(self, inner: FileStore, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.name = inner.name
        self.capabilities = inner.capabilities

    def _size(self) -> int:
        return self.inner.size_now()

    async def size(self) -> int:
        return await self.inner.size()

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        self.recorder.read(offset, len(buf), self._size())
        return await self.inner.readinto(offset, buf)

    async def read(self, offset: int, length: int) -> bytes:
        self.recorder.read(offset, length, self._size())
        return await self.inner.read(offset, length)

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        n = sum(len(memoryview(b).cast("B")) for b in buffers)
        self.recorder.write("write", offset, n, self._size(), extends=True)
        await self.inner.writev(offset, buffers)

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        what = "punch" if punch else "write-zeroes"
        self.recorder.write(what, offset, length, self._size(), extends=not punch)
        await self.inner.write_zeroes(offset, length, punch=punch)

    async def discard(self, offset: int, length: int) -> None:
        self.recorder.write("discard", offset, length, self._size(), extends=False)
        await self.inner.discard(offset, length)

    async def flush(self) -> None:
        await self.inner.flush()

    async def truncate(self, size: int) -> None:
        self.recorder.truncate(size, self._size())
        await self.inner.truncate(size)

    async def extents(self, offset: int, length: int) -> list[StoreExtent]:
        return await self.inner.extents(offset, length)

    async def allocated_bytes(self) -> int:
        return await self.inner.allocated_bytes()

    async def close(self) -> None:
        await self.inner.close()


async def open_recorded(
    path: Path, recorder: Recorder, *, readonly: bool, repair: bool, backing_chain: bool
) -> QedImage:
    """``engine.chain.open_image`` for a QED image (format forced, as ``-f qed``), on a
    recording store; the backing file is opened by the real ``open_image``."""
    store = RecordingStore(FileStore.open(str(path), readonly=readonly, unsafe=True), recorder)
    try:
        header, area = await QedImage.read_header(store)
        backing: BlockImage | None = None
        name = header.backing_filename(area)
        if name and backing_chain:
            fmt = "raw" if header.has(Feature.BACKING_FORMAT_NO_PROBE) else None
            try:
                backing = await open_image(
                    full_backing_filename(str(path), name), fmt=fmt, readonly=True
                )
            except BackingFileError:
                raise
            except QedError as exc:
                raise BackingFileError(f"cannot open backing file: {exc}") from exc
        try:
            img = await open_qed(
                store,
                header,
                area,
                backing=backing,
                readonly=readonly,
                filename=str(path),
                repair=repair,
            )
        except BaseException:
            if backing is not None:
                await backing.close()
            raise
    except BaseException:
        await store.close()
        raise
    if getattr(img, "home_allocation", False):
        recorder.sparse_limit = getattr(img, "data_start", 0) + img.geo.round_up(img.size)
    return img


# =====================================================================================
# One case
# =====================================================================================


@dataclass
class Observed:
    """What the read-only steps saw."""

    opened: bool = False
    size: int = 0
    map_ok: bool = False
    reads: dict[int, bytes] = field(default_factory=dict)  # the chunks that read
    read_ok: bool = False  # the map and every chunk read
    check: CheckReport | None = None
    errors: list[str] = field(default_factory=list)


def _ranges(size: int, entries: list[MapEntry] | None) -> list[tuple[int, int]]:
    """Guest ranges step 1 reads: the head, then whatever the map says may hold data."""
    out = [(0, min(size, HEAD_READ))] if size else []
    budget = READ_CAP - out[0][1] if out else READ_CAP
    for e in entries or []:
        if not e.present or e.zero or e.end <= HEAD_READ:
            continue
        start = max(e.start, HEAD_READ)
        n = min(e.end - start, budget)
        if n <= 0:
            break
        out.append((start, n))
        budget -= n
    return out


class Escaped(AssertionError):
    """A non-QedError exception escaped a step."""


def _escaped(step: str, exc: BaseException) -> Escaped:
    """The failure for a non-QedError ``exc``: its traceback as text, and the frames
    cleared, so that what they held (a gigabyte array after a MemoryError, say) is
    not kept alive by hypothesis and pytest while they report."""
    text = "".join(traceback.format_exception(exc))
    traceback.clear_frames(exc.__traceback__)
    return Escaped(f"{step}: {type(exc).__name__} escaped (not a QedError): {exc}\n{text}")


class Failed:
    """What a step that raised a QedError returns (an allowed outcome). It keeps the
    message only: the exception's traceback would tie the frames (and the guest
    bytes they hold) into reference cycles that outlive the case."""

    def __init__(self, exc: QedError) -> None:
        self.text = f"{type(exc).__name__}: {exc}"

    def __repr__(self) -> str:
        return self.text


async def _guarded(step: str, obs: Observed, coro: Any) -> Any:
    """Await ``coro``; a QedError is an allowed outcome (a Failed), anything else fails
    the case."""
    try:
        return await coro
    except QedError as exc:
        obs.errors.append(f"{step}: {type(exc).__name__}: {exc}")
        return Failed(exc)
    except Exception as exc:
        raise _escaped(step, exc) from None


@contextlib.asynccontextmanager
async def _recorded(
    path: Path, obs: Observed, step: str, *, readonly: bool, repair: bool, backing_chain: bool
) -> AsyncIterator[Any]:
    """One step's open on a recording store, guarded: yields the image, or a Failed
    when the open raised a QedError. The image is closed afterwards, then the step's
    accesses must have stayed inside the file (checked unless the body raised)."""
    rec = Recorder(path, readonly=readonly)
    img = await _guarded(
        f"{step}: open",
        obs,
        open_recorded(path, rec, readonly=readonly, repair=repair, backing_chain=backing_chain),
    )
    try:
        yield img
    finally:
        if not isinstance(img, Failed):
            await _guarded(f"{step}: close", obs, img.close())
    rec.finish()
    rec.assert_clean(step)


async def step_read_only(path: Path, obs: Observed) -> None:
    async with _recorded(
        path, obs, "read-only open, info, map, read", readonly=True, repair=True, backing_chain=True
    ) as img:
        if isinstance(img, Failed):
            return
        obs.opened = True
        obs.size = img.size
        await _guarded("info", obs, img.info())
        entries = await _guarded("map", obs, map_chain(img))
        obs.map_ok = not isinstance(entries, Failed)
        if not obs.map_ok:
            entries = None
        ok = True
        for start, n in _ranges(img.size, entries):
            for pos in range(start, start + n, CHUNK):
                # In chunks: a damaged cluster fails its chunk only.
                k = min(CHUNK, start + n - pos)
                got = await _guarded("read", obs, img.read(pos, k))
                if isinstance(got, Failed):
                    ok = False
                else:
                    obs.reads[pos] = got
        obs.read_ok = ok and obs.map_ok


async def step_check(path: Path, obs: Observed) -> None:
    async with _recorded(
        path, obs, "check", readonly=True, repair=False, backing_chain=False
    ) as img:
        if not isinstance(img, Failed):
            report = await _guarded("check", obs, check_and_repair(img, None))
            obs.check = None if isinstance(report, Failed) else report


async def step_repair(path: Path, obs: Observed, before: Observed) -> None:
    async with _recorded(
        path, obs, "check -r all", readonly=False, repair=False, backing_chain=False
    ) as img:
        if not isinstance(img, Failed):
            report = await _guarded("check -r all", obs, check_and_repair(img, RepairMode.ALL))
            if not isinstance(report, Failed):
                again = await _guarded("check after repair", obs, check_image(img, None))
                if not isinstance(again, Failed) and not again.check_errors:
                    assert again.corruptions == 0, (
                        f"check -r all left {again.corruptions} corruptions: "
                        f"{[p.message for p in again.problems][:5]}"
                    )
    if isinstance(img, Failed) or not before.reads:
        return
    # Every byte that read before the repair reads the same after it: repair clears
    # only entries that cannot be read, and gives shared clusters their own copies.
    async with _recorded(
        path, obs, "read after repair", readonly=True, repair=False, backing_chain=True
    ) as img:
        if isinstance(img, Failed):
            raise AssertionError(f"the image opened before check -r all, not after: {img}")
        for start, old in before.reads.items():
            new = await _guarded("read after repair", obs, img.read(start, len(old)))
            assert not isinstance(new, Failed), (
                f"[{start:#x}, +{len(old)}) read before check -r all, not after: {new}"
            )
            if new != old:
                first = next(i for i in range(len(old)) if old[i] != new[i])
                raise AssertionError(
                    f"check -r all changed guest byte {start + first:#x}: "
                    f"{old[first]:#x} -> {new[first]:#x}"
                )


def _ops(size: int, cs: int, k: int) -> list[tuple[str, int, int]]:
    """The requests of step 4: (kind, offset, length), inside an image of ``size``."""
    clusters = -(-size // cs)
    if not clusters:
        return []
    index = k % clusters if k % 3 else k % min(clusters, 64)
    ops = [("write", index * cs, min(cs, size - index * cs))]
    j = (k >> 20) % clusters
    if (j + 1) * cs + 50 <= size:  # an unaligned write across a cluster boundary
        ops.append(("write", (j + 1) * cs - 50, 100))
    z = (k >> 30) % clusters
    ops.append(("zero", z * cs, min(cs, size - z * cs)))
    if z * cs + 1000 < size:
        ops.append(("zero", z * cs + 300, min(700, size - z * cs - 300)))
    d = (k >> 40) % clusters
    ops.append(("discard", d * cs, min(2 * cs, size - d * cs)))
    ops.append(("resize", size, cs + 512))
    return ops


async def _write_ops(img: QedImage, obs: Observed, clean: bool, k: int) -> None:
    """Step 4's requests; on an image that checks clean each must succeed and read
    back (zeros for write-zeroes and for the range a resize adds)."""
    for kind, offset, n in _ops(img.size, img.cluster_size, k):
        expect: bytes | None = None
        if kind == "write":
            expect = bytes([0xA5 ^ (offset & 0xFF)]) * n
            coro = img.write(offset, expect)
        elif kind == "zero":
            expect = bytes(n)
            coro = img.write_zeroes(offset, n)
        elif kind == "discard":
            coro = img.discard(offset, n)
        else:
            if offset + n > qemu_max_image_size(img.cluster_size, img.geo.table_size):
                continue
            expect = bytes(n)
            coro = img.resize(offset + n)
        done = await _guarded(kind, obs, coro)
        if not clean:
            continue
        where = f"{kind} of {n} bytes at {offset:#x}"
        assert not isinstance(done, Failed), f"{where} failed on an image that checks clean: {done}"
        if expect is not None:
            back = await _guarded("read back", obs, img.read(offset, n))
            assert back == expect, (
                f"{where} on an image that checks clean does not read back: "
                f"{back if isinstance(back, Failed) else 'other bytes'}"
            )


async def step_write(path: Path, obs: Observed, clean: bool, write_at: int) -> None:
    async with _recorded(
        path, obs, "read-write open and write", readonly=False, repair=True, backing_chain=True
    ) as img:
        if not isinstance(img, Failed):
            await _write_ops(img, obs, clean, write_at)
    if isinstance(img, Failed):
        assert not clean, f"an image that checks clean does not open read-write: {img}"
        return
    if not clean:
        return
    async with _recorded(
        path, obs, "check after write", readonly=True, repair=False, backing_chain=False
    ) as img:
        if isinstance(img, Failed):
            raise AssertionError(f"an image that checked clean no longer opens: {img}")
        report = await _guarded("check after write", obs, check_image(img, None))
        assert not isinstance(report, Failed), f"check after a write failed: {report}"
        assert report.corruptions == 0 and not report.check_errors, (
            f"writes into an image that checked clean corrupted it: {report}"
        )


def step_convert(path: Path, target: Path, obs: Observed) -> None:
    try:
        convert(str(path), str(target), src_format="qed", dst_format="raw")
    except QedError as exc:
        obs.errors.append(f"convert: {type(exc).__name__}: {exc}")
        return
    except Exception as exc:
        raise _escaped("convert", exc) from None
    with open(target, "rb") as f:
        for start, old in obs.reads.items():
            f.seek(start)
            got = f.read(len(old)).ljust(len(old), b"\0")
            if got != old:
                first = next(i for i in range(len(old)) if old[i] != got[i])
                raise AssertionError(
                    f"convert wrote {got[first]:#x} at guest offset {start + first:#x}, "
                    f"a read gives {old[first]:#x}"
                )


CLI_IN_PROCESS = (
    (("info",), (0, 1)),
    (("info", "--output=json", "--backing-chain"), (0, 1)),
    (("map", "--output=json"), (0, 1)),
    (("check",), (0, 1, 2, 3)),
)


def step_cli_in_process(path: Path) -> None:
    for args, codes in CLI_IN_PROCESS:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = qed_main([*args, "-f", "qed", str(path)])
        except BaseException as exc:
            raise _escaped(f"qed {' '.join(args)}", exc) from None
        assert rc in codes, f"qed {' '.join(args)} exited {rc}: {err.getvalue()}"
        if rc and args[0] != "check":
            assert err.getvalue().startswith("qed: "), (args, err.getvalue())
        if rc == 0 and "--output=json" in args:
            json.loads(out.getvalue())


def run_case(env: FuzzEnv, data: bytes, case: Case, counter: Any) -> None:
    """Steps 1 to 6 on one mutated image (runs in the worker thread)."""
    name = env.next_name("case")
    path = env.workdir / f"{name}.qed"
    copies = [env.workdir / f"{name}-repair.qed", env.workdir / f"{name}-write.qed"]
    target = env.workdir / f"{name}.raw"
    path.write_bytes(data)
    for c in copies:
        c.write_bytes(data)
    try:
        before = hashlib.sha256(data).hexdigest()
        obs = Observed()
        asyncio.run(step_read_only(path, obs))
        asyncio.run(step_check(path, obs))
        step_convert(path, target, obs)
        step_cli_in_process(path)
        assert _sha(path) == before, "a read-only step changed the image"
        assert _sha(env.workdir / "base.raw") == env.backing_sha, "the backing file changed"
        clean = (
            obs.check is not None
            and obs.check.corruptions == 0
            and obs.check.check_errors == 0
            and obs.opened
        )
        asyncio.run(step_repair(copies[0], Observed(), obs))
        asyncio.run(step_write(copies[1], Observed(), clean, case.write_at))
        counter.note("rejected at open" if not obs.opened else "opened")
        if obs.check is not None:
            counter.note("checked clean" if clean else "check found damage")
        if obs.read_ok:
            counter.note("every byte readable")
    finally:
        close_thread_loop()  # the one the synchronous API made in this thread
        for p in (path, *copies, target):
            p.unlink(missing_ok=True)


def _save(env: FuzzEnv, data: bytes, case: Case, done: list[str]) -> Path:
    env.artifacts.mkdir(parents=True, exist_ok=True)
    out = env.artifacts / f"fuzz-{hashlib.sha256(data).hexdigest()[:16]}.qed"
    out.write_bytes(data)
    out.with_suffix(".txt").write_text(
        f"seed image: {case.seed}\nmutations:\n" + "".join(f"  {d}\n" for d in done)
    )
    return out


def bounded(env: FuzzEnv, fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` in the worker thread; a case that takes longer than ``timeout`` is a
    hang (the thread is abandoned and a fresh one serves the next case)."""
    if env.executor is None:
        env.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fuzz")
    future = env.executor.submit(fn)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        env.executor.shutdown(wait=False)
        env.executor = None
        raise AssertionError(f"the case did not finish in {timeout:.0f} s: a hang") from None


# =====================================================================================
# Tests
# =====================================================================================


@fuzz_settings(ENGINE_EXAMPLES)
@given(case=cases)
def test_fuzzed_image_engine(fuzz_env: FuzzEnv, fuzz_counter: Any, case: Case) -> None:
    fuzz_counter.hit("engine")
    seed_image = fuzz_env.pick(case.seed)
    data, done = mutate(seed_image, case.mutations)
    try:
        bounded(fuzz_env, lambda: run_case(fuzz_env, data, case, fuzz_counter), CASE_TIMEOUT)
    except BaseException as exc:
        saved = _save(fuzz_env, data, case, done)
        exc.add_note(f"seed {seed_image.name}; mutations: {done}; image saved as {saved}")
        raise


CLI_COMMANDS: tuple[tuple[tuple[str, ...], tuple[int, ...], bool], ...] = (
    # (arguments before the file, allowed exit codes, read-only)
    (("info", "-f", "qed"), (0, 1), True),
    (("map", "-f", "qed"), (0, 1), True),
    (("check", "-f", "qed", "--output=json"), (0, 1, 2, 3), True),
    (("io", "-f", "qed", "-r", "-c", "read 0 4k"), (0, 1), True),
    (("convert", "-f", "qed", "-O", "raw"), (0, 1), True),
    (("check", "-f", "qed", "-r", "all", "--output=json"), (0, 1, 2, 3), False),
)


# ``python -m qedkit`` with its address space capped (see memory_cap).
QED_CAPPED = [
    sys.executable,
    "-c",
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_AS, ({CLI_MEMORY}, {CLI_MEMORY})); "
    "runpy.run_module('qedkit', run_name='__main__', alter_sys=True)",
]


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"qed {' '.join(argv[len(QED_CAPPED) :])}: no exit in {CLI_TIMEOUT:.0f} s: a hang"
        ) from None


@fuzz_settings(CLI_EXAMPLES)
@given(case=cases)
def test_fuzzed_image_cli(fuzz_env: FuzzEnv, fuzz_counter: Any, case: Case) -> None:
    fuzz_counter.hit("cli")
    seed_image = fuzz_env.pick(case.seed)
    data, done = mutate(seed_image, case.mutations)
    name = fuzz_env.next_name("cli")
    path = fuzz_env.workdir / f"{name}.qed"
    copy = fuzz_env.workdir / f"{name}-rw.qed"
    target = fuzz_env.workdir / f"{name}.raw"
    path.write_bytes(data)
    copy.write_bytes(data)
    argvs = []
    for args, _, readonly in CLI_COMMANDS:
        argv = [*QED_CAPPED, *args, str(path if readonly else copy)]
        if args[0] == "convert":
            argv.append(str(target))
        argvs.append(argv)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(_run_cli, argvs))
        fuzz_counter.note("cli commands run", len(results))
        for (args, codes, _), result in zip(CLI_COMMANDS, results, strict=True):
            what = f"qed {' '.join(args)}"
            assert "Traceback" not in result.stderr, f"{what}:\n{result.stderr}"
            assert result.returncode in codes, (
                f"{what} exited {result.returncode}:\n{result.stderr}"
            )
            if result.returncode and result.stderr:
                assert result.stderr.startswith("qed: "), f"{what}: stderr {result.stderr!r}"
            if result.returncode not in (0, 1) or (args[0] == "check" and not result.returncode):
                json.loads(result.stdout)  # check ran: its report is there
            if result.returncode and args[0] != "check":
                assert result.stderr.startswith("qed: "), f"{what}: no message on stderr"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), (
            "a read-only command changed the image"
        )
    except BaseException as exc:
        saved = _save(fuzz_env, data, case, done)
        exc.add_note(f"seed {seed_image.name}; mutations: {done}; image saved as {saved}")
        raise
    finally:
        for p in (path, copy, target):
            p.unlink(missing_ok=True)


# =====================================================================================
# Self-tests of the harness
# =====================================================================================


def test_recorder_flags_reads_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    rec = Recorder(path, readonly=True)
    rec.read(0, 4096, 8192)
    rec.read(0, 65536, 8192)  # a header read of a short file: allowed
    assert not rec.violations
    rec.read(8192, 1, 8192)
    rec.read(4096, 8192, 8192)
    assert len(rec.violations) == 2


def test_recorder_flags_gaps_and_absurd_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    rec = Recorder(path, readonly=False)
    rec.write("write", 4096, 8192, 8192, extends=True)  # an append from the rounded end
    path.write_bytes(bytes(12288))
    rec.finish()
    assert not rec.violations
    rec = Recorder(path, readonly=False)
    rec.write("write", 2**60, 4096, 12288, extends=True)
    assert rec.violations
    rec = Recorder(path, readonly=False)
    rec.write("write", 16384, 4096, 12288, extends=True)
    path.write_bytes(bytes(20480))
    rec.finish()
    assert any("never written" in v for v in rec.violations)
    rec = Recorder(path, readonly=True)
    rec.write("write", 0, 64, 20480, extends=True)
    assert rec.violations


def test_mutations_apply_to_every_seed(fuzz_env: FuzzEnv) -> None:
    """Each kind of mutation changes something on each seed image."""
    for seed_image in fuzz_env.seeds.values():
        for m in (
            HeaderField("image_size", "max", 0),
            FlipBit("l1", 3, 1),
            SetEntry("l2", 0, 0, True, "past-eof", 5),
            CopyEntry("l2", 0, 0, "l2", 0, 7),
            Truncate("last", 0),
            Append(100),
            SetNeedCheck(),
        ):
            data, done = mutate(seed_image, [m])
            assert done and data != seed_image.data, (seed_image.name, m)
