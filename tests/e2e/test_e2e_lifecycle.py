"""Start, stop and ownership of ``qed serve``: SIGTERM/SIGINT drain and clean exit,
--fork and --pid-file, image locks, read-only exports."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2ekit import (
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EPERM,
    ESHUTDOWN,
    FLAG_FUA,
    NEED_CHECK,
    TFLAG_READ_ONLY,
    Closed,
    MiB,
    RawClient,
    Served,
    ServerFactory,
    Shadow,
    assert_clean_and_equal,
    header_features_byte,
    nbdsh,
    pattern,
    process_alive,
    qed_argv,
    qemu_io,
    run,
    signal_name,
)
from qedtest import Qemu, require_tool

import qedkit
from qedkit.cli.ctl import ControlClient

Disk = Callable[..., tuple[Path, Shadow]]
SIGNALS = [signal.SIGTERM, signal.SIGINT]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- signals ----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", SIGNALS, ids=signal_name)
def test_signal_flushes_clears_need_check_and_exits_0(
    signum: int, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image)
    client = server.client()
    data = pattern(1, 3 * MiB)
    client.write(MiB, data)  # allocating, and never flushed by the client
    shadow.write(MiB, data)
    assert header_features_byte(image) & NEED_CHECK, "an allocating write sets NEED_CHECK"
    server.finish(qemu, shadow, signum)  # exit 0, NEED_CHECK clear, data all there
    with pytest.raises((Closed, ConnectionResetError, BrokenPipeError)):
        client.read(0, 4096)
    client.close()


@pytest.mark.parametrize("signum", SIGNALS, ids=signal_name)
def test_signal_drains_a_burst_of_fua_writes(
    signum: int, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """A signal between two bursts of 24 FUA writes: each write the server answered
    is in the image, each it refused (ESHUTDOWN) or never read is not, nothing sent
    after the signal is applied, and it exits 0."""
    image, shadow = disk(64 * MiB)
    server = serve(image)
    client = server.client()
    payloads = {cookie: pattern(cookie, MiB) for cookie in range(1, 49)}
    for cookie in range(1, 25):
        client.request(CMD_WRITE, cookie, cookie * MiB, payload=payloads[cookie], flags=FLAG_FUA)
    server.send_signal(signum)
    server.wait_log("stopping:")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for cookie in range(25, 49):
            client.request(
                CMD_WRITE, cookie, cookie * MiB, payload=payloads[cookie], flags=FLAG_FUA
            )
    answered: dict[int, int] = {}
    try:
        while len(answered) < len(payloads):
            reply = client.reply()
            assert reply.cookie not in answered, f"cookie {reply.cookie} answered twice"
            answered[reply.cookie] = reply.error
    except (Closed, ConnectionResetError):
        pass  # requests the server never read are not answered
    client.close()
    assert set(answered.values()) <= {0, ESHUTDOWN}, answered
    for cookie, error in answered.items():
        if error == 0:
            shadow.write(cookie * MiB, payloads[cookie])
    assert any(e == 0 for e in answered.values()), "nothing was drained"
    late = {c: e for c, e in answered.items() if c > 24 and e == 0}
    assert not late, f"writes sent after the signal were applied: {sorted(late)}"
    server.finish(qemu, shadow, signum)


def start_blocking_check(ctl: ControlClient) -> str:
    """A check job paused in the middle of its scan: it holds allocating writes."""
    for _ in range(20):
        job: str = ctl.execute("job-start", {"type": "check"})["id"]
        try:
            ctl.execute("job-pause", {"id": job})
        except qedkit.QedError:
            continue  # it finished first: try again
        info = next(j for j in ctl.execute("query-jobs") if j["id"] == job)
        if info["current-progress"] < info["total-progress"]:
            return job
        ctl.execute("job-resume", {"id": job})  # paused after the scan: no use
    raise AssertionError("could not pause a check job in the middle of its scan")


def many_tables_image(path: Path, tables: int = 128) -> tuple[Path, Shadow]:
    """4 KiB clusters, 2-cluster tables (4 MiB per L2 table), one data cluster per
    table: a check job has ``tables`` L2 tables to scan, time enough to pause it."""
    size = tables * 4 * MiB
    qedkit.create(str(path), size, cluster_size=4096, table_size=2)
    shadow = Shadow(path.with_suffix(".shadow"), size)
    with qedkit.open(str(path)) as image:
        for i in range(tables):
            data = pattern(i, 4096)
            image.write(i * 4 * MiB, data)
            shadow.write(i * 4 * MiB, data)
    return path, shadow


def connect_refused(server: Served) -> bool:
    try:
        probe = RawClient(server.address, timeout=2)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    try:
        probe.greeting()
    except (Closed, ConnectionResetError):
        return True
    finally:
        probe.close()
    return False


@pytest.mark.parametrize("signum", SIGNALS, ids=signal_name)
def test_signal_stops_accepting_and_drains_a_request_in_flight(
    signum: int, serve: ServerFactory, qemu: Qemu, tmp_path: Path
) -> None:
    image, shadow = many_tables_image(tmp_path / "img.qed")
    server = serve(image, control=True)
    assert server.control is not None
    ctl = ControlClient(str(server.control))
    try:
        job = start_blocking_check(ctl)
        client = server.client()
        payload = pattern(77, 4096)
        client.request(CMD_WRITE, 1, 4 * MiB + 8192, payload=payload)  # allocates
        ready, _, _ = select.select([client.sock], [], [], 0.5)
        assert not ready, "the allocating write should wait for the paused check"
        server.send_signal(signum)
        # Stopping cancels the job (a paused job cannot hold the drain), so the
        # write in flight completes and is answered before the server exits.
        reply = client.reply()
        assert (reply.cookie, reply.error) == (1, 0)
        assert connect_refused(server), "a stopping server accepted a new connection"
        statuses = []
        while not statuses or statuses[-1] not in ("cancelled", "concluded"):
            event = ctl.next_event()
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["id"] == job:
                statuses.append(event["data"]["status"])
        assert statuses[-1] == "cancelled"
        shadow.write(4 * MiB + 8192, payload)
        assert client.closed_by_server()
        client.close()
    finally:
        ctl.close()
    server.finish(qemu, shadow, signum)


def test_sigterm_with_a_paused_job_blocking_a_write_still_exits(
    serve: ServerFactory, qemu: Qemu, tmp_path: Path
) -> None:
    """Nobody resumes the job: stopping must not wait for it forever (the job is
    cancelled, the write completes, the server exits 0 and the image is clean)."""
    image, shadow = many_tables_image(tmp_path / "img.qed")
    server = serve(image, control=True)
    assert server.control is not None
    ctl = ControlClient(str(server.control))
    client = server.client()
    payload = pattern(78, 4096)
    try:
        start_blocking_check(ctl)
        client.request(CMD_WRITE, 1, 4 * MiB + 8192, payload=payload)
        ready, _, _ = select.select([client.sock], [], [], 0.5)
        assert not ready, "the allocating write should wait for the paused check"
        code = server.stop(signal.SIGTERM, timeout=5)
        assert code == 0
        try:
            reply = client.reply()
        except (Closed, ConnectionResetError):
            reply = None
    finally:
        ctl.close()
        client.close()
    if reply is not None and reply.error == 0:
        shadow.write(4 * MiB + 8192, payload)
    server.finish(qemu, shadow)


# ---- how long stopping takes ------------------------------------------------------------

# A generous bound, not a benchmark: idle, qed serve exits in ~25 ms here (qemu-nbd:
# ~5 ms); stopping must take no longer than draining what is in flight.
QUICK_EXIT = 0.5


def exit_seconds(server: Served, signum: int = signal.SIGTERM) -> float:
    started = time.monotonic()
    server.send_signal(signum)
    assert server.stop(signum, timeout=20) == 0, server.log_text()
    return time.monotonic() - started


@pytest.mark.parametrize(
    "before",
    ["nothing", "a-client-wrote-and-left", "an-idle-client", "an-idle-control-client"],
)
def test_sigterm_on_an_idle_server_exits_at_once(
    before: str, serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image, control=True)
    assert server.control is not None
    client = ctl = None
    if before == "a-client-wrote-and-left":
        qemu_io(server.uri(), "write -P 7 0 1M")
        shadow.fill(0, MiB, 7)
    elif before == "an-idle-client":
        client = server.client()
    elif before == "an-idle-control-client":
        ctl = ControlClient(str(server.control))
    time.sleep(0.2)  # idle
    try:
        seconds = exit_seconds(server)
    finally:
        if client is not None:
            client.close()
        if ctl is not None:
            ctl.close()
    assert seconds < QUICK_EXIT, f"qed serve took {seconds:.2f} s to exit after SIGTERM"
    server.finish(qemu, shadow)


def test_sigterm_during_a_rate_limited_scrub_does_not_wait_out_the_rate_limit(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """A scrub at 256 KiB/s pauses ~4 s after each 1 MiB it reads: the job is
    cancelled at once (it used to finish its pause first, 1-4 s)."""
    image, shadow = disk(16 * MiB)
    with qedkit.open(str(image)) as img:
        img.write(0, b"\x5a" * (4 * MiB))
    shadow.fill(0, 4 * MiB, 0x5A)
    server = serve(image, control=True)
    assert server.control is not None
    ctl = ControlClient(str(server.control))
    try:
        job = ctl.execute("job-start", {"type": "scrub", "rate": "256k"})["id"]
        while True:  # its first chunk is read: it rests now
            event = ctl.next_event()
            if event["event"] == "JOB_PROGRESS" and event["data"]["id"] == job:
                break
        time.sleep(0.2)
        seconds = exit_seconds(server)
    finally:
        ctl.close()
    assert seconds < QUICK_EXIT, f"qed serve took {seconds:.2f} s to exit after SIGTERM"
    assert "Traceback" not in server.log_text()
    server.finish(qemu, shadow)


# ---- --fork and --pid-file --------------------------------------------------------------


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"qed serve (pid {pid}) did not exit; killed")
        time.sleep(0.02)


def test_fork_returns_once_listening_and_the_pid_file_names_the_server(
    disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    image, shadow = disk(16 * MiB)
    sock = tmp_path / "forked.sock"
    pid_file = tmp_path / "serve.pid"
    result = run(qed_argv("serve", "--fork", "--pid-file", pid_file, "-k", sock, image), 30)
    result.ok()
    pid = int(pid_file.read_text())
    try:
        assert process_alive(pid)
        assert sock.exists()
        uri = f"nbd+unix:///?socket={sock}"
        qemu_io(uri, "write -P 0x61 0 1M", "read -P 0x61 0 1M")  # no waiting needed
        shadow.fill(0, MiB, 0x61)
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not pid_file.exists(), "the pid file outlived the server"
    assert not sock.exists(), "the socket outlived the server"
    assert_clean_and_equal(qemu, image, shadow)


def test_fork_reports_a_server_that_cannot_start(tmp_path: Path, qemu: Qemu) -> None:
    sock = tmp_path / "x.sock"
    missing = tmp_path / "missing.qed"
    result = run(qed_argv("serve", "--fork", "-k", sock, missing), 30)
    assert result.returncode == 1
    assert "missing.qed" in result.stderr


# ---- locks ------------------------------------------------------------------------------


def test_a_served_image_is_locked_against_other_writers(
    serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image)
    qemu_io(server.uri(), "write -P 0x71 0 1M")
    shadow.fill(0, MiB, 0x71)
    before = sha(image)
    # qemu-io cannot open it for writing
    direct = run([require_tool("qemu-io"), "-f", "qed", image, "-c", "write -P 0x72 0 4k"])
    assert direct.returncode != 0
    assert 'Failed to get "write" lock' in direct.stderr, direct.stderr
    # nor can a second qed serve, with or without --fork
    second = run(qed_argv("serve", "-k", tmp_path / "second.sock", image), 30)
    assert second.returncode != 0
    assert "lock" in second.stderr, second.stderr
    forked = run(qed_argv("serve", "--fork", "-k", tmp_path / "third.sock", image), 30)
    assert forked.returncode == 1
    assert "lock" in forked.stderr, forked.stderr
    # reading with -U (share) is allowed
    info = qemu.img("info", "-U", "--output=json", image)
    assert '"format": "qed"' in info.stdout
    assert sha(image) == before, "a refused writer changed the image"
    qemu_io(server.uri(), "read -P 0x71 0 1M", "write -P 0x73 1M 1M")
    shadow.fill(MiB, MiB, 0x73)
    server.finish(qemu, shadow)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("second_image", ["locked", "missing"])
def test_a_second_server_that_cannot_start_leaves_the_first_one_reachable(
    tcp: bool, second_image: str, serve: ServerFactory, disk: Disk, qemu: Qemu, tmp_path: Path
) -> None:
    """Someone starts ``qed serve`` again on the same socket or port, with the same
    (locked) image or a missing one: it fails, and the running server must still be
    reachable where it was."""
    image, shadow = disk(8 * MiB)
    server = serve(image, tcp=tcp)
    where = ["--port", str(server.port)] if tcp else ["-k", str(server.sock)]
    other = image if second_image == "locked" else tmp_path / "missing.qed"
    second = run(qed_argv("serve", *where, other), 30)
    assert second.returncode != 0
    if not tcp:
        assert server.sock is not None and server.sock.exists(), "the socket file is gone"
    result = qemu_io(server.uri(), "write -P 0x75 0 64k", "read -P 0x75 0 64k", check=False)
    assert result.returncode == 0, (
        f"the running server is unreachable after a failed second start: {result.stderr}"
    )
    shadow.fill(0, 65536, 0x75)
    server.finish(qemu, shadow)


def test_qed_serve_cannot_take_an_image_qemu_holds(disk: Disk, qemu: Qemu, tmp_path: Path) -> None:
    image, _ = disk(4 * MiB)
    holder = subprocess.Popen(
        [require_tool("qemu-io"), "-f", "qed", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        inode = image.stat().st_ino
        while f":{inode} " not in Path("/proc/locks").read_text():
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.02)
        result = run(qed_argv("serve", "-k", tmp_path / "s.sock", image), 30)
        assert result.returncode != 0
        assert "lock" in result.stderr, result.stderr
    finally:
        holder.kill()
        holder.communicate()


# ---- read-only exports ------------------------------------------------------------------


def prefilled(disk: Disk) -> tuple[Path, Shadow]:
    image, shadow = disk(8 * MiB)
    data = pattern(3, 2 * MiB)
    with qedkit.open(str(image)) as img:
        img.write(MiB, data)
    shadow.write(MiB, data)
    return image, shadow


NBDSH_READONLY = """
h = nbd.NBD()
h.connect_uri(uri)
h.set_strict_mode(0)  # let the requests reach the server: it must refuse them
out = {"is_read_only": h.is_read_only(), "can_trim": h.can_trim(), "can_zero": h.can_zero()}
for name, call in [
    ("pwrite", lambda: h.pwrite(b"x" * 4096, 0)),
    ("zero", lambda: h.zero(4096, 0)),
    ("trim", lambda: h.trim(65536, 65536)),
]:
    try:
        call()
        out[name] = "accepted"
    except nbd.Error as exc:
        out[name] = [exc.errno, exc.string]
