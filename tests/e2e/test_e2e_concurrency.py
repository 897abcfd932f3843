"""Several requests in flight per connection, several connections at once."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from e2ekit import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    CLUSTER,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FUA,
    OPT_GO,
    REP_ERR_POLICY,
    REQUEST_MAGIC,
    TFLAG_CAN_MULTI_CONN,
    KiB,
    MiB,
    RawClient,
    Reply,
    ServerFactory,
    Shadow,
    assert_same_bytes,
    pattern,
    popen_all,
    qemu_io,
    run,
)
from qedtest import Qemu, require_tool

import qedkit
from qedkit.cli.ctl import ControlClient

Disk = Callable[..., tuple[Path, Shadow]]


def compare_export(qemu: Qemu, uri: str, shadow: Shadow) -> None:
    result = qemu.img("compare", "-f", "raw", "-F", "raw", uri, shadow.path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


class PipelinedReplies:
    """Reads the replies to requests 1..count on a thread while the test sends them
    (a client that sends everything first would fill both sockets and stall)."""

    def __init__(self, client: RawClient, count: int) -> None:
        self.client = client
        self.count = count
        self.replies: list[Reply] = []
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in range(self.count):
                self.replies.append(self.client.reply())
        except BaseException as exc:
            self.failure.append(exc)

    def check(self, expected_reads: dict[int, bytes]) -> None:
        """Every cookie answered once and without error; reads gave ``expected_reads``."""
        self.thread.join(60)
        replies = self.replies
        assert not self.thread.is_alive(), f"only {len(replies)} of {self.count} replies came"
        assert not self.failure, self.failure
        assert sorted(r.cookie for r in replies) == list(range(1, self.count + 1))
        assert all(r.error == 0 for r in replies), [r for r in replies if r.error]
        for reply in replies:
            if reply.cookie in expected_reads:
                expected = expected_reads[reply.cookie]
                assert_same_bytes(reply.data, expected, f"read {reply.cookie}")


def test_four_qemu_io_writers_on_four_connections_write_disjoint_regions(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(32 * MiB)
    server = serve(image, "--shared", "4")
    qemu_io_path = require_tool("qemu-io")
    argvs = []
    for writer in range(4):
        commands = []
        for i in range(24):
            # writers interleave at 64 KiB steps, so that they allocate side by side
            offset = (i * 4 + writer) * 320 * KiB + writer * 512
            commands += ["-c", f"aio_write -P {writer * 24 + i + 1} {offset} 200k"]
            shadow.fill(offset, 200 * KiB, writer * 24 + i + 1)
        argvs.append([qemu_io_path, "-f", "raw", server.uri(), *commands, "-c", "aio_flush"])
    with popen_all(argvs) as procs:
        outputs = [proc.communicate(timeout=60) for proc in procs]
        codes = [proc.returncode for proc in procs]
    for code, (stdout, stderr) in zip(codes, outputs, strict=True):
        assert code == 0 and "failed" not in stdout + stderr, stdout + stderr
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_nbdcopy_with_four_connections_in_and_out(
    loop: str, serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    nbdcopy = require_tool("nbdcopy")
    image, shadow = disk(32 * MiB)
    source = tmp_path / "source.raw"
    rng = random.Random(5)
    content = bytearray(32 * MiB)
    for _ in range(200):
        offset = rng.randrange(0, 32 * MiB - 256 * KiB)
        content[offset : offset + 128 * KiB] = rng.randbytes(128 * KiB)
    source.write_bytes(content)
    server = serve(image, "--shared", "4", loop=loop)
    info = run([require_tool("nbdinfo"), server.uri()]).ok()
    assert "can_multi_conn: true" in info.stdout
    copy = [nbdcopy, "--connections=4", "--requests=16", "--request-size=262144"]
    run([*copy, "--flush", source, server.uri()]).ok()
    shadow.write(0, bytes(content))
    out = tmp_path / "out.raw"
    run([*copy, server.uri(), out]).ok()
    assert_same_bytes(out.read_bytes(), bytes(content), "read back from the export")
    server.finish(qemu, shadow)


def test_clients_over_shared_wait_then_are_refused_in_words_and_a_freed_slot_admits_one(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(8 * MiB)
    server = serve(image, "--shared", "2", "--shared-wait", "1")
    first, second = server.client(), server.client()
    assert first.flags & TFLAG_CAN_MULTI_CONN
    # Over the limit: no greeting until the wait is over, then NBD_OPT_GO is refused
    # with a message the client prints (never a silent close).
    started = time.monotonic()
    refused = qemu_io(server.uri(), "read 0 4k", check=False)
    assert refused.returncode != 0
    assert time.monotonic() - started >= 0.9
    assert "too many connections (2 allowed" in refused.stdout + refused.stderr, refused
    extra = RawClient(server.address)
    try:
        extra.greeting()
        extra.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
        extra.send_go()
        opt, kind, message = extra.option_reply()
        assert (opt, kind) == (OPT_GO, REP_ERR_POLICY)
        assert b"no slot freed within 1 s" in message
    finally:
        extra.close()
    server.wait_log("refused: no slot freed within 1 s")
    # A slot that frees goes to the client waiting for it.
    waiting = RawClient(server.address)
    try:
        server.wait_log("waits for a free slot")
        second.write(0, b"\x01" * 4096)
        shadow.write(0, b"\x01" * 4096)
        second.disconnect()
        waiting.handshake()
        assert waiting.read(0, 4096) == b"\x01" * 4096
        waiting.disconnect()
    finally:
        waiting.close()
    first.disconnect()
    qemu_io(server.uri(), "read -P 1 0 4k", "write -P 2 4k 4k")
    shadow.fill(4096, 4096, 2)
    server.finish(qemu, shadow)


def test_shared_wait_0_refuses_at_once_but_in_words(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image, "--shared-wait", "0")
    first = server.client()
    started = time.monotonic()
    refused = qemu_io(server.uri(), "read 0 4k", check=False)
    assert refused.returncode != 0 and time.monotonic() - started < 5
    assert "too many connections (1 allowed" in refused.stdout + refused.stderr, refused
    first.disconnect()
    qemu_io(server.uri(), "read 0 4k")
    server.finish(qemu, shadow)


def test_a_client_that_gives_up_waiting_is_forgotten(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image, control=True)
    first = server.client()
    assert server.control is not None
    ctl = ControlClient(str(server.control))
    try:
        waiter = RawClient(server.address)
        server.wait_log("waits for a free slot")
        assert ctl.execute("query-status")["waiting-connections"] == 1
        waiter.close()
        server.wait_log("the client left while waiting")
        assert ctl.execute("query-status")["waiting-connections"] == 0
    finally:
        ctl.close()
    first.disconnect()
    qemu_io(server.uri(), "read 0 4k")  # the slot is free: no wait
    assert server.log_text().count("waits for a free slot") == 1
    server.finish(qemu, shadow)


@contextmanager
def cpu_hog(processes: int = 2) -> Iterator[None]:
    """Keep the machine's cores busy (a Python busy loop each), always killed."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def back_to_back_clients(uri: str, count: int, first: int = 0) -> list[str]:
    """``count`` clients one after the other, alternately ``qemu-io -c 'read 0 4k'``
    and ``nbdinfo``; the failures, described."""
    qemu_io_tool, nbdinfo = require_tool("qemu-io"), require_tool("nbdinfo")
    failures = []
    for index in range(first, first + count):
        if index % 2:
            result = run([nbdinfo, uri])
        else:
            result = run([qemu_io_tool, "-f", "raw", uri, "-c", "read 0 4k"])
        text = result.stdout + result.stderr
        if result.returncode != 0 or "failed" in text:
            failures.append(f"client {index} ({result.argv[0]}): exit {result.returncode}: {text}")
    return failures


