"""Fuzzing the qcow2 reader: hostile headers, extensions and tables.

Seeds are small qcow2 images made by qemu-img/qemu-io (4 KiB clusters unless the
feature needs more): plain v3 data with zero clusters, v2, zlib- and zstd-compressed,
extended L2 with partial subclusters, a raw backing file, an internal snapshot,
512-byte clusters, persistent bitmaps. Hypothesis applies mutations: a header field
overwritten with an interesting value, bit flips (header, extension area, L1, L2, anywhere), an
extension's type or length overwritten, L1 entries and L2 entries (and subcluster
bitmaps) overwritten (unaligned, past the end, pointing at metadata, COPIED,
compressed descriptors with random offsets and sector counts, zero flags), the file
truncated or extended.

Each case, in a worker thread under a time bound, must only ever raise QedError:

1. open read-only on a *no-write store* (any write, zeroing, discard or truncate is
   a failure, whatever the engine would do with it), then info, the chain map of
   the whole image, and reads of the first 4 MiB and of whatever the map says may
   hold data (up to 16 MiB) in 64 KiB chunks (a second pass reads 1000-byte pieces,
   unaligned, of the first 256 KiB);
2. ``convert -O raw`` through the real open path (images of up to 256 MiB): if it
   and step 1 succeeded, the target holds the bytes step 1 read;
3. ``qed info --output=json`` and ``qed map --output=json`` through the CLI's main()
   in process: exit 0 or 1, and a ``qed: `` message on failure.

The image and its backing file must be byte-for-byte unchanged (sha256). Case counts
are printed in the fuzz summary (kind "qcow2"); ``QEDKIT_FUZZ_SCALE`` multiplies them
(500 by default), ``QEDKIT_FUZZ_SEED=S`` draws random cases from seed S instead of
the derandomized sequence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzzkit import capped_address_space
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from qedtest import IN_CI

from qedkit.cli.main import main as qed_main
from qedkit.engine.base import BlockImage
from qedkit.engine.chain import open_image
from qedkit.engine.mapping import map_chain
from qedkit.engine.names import full_backing_filename
from qedkit.engine.qcow2 import Qcow2Image
from qedkit.engine.sync import close_thread_loop
from qedkit.errors import BackingFileError, QedError
from qedkit.format import qcow2 as q
from qedkit.jobs.convert import convert
from qedkit.store import ByteStore, FileStore
from qedkit.store.base import Buffer, StoreExtent

KiB, MiB = 1 << 10, 1 << 20
U64 = 2**64 - 1
SCALE = max(1, round(float(os.environ.get("QEDKIT_FUZZ_SCALE") or 1)))
EXAMPLES = 500 * SCALE
CASE_TIMEOUT = float(os.environ.get("QEDKIT_FUZZ_CASE_TIMEOUT") or 30)
HEAD_READ = 4 * MiB
READ_CAP = 16 * MiB
CHUNK = 64 * KiB
CONVERT_LIMIT = 256 * MiB
# The seed images (made by qemu-img in ``env``), by name.
SEED_NAMES = ["plain", "v2", "zlib", "zstd", "extl2", "backing", "snapshot", "c512", "bitmaps"]


# ==========================================================================================
# Seeds
# ==========================================================================================


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    l1: tuple[int, ...]  # file offsets of the L1 entries
    l2: tuple[int, ...]  # file offsets of the L2 tables
    extensions: tuple[int, ...]  # file offsets of the extension headers
    cluster_size: int
    extended: bool

    def __repr__(self) -> str:
        return f"Seed({self.name!r}, {len(self.data)} bytes)"

    @classmethod
    def of(cls, name: str, data: bytes) -> Seed:
        """Locate the tables with struct alone (not the code under test)."""
        (version,) = struct.unpack_from(">I", data, 4)
        (cluster_bits,) = struct.unpack_from(">I", data, 20)
        (l1_size,) = struct.unpack_from(">I", data, 36)
        (l1_offset,) = struct.unpack_from(">Q", data, 40)
        incompat = struct.unpack_from(">Q", data, 72)[0] if version == 3 else 0
        header_length = struct.unpack_from(">I", data, 100)[0] if version == 3 else 72
        l1 = tuple(l1_offset + 8 * i for i in range(l1_size))
        l2 = tuple(
            e & 0x00FFFFFFFFFFFE00
            for e in struct.unpack_from(f">{l1_size}Q", data, l1_offset)
            if e & 0x00FFFFFFFFFFFE00
        )
        exts, pos = [], header_length
        while pos + 8 <= 1 << cluster_bits:
            ext_type, length = struct.unpack_from(">II", data, pos)
            if ext_type == 0:
                break
            exts.append(pos)
            pos += 8 + (length + 7) // 8 * 8
        return cls(name, data, l1, l2, tuple(exts), 1 << cluster_bits, bool(incompat & 16))


def _build_seeds(d: Path, qemu_img: str, qemu_io: str) -> dict[str, Seed]:
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=d, timeout=120)

    def make(name: str, options: str, size: str, *writes: str, extra: Sequence[str] = ()) -> None:
        run(qemu_img, "create", "-q", "-f", "qcow2", "-o", options, *extra, name, size)
        if writes:
            run(qemu_io, *[a for w in writes for a in ("-c", w)], name)

    rng = random.Random(7)
    with open(d / "base.raw", "wb") as f:
        f.truncate(2 * MiB)
        f.write(rng.randbytes(200 * KiB))
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.truncate(3 * MiB)
        f.write((b"qcow2 fuzz %d\n" % 7) * 20000)
        f.seek(2 * MiB)
        f.write(rng.randbytes(8 * KiB))
    cs4k = "cluster_size=4096"
    make("plain.qcow2", cs4k, "3M", "write -P 0x11 0 20k", "write -z 8k 8k",
         "write -z -u 64k 8k", "write -P 0x12 2044k 8k", "write -z 1m 12k")  # fmt: skip
    make("v2.qcow2", cs4k + ",compat=0.10", "2M", "write -P 0x21 4k 12k")
    run(qemu_img, "convert", "-c", "-O", "qcow2", "-o", cs4k, "src.raw", "zlib.qcow2")
    run(qemu_img, "convert", "-c", "-O", "qcow2", "-o", cs4k + ",compression_type=zstd",
        "src.raw", "zstd.qcow2")  # fmt: skip
    make("extl2.qcow2", "cluster_size=16k,extended_l2=on", "2M", "write -P 0x31 1k 2k",
         "write -z 20k 4k", "write -P 0x32 64k 16k", "write -z 66k 1k")  # fmt: skip
    make("backing.qcow2", cs4k, "3M", "write -P 0x41 4k 4k", "write -z 100k 8k",
         extra=("-b", "base.raw", "-F", "raw"))  # fmt: skip
    make("snapshot.qcow2", cs4k, "1M", "write -P 0x51 0 16k")
    run(qemu_img, "snapshot", "-c", "s1", "snapshot.qcow2")
    run(qemu_io, "-c", "write -P 0x52 4k 4k", "snapshot.qcow2")
    make("c512.qcow2", "cluster_size=512", "256k", "write -P 0x61 1000 3000", "write -z 8k 1k")
    make("bitmaps.qcow2", cs4k, "1M", "write -P 0x71 0 8k")
    run(qemu_img, "bitmap", "--add", "bitmaps.qcow2", "b0")
    run(qemu_img, "bitmap", "--add", "--disable", "bitmaps.qcow2", "b1")
    src.unlink()
    return {p.stem: Seed.of(p.stem, p.read_bytes()) for p in sorted(d.glob("*.qcow2"))}


class Env:
    def __init__(self, workdir: Path, seeds: dict[str, Seed], backing_sha: str) -> None:
        self.workdir = workdir
        self.seeds = seeds
        self.backing_sha = backing_sha
        self.serial = 0
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fuzz2")

    def __repr__(self) -> str:
        return f"Env({str(self.workdir)!r})"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    qemu_img, qemu_io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not (qemu_img and qemu_io):
        message = "qemu-img/qemu-io are not installed (they make the qcow2 seeds)"
        if IN_CI:
            pytest.fail(message + " (CI=true)")
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("fuzz-qcow2")
    seeds = _build_seeds(workdir, qemu_img, qemu_io)
    e = Env(workdir, seeds, hashlib.sha256((workdir / "base.raw").read_bytes()).hexdigest())
    yield e
    e.executor.submit(close_thread_loop).result()
    e.executor.shutdown(wait=True)


@pytest.fixture(scope="module", autouse=True)
def memory_cap() -> Iterator[None]:
    """An image must not make qedkit allocate gigabytes: cap the address space while
    the fuzzer runs (MemoryError instead of the OOM killer)."""
    with capped_address_space(4 << 30):
        yield


# ==========================================================================================
# Mutations
# ==========================================================================================

FIELDS: dict[str, tuple[int, int]] = {  # name -> (offset, width in bytes)
    "version": (4, 4), "backing_file_offset": (8, 8), "backing_file_size": (16, 4),
    "cluster_bits": (20, 4), "size": (24, 8), "crypt_method": (32, 4), "l1_size": (36, 4),
    "l1_table_offset": (40, 8), "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4), "nb_snapshots": (60, 4), "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8), "compatible_features": (80, 8),
    "autoclear_features": (88, 8), "refcount_order": (96, 4), "header_length": (100, 4),
    "compression_type": (104, 1),
}  # fmt: skip


@dataclass(frozen=True)
class SetField:
    field: str
    value: str
    k: int


@dataclass(frozen=True)
class FlipBit:
    region: str  # header, extensions, l1, l2, any
    pos: int
    bit: int


@dataclass(frozen=True)
class SetExtension:
    which: int
    part: str  # type or length
    value: int


@dataclass(frozen=True)
class SetEntry:
    table: str  # l1, l2, bitmap
    which: int
    index: int
    value: str
    k: int


@dataclass(frozen=True)
class Resize:
    mode: str  # truncate or append
    k: int


Mutation = SetField | FlipBit | SetExtension | SetEntry | Resize

FIELD_VALUES = ["zero", "one", "max", "pow2", "old+k", "old-k", "old<<k", "setbit", "random"]
ENTRY_VALUES = ["zero", "one", "copied", "header", "l1", "l2", "eof", "past-eof", "unaligned",
                "huge", "compressed", "zero-flag", "random"]  # fmt: skip
u64 = st.integers(0, U64)
mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.builds(SetField, st.sampled_from(sorted(FIELDS)), st.sampled_from(FIELD_VALUES), u64),
    st.builds(
        FlipBit,
        st.sampled_from(["header", "extensions", "l1", "l2", "any"]),
        st.integers(0, 2**20),
        st.integers(0, 7),
    ),
    st.builds(
        SetExtension,
        st.integers(0, 8),
        st.sampled_from(["type", "length"]),
        st.one_of(
            st.integers(0, 64),
            st.integers(0, 2**32 - 1),
            st.sampled_from([e.value for e in q.ExtensionType]),
        ),
    ),
    st.builds(
        SetEntry,
        st.sampled_from(["l1", "l2", "l2", "bitmap"]),
        st.integers(0, 64),
        st.integers(0, 2**16),
        st.sampled_from(ENTRY_VALUES),
        u64,
    ),
    st.builds(Resize, st.sampled_from(["truncate", "append"]), st.integers(0, 2**20)),
)


def _put(buf: bytearray, offset: int, width: int, value: int) -> None:
    if offset + width <= len(buf):
        buf[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")


def _entry_value(seed: Seed, size: int, value: str, k: int) -> int:
    cs = seed.cluster_size
    l2 = seed.l2[k % len(seed.l2)] if seed.l2 else cs
    l1 = seed.l1[0] if seed.l1 else cs
    choices = {
        "zero": 0,
        "one": 1,
        "copied": (1 << 63) | (k % max(1, size // cs)) * cs,
        "header": 1 << 63,
        "l1": l1 - l1 % cs,
        "l2": l2,
        "eof": size - size % cs,
        "past-eof": size - size % cs + cs * (1 + k % 4),
        "unaligned": (k % max(1, size)) | 0x200,
        "huge": (1 << 55) + (k % 97) * cs,
        "compressed": (1 << 62) | (k & ((1 << 62) - 1)),
        "zero-flag": 1 | ((k % max(1, size // cs)) * cs),
        "random": k,
    }
    return choices[value]


def mutated(seed: Seed, muts: Sequence[Mutation]) -> bytearray:
    """The seed's bytes with ``muts`` applied in order."""
    data = bytearray(seed.data)
    for m in muts:
        data = apply(seed, data, m)
    return data