out["read"] = h.pread(4096, 1 << 20).hex()[:16]
h.shutdown()
print(json.dumps(out))
"""


def test_read_only_export_refuses_writes_with_eperm(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = prefilled(disk)
    before = sha(image)
    server = serve(image, "-r", "--shared", "2")
    # a raw client: the export says read-only, and WRITE / WRITE_ZEROES / TRIM get EPERM
    client = server.client()
    assert client.flags & TFLAG_READ_ONLY
    assert client.call(CMD_WRITE, 0, payload=b"\xff" * 4096).error == EPERM
    assert client.call(CMD_WRITE_ZEROES, MiB, 4096).error == EPERM
    assert client.call(CMD_TRIM, MiB, 65536).error == EPERM
    assert client.call(CMD_FLUSH, 0, 0).error == 0
    assert client.call(CMD_READ, MiB, 4096).data == shadow.read(MiB, 4096)
    # libnbd with its own checks off: the server's EPERM comes back as such
    out: Any = nbdsh(NBDSH_READONLY, uri=server.uri())
    assert out["is_read_only"] is True
    for name in ("pwrite", "zero", "trim"):
        assert out[name] != "accepted", f"{name} was accepted by a read-only export"
        errno, message = out[name]  # libnbd names the errno: "EPERM"
        assert errno in ("EPERM", EPERM) and "Operation not permitted" in message, out[name]
    assert out["read"] == shadow.read(MiB, 8).hex()
    client.disconnect()
    # qemu-io: -r reads; without -r it cannot even open a read-only export
    qemu_io(server.uri(), "read -P 0 0 1M", f"read -v {MiB} 16", extra=("-r", "-f", "raw"))
    refused = qemu_io(server.uri(), "write 0 4k", check=False)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr or "read-only" in refused.stderr
    server.finish(qemu, shadow)
    assert sha(image) == before, "a read-only server changed the file"