@pytest.mark.parametrize(("shared", "workers"), [(1, 1), (4, 8)], ids=["shared1", "shared4x8"])
def test_back_to_back_clients_on_a_busy_machine_are_never_dropped(
    serve: ServerFactory, disk: Disk, qemu: Qemu, shared: int, workers: int
) -> None:
    """200 short-lived clients (qemu-io and nbdinfo, alternately) against one export
    while two busy loops keep both cores loaded: a client that arrives while the
    previous one is still being forgotten (or while all slots are taken) waits for
    its slot instead of being dropped (before, 8 clients on --shared 4 lost about 80
    of 200). A few seconds per case here."""
    image, shadow = disk(4 * MiB)
    server = serve(image, "--shared", str(shared))
    total = 200
    with cpu_hog(2), ThreadPoolExecutor(workers) as pool:
        share = total // workers
        jobs = [
            pool.submit(back_to_back_clients, server.uri(), share, n * share)
            for n in range(workers)
        ]
        failures = [failure for job in jobs for failure in job.result()]
    assert failures == [], f"{len(failures)} of {total} clients failed:\n" + "\n".join(failures)
    log = server.log_text()
    assert "refused" not in log and "dropped" not in log, log
    if workers > shared:
        assert "waits for a free slot" in log  # the wait was exercised
    server.finish(qemu, shadow)