def apply(seed: Seed, data: bytearray, m: Mutation) -> bytearray:
    size = len(data)
    if isinstance(m, SetField):
        offset, width = FIELDS[m.field]
        old = int.from_bytes(data[offset : offset + width], "big") if offset + width <= size else 0
        top = (1 << (8 * width)) - 1
        value = {
            "zero": 0, "one": 1, "max": top, "pow2": 1 << (m.k % (8 * width)),
            "old+k": old + 1 + m.k % 64, "old-k": old - 1 - m.k % 64,
            "old<<k": old << (1 + m.k % 8), "setbit": old | 1 << (m.k % (8 * width)),
            "random": m.k,
        }[m.value]  # fmt: skip
        _put(data, offset, width, value % (top + 1))
    elif isinstance(m, FlipBit):
        start, end = {
            "header": (0, 112),
            "extensions": (72, min(size, seed.cluster_size)),
            "l1": (seed.l1[0], seed.l1[-1] + 8) if seed.l1 else (0, 112),
            "l2": (seed.l2[0], seed.l2[0] + seed.cluster_size) if seed.l2 else (0, 112),
            "any": (0, size),
        }[m.region]
        if end > start:
            pos = start + m.pos % (end - start)
            if pos < size:
                data[pos] ^= 1 << m.bit
    elif isinstance(m, SetExtension):
        if seed.extensions:
            pos = seed.extensions[m.which % len(seed.extensions)]
            _put(data, pos + (0 if m.part == "type" else 4), 4, m.value)
    elif isinstance(m, SetEntry):
        value = _entry_value(seed, size, m.value, m.k)
        if m.table == "l1" and seed.l1:
            _put(data, seed.l1[m.index % len(seed.l1)], 8, value)
        elif seed.l2:
            table = seed.l2[m.which % len(seed.l2)]
            words = 2 if seed.extended else 1
            entries = seed.cluster_size // (8 * words)
            index = m.index % entries
            word = 1 if m.table == "bitmap" and seed.extended else 0
            if m.table == "bitmap" and seed.extended:
                value = m.k  # any bitmap: allocation and zero bits, contradictions included
            _put(data, table + 8 * (index * words + word), 8, value)
    elif m.mode == "truncate":
        del data[m.k % max(1, size) :]
    else:
        data += bytes([m.k & 0xFF]) * (m.k % (64 * KiB))
    return data


