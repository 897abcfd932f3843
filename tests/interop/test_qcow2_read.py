"""qcow2 images made by qemu-img and qemu-io, read by qedkit; QEMU is the oracle.

Every image (built once per session, small) is judged on every read path against
``qemu-img convert -O raw`` of it: a library read of the whole disk (and unaligned
windows), ``qed convert -O raw`` and ``-O qed``, ``qed map --output=json`` against
``qemu-img map --output=json`` (text), ``qed info --output=json`` against ``qemu-img
info --output=json`` (text), and reads through ``qed serve -r`` by nbdcopy (and
qemu-io for a few). No read path may change the file.

Which qcow2 feature each image covers is in ``CASES`` (the ``covers`` text).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qedtest import Qemu, require_tool

import qedkit
from qedkit.cli.main import main as qed_main
from qedkit.errors import UnsupportedFeatureError

KiB = 1 << 10
MiB = 1 << 20

pytestmark = pytest.mark.qemu


# ==========================================================================================
# The images
# ==========================================================================================


def _pattern_raw(path: Path, size: int, pieces: list[tuple[int, int, str]]) -> None:
    """A sparse raw file: each (offset, length, kind) piece holds random bytes
    ("random": incompressible), a text-like repetitive pattern ("text": compresses),
    or one repeated byte ("fill")."""
    rng = random.Random(f"{path.name}")
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, kind in pieces:
            f.seek(offset)
            if kind == "random":
                f.write(rng.randbytes(length))
            elif kind == "text":
                words = [b"qcow2", b"cluster", b"L2", b"refcount", b"zero", b"backing"]
                out = bytearray()
                while len(out) < length:
                    out += rng.choice(words) + b" %d\n" % rng.randrange(1000)
                f.write(out[:length])
            else:
                f.write(bytes([0x5A]) * length)


def _io(qemu: Qemu, image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv: list[str] = ["-f", fmt]
    for c in commands:
        argv += ["-c", c]
    qemu.io(*argv, image)


def _create(qemu: Qemu, image: Path, size: str, options: str = "", *extra: str) -> None:
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    qemu.img(*args, *extra, image, size)


def make_v2(qemu: Qemu, d: Path) -> Path:
    p = d / "v2.qcow2"
    _create(qemu, p, str(5 * MiB + 1536), "compat=0.10")
    _io(qemu, p, "write -P 0x11 0 100k", "write -P 0x22 3145900 5000", "write -z 1m 128k",
        "write -P 0x23 5m 1536")  # fmt: skip
    return p


def make_v3_4k(qemu: Qemu, d: Path) -> Path:
    p = d / "v3-4k.qcow2"
    _create(qemu, p, str(5 * MiB + 1536), "cluster_size=4096")
    _io(qemu, p,
        "write -P 0x33 2044k 8k",  # crosses an L2 table (4 KiB clusters: 2 MiB each)
        "write -z 64k 16k",  # zero clusters (ZERO_PLAIN)
        "write -P 0x44 128k 16k", "write -z 128k 8k",  # zero flag on allocated (ZERO_ALLOC)
        "write -z -u 136k 8k",  # write -z -u over data
        "write -P 0x55 5m 1536",  # the partial last cluster
        "write -P 0x56 1000 3000")  # fmt: skip
    return p


def make_v3_512(qemu: Qemu, d: Path) -> Path:
    p = d / "v3-512.qcow2"
    _create(qemu, p, str(1 * MiB + 512), "cluster_size=512")
    _io(qemu, p, "write -P 0x61 0 1500", "write -P 0x62 31k 4k",  # 512 B: L2 spans 32 KiB
        "write -z 100k 2k", "write -P 0x63 1m 512", "write -P 0x64 500k 100k")  # fmt: skip
    return p


def make_v3_2m(qemu: Qemu, d: Path) -> Path:
    p = d / "v3-2m.qcow2"
    _create(qemu, p, str(9 * MiB), "cluster_size=2M")
    _io(qemu, p, "write -P 0x71 1m 3m", "write -z 6m 2m", "write -P 0x72 8390000 5000")
    return p


def _compressed(qemu: Qemu, d: Path, name: str, options: str, size: int) -> Path:
    src = d / f"{name}.src.raw"
    _pattern_raw(
        src,
        size,
        [
            (0, 300 * KiB, "text"),
            (1 * MiB, 64 * KiB, "random"),  # incompressible: stored uncompressed
            (2 * MiB - 3000, 9000, "text"),
            (3 * MiB, 1 * MiB, "fill"),
            (size - 70 * KiB, 70 * KiB, "text"),
        ],
    )
    p = d / f"{name}.qcow2"
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, src, p)
    src.unlink()
    return p


def make_zlib_64k(qemu: Qemu, d: Path) -> Path:
    return _compressed(qemu, d, "zlib-64k", "compression_type=zlib", 6 * MiB)


def make_zlib_4k(qemu: Qemu, d: Path) -> Path:
    return _compressed(qemu, d, "zlib-4k", "cluster_size=4096", 6 * MiB)


def make_zlib_512(qemu: Qemu, d: Path) -> Path:
    return _compressed(qemu, d, "zlib-512", "cluster_size=512", 5 * MiB)


def make_zlib_2m(qemu: Qemu, d: Path) -> Path:
    return _compressed(qemu, d, "zlib-2m", "cluster_size=2M", 8 * MiB)


def make_zstd_64k(qemu: Qemu, d: Path) -> Path:
    return _compressed(qemu, d, "zstd-64k", "compression_type=zstd", 6 * MiB)


def make_zstd_extl2(qemu: Qemu, d: Path) -> Path:
    p = _compressed(qemu, d, "zstd-extl2", "compression_type=zstd,extended_l2=on", 6 * MiB)
    _io(qemu, p, "write -P 0x73 8k 4k")  # a write into a compressed cluster
    return p


def make_zeros(qemu: Qemu, d: Path) -> Path:
    p = d / "zeros.qcow2"
    _create(qemu, p, "4M")
    _io(qemu, p, "write -P 0x81 0 256k",
        "write -z 64k 64k",  # zero flag, allocation kept (ZERO_ALLOC)
        "write -z -u 128k 64k",  # zero flag, unmapped (ZERO_PLAIN)
        "write -z 1m 128k",  # fresh range (ZERO_PLAIN)
        "write -z -u 2m 64k",
        "write -z 196k 4k")  # a partial cluster: real zeros  # fmt: skip
    return p


def make_extl2(qemu: Qemu, d: Path) -> Path:
    p = d / "extl2.qcow2"
    _create(qemu, p, "4M", "extended_l2=on")
    _io(qemu, p,
        "write -P 0x91 4k 4k",  # subclusters 2-3 (0xc)
        "write -P 0x92 70k 1000",  # part of one subcluster
        "write -z 128k 8k",  # zero bits of an unallocated cluster
        "write -z 192k 64k",  # a whole zero cluster
        "write -P 0x93 256k 64k",  # fully allocated
        "write -z 260k 2k",  # zero bit inside an allocated cluster
        "write -P 0x94 1m 200k")  # fmt: skip
    return p


def make_extl2_16k(qemu: Qemu, d: Path) -> Path:
    p = d / "extl2-16k.qcow2"
    _create(qemu, p, "2M", "extended_l2=on,cluster_size=16k")  # 512-byte subclusters
    _io(qemu, p, "write -P 0xa1 512 512", "write -P 0xa2 20000 3000", "write -z 40k 1k")
    return p


def _base_raw(d: Path, size: int) -> Path:
    base = d / "base.raw"
    if not base.exists():
        _pattern_raw(base, size, [(0, 1 * MiB, "random"), (2 * MiB, 512 * KiB, "text")])
    return base


def make_over_raw(qemu: Qemu, d: Path) -> Path:
    _base_raw(d, 3 * MiB)
    p = d / "over-raw.qcow2"
    _create(qemu, p, "5M", "", "-b", "base.raw", "-F", "raw")  # longer than its backing file
    _io(qemu, p, "write -P 0xb1 100k 10k", "write -z 300k 64k",  # the zero flag hides backing
        "write -P 0xb2 2900k 300k")  # across the end of the backing file  # fmt: skip
    return p


def make_extl2_over_raw(qemu: Qemu, d: Path) -> Path:
    _base_raw(d, 3 * MiB)
    p = d / "extl2-over-raw.qcow2"
    _create(qemu, p, "4M", "extended_l2=on", "-b", "base.raw", "-F", "raw")
    _io(qemu, p, "write -P 0xc1 4k 4k",  # the other subclusters read the backing file
        "write -z 64k 8k", "write -P 0xc2 2050k 3000")  # fmt: skip
    return p


def make_over_qcow2(qemu: Qemu, d: Path) -> Path:
    base = d / "base.qcow2"
    _create(qemu, base, "4M", "cluster_size=4096")
    _io(qemu, base, "write -P 0xd1 0 1m", "write -P 0xd2 3m 512k")
    p = d / "over-qcow2.qcow2"
    _create(qemu, p, "4M", "", "-b", "base.qcow2", "-F", "qcow2")
    _io(qemu, p, "write -P 0xd3 64k 64k", "write -z 128k 128k", "write -P 0xd4 3200k 4k")
    return p


def make_refcount_1(qemu: Qemu, d: Path) -> Path:
    p = d / "refcount-1.qcow2"
    _create(qemu, p, "2M", "refcount_bits=1")
    _io(qemu, p, "write -P 0xe1 0 200k", "write -z 1m 64k")
    return p


def make_refcount_64(qemu: Qemu, d: Path) -> Path:
    p = d / "refcount-64.qcow2"
    _create(qemu, p, "2M", "refcount_bits=64")
    _io(qemu, p, "write -P 0xe2 64k 200k")
    return p


def make_snapshot(qemu: Qemu, d: Path) -> Path:
    p = d / "snapshot.qcow2"
    _create(qemu, p, "2M")
    _io(qemu, p, "write -P 0xf1 0 256k")
    qemu.img("snapshot", "-c", "first", p)
    _io(qemu, p, "write -P 0xf2 64k 64k", "write -z 192k 64k")  # COW: the snapshot keeps 0xf1
    qemu.img("snapshot", "-c", "second", p)
    _io(qemu, p, "write -P 0xf3 1m 4k")
    return p


def make_dirty(qemu: Qemu, d: Path) -> Path:
    p = d / "dirty.qcow2"
    _create(qemu, p, "2M", "lazy_refcounts=on")
    # qemu-io's abort leaves the dirty bit set (lazy refcounts: refcounts are stale)
    qemu.io("-c", "write -P 0x12 0 128k", "-c", "abort", p, check=False)
    return p


def make_corrupt(qemu: Qemu, d: Path) -> Path:
    p = d / "corrupt.qcow2"
    _create(qemu, p, "2M")
    _io(qemu, p, "write -P 0x13 64k 64k")
    with open(p, "r+b") as f:  # set the corrupt bit (incompatible feature bit 1)
        f.seek(79)
        flags = f.read(1)[0]
        f.seek(79)
        f.write(bytes([flags | 2]))
    return p


def make_bitmaps(qemu: Qemu, d: Path) -> Path:
    p = d / "bitmaps.qcow2"
    _create(qemu, p, "4M")
    qemu.img("bitmap", "--add", p, "b0")
    qemu.img("bitmap", "--add", "-g", "128k", "--disable", p, "second")
    _io(qemu, p, "write -P 0x16 0 64k")
    return p


def make_prealloc_metadata(qemu: Qemu, d: Path) -> Path:
    p = d / "prealloc-metadata.qcow2"
    _create(qemu, p, "2M", "preallocation=metadata")  # every entry allocated, file holes
    _io(qemu, p, "write -P 0x14 100k 8k")
    return p


def make_prealloc_falloc(qemu: Qemu, d: Path) -> Path:
    p = d / "prealloc-falloc.qcow2"
    _create(qemu, p, "2M", "preallocation=falloc,cluster_size=16k")
    _io(qemu, p, "write -P 0x15 100k 8k", "write -z 512k 64k")
    return p


@dataclass(frozen=True)
class Case:
    make: Callable[[Qemu, Path], Path]
    covers: str
    map_parity: bool = True


CASES: dict[str, Case] = {
    "v2": Case(make_v2, "v2 (compat=0.10), write -z with no zero flag, partial last cluster"),
    "v3-4k": Case(make_v3_4k, "4 KiB clusters, an L2 boundary, ZERO_PLAIN/ZERO_ALLOC, write -z -u"),
    "v3-512": Case(make_v3_512, "512-byte clusters (many L2 tables)"),
    "v3-2m": Case(make_v3_2m, "2 MiB clusters, a size not a multiple of the cluster"),
    "zlib-64k": Case(make_zlib_64k, "convert -c, zlib (raw deflate), 64 KiB clusters"),
    "zlib-4k": Case(make_zlib_4k, "convert -c, zlib, 4 KiB clusters (descriptor split x=58)"),
    "zlib-512": Case(make_zlib_512, "convert -c, zlib, 512-byte clusters (x=61)"),
    "zlib-2m": Case(make_zlib_2m, "convert -c, zlib, 2 MiB clusters (x=49)"),
    "zstd-64k": Case(make_zstd_64k, "convert -c, compression_type=zstd"),
    "zstd-extl2": Case(make_zstd_extl2, "zstd with extended L2 (compressed entries' bitmap 0)"),
    "zeros": Case(make_zeros, "write -z (-u) on data and on fresh ranges (v3 zero flag)"),
    "extl2": Case(make_extl2, "extended_l2=on: partial subclusters, zero bits, whole clusters"),
    "extl2-16k": Case(make_extl2_16k, "extended L2 with the smallest clusters (512 B subclusters)"),
    "over-raw": Case(make_over_raw, "a raw backing file shorter than the image, zero flag over it"),
    "extl2-over-raw": Case(make_extl2_over_raw, "unallocated subclusters read the backing file"),
    "over-qcow2": Case(make_over_qcow2, "a qcow2 backing file (backing format extension)"),
    "refcount-1": Case(make_refcount_1, "refcount_bits=1"),
    "refcount-64": Case(make_refcount_64, "refcount_bits=64"),
    "snapshot": Case(make_snapshot, "internal snapshots: the active layer reads, info lists them"),
    "dirty": Case(make_dirty, "the dirty bit (lazy refcounts, qemu-io abort): reads are fine"),
    "corrupt": Case(make_corrupt, "the corrupt bit: read-only reading is allowed"),
    "bitmaps": Case(make_bitmaps, "persistent bitmaps (listed by info, flags and granularity)"),
    # qemu-img map detects metadata preallocation (refcounts against the file's
    # allocated size) and then reports holes under data clusters as zero; qed map
    # reports them as data (reads are the same)
    "prealloc-metadata": Case(make_prealloc_metadata, "preallocation=metadata", False),
    "prealloc-falloc": Case(make_prealloc_falloc, "preallocation=falloc, 16 KiB clusters"),
}  # fmt: skip


@dataclass(frozen=True)
class Made:
    name: str
    path: Path
    raw: bytes  # qemu-img convert -O raw of the image
    sha: str  # of the image file (and its backing files), before any test

    @property
    def size(self) -> int:
        return len(self.raw)


def _sha(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


@pytest.fixture(scope="session")
def images(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    d = tmp_path_factory.mktemp("qcow2-images")
    out = {}
    for name, case in CASES.items():
        path = case.make(qemu, d)
        raw = d / f"{name}.expected"
        qemu.img("convert", "-U", "-O", "raw", path, raw)
        out[name] = Made(name, path, raw.read_bytes(), "")
        raw.unlink()
    sha = _sha(*_files(d))
    return {name: Made(m.name, m.path, m.raw, sha) for name, m in out.items()}


@pytest.fixture(params=sorted(CASES))
def made(request: pytest.FixtureRequest, images: dict[str, Made]) -> Iterator[Made]:
    m = images[request.param]
    yield m
    assert _sha(*_files(m.path.parent)) == m.sha, "a read path changed an image file"


def _run_qed(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``qed`` in process (fast); returns (exit code, stdout, stderr)."""
    import io as _io_mod

    out, err = _io_mod.StringIO(), _io_mod.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qed_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# ==========================================================================================
