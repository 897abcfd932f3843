"""Real NBD clients against ``qed serve``: qemu-io, qemu-img, nbdcopy, nbdinfo, nbdsh.

Every test keeps a raw shadow of what it wrote; once the server exited, the image
must check clean with qemu-img, compare identical to the shadow and have NEED_CHECK
clear (``Served.finish``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2ekit import (
    CLUSTER,
    KiB,
    MiB,
    ServerFactory,
    Shadow,
    assert_clean_and_equal,
    assert_same_bytes,
    merge,
    nbdinfo_map,
    nbdsh,
    qemu_io,
    run,
)
from qedtest import Qemu, qed, require_tool

Disk = Callable[..., tuple[Path, Shadow]]

# (pattern, offset, length): aligned, unaligned across clusters, the last bytes
PATTERNS = [
    (0xA1, 0, 64 * KiB),
    (0xB2, 100_000, 200_000),
    (0xC3, 5 * MiB - 512, MiB + 1024),
    (0xD4, 9 * MiB + 7, 3),
    (0xE5, 16 * MiB - 4096, 4096),
]


def write_patterns(uri: str, shadow: Shadow) -> None:
    qemu_io(uri, *(f"write -P {p:#x} {o} {n}" for p, o, n in PATTERNS), "flush")
    for p, o, n in PATTERNS:
        shadow.fill(o, n, p)


def verify_patterns(uri: str) -> None:
    reads = [f"read -P {p:#x} {o} {n}" for p, o, n in PATTERNS]
    # gaps between the patterns read as zeros
    reads += ["read -P 0 64k 34464", "read -P 0 300000 4942368", "read -P 0 10M 4M"]
    qemu_io(uri, *reads)


def compare_export(qemu: Qemu, uri: str, shadow: Shadow) -> None:
    """The whole export, read through the server, equals the shadow."""
    result = qemu.img("compare", "-f", "raw", "-F", "raw", uri, shadow.path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_qemu_io_writes_and_verifies_patterns_over_a_unix_socket(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image)
    assert server.uri().startswith("nbd+unix:///?socket=")
    write_patterns(server.uri(), shadow)
    verify_patterns(server.uri())
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


def test_qemu_io_over_tcp_on_127_0_0_1_with_a_named_export(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image, tcp=True, names=["disk0"])
    uri = server.uri()
    assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/disk0")
    write_patterns(uri, shadow)
    verify_patterns(uri)
    listing = run([require_tool("nbdinfo"), "--list", "--json", uri]).ok()
    exports = json.loads(listing.stdout)["exports"]
    assert [e["export-name"] for e in exports] == ["disk0"]
    assert exports[0]["export-size"] == 16 * MiB
    # an export that does not exist is refused, and the server goes on
    wrong = qemu_io(server.uri("nope"), "read 0 4k", check=False)
    assert wrong.returncode != 0
    verify_patterns(uri)
    server.finish(qemu, shadow)


def test_two_images_are_two_exports_with_their_own_data(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    a, shadow_a = disk(8 * MiB, "a.qed")
    b, shadow_b = disk(4 * MiB, "b.qed")
    server = serve([a, b], "--shared", "2", tcp=True)
    assert server.names == ["a.qed", "b.qed"]
    qemu_io(server.uri("a.qed"), "write -P 0x11 0 1M", "write -P 0x12 7M 1M")
    qemu_io(server.uri("b.qed"), "write -P 0x21 0 1M", "write -P 0x22 3M 1M")
    shadow_a.fill(0, MiB, 0x11)
    shadow_a.fill(7 * MiB, MiB, 0x12)
    shadow_b.fill(0, MiB, 0x21)
    shadow_b.fill(3 * MiB, MiB, 0x22)
    compare_export(qemu, server.uri("a.qed"), shadow_a)
    compare_export(qemu, server.uri("b.qed"), shadow_b)
    assert server.stop() == 0
    assert_clean_and_equal(qemu, a, shadow_a)
    assert_clean_and_equal(qemu, b, shadow_b)


def make_source(path: Path, size: int, seed: int) -> bytes:
    """A raw file with data runs, zero runs and holes (what convert tools skip)."""
    rng = random.Random(seed)
    data = bytearray(size)
    pos = 0
    while pos < size:
        run_length = min(rng.choice([4 * KiB, 60 * KiB, 64 * KiB, 300 * KiB, MiB]), size - pos)
        if rng.random() < 0.5:
            data[pos : pos + run_length] = rng.randbytes(run_length)
        pos += run_length
    path.write_bytes(bytes(data))
    return bytes(data)


def test_qemu_img_convert_into_the_export_and_back_out(
    serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    image, shadow = disk(16 * MiB)
    source = tmp_path / "source.raw"
    content = make_source(source, 16 * MiB, seed=1)
    server = serve(image)
    qemu.img("convert", "-n", "-f", "raw", "-O", "raw", source, server.uri())
    shadow.write(0, content)
    out = tmp_path / "out.raw"
    qemu.img("convert", "-f", "raw", "-O", "raw", server.uri(), out)
    assert_same_bytes(out.read_bytes(), content, "read back from the export")
    # and into another format through the export: a qcow2 copy reads the same
    qemu.img("convert", "-f", "raw", "-O", "qcow2", server.uri(), tmp_path / "out.qcow2")
    qemu.img("compare", "-f", "qcow2", "-F", "raw", tmp_path / "out.qcow2", source)
    server.finish(qemu, shadow)


def test_nbdcopy_into_the_export_and_back_out(
    serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    nbdcopy = require_tool("nbdcopy")
    image, shadow = disk(16 * MiB)
    source = tmp_path / "source.raw"
    content = make_source(source, 16 * MiB, seed=2)
    server = serve(image)
    run([nbdcopy, "--flush", source, server.uri()]).ok()
    shadow.write(0, content)
    out = tmp_path / "out.raw"
    run([nbdcopy, server.uri(), out]).ok()
    assert_same_bytes(out.read_bytes(), content, "read back from the export")
    server.finish(qemu, shadow)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_large_writes_of_every_size_land_whole(
    serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path, loop: str
) -> None:
    """Large WRITE payloads are read straight into their own buffers (the server's
    zero-copy receive); sizes around its thresholds, one connection and several,
    must land byte for byte."""
    nbdcopy = require_tool("nbdcopy")
    image, shadow = disk(16 * MiB)
    server = serve(image, "--shared", "4", loop=loop)
    for seed, (request_size, connections) in enumerate(
        [(64 * KiB, 1), (128 * KiB, 4), (256 * KiB, 4), (MiB, 1), (4 * MiB, 2)]
    ):
        source = tmp_path / f"source{seed}.raw"
        content = random.Random(seed).randbytes(16 * MiB)
        source.write_bytes(content)
        args = [f"--request-size={request_size}", f"--connections={connections}"]
        run([nbdcopy, *args, source, server.uri()]).ok()
        shadow.write(0, content)
        compare_export(qemu, server.uri(), shadow)
    # lengths nbdcopy does not send: just under, at and over the thresholds, unaligned
    writes = [(0x5A, 7, 64 * KiB - 1), (0x6B, MiB + 3, 64 * KiB + 28), (0x7C, 3 * MiB, 100_001)]
    writes += [(0x8D, 5 * MiB - 1, 300_000), (0x9E, 9 * MiB + 511, 2 * MiB + 7)]
    qemu_io(server.uri(), *(f"aio_write -P {p:#x} {o} {n}" for p, o, n in writes), "aio_flush")
    for pattern, offset, length in writes:
        shadow.fill(offset, length, pattern)
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


def qed_map(image: Path) -> list[dict[str, Any]]:
    result = qed("map", "--output=json", image, check=True)
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    return entries


def test_nbdinfo_map_agrees_with_qed_map(serve: ServerFactory, disk: Disk, qemu: Qemu) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image)
    qemu_io(
        server.uri(),
        "write -P 0x31 0 1M",  # data
        "write -P 0x32 2M 100k",  # data, partial last cluster
        "write -z 4M 2M",  # unallocated -> zero clusters
        "write -P 0x33 8M 1M",
        "write -z 8M 256k",  # allocated clusters zeroed in place
        "discard 512k 128k",  # punched, still allocated
        "write -P 0x34 15M 64k",
    )
    shadow.fill(0, MiB, 0x31)
    shadow.fill(2 * MiB, 100 * KiB, 0x32)
    shadow.fill(8 * MiB, MiB, 0x33)
    shadow.zero(8 * MiB, 256 * KiB)
    shadow.zero(512 * KiB, 128 * KiB)  # a discarded whole cluster reads as zeros
    shadow.fill(15 * MiB, 64 * KiB, 0x34)
    allocation = nbdinfo_map(server.uri())
    depth = nbdinfo_map(server.uri(), "qemu:allocation-depth")
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)

    entries = qed_map(image)
    expected_allocation = merge(
        [
            (e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0))
            for e in entries
        ]
    )
    expected_depth = merge(
        [(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in entries]
    )
    assert allocation == expected_allocation
    assert depth == expected_depth
    # and the map says something: data where written, no data where never written
    assert (0, MiB, 0) in allocation
    assert any(flags & 1 for _, _, flags in allocation)
    assert all(offset + length <= 16 * MiB for offset, length, _ in allocation)
    assert sum(length for _, length, _ in allocation) == 16 * MiB


NBDSH_SCRIPT = """
# libnbd's Python calls take (count, offset)
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
C = 65536
out = {
    "size": h.get_size(),
    "can_trim": h.can_trim(), "can_zero": h.can_zero(), "can_fast_zero": h.can_fast_zero(),
    "can_cache": h.can_cache(), "can_flush": h.can_flush(), "can_fua": h.can_fua(),
    "can_multi_conn": h.can_multi_conn(), "is_read_only": h.is_read_only(),
    "can_meta_context": h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
}
h.pwrite(b"\\x5a" * (8 * C), 0)
h.pwrite(b"\\x6b" * 5000, 10 * C + 123, nbd.CMD_FLAG_FUA)
h.trim(C, C)                                    # one whole allocated cluster
h.zero(2 * C, 2 * C)                            # allocated clusters, may punch
h.zero(3000, 1000, nbd.CMD_FLAG_NO_HOLE)        # partial cluster: real zeros
h.zero(100, 4 * C + 10)
h.zero(16 * C, 32 * C, nbd.CMD_FLAG_FAST_ZERO)  # unallocated: zero clusters
h.cache(16 * C, 0)
h.flush()
out["trimmed"] = h.pread(C, C) == bytes(C)
out["zeroed"] = h.pread(2 * C, 2 * C) == bytes(2 * C)
out["partial"] = h.pread(5000, 0) == b"\\x5a" * 1000 + bytes(3000) + b"\\x5a" * 1000
out["fua"] = h.pread(5000, 10 * C + 123) == b"\\x6b" * 5000
extents = []
def collect(context, offset, entries, err):
    extents.append([context, offset, list(entries)])
    return 0