# ==========================================================================================
# The no-write store and one case
# ==========================================================================================


class NoWriteStore(ByteStore):
    """A read-only FileStore that records any attempt to change the file."""

    def __init__(self, inner: FileStore) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities
        self.attempts: list[str] = []

    async def size(self) -> int:
        return await self.inner.size()

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        return await self.inner.readinto(offset, buf)

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.attempts.append(f"write at {offset:#x}")
        raise AssertionError("a read-only qcow2 open wrote")

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        self.attempts.append(f"write-zeroes at {offset:#x}")
        raise AssertionError("a read-only qcow2 open zeroed")

    async def discard(self, offset: int, length: int) -> None:
        self.attempts.append(f"discard at {offset:#x}")
        raise AssertionError("a read-only qcow2 open discarded")

    async def truncate(self, size: int) -> None:
        self.attempts.append(f"truncate to {size}")
        raise AssertionError("a read-only qcow2 open truncated")

    async def flush(self) -> None:
        return None

    async def extents(self, offset: int, length: int) -> list[StoreExtent]:
        return await self.inner.extents(offset, length)

    async def allocated_bytes(self) -> int:
        return await self.inner.allocated_bytes()

    async def close(self) -> None:
        await self.inner.close()


async def _open_recorded(path: Path) -> tuple[BlockImage, NoWriteStore]:
    """engine.chain's qcow2 open (format forced, as -f qcow2) on a no-write store."""
    store = NoWriteStore(FileStore.open(str(path), readonly=True))
    try:
        meta = await Qcow2Image.read_metadata(store)
        backing = None
        if meta.backing_filename:
            try:
                backing = await open_image(
                    full_backing_filename(str(path), meta.backing_filename),
                    fmt=meta.backing_format,
                    readonly=True,
                )
            except QedError as exc:
                raise BackingFileError(f"cannot open backing file: {exc}") from exc
        try:
            return await Qcow2Image.open(store, meta, backing=backing, filename=str(path)), store
        except BaseException:
            if backing is not None:
                await backing.close()
            raise
    except BaseException:
        await store.close()
        raise