# Read paths
# ==========================================================================================


def test_library_reads_equal_qemu_img_convert(made: Made) -> None:
    with qedkit.open(str(made.path), readonly=True) as img:
        assert img.format == "qcow2"
        assert img.size == made.size
        got = bytearray()
        chunk = 768 * KiB  # not a multiple of any cluster size above 256 KiB
        for pos in range(0, img.size, chunk):
            got += img.read(pos, min(chunk, img.size - pos))
        assert got == made.raw
        rng = random.Random(made.name)
        for _ in range(200):  # unaligned windows (cut clusters and subclusters anywhere)
            pos = rng.randrange(img.size)
            n = rng.randrange(1, min(200 * KiB, img.size - pos) + 1)
            assert img.read(pos, n) == made.raw[pos : pos + n], (pos, n)


def test_qed_convert_raw_and_qed_equal_qemu_img_convert(
    made: Made, qemu: Qemu, tmp_path: Path
) -> None:
    target = tmp_path / "out.raw"
    assert _run_qed("convert", "-O", "raw", made.path, target)[0] == 0
    assert target.read_bytes() == made.raw
    qed_target = tmp_path / "out.qed"
    assert _run_qed("convert", "-O", "qed", made.path, qed_target)[0] == 0
    expected = tmp_path / "expected.raw"
    expected.write_bytes(made.raw)
    qemu.img("compare", "-f", "qed", "-F", "raw", qed_target, expected)
    qemu.img("check", "-f", "qed", qed_target)