def test_many_requests_in_flight_on_one_connection_are_each_answered_once(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """One raw client sends 300 mixed requests before it reads a reply (a thread
    reads them as they come); every cookie is answered once, reads return what was
    there, and the image ends up exactly like the shadow."""
    image, shadow = disk(64 * MiB)
    server = serve(image)
    client = server.client()
    old = pattern(1, 8 * MiB)  # read while the writes go on elsewhere
    client.write(0, old)
    shadow.write(0, old)

    rng = random.Random(3)
    expected_reads: dict[int, bytes] = {}
    requests = []
    for cookie in range(1, 301):
        kind = rng.choice([CMD_WRITE] * 5 + [CMD_READ] * 3 + [CMD_WRITE_ZEROES, CMD_TRIM])
        if cookie % 50 == 0:
            kind = CMD_FLUSH
        slot = 8 * MiB + cookie * 160 * KiB  # each request has its own region
        if kind == CMD_WRITE:
            data = pattern(cookie, rng.choice([512, 4096, 65536, 100_000]))
            flags = FLAG_FUA if cookie % 7 == 0 else 0
            requests.append((kind, cookie, slot + rng.randrange(0, 4096), data, flags))
        elif kind == CMD_READ:
            offset = rng.randrange(0, 8 * MiB - 65536)
            expected_reads[cookie] = old[offset : offset + 65536]
            requests.append((kind, cookie, offset, b"", 0))
        elif kind in (CMD_WRITE_ZEROES, CMD_TRIM):
            requests.append((kind, cookie, slot, b"", 0))
        else:
            requests.append((kind, cookie, 0, b"", 0))
    replies = PipelinedReplies(client, len(requests))
    for kind, cookie, offset, data, flags in requests:
        if kind == CMD_WRITE:
            client.request(kind, cookie, offset, payload=data, flags=flags)
            shadow.write(offset, data)
        elif kind == CMD_READ:
            client.request(kind, cookie, offset, 65536)
        elif kind in (CMD_WRITE_ZEROES, CMD_TRIM):
            # whole, never-written clusters: zeros either way
            client.request(kind, cookie, offset, 128 * KiB)
        else:
            client.request(kind, cookie, 0, 0)
    replies.check(expected_reads)
    client.disconnect()
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


def test_requests_cut_at_odd_places_are_served_like_whole_ones(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """A stream of pipelined reads and in-place writes (the server's fast lane), sent
    in pieces cut anywhere: inside headers, inside payloads, several requests at once.
    Every request is answered once, reads see the data, the image ends like the shadow."""
    image, shadow = disk(16 * MiB)
    server = serve(image)
    client = server.client()
    old = pattern(7, 8 * MiB)  # allocated: writes below go in place
    client.write(0, old)
    shadow.write(0, old)

    rng = random.Random(11)
    stream = bytearray()
    expected_reads: dict[int, bytes] = {}
    count = 400
    for cookie in range(1, count + 1):
        if rng.random() < 0.4:  # reads of the upper half, which nothing writes
            offset = 4 * MiB + rng.randrange(0, 4 * MiB - 8192)
            length = rng.choice([1, 512, 4096, 8192])
            expected_reads[cookie] = old[offset : offset + length]
            client.pending[cookie] = length
            stream += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length)
            continue
        data = pattern(cookie, rng.choice([1, 512, 4096, 5000]))
        offset = cookie * 8 * KiB + rng.randrange(0, 1024)  # each write its own slot
        flags = FLAG_FUA if cookie % 37 == 0 else 0  # not the fast lane: in between
        stream += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, CMD_WRITE, cookie, offset, len(data))
        stream += data
        shadow.write(offset, data)

    replies = PipelinedReplies(client, count)
    pos = 0
    while pos < len(stream):
        cut = min(len(stream), pos + rng.choice([1, 7, 28, 29, 100, 4096, 5000, 30000]))
        client.send(bytes(stream[pos:cut]))
        pos = cut
        if rng.random() < 0.3:
            time.sleep(0.001)  # let the server read this piece on its own
    replies.check(expected_reads)
    client.disconnect()
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