async def read_mapped(img: BlockImage) -> dict[int, bytes]:
    """What the qcow2 fuzzers read of an image, by guest offset: the first HEAD_READ
    bytes, then what its map says holds data past them (READ_CAP bytes at most), in
    reads of CHUNK bytes. Failure: the QedError of the map or of a read."""
    ranges = [(0, min(img.size, HEAD_READ))]
    budget = READ_CAP
    for e in await map_chain(img):
        if e.present and not e.zero and e.end > HEAD_READ and budget > 0:
            start = max(e.start, HEAD_READ)
            n = min(e.end - start, budget)
            ranges.append((start, n))
            budget -= n
    reads = {}
    for start, n in ranges:
        for pos in range(start, start + n, CHUNK):
            reads[pos] = await img.read(pos, min(CHUNK, start + n - pos))
    return reads


async def _read_step(path: Path, errors: list[str]) -> tuple[int, dict[int, bytes]] | None:
    img, store = await _open_recorded(path)
    try:
        await img.info()
        reads = await read_mapped(img)
        for pos in range(0, min(img.size, 256 * KiB) - 1000, 7919):
            piece = await img.read(pos, 1000)
            block = reads[pos - pos % CHUNK] + reads.get(pos - pos % CHUNK + CHUNK, b"")
            assert piece == block[pos % CHUNK : pos % CHUNK + 1000], f"unaligned read at {pos}"
        return img.size, reads
    finally:
        await img.close()
        if store.attempts:
            errors.append(f"writes on a read-only open: {store.attempts}")