def test_map_json_equals_qemu_img_map(made: Made, qemu: Qemu) -> None:
    if not CASES[made.name].map_parity:  # the parts that are comparable: data vs not
        with qedkit.open(str(made.path), readonly=True) as img:
            assert all(e.data for e in img.map() if e.present)
        return
    ours = _run_qed("map", "--output=json", made.path)
    assert ours[0] == 0, ours[2]
    theirs = qemu.img("map", "-U", "--output=json", made.path).stdout
    assert ours[1] == theirs


def test_info_json_equals_qemu_img_info(made: Made, qemu: Qemu) -> None:
    for extra in ((), ("--backing-chain",)):
        ours = _run_qed("info", "--output=json", *extra, made.path)
        assert ours[0] == 0, ours[2]
        theirs = qemu.img("info", "-U", "--output=json", *extra, made.path).stdout
        assert ours[1] == theirs


def test_info_human_equals_qemu_img_info(made: Made, qemu: Qemu) -> None:
    ours = _run_qed("info", made.path)
    assert ours[0] == 0, ours[2]
    theirs = qemu.img("info", "-U", made.path).stdout
    assert ours[1] == theirs


# ---- qed serve -r --------------------------------------------------------------------------


@contextlib.contextmanager
def serving(image: Path, sock: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """``qed serve -r`` on a unix socket, stopped (SIGTERM, then kill) on the way out."""
    log = open(sock.with_suffix(".log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "qedkit", "serve", "-k", str(sock), *options, str(image)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"qed serve exited {proc.returncode}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    if s.recv(8) == b"NBDMAGIC":
                        break
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
            if time.monotonic() > deadline:
                raise AssertionError("qed serve did not listen")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        text = sock.with_suffix(".log").read_text(errors="replace")
        assert "Traceback" not in text, text


def test_reads_through_qed_serve_read_only_equal_qemu_img_convert(
    made: Made, qemu: Qemu, tmp_path: Path
) -> None:
    nbdcopy = require_tool("nbdcopy")
    sock = tmp_path / "s.sock"
    out = tmp_path / "copy.raw"
    with serving(made.path, sock, "-r", "-e", "4"):
        uri = f"nbd+unix:///?socket={sock}"
        subprocess.run([nbdcopy, uri, str(out)], check=True, capture_output=True, timeout=120)
        # qemu-io over NBD: unaligned reads, and the zero/allocation view of qemu-img map
        n = min(made.size, 300 * KiB) - 1000
        pattern_check = qemu.io("-r", "-f", "raw", "-c", f"read -v 1000 {min(n, 64)}", uri)
        assert pattern_check.returncode == 0
        mapped = qemu.img("map", "--output=json", "-f", "raw", uri).stdout
    assert out.read_bytes() == made.raw
    assert '"start": 0' in mapped
    dump = pattern_check.stdout.splitlines()[0]  # "000003e8:  xx xx ..."
    first = int(dump.split()[1], 16)
    assert first == made.raw[1000]


def test_serve_without_read_only_is_refused_cleanly(
    images: dict[str, Made], tmp_path: Path
) -> None:
    path = images["zeros"].path
    proc = subprocess.run(
        [sys.executable, "-m", "qedkit", "serve", "-k", str(tmp_path / "s.sock"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"qed: {path}: qcow2 images open read-only in qedkit (qed convert --in-place makes "
        "it QED in the same file; qed serve --convert-qcow2 does that while serving it)\n"
    )
    assert not (tmp_path / "s.sock").exists()


def test_writes_to_a_qcow2_raise_read_only_error(images: dict[str, Made]) -> None:
    path = str(images["zeros"].path)
    with pytest.raises(qedkit.errors.ReadOnlyError, match="read-only"):
        qedkit.open(path)
    with qedkit.open(path, readonly=True) as img:
        for call in (
            lambda: img.write(0, b"x"),
            lambda: img.write_zeroes(0, 512),
            lambda: img.discard(0, 512),
            lambda: img.resize(8 * MiB),
        ):
            with pytest.raises(qedkit.errors.ReadOnlyError, match="qcow2 images are read-only"):
                call()


# ---- what qedkit needs to know for a converter -------------------------------------------


def test_snapshots_are_listed_and_the_active_layer_reads(images: dict[str, Made]) -> None:
    from qedkit.engine.qcow2 import Qcow2Image
    from qedkit.engine.sync import run

    made = images["snapshot"]
    with qedkit.open(str(made.path), readonly=True) as img:
        engine = img.engine
        assert isinstance(engine, Qcow2Image)
        snaps = run(engine.snapshots())
        assert [s.name for s in snaps] == ["first", "second"]
        assert [s.id for s in snaps] == ["1", "2"]
        assert all(s.disk_size == made.size for s in snaps)
        assert img.read(64 * KiB, 4) == b"\xf2" * 4  # the active layer, not a snapshot
        meta = run(engine.metadata_clusters())
        assert meta.snapshot_table and meta.l2_tables and meta.refcount_blocks
        assert len(meta.snapshot_l1_tables) == 2  # one L1 table (one cluster) each


@pytest.mark.parametrize("name", ["refcount-1", "refcount-64", "snapshot", "v2"])
def test_refcounts_read_as_qemu_check_counts_them(
    name: str, images: dict[str, Made], qemu: Qemu
) -> None:
    """Every cluster the metadata or the data uses has a refcount of at least 1 and
    every cluster past the end of the file 0 (qemu-img check reports the image clean)."""
    from qedkit.engine.qcow2 import Qcow2Image
    from qedkit.engine.sync import run
    from qedkit.format.qcow2 import SubclusterType

    made = images[name]
    qemu.img("check", "-U", made.path)
    with qedkit.open(str(made.path), readonly=True, backing_chain=False) as img:
        engine = img.engine
        assert isinstance(engine, Qcow2Image)
        table = run(engine.refcount_table())
        used = set(run(engine.metadata_clusters()).all())
        for r in run(engine.runs(0, engine.size)):
            if r.kind is SubclusterType.NORMAL and r.host_offset is not None:
                used.add(r.host_offset - r.host_offset % engine.cluster_size)
        for host in sorted(used):
            assert run(engine.refcount(host, table)) >= 1, hex(host)
        end = made.path.stat().st_size
        assert run(engine.refcount(end + 64 * engine.cluster_size, table)) == 0


def test_missing_zstandard_is_a_clear_error(
    images: dict[str, Made], monkeypatch: pytest.MonkeyPatch
) -> None:
    import qedkit.engine.qcow2 as driver

    monkeypatch.setattr(driver, "_zstd", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
    path = str(images["zstd-64k"].path)
    with qedkit.open(path, readonly=True) as img:
        assert img.read(1 * MiB, 4096)  # uncompressed clusters still read
        with pytest.raises(UnsupportedFeatureError) as info:
            img.read(0, 4096)
    assert str(info.value) == (
        f"{path}: the image has zstd-compressed clusters and the Python package "
        "'zstandard' is not installed (pip install qedkit[zstd])"
    )


# ==========================================================================================
# Refusals
# ==========================================================================================


def _luks(qemu: Qemu, path: Path) -> None:
    last = None
    for iter_time in (10, 50, 200):  # the key derivation benchmark needs a measurable time
        result = qemu.img(
            "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o",
            f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={iter_time}",
            path, "1M", check=False,
        )  # fmt: skip
        if result.returncode == 0:
            return
        last = result
    raise AssertionError(f"cannot make a LUKS image: {last}")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("luks", "encrypted qcow2 images (LUKS) are not supported"),
        ("aes", "encrypted qcow2 images (AES) are not supported"),
        ("data-file", "qcow2 images with an external data file ('data.raw') are not supported"),
    ],
)
def test_encrypted_and_data_file_images_are_refused_naming_the_feature(
    kind: str, message: str, qemu: Qemu, tmp_path: Path
) -> None:
    path = tmp_path / f"{kind}.qcow2"
    if kind == "luks":
        _luks(qemu, path)
    elif kind == "aes":
        qemu.img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
                 "-o", "encrypt.format=aes,encrypt.key-secret=sec0", path, "1M")  # fmt: skip
    else:
        qemu.img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", path, "1M")
    before = path.read_bytes()
    with pytest.raises(UnsupportedFeatureError) as info:
        qedkit.open(str(path), readonly=True)
    assert message in info.value.message
    for argv in (
        ("info", path),
        ("map", path),
        ("convert", "-O", "raw", path, tmp_path / "out.raw"),
        ("io", "-r", "-c", "read 0 4k", path),
    ):
        code, _, err = _run_qed(*argv)
        assert code == 1
        assert err.startswith(f"qed: {path}: ") and message in err, err
    assert path.read_bytes() == before
    assert not (tmp_path / "out.raw").exists()


# ==========================================================================================
# Mixed chains
# ==========================================================================================


def test_a_qed_overlay_on_a_qcow2_backing_file_reads_as_qemu_reads_it(
    images: dict[str, Made], qemu: Qemu, tmp_path: Path
) -> None:
    """``qed create -b BASE.qcow2 -F qcow2`` (QED records no format: probed on open),
    written by qed io; QEMU and qedkit read the chain alike."""
    base = images["zlib-64k"].path
    top = tmp_path / "top.qed"
    code, _, err = _run_qed("create", "-q", "-b", base, "-F", "qcow2", top)
    assert code == 0, err
    code, _, err = _run_qed("io", "-c", "write -P 0x77 100k 8k", "-c", "write -z 1m 64k", top)
    assert code == 0, err
    expected = tmp_path / "expected.raw"
    qemu.img("convert", "-U", "-O", "raw", top, expected)
    with qedkit.open(str(top), readonly=True) as img:
        assert [i.format for i in img.chain_info()] == ["qed", "qcow2"]
        assert img.read(0, img.size) == expected.read_bytes()
    ours = _run_qed("map", "--output=json", top)[1]
    assert ours == qemu.img("map", "-U", "--output=json", top).stdout


def test_a_qcow2_overlay_on_a_qed_backing_file_reads_as_qemu_reads_it(
    qemu: Qemu, tmp_path: Path
) -> None:
    base = tmp_path / "base.qed"
    qemu.img("create", "-q", "-f", "qed", "-o", "cluster_size=4096", base, "2M")
    _io(qemu, base, "write -P 0x31 0 300k", fmt="qed")
    top = tmp_path / "top.qcow2"
    _create(qemu, top, "3M", "extended_l2=on", "-b", "base.qed", "-F", "qed")
    _io(qemu, top, "write -P 0x32 8k 4k", "write -z 128k 64k")
    expected = tmp_path / "expected.raw"
    qemu.img("convert", "-O", "raw", top, expected)
    with qedkit.open(str(top), readonly=True) as img:
        assert img.read(0, img.size) == expected.read_bytes()
    assert _run_qed("map", "--output=json", top)[1] == qemu.img("map", "--output=json", top).stdout
    chain = ("info", "--output=json", "--backing-chain")
    assert _run_qed(*chain, top)[1] == qemu.img(*chain, top).stdout