@pytest.mark.parametrize("backing", [False, True], ids=["fresh", "overlay"])
def test_pipelined_allocating_writes_are_committed_together_in_order(
    backing: bool, serve: ServerFactory, tmp_path: Path, qemu: Qemu
) -> None:
    """Allocating writes pipelined into an image with 4 KiB clusters (fresh, or over
    a backing file): the server hands those of one chunk to the engine together
    (write_batch, one allocation for all), including writes over clusters an
    earlier one allocates, partial clusters, FUA writes and flushes in between.
    Every cookie is answered once; the image ends like the shadow (later writes win
    where they overlap) and checks clean."""
    size = 8 * MiB
    shadow = Shadow(tmp_path / "img.shadow", size)
    image = tmp_path / "img.qed"
    if backing:
        base = tmp_path / "base.raw"
        base_data = pattern(3, size)
        base.write_bytes(base_data)
        shadow.write(0, base_data)
        qedkit.create(str(image), cluster_size=4096, backing_file="base.raw",
                      backing_format="raw")  # fmt: skip
    else:
        qedkit.create(str(image), size, cluster_size=4096)
    server = serve(image)
    client = server.client()
    rng = random.Random(5)
    stream = bytearray()
    count = 600
    last = 0
    for cookie in range(1, count + 1):
        if cookie % 97 == 0:
            stream += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, cookie, 0, 0)
            client.pending[cookie] = 0
            continue
        length = rng.choice([4096, 4096, 4096, 100, 6000, 12288])
        if rng.random() < 0.2:  # over the clusters of a recent write
            offset = max(0, min(size - length, last + rng.randrange(-2048, 2048)))
        else:
            offset = rng.randrange(0, size // 4096) * 4096 + rng.choice([0, 0, 512, 3000])
            offset = min(offset, size - length)
        last = offset
        data = pattern(cookie, length)
        flags = FLAG_FUA if cookie % 41 == 0 else 0
        stream += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, CMD_WRITE, cookie, offset, length)
        stream += data
        client.pending[cookie] = 0
        shadow.write(offset, data)
    replies = PipelinedReplies(client, count)
    pos = 0
    while pos < len(stream):
        cut = min(len(stream), pos + rng.choice([4096, 30000, 100000, 300000]))
        client.send(bytes(stream[pos:cut]))
        pos = cut
    replies.check({})
    client.disconnect()
    compare_export(qemu, server.uri(), shadow)
    if not backing:
        server.finish(qemu, shadow)
        return
    assert server.stop() == 0, server.log_text()
    check = qemu.img("check", "-f", "qed", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    same = qemu.img("compare", "-f", "qed", "-F", "raw", image, shadow.path, check=False)
    assert same.returncode == 0, same.stdout + same.stderr


def test_qemu_io_readers_and_writers_in_parallel_see_consistent_data(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """Readers verify a fixed region again and again while writers fill others."""
    image, shadow = disk(32 * MiB)
    server = serve(image, "--shared", "4")
    qemu_io(server.uri(), "write -P 0x5a 0 8M")
    shadow.fill(0, 8 * MiB, 0x5A)
    qemu_io_path = require_tool("qemu-io")
    reads = ["-c", "read -P 0x5a 0 8M"] * 8
    writers = []
    for w in range(2):
        commands = []
        for i in range(16):
            offset = 8 * MiB + (i * 2 + w) * 512 * KiB
            commands += ["-c", f"write -P {0x60 + w} {offset} 512k"]
            shadow.fill(offset, 512 * KiB, 0x60 + w)
        writers.append([qemu_io_path, "-f", "raw", server.uri(), *commands])
    argvs = [[qemu_io_path, "-f", "raw", server.uri(), *reads]] * 2 + writers
    with popen_all(argvs) as procs:
        results = [proc.communicate(timeout=60) for proc in procs]
        codes = [proc.returncode for proc in procs]
    for code, (stdout, stderr) in zip(codes, results, strict=True):
        assert code == 0, stderr
        assert "failed" not in stdout + stderr and "Pattern" not in stdout + stderr
    compare_export(qemu, server.uri(), shadow)
    server.finish(qemu, shadow)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_large_reads_on_two_connections_each_get_their_own_data(
    loop: str, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """Client A pipelines 256 KiB reads and is slow to take the replies, while client
    B reads other ranges: A's replies must still carry A's data. (The reads span
    allocated and unallocated clusters, so they take the server's general read path
    and its pooled buffers.)"""
    size = 32 * MiB
    image, shadow = disk(size)
    with qedkit.open(str(image)) as img:
        for cluster in range(0, size // CLUSTER, 2):
            data = pattern(cluster, 32 * KiB)
            img.write(cluster * CLUSTER, data)
            shadow.write(cluster * CLUSTER, data)
    expected = shadow.read(0, size)
    server = serve(image, "--shared", "2", loop=loop)
    a, b = server.client(), server.client()
    n = 256 * KiB
    wrong = []
    for rnd in range(20):
        offsets_a = [((rnd * 7 + i * 13) % (size // n)) * n for i in range(8)]
        for i, offset in enumerate(offsets_a):
            a.request(CMD_READ, i + 1, offset, n)
        time.sleep(0.02)  # A's replies wait in the server's transport
        offsets_b = [((rnd * 5 + i * 11) % (size // n)) * n for i in range(16)]
        for offset in offsets_b:
            if b.read(offset, n) != expected[offset : offset + n]:
                wrong.append(("B", rnd, offset))
        for _ in offsets_a:
            reply = a.reply()
            offset = offsets_a[reply.cookie - 1]
            assert reply.error == 0
            if reply.data != expected[offset : offset + n]:
                wrong.append(("A", rnd, offset))
    a.disconnect()
    b.disconnect()
    assert not wrong, f"{len(wrong)} READ replies carried the wrong data: {wrong[:5]}"
    server.finish(qemu, shadow)