pos = 0
while pos < out["size"]:
    before = len(extents)
    h.block_status(out["size"] - pos, pos, collect)
    pos += sum(extents[-1][2][0::2])
out["extents"] = extents
h.shutdown()
print(json.dumps(out))
"""


def test_nbdsh_trim_zero_cache_flush_and_block_status(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image)
    out: Any = nbdsh(NBDSH_SCRIPT, uri=server.uri())
    assert out["size"] == 4 * MiB
    for flag in ("can_trim", "can_zero", "can_fast_zero", "can_cache", "can_flush", "can_fua"):
        assert out[flag], flag
    assert out["can_meta_context"]
    assert not out["is_read_only"]
    assert not out["can_multi_conn"]  # one client at a time (no --shared)
    assert out["trimmed"] and out["zeroed"] and out["partial"] and out["fua"]
    shadow.fill(0, 8 * CLUSTER, 0x5A)
    shadow.fill(10 * CLUSTER + 123, 5000, 0x6B)
    shadow.zero(CLUSTER, CLUSTER)
    shadow.zero(2 * CLUSTER, 2 * CLUSTER)
    shadow.zero(1000, 3000)
    shadow.zero(4 * CLUSTER + 10, 100)
    compare_export(qemu, server.uri(), shadow)

    extents: list[tuple[int, int, int]] = []
    for context, offset, entries in out["extents"]:
        assert context == "base:allocation"
        for length, flags in zip(entries[0::2], entries[1::2], strict=True):
            extents.append((offset, length, flags))
            offset += length
    extents = merge(extents)
    assert extents[0][0] == 0 and sum(e[1] for e in extents) == 4 * MiB
    server.finish(qemu, shadow)

    expected = merge(
        [
            (e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0))
            for e in qed_map(image)
        ]
    )
    assert extents == expected
    # the fast-zeroed range became zero clusters: a hole reading as zeros
    assert any(o <= 32 * CLUSTER and o + n >= 48 * CLUSTER and f == 3 for o, n, f in extents), (
        extents
    )


def test_qemu_io_aio_keeps_many_requests_in_flight(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image)
    commands = []
    for i in range(48):
        offset = i * 300 * KiB + (i % 3) * 512
        commands.append(f"aio_write -P {i + 1} {offset} 200k")
        shadow.fill(offset, 200 * KiB, i + 1)
    commands += ["aio_flush"]
    qemu_io(server.uri(), *commands)
    reads = [f"aio_read -P {i + 1} {i * 300 * KiB + (i % 3) * 512} 200k" for i in range(48)]
    qemu_io(server.uri(), *reads, "aio_flush")
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


def test_with_busy_polling_requests_are_served_alike(
    serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    """--busy-poll: the server spins for the next request after its replies (two
    connections at once here, so a spin also sees the other one's requests)."""
    nbdcopy = require_tool("nbdcopy")
    image, shadow = disk(16 * MiB)
    source = tmp_path / "source.raw"
    content = make_source(source, 16 * MiB, seed=4)
    server = serve(image, "--shared", "4", "--busy-poll", "200", "-v")
    run([nbdcopy, "--flush", source, server.uri()]).ok()
    shadow.write(0, content)
    commands = [f"aio_write -P {i + 1} {i * 64 * KiB} 4k" for i in range(64)]
    for i in range(64):
        shadow.fill(i * 64 * KiB, 4 * KiB, i + 1)
    qemu_io(server.uri(), *commands, "aio_flush")
    out = tmp_path / "out.raw"
    run([nbdcopy, server.uri(), out]).ok()
    assert_same_bytes(out.read_bytes(), shadow.read(0, 16 * MiB), "read back from the export")
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)
    assert "busy-poll:" in server.log_text()