def _cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = qed_main(list(args))
    return code, err.getvalue()


def run_case(path: Path, target: Path) -> list[str]:
    """The steps of the module docstring; returns the violations."""
    errors: list[str] = []
    loop = asyncio.new_event_loop()
    seen: tuple[int, dict[int, bytes]] | None = None
    try:
        seen = loop.run_until_complete(_read_step(path, errors))
    except QedError:
        pass
    finally:
        loop.close()
    size = seen[0] if seen else 0
    if seen is None or size <= CONVERT_LIMIT:
        try:
            convert(str(path), str(target), src_format="qcow2", dst_format="raw")
            if seen is not None:
                with open(target, "rb") as f:
                    for pos, data in seen[1].items():
                        f.seek(pos)
                        if f.read(len(data)) != data:
                            errors.append(f"convert differs from the reads at {pos}")
                            break
        except QedError:
            pass
    for argv in (("info", "--output=json", str(path)), ("map", "--output=json", str(path))):
        code, err = _cli(*argv)
        if code not in (0, 1) or (code and not err.startswith("qed: ")):
            errors.append(f"qed {argv[0]}: exit {code}, stderr {err!r}")
    return errors


_SEED = os.environ.get("QEDKIT_FUZZ_SEED")


def fuzz_settings(max_examples: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The hypothesis settings of the qcow2 fuzzers: ``max_examples`` cases, the
    derandomized sequence unless QEDKIT_FUZZ_SEED names a seed, no database, no
    deadline (a watchdog bounds each case)."""
    base = settings(
        max_examples=max_examples,
        derandomize=_SEED is None,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        return seed(int(_SEED or 0))(base(fn))

    return apply


@fuzz_settings(EXAMPLES)
@given(
    seed_name=st.sampled_from(SEED_NAMES),
    muts=st.lists(mutations, min_size=1, max_size=4),
)
def test_hostile_qcow2_images_give_qed_errors_only_and_are_never_written(
    env: Env, fuzz_counter: Any, seed_name: str, muts: list[Mutation]
) -> None:
    fuzz_counter.hit("qcow2")
    data = mutated(env.seeds[seed_name], muts)
    env.serial += 1
    path = env.workdir / f"case{env.serial}.qcow2"
    target = env.workdir / f"case{env.serial}.raw"
    path.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()
    future = env.executor.submit(run_case, path, target)
    try:
        errors = future.result(timeout=CASE_TIMEOUT)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"case hung (> {CASE_TIMEOUT} s): {path}")
    except Exception as exc:  # anything but QedError escaped a step
        keep = env.workdir / "failures"
        keep.mkdir(exist_ok=True)
        shutil.copy(path, keep / path.name)
        raise AssertionError(f"{type(exc).__name__} escaped on {keep / path.name}") from exc
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the image changed"
    assert hashlib.sha256((env.workdir / "base.raw").read_bytes()).hexdigest() == env.backing_sha, (
        "the backing file changed"
    )
    assert not errors, errors
    fuzz_counter.note("opened" if target.exists() else "refused")
    path.unlink()
    target.unlink(missing_ok=True)
