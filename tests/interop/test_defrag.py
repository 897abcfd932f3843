"""Offline defragmentation (``qed defrag``) judged by QEMU, in both target layouts,
and the home allocation policy's header bit.

Images are fragmented by QEMU itself (qemu-io writing clusters in a shuffled order from
a fixed seed: whole clusters, partial clusters, ``write -z`` zero clusters, over no
backing file, a raw one or a QED one; sparse disks: 5 MiB scattered over 1 GiB, a
shuffled first quarter, the metadata mkfs.ext4 writes on a 4 GiB disk) and by qedkit
(the Python API, with discards and write-zeroes too). A raw shadow is taken with
``qemu-img convert`` before ``qed defrag`` runs (as a subprocess); afterwards:

* ``qemu-img compare`` with the shadow: identical;
* ``qemu-img check``: no corruption. In the **packed** layout (the default) no leak
  either (exit 0): the L2 tables sit right after the L1 table in L1 order, then the
  allocated clusters in guest order with nothing between them, so the file is no
  larger than ``qed convert`` makes it (plus one L2 table and one cluster). In the
  **identity** layout (``--layout identity``) home slots of unallocated guest clusters
  stay free, which every QED checker counts as leaks (exit 3, by design);
* one host read per run: every data cluster sits at its home (computed here from the
  header and the tables without qedkit), and ``qemu-img map`` shows exactly one host
  extent per run of allocated guest clusters, in ascending guest order (``qed frag``
  must agree);
* the file ends at its last used cluster (truncated), every free cluster inside it is
  a hole, and it takes no more disk space than before (st_blocks).

Images stay below ``cluster_size - 1`` clusters, where QEMU's check reports phantom
leaks (qedoracle's docstring), and QEMU never writes partially into a zero cluster
over a backing file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qedoracle import KiB, Layout, MiB
from qedtest import Qemu, qed

import qedkit
from qedkit.engine.qed import QedImage
from qedkit.engine.sync import run as run_sync

pytestmark = pytest.mark.qemu

SLACK = 64 * KiB  # file system metadata (extent tree blocks of a sparse file)
STATS_KEYS = {
    "layout",
    "tables-dropped",
    "zero-clusters-made",
    "clusters-moved",
    "bytes-moved",
    "tables-moved",
    "rounds",
    "seconds",
    "mb-per-second",
    "truncated-bytes",
    "done",
}


# =====================================================================================
# Independent views of the file (no qedkit code)
# =====================================================================================


def data_start(lay: Layout) -> int:
    """Where guest cluster 0's home is: past the header and the L1 table."""
    cs = lay.cluster_size
    end = max(lay.header_size * cs, lay.l1_table_offset + lay.table_bytes)
    return -(-end // cs) * cs


HOME = 0x1  # the home allocation policy's autoclear bit: the identity layout


def identity(lay: Layout) -> bool:
    return bool(lay.autoclear_features & HOME)


def homes(lay: Layout) -> dict[int, int]:
    """Guest cluster -> where defragmentation puts its data. Identity: data start +
    guest offset. Packed: past the L2 tables (all of them, right after the L1 table),
    the allocated clusters one after the other in guest order."""
    cs = lay.cluster_size
    start = data_start(lay)
    data = sorted(g for g, e in l2_entries(lay).items() if e > 1)
    if identity(lay):
        return {g: start + g * cs for g in data}
    base = start + sum(1 for l2 in lay.l1() if l2) * lay.table_bytes
    return {g: base + i * cs for i, g in enumerate(data)}


def table_homes(lay: Layout) -> dict[int, int]:
    """L1 index -> where defragmentation puts its L2 table: in L1 order, right after
    the L1 table (packed) or after the home area (identity)."""
    start = data_start(lay)
    if identity(lay):
        cs = lay.cluster_size
        start += -(-lay.image_size // cs) * cs
    used = [i for i, l2 in enumerate(lay.l1()) if l2]
    return {i: start + k * lay.table_bytes for k, i in enumerate(used)}


def l2_entries(lay: Layout) -> dict[int, int]:
    """Guest cluster index -> L2 entry, for every entry that is not 0."""
    out: dict[int, int] = {}
    for l1_index, l2 in enumerate(lay.l1()):
        if l2:
            for index, entry in enumerate(lay.table(l2)):
                if entry:
                    out[l1_index * lay.entries + index] = entry
    return out


def data_regions(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the non-hole regions of a file (SEEK_DATA / SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def disk_usage(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # ext4 reports delayed allocations late
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_map(qemu: Qemu, path: Path) -> list[dict[str, Any]]:
    return list(json.loads(qemu.img("map", "--output=json", path).stdout))


# =====================================================================================
# Fragmenting images
# =====================================================================================


@dataclass
class Spec:
    """How one image is fragmented: ``count`` clusters of ``size``, in shuffled order;
    a ``zero`` share become zero clusters, a ``partial`` share get a partial write
    (the rest is copied on write from the backing file, or zeros), a ``twice``
    share of the data clusters get a second, in-place partial write."""

    size: int
    cluster_size: int
    table_size: int
    count: int
    seed: int
    zero: float = 0.1
    partial: float = 0.25
    twice: float = 0.1
    runs: float = 0.05  # share of writes that cover 2-3 clusters at once


def shuffled_commands(spec: Spec) -> list[str]:
    """qemu-io commands that write ``spec.count`` clusters in a shuffled order."""
    rng = random.Random(spec.seed)
    cs = spec.cluster_size
    clusters = rng.sample(range(spec.size // cs), spec.count)
    commands = []
    data = []
    for i, c in enumerate(clusters):
        byte = i % 250 + 1
        r = rng.random()
        if r < spec.zero:
            commands.append(f"write -z {c * cs} {cs}")
        elif r < spec.zero + spec.partial:
            off = rng.randrange(cs - 1)
            n = rng.randrange(1, cs - off)
            commands.append(f"write -P {byte} {c * cs + off} {n}")
            data.append(c)
        elif r < spec.zero + spec.partial + spec.runs and c + 3 <= spec.size // cs:
            n = rng.randrange(2, 4) * cs
            commands.append(f"write -P {byte} {c * cs} {n}")
            data.append(c)
        else:
            commands.append(f"write -P {byte} {c * cs} {cs}")
            data.append(c)
    for c in rng.sample(data, int(len(data) * spec.twice)):
        off = rng.randrange(cs - 1)
        commands.append(f"write -P 0xee {c * cs + off} {rng.randrange(1, cs - off)}")
    return commands


def qemu_io_script(qemu: Qemu, path: Path, commands: list[str], fmt: str = "qed") -> None:
    for start in range(0, len(commands), 400):
        # -t unsafe: QEMU's QED flushes at every allocation otherwise (seconds).
        args: list[str | os.PathLike[str]] = ["-t", "unsafe", "-f", fmt]
        for command in commands[start : start + 400]:
            args += ["-c", command]
        qemu.io(*args, path)


def qemu_fragmented(
    qemu: Qemu,
    directory: Path,
    spec: Spec,
    backing: str | None = None,
    name: str = "frag.qed",
) -> Path:
    """A QED image written by qemu-io in a shuffled order; ``backing``: "raw" or
    "qed", a backing file QEMU wrote first (the QED one fragmented too)."""
    path = directory / name
    opts = f"cluster_size={spec.cluster_size},table_size={spec.table_size}"
    extra: list[str] = []
    if backing == "raw":
        base = directory / "base.raw"
        rng = random.Random(spec.seed + 1)
        base.write_bytes(rng.randbytes(spec.size - 5 * spec.cluster_size))  # shorter
        extra = ["-b", "base.raw", "-F", "raw"]
    elif backing == "qed":
        base = directory / "base.qed"
        qemu.img("create", "-f", "qed", "-o", opts, base, str(spec.size))
        below = Spec(spec.size, spec.cluster_size, spec.table_size, spec.count, spec.seed + 7)
        qemu_io_script(qemu, base, shuffled_commands(below))
        extra = ["-b", "base.qed", "-F", "qed"]
    qemu.img("create", "-f", "qed", "-o", opts, *extra, path, str(spec.size), cwd=directory)
    qemu_io_script(qemu, path, shuffled_commands(spec))
    return path


def qedkit_fragmented(directory: Path, spec: Spec, backing: bool = False) -> Path:
    """The same through the Python API, with discards and write-zeroes (unmap or
    not) of allocated clusters too; ``backing``: over a raw backing file."""
    path = directory / "qk.qed"
    rng = random.Random(spec.seed)
    cs = spec.cluster_size
    kw: dict[str, Any] = {}
    if backing:
        (directory / "base.raw").write_bytes(rng.randbytes(spec.size))
        kw = {"backing_file": "base.raw", "backing_format": "raw"}
    qedkit.create(str(path), spec.size, cluster_size=cs, table_size=spec.table_size, **kw)
    clusters = rng.sample(range(spec.size // cs), spec.count)
    with qedkit.open(str(path)) as img:
        for i, c in enumerate(clusters):
            r = rng.random()
            if r < spec.zero:
                img.write_zeroes(c * cs, cs)
            elif r < spec.zero + spec.partial:
                off = rng.randrange(cs - 1)
                img.write(c * cs + off, rng.randbytes(rng.randrange(1, cs - off)))
            else:
                img.write(c * cs, bytes([i % 250 + 1]) * cs)
            if i % 97 == 0:
                img.flush()
        for c in clusters[: spec.count // 10]:
            img.write(c * cs + 100, b"again" * 50)  # in place (or into a zero cluster)
        for c in clusters[spec.count // 10 : spec.count // 8]:
            img.write_zeroes(c * cs, cs, unmap=rng.random() < 0.5)
    return path


# =====================================================================================
# The judgement
# =====================================================================================


@dataclass
class Before:
    shadow: Path
    usage: int
    size: int
    backing_sha: str | None
    converted: int  # size of a ``qed convert -O qed`` of the image (the same chain)


def prepare(qemu: Qemu, path: Path) -> Before:
    """The raw shadow and the numbers to compare with after the defragmentation."""
    shadow = path.with_suffix(".shadow.raw")
    qemu.img("convert", "-O", "raw", path, shadow)
    result = qemu.img("check", "-f", "qed", path, check=False)
    assert result.returncode == 0, f"QEMU's own image does not check clean: {result.stdout}"
    lay = Layout.read(path)
    backing = None
    if lay.backing_filename_size:
        with open(path, "rb") as f:
            name = os.pread(f.fileno(), lay.backing_filename_size, lay.backing_filename_offset)
        backing = sha(path.parent / name.decode())
    converted = path.with_suffix(".converted.qed")
    lay_opts = f"cluster_size={lay.cluster_size},table_size={lay.table_size}"
    result = qed("convert", "-O", "qed", "-o", lay_opts, path, converted)
    assert result.returncode == 0, result.stderr
    size = converted.stat().st_size
    converted.unlink()
    return Before(shadow, disk_usage(path), path.stat().st_size, backing, size)


def defrag(path: Path, *options: str) -> dict[str, Any]:
    """``qed defrag --output=json`` as a subprocess; its statistics."""
    result = qed("defrag", "--output=json", *options, path)
    assert result.returncode == 0, f"qed defrag: {result.stdout}{result.stderr}"
    stats = json.loads(result.stdout)
    assert set(stats) == STATS_KEYS, stats
    assert stats["done"] is True
    assert stats["bytes-moved"] == stats["clusters-moved"] * Layout.read(path).cluster_size
    assert stats["rounds"] >= 1 and stats["seconds"] >= 0 and stats["mb-per-second"] >= 0
    return stats


def assert_no_corruption(qemu: Qemu, path: Path, leaks_ok: bool | None = None) -> dict[str, Any]:
    """No corruption for qemu-img check; no leak either unless ``leaks_ok`` (by
    default: when the image has the identity layout, whose holes are leaks)."""
    result = qemu.img("check", "-f", "qed", "--output=json", path, check=False)
    if leaks_ok is None:
        leaks_ok = identity(Layout.read(path))
    allowed = (0, 3) if leaks_ok else (0,)
    assert result.returncode in allowed, f"qemu-img check exited {result.returncode}: {result}"
    report = json.loads(result.stdout)
    assert "corruptions" not in report, report
    assert report.get("check-errors", 0) == 0, report
    return dict(report)


def assert_compare(qemu: Qemu, path: Path, shadow: Path) -> None:
    result = qemu.img("compare", "-f", "qed", "-F", "raw", path, shadow, check=False)
    assert result.returncode == 0, f"qemu-img compare: {result.stdout}{result.stderr}"
    assert "Images are identical." in result.stdout


def allocated_runs(entries: dict[int, int]) -> list[tuple[int, int]]:
    """Runs [first, last] of consecutive guest clusters with data (entry > 1)."""
    data = sorted(g for g, e in entries.items() if e > 1)
    runs: list[tuple[int, int]] = []
    for g in data:
        if runs and runs[-1][1] == g - 1:
            runs[-1] = (runs[-1][0], g)
        else:
            runs.append((g, g))
    return runs


def assert_raw_like(qemu: Qemu, path: Path) -> list[dict[str, Any]]:
    """Every data cluster and table at home; one host extent per run of allocated
    clusters, the runs in ascending guest and host order."""
    lay = Layout.read(path)
    cs = lay.cluster_size
    entries = l2_entries(lay)
    home = homes(lay)
    away = {g: e for g, e in entries.items() if e > 1 and e != home[g]}
    assert not away, f"{len(away)} data clusters not at home, e.g. " + ", ".join(
        f"guest {g * cs:#x} at {e:#x} (home {home[g]:#x})" for g, e in list(away.items())[:5]
    )
    l1 = lay.l1()
    tables = {i: l1[i] for i in table_homes(lay)}
    assert tables == table_homes(lay), f"L2 tables at {tables}, not {table_homes(lay)}"
    extents = [e for e in qemu_map(qemu, path) if e["depth"] == 0 and e["data"]]
    for a, b in itertools.pairwise(extents):
        if a["start"] + a["length"] == b["start"]:
            assert b["offset"] == a["offset"] + a["length"], (
                f"guest {a['start']:#x}+{a['length']:#x} and the next run are adjacent "
                f"but sit at {a['offset']:#x} and {b['offset']:#x}: two host reads"
            )
        assert b["offset"] > a["offset"], "runs out of guest order in the file"
    for e in extents:
        assert e["offset"] == home[e["start"] // cs], e
    runs = allocated_runs(entries)
    assert len(extents) == len(runs), (
        f"{len(runs)} runs of allocated guest clusters but {len(extents)} host extents"
    )
    for (first, last), e in zip(runs, extents, strict=True):
        assert (e["start"], e["length"]) == (first * cs, (last - first + 1) * cs)
    return extents


def assert_compact(path: Path, before: Before) -> None:
    """Truncated at the last used cluster; every free cluster inside is a hole; no
    more disk space than before."""
    lay = Layout.read(path)
    cs = lay.cluster_size
    refs = lay.references()
    assert all(n == 1 for n in refs.values()), "a cluster is referenced twice"
    size = path.stat().st_size
    last = max(max(refs), lay.header_size - 1)
    assert size == (last + 1) * cs, f"file of {size} bytes, last used cluster ends at " + str(
        (last + 1) * cs
    )
    used = set(refs) | set(range(lay.header_size))
    for a, b in data_regions(path):
        for index in range(a // cs, -(-b // cs)):
            assert index in used, f"free cluster at {index * cs:#x} takes disk space"
    usage = disk_usage(path)
    assert usage <= len(used) * cs + SLACK, f"{usage} bytes on disk for {len(used)} clusters"
    assert usage <= before.usage + SLACK, f"disk usage grew from {before.usage} to {usage}"
    if not identity(lay):
        free = sorted(set(range(size // cs)) - used)
        assert not free, f"{len(free)} free clusters inside the file, from {free[0] * cs:#x}"
        bound = before.converted + lay.table_bytes + cs
        assert size <= bound, f"file of {size} bytes; qed convert makes {before.converted}"


def assert_frag_agrees(path: Path, report: dict[str, Any]) -> None:
    """``qed frag`` says raw-like, with the counts found here and by qemu-img check."""
    result = qed("frag", "--output=json", path)
    assert result.returncode == 0, result.stderr
    frag = json.loads(result.stdout)
    lay = Layout.read(path)
    entries = l2_entries(lay)
    runs = allocated_runs(entries)
    assert frag["raw-like"] is True, frag
    assert frag["away-from-home-clusters"] == 0, frag
    assert frag["runs"] == frag["host-extents"] == len(runs), frag
    assert frag["data-start"] == data_start(lay), frag
    assert frag["allocated-clusters"] == sum(1 for e in entries.values() if e > 1)
    assert frag["allocated-clusters"] == report.get("allocated-clusters", 0), (frag, report)
    assert frag["fragmented-clusters"] == report.get("fragmented-clusters", 0), (frag, report)


def judge(qemu: Qemu, path: Path, before: Before) -> dict[str, Any]:
    assert_compare(qemu, path, before.shadow)
    report = assert_no_corruption(qemu, path)
    assert_raw_like(qemu, path)
    assert_frag_agrees(path, report)
    assert_compact(path, before)
    if before.backing_sha is not None:
        lay = Layout.read(path)
        with open(path, "rb") as f:
            name = os.pread(f.fileno(), lay.backing_filename_size, lay.backing_filename_offset)
        assert sha(path.parent / name.decode()) == before.backing_sha, "backing file changed"
    return report


# =====================================================================================
# QEMU-fragmented images
# =====================================================================================

QEMU_CASES = {
    # name: (spec, backing)
    "64k": (Spec(48 * MiB, 64 * KiB, 4, 300, seed=101), None),
    "4k-tables": (Spec(16 * MiB, 4 * KiB, 2, 700, seed=102), None),
    "raw-backing": (Spec(24 * MiB, 64 * KiB, 4, 160, seed=103), "raw"),
    "qed-backing": (Spec(12 * MiB, 4 * KiB, 2, 400, seed=104), "qed"),
}


@pytest.mark.parametrize("layout", ["packed", "identity"])
@pytest.mark.parametrize("case", list(QEMU_CASES))
def test_defrag_of_a_qemu_fragmented_image(
    case: str, layout: str, qemu: Qemu, tmp_path: Path
) -> None:
    spec, backing = QEMU_CASES[case]
    path = qemu_fragmented(qemu, tmp_path, spec, backing)
    before = prepare(qemu, path)
    lay = Layout.read(path)
    cs = spec.cluster_size
    start = data_start(lay)
    entries = l2_entries(lay)
    misplaced = sum(1 for g, e in entries.items() if e > 1 and e != start + g * cs)
    assert misplaced > spec.count // 2, "the image is not fragmented"
    # L2 tables QEMU allocated among the data, on homes of allocated clusters.
    homes = {start // cs + g for g, e in entries.items() if e > 1}
    blocking = [
        l2 for l2 in lay.l1() if l2 and homes & set(range(l2 // cs, l2 // cs + lay.table_size))
    ]
    if case == "4k-tables":
        assert sum(1 for l2 in lay.l1() if l2) == 4
        assert blocking, "no L2 table in the way: stage 2 would not be tested"
    stats = defrag(path, "--layout", layout)
    assert stats["layout"] == layout
    assert stats["clusters-moved"] >= misplaced
    assert stats["tables-moved"] >= len(blocking), stats
    assert identity(Layout.read(path)) == (layout == "identity")
    judge(qemu, path, before)


def _write_clusters(qemu: Qemu, path: Path, clusters: dict[int, bytes], seed: int) -> None:
    """qemu-io writes each cluster's bytes (a pattern file per cluster), in a shuffled
    order."""
    cs = Layout.read(path).cluster_size
    order = list(clusters)
    random.Random(seed).shuffle(order)
    commands = []
    for c in order:
        source = path.parent / f"cluster-{c}.bin"
        source.write_bytes(clusters[c])
        commands.append(f"write -s {source} {c * cs} {cs}")
    qemu_io_script(qemu, path, commands)
    for c in order:
        (path.parent / f"cluster-{c}.bin").unlink()


def _ext4_clusters(directory: Path, size: int, cs: int) -> dict[int, bytes]:
    """The clusters mkfs.ext4 puts data in on a sparse raw disk of ``size``."""
    raw = directory / "ext4.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    out: dict[int, bytes] = {}
    with open(raw, "rb") as f:
        fd = f.fileno()
        for start, end in data_regions(raw):
            for c in range(start // cs, -(-end // cs)):
                data = os.pread(fd, cs, c * cs)
                if data.strip(b"\0"):
                    out[c] = data
    raw.unlink()
    return out


SPARSE_CASES = ["5M-in-1G", "first-quarter", "ext4-4G", "overlay", "zero-clusters"]


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_defrag_of_a_sparse_image_is_clean_compact_and_raw_like(
    case: str, qemu: Qemu, tmp_path: Path
) -> None:
    """Real disks are sparse: after the default (packed) defragmentation the image
    checks clean (no leaks), is no larger than a converted copy plus one L2 table and
    one cluster, takes no more space than before, and reads each run with one host
    read, the runs in guest order."""
    cs = 64 * KiB
    path = tmp_path / "sparse.qed"
    rng = random.Random(SPARSE_CASES.index(case))
    size = {"ext4-4G": 4 << 30, "5M-in-1G": 1 << 30}.get(case, 16 * MiB)
    extra: list[str] = []
    if case == "overlay":
        (tmp_path / "base.raw").write_bytes(rng.randbytes(size))
        extra = ["-b", "base.raw", "-F", "raw"]
    qemu.img("create", "-f", "qed", *extra, path, str(size), cwd=tmp_path)
    clusters: dict[int, bytes]
    if case == "5M-in-1G":
        scattered = rng.sample(range(512 * MiB // cs), 64)
        clusters = {c: rng.randbytes(cs) for c in scattered}
        clusters.update({512 * MiB // cs + k: rng.randbytes(cs) for k in range(16)})
    elif case == "ext4-4G":
        clusters = _ext4_clusters(tmp_path, size, cs)
        assert len(clusters) > 20
    else:  # the first quarter, with gaps
        clusters = {c: rng.randbytes(cs) for c in range(size // cs // 4) if rng.random() < 0.7}
    _write_clusters(qemu, path, clusters, seed=len(clusters))
    if case == "zero-clusters":
        zeros = [f"write -z {c * cs} {cs}" for c in range(size // cs // 4, size // cs // 2, 3)]
        qemu_io_script(qemu, path, zeros + [f"write -z {c * cs} {cs}" for c in list(clusters)[::5]])
    before = prepare(qemu, path)
    stats = defrag(path)
    assert stats["layout"] == "packed"
    report = judge(qemu, path, before)
    assert "leaks" not in report, report
    assert path.stat().st_size <= before.converted + Layout.read(path).table_bytes + cs


def test_defrag_of_a_fully_allocated_image_checks_clean_and_unfragmented(
    qemu: Qemu, tmp_path: Path
) -> None:
    """Every cluster written once, in a shuffled order, 4 KiB clusters and two L2
    tables: afterwards the image is a raw file behind its tables."""
    spec = Spec(8 * MiB, 4 * KiB, 2, 2048, seed=105, zero=0.0, partial=0.2, runs=0.0)
    path = qemu_fragmented(qemu, tmp_path, spec)
    before = prepare(qemu, path)
    result = qemu.img("check", "-f", "qed", path)
    assert "100.00% allocated" in result.stdout and "0.00% fragmented" not in result.stdout
    stats = defrag(path, "-p")
    assert stats["tables-moved"] >= 1
    result = qemu.img("check", "-f", "qed", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout
    assert "2048/2048 = 100.00% allocated, 0.00% fragmented" in result.stdout, result.stdout
    judge(qemu, path, before)
    (extent,) = assert_raw_like(qemu, path)
    assert extent["length"] == spec.size
    assert path.stat().st_size <= before.size


def test_defrag_reports_progress_and_a_summary(qemu: Qemu, tmp_path: Path) -> None:
    spec = Spec(4 * MiB, 4 * KiB, 2, 200, seed=106)
    path = qemu_fragmented(qemu, tmp_path, spec)
    result = qed("defrag", "-p", path)
    assert result.returncode == 0, result.stderr
    assert "100" in result.stderr  # the progress display (tqdm's or qemu-img's style)
    assert result.stdout.startswith("moved ") and "L2 tables" in result.stdout
    assert_raw_like(qemu, path)
    quiet = qed("defrag", "-q", path)
    assert quiet.returncode == 0 and quiet.stdout == ""


# =====================================================================================
# qedkit-fragmented images
# =====================================================================================


@pytest.mark.parametrize("backing", [False, True], ids=["fresh", "raw-backing"])
def test_defrag_of_a_qedkit_fragmented_image(backing: bool, qemu: Qemu, tmp_path: Path) -> None:
    spec = Spec(12 * MiB, 4 * KiB, 2, 500, seed=107 + backing, zero=0.1, partial=0.3)
    path = qedkit_fragmented(tmp_path, spec, backing)
    before = prepare(qemu, path)
    stats = defrag(path)
    assert stats["clusters-moved"] > spec.count // 2
    judge(qemu, path, before)


def test_defrag_keeps_discarded_clusters_sparse(qemu: Qemu, tmp_path: Path) -> None:
    """Discarded clusters stay referenced but take no space (DESIGN.md); moving them
    home must not give them disk space again."""
    path = tmp_path / "discarded.qed"
    cs = 4 * KiB
    qedkit.create(str(path), 8 * MiB, cluster_size=cs, table_size=2)
    order = list(range(600))
    random.Random(108).shuffle(order)
    with qedkit.open(str(path)) as img:
        for c in order:
            img.write(c * cs, bytes([c % 250 + 1]) * cs)
        for c in range(0, 600, 2):
            img.discard(c * cs, cs)
    before = prepare(qemu, path)
    defrag(path)
    assert_compare(qemu, path, before.shadow)
    assert_raw_like(qemu, path)
    usage = disk_usage(path)
    assert usage <= before.usage + SLACK, (
        f"defragmentation gave discarded clusters disk space again: "
        f"{before.usage} -> {usage} bytes on disk"
    )


def test_defrag_moves_l2_tables_off_the_homes_of_unallocated_clusters(
    qemu: Qemu, tmp_path: Path
) -> None:
    """Home slots of unallocated clusters stay free, reserved for them (DESIGN.md,
    "Holes"): an L2 table QEMU put on such a home must not stay there, or the home
    allocation policy cannot put that cluster home later. Here QEMU writes guest
    cluster 0 (its table lands on the homes of clusters 1-2) and one cluster in the
    second table's span (that table lands on the homes of clusters 4-5)."""
    cs = 4 * KiB
    path = tmp_path / "tables.qed"
    qemu.img("create", "-f", "qed", "-o", f"cluster_size={cs},table_size=2", path, "8M")
    qemu_io_script(qemu, path, ["write -P 1 0 4k", "write -P 2 4M 4k"])
    before = prepare(qemu, path)
    defrag(path, "--layout", "identity")
    judge(qemu, path, before)
    lay = Layout.read(path)
    start = data_start(lay)
    top = max(g for g, e in l2_entries(lay).items() if e > 1)
    allocated_home_end = start + (top + 1) * cs
    inside = [hex(l2) for l2 in lay.l1() if l2 and l2 < allocated_home_end]
    assert not inside, (
        f"L2 tables at {inside} sit on homes of unallocated guest clusters below the "
        f"last allocated one (homes from {start:#x} to {allocated_home_end:#x})"
    )
    with qedkit.open(str(path)) as img:
        assert isinstance(img.engine, QedImage)
        assert img.engine.home_allocation  # the identity layout set the policy
        img.write(1 * cs, b"\x11" * cs)
    assert _first_entry(path, 1) == start + cs, "guest cluster 1 did not land at home"


# =====================================================================================
# Nothing to do, refusals
# =====================================================================================


def test_defrag_of_a_defragmented_image_moves_nothing(qemu: Qemu, tmp_path: Path) -> None:
    spec = Spec(16 * MiB, 4 * KiB, 2, 500, seed=109)
    path = qemu_fragmented(qemu, tmp_path, spec)
    before = prepare(qemu, path)
    first = defrag(path)
    assert first["clusters-moved"] > 0
    digest, usage = sha(path), disk_usage(path)
    again = defrag(path)
    assert again["clusters-moved"] == again["bytes-moved"] == again["tables-moved"] == 0, again
    assert again["truncated-bytes"] == 0
    assert sha(path) == digest, "a defragmentation with nothing to do changed the file"
    assert disk_usage(path) == usage
    judge(qemu, path, before)


def _l2_entry_offsets(path: Path) -> tuple[Layout, list[tuple[int, int]]]:
    """(file offset of the entry, entry) of every data entry."""
    lay = Layout.read(path)
    out = []
    for l1_index, l2 in enumerate(lay.l1()):
        if l2:
            for index, entry in enumerate(lay.table(l2)):
                if entry > 1:
                    out.append((lay.l2_entry_offset(l1_index, index), entry))
    return lay, out


@pytest.mark.parametrize("damage", ["twice-referenced", "past-the-end", "unaligned"])
def test_defrag_refuses_a_corrupted_image(damage: str, qemu: Qemu, tmp_path: Path) -> None:
    spec = Spec(4 * MiB, 4 * KiB, 2, 100, seed=110, zero=0.0)
    path = qemu_fragmented(qemu, tmp_path, spec)
    lay, entries = _l2_entry_offsets(path)
    value = {
        "twice-referenced": entries[1][1],
        "past-the-end": path.stat().st_size + 16 * lay.cluster_size,
        "unaligned": entries[0][1] + 512,
    }[damage]
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), struct.pack("<Q", value), entries[0][0])
    result = qemu.img("check", "-f", "qed", path, check=False)
    assert result.returncode == 2, "the damage is a corruption for QEMU too"
    digest = sha(path)
    result = qed("defrag", path)
    assert result.returncode != 0
    assert "corruption" in result.stderr and "qed check -r all" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sha(path) == digest, "a refused defragmentation changed the file"


def test_defrag_refuses_a_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(64 * KiB))
    result = qed("defrag", "-f", "raw", path)
    assert result.returncode != 0
    assert "only QED images can be defragmented" in result.stderr
    assert path.read_bytes() == bytes(64 * KiB)


# =====================================================================================
# The home allocation policy's header bit (autoclear bit 0x1)
# =====================================================================================


def _first_entry(path: Path, guest_cluster: int) -> int:
    return l2_entries(Layout.read(path))[guest_cluster]


def test_home_allocation_bit_persists_is_honoured_and_qemu_writes_clear_it(
    qemu: Qemu, tmp_path: Path
) -> None:
    cs = 64 * KiB
    home = tmp_path / "home.qed"
    result = qed("create", "-f", "qed", "-o", "allocation=home", home, "16M")
    assert result.returncode == 0, result.stderr
    assert Layout.read(home).autoclear_features == HOME
    qemu.img("check", "-f", "qed", home)  # QEMU opens it (read-only) and is content

    # Honoured on reopen: guest cluster 7 goes to its home, not to the end of the file.
    with qedkit.open(str(home)) as img:
        engine = img.engine
        assert getattr(engine, "home_allocation", None) is True
        img.write(7 * cs, b"\x77" * cs)
    start = data_start(Layout.read(home))
    assert _first_entry(home, 7) == start + 7 * cs
    assert Layout.read(home).autoclear_features == HOME  # still set after our write

    end = tmp_path / "end.qed"
    qedkit.create(str(end), 16 * MiB)
    assert Layout.read(end).autoclear_features == 0
    with qedkit.open(str(end)) as img:
        assert getattr(img.engine, "home_allocation", None) is False
        img.write(7 * cs, b"\x77" * cs)
    assert _first_entry(end, 7) == data_start(Layout.read(end))  # the end of the file

    # A read-only QEMU open leaves the bit alone...
    qemu.io("-r", "-f", "qed", "-c", f"read -P 0x77 {7 * cs} {cs}", home)
    assert Layout.read(home).autoclear_features == HOME
    # ... a QEMU write clears it (unknown autoclear bits are cleared on a read-write
    # open), so the promise never outlives an image QEMU allocated in.
    qemu.io("-f", "qed", "-c", f"write -P 0x33 {20 * cs} {cs}", home)
    assert Layout.read(home).autoclear_features == 0
    assert _first_entry(home, 20) != start + 20 * cs  # QEMU allocates at the end
    with qedkit.open(str(home)) as img:
        assert getattr(img.engine, "home_allocation", None) is False
        img.write(30 * cs, b"\x30" * cs)
    assert _first_entry(home, 30) != start + 30 * cs
    assert Layout.read(home).autoclear_features == 0
    assert_no_corruption(qemu, home, leaks_ok=True)


def test_home_allocation_can_be_turned_on_and_off(qemu: Qemu, tmp_path: Path) -> None:
    cs = 64 * KiB
    path = tmp_path / "toggle.qed"
    qedkit.create(str(path), 16 * MiB)
    with qedkit.open(str(path)) as img:
        assert isinstance(img.engine, QedImage)
        run_sync(img.engine.set_home_allocation(True))
    assert Layout.read(path).autoclear_features == HOME
    with qedkit.open(str(path)) as img:
        assert isinstance(img.engine, QedImage)
        assert img.engine.home_allocation
        img.write(3 * cs, b"\x03" * cs)
        run_sync(img.engine.set_home_allocation(False))
    assert Layout.read(path).autoclear_features == 0
    assert _first_entry(path, 3) == data_start(Layout.read(path)) + 3 * cs
    with qedkit.open(str(path)) as img:
        assert isinstance(img.engine, QedImage)
        assert not img.engine.home_allocation
    assert_no_corruption(qemu, path, leaks_ok=True)


def test_home_allocation_lays_a_sequentially_written_image_out_like_a_raw_file(
    qemu: Qemu, tmp_path: Path
) -> None:
    """A new image with the policy on, written from the start like a guest installing
    onto an empty disk: every cluster should land at its home. (The L2 table a first
    write in a span creates must not take the homes of the clusters after it.)"""
    cs = 4 * KiB
    path = tmp_path / "seq.qed"
    qedkit.create(str(path), 8 * MiB, cluster_size=cs, table_size=2, allocation="home")
    with qedkit.open(str(path)) as img:
        for c in range(64):
            img.write(c * cs, bytes([c + 1]) * cs)
        for c in range(1024, 1040):  # the second L2 table's span
            img.write(c * cs, bytes([c % 250 + 1]) * cs)
    assert_no_corruption(qemu, path, leaks_ok=True)
    assert_raw_like(qemu, path)
