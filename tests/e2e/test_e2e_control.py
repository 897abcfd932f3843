"""The control socket of ``qed serve`` (JSON lines) and ``qed ctl``."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from e2ekit import (
    CMD_FLUSH,
    CMD_READ,
    FLAG_FUA,
    KiB,
    MiB,
    Served,
    ServerFactory,
    Shadow,
    qed_argv,
    qemu_io,
    run,
)
from qedtest import Qemu

import qedkit
from qedkit.cli.ctl import ControlClient

Disk = Callable[..., tuple[Path, Shadow]]


@contextmanager
def control(server: Served) -> Iterator[ControlClient]:
    assert server.control is not None
    client = ControlClient(str(server.control))
    try:
        yield client
    finally:
        client.close()


def wait_event(
    client: ControlClient, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    client.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = client.next_event()
        if predicate(event):
            return event
    raise AssertionError("no such event")


def status_event(job: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e["event"] == "JOB_STATUS_CHANGE"
        and e["data"]["id"] == job
        and e["data"]["status"] == status
    )


def filled(disk: Disk, size: int = 16 * MiB) -> tuple[Path, Shadow]:
    """An image whose first half is data (for scrub), and its shadow."""
    image, shadow = disk(size)
    with qedkit.open(str(image)) as img:
        img.write(0, b"\x3c" * (size // 2))
    shadow.fill(0, size // 2, 0x3C)
    return image, shadow


def test_statistics_count_every_request_once_whichever_path_serves_it(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """Requests served by the fast paths (in-place writes, cached reads, a pipelined
    batch) and by the general path (allocating and FUA writes, flush) are counted
    alike; a refused request is not counted."""
    image, shadow = disk(16 * MiB)
    server = serve(image, control=True)
    client = server.client()
    client.write(0, b"\x11" * (64 * KiB))  # allocating: the general path
    client.write(0, b"\x22" * (4 * KiB))  # in place: the fast path
    client.write(4 * KiB, b"\x33" * (4 * KiB), flags=FLAG_FUA)  # FUA: the general path
    assert client.read(0, 4 * KiB) == b"\x22" * (4 * KiB)  # cached: the fast path
    for cookie in range(1, 9):  # one send: the lane takes the batch
        client.request(CMD_READ, cookie, offset=cookie * 8 * KiB, length=8 * KiB)
    replies = sorted((client.reply() for _ in range(8)), key=lambda r: r.cookie)
    assert [r.error for r in replies] == [0] * 8
    assert client.call(CMD_FLUSH).error == 0
    assert client.call(CMD_READ, 16 * MiB, 4096).error != 0  # refused: past the end
    shadow.fill(0, 64 * KiB, 0x11)
    shadow.fill(0, 4 * KiB, 0x22)
    shadow.fill(4 * KiB, 4 * KiB, 0x33)
    with control(server) as ctl:
        (export,) = ctl.execute("query-exports")
    assert export["requests"] == 3 + 1 + 8 + 1
    assert export["bytes-written"] == 64 * KiB + 4 * KiB + 4 * KiB
    assert export["bytes-read"] == 4 * KiB + 8 * 8 * KiB
    assert export["errors"] == 0
    client.disconnect()
    server.finish(qemu, shadow)


def test_greeting_and_queries_describe_the_server(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(16 * MiB)
    server = serve(image, "--shared", "3", control=True)
    with control(server) as ctl:
        assert ctl.greeting["QED"]["version"]["qedkit"] == qedkit.__version__
        assert set(ctl.greeting["QED"]["capabilities"]) == {"jobs", "events"}
        status = ctl.execute("query-status")
        assert status["status"] == "running"
        assert status["pid"] == server.pid
        assert status["connections"] == 0 and status["max-connections"] == 3
        assert status["jobs"] == 0
        assert ctl.execute("query-jobs") == []

        qemu_io(server.uri(), "write -P 0x44 0 1M", "read -P 0x44 0 1M", "flush")
        shadow.fill(0, MiB, 0x44)
        (export,) = ctl.execute("query-exports")
        assert export["name"] == ""
        assert Path(export["filename"]).resolve() == image.resolve()
        assert export["format"] == "qed" and export["size"] == 16 * MiB
        assert export["readonly"] is False
        assert export["bytes-written"] == MiB
        assert export["bytes-read"] >= MiB
        assert export["requests"] >= 3 and export["errors"] == 0
        assert export["connections"] == 0

        raw = server.client()
        assert ctl.execute("query-status")["connections"] == 1
        assert ctl.execute("query-exports")[0]["connections"] == 1
        raw.disconnect()

        info = ctl.execute("query-image")
        assert info["virtual-size"] == 16 * MiB
        assert info["cluster-size"] == 65536
        assert info["format"] == "qed"
        assert info["allocated-clusters"] == MiB // 65536
        assert info["total-clusters"] == 16 * MiB // 65536
        assert info["leaks"] == 0 and info["corruptions"] == 0
        assert info["need-check"] is False  # the flush cleared it
        assert ctl.execute("query-image", {"export": ""})["export"] == ""
    server.finish(qemu, shadow)


def test_bad_commands_get_error_classes_and_the_session_goes_on(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image, control=True)
    assert server.control is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.control))
        stream = sock.makefile("rwb")
        assert "QED" in json.loads(stream.readline())

        def ask(line: bytes) -> dict[str, Any]:
            stream.write(line + b"\n")
            stream.flush()
            reply: dict[str, Any] = json.loads(stream.readline())
            return reply

        cases = [
            (b"this is not json", "JSONError"),
            (b"[1, 2, 3]", "JSONError"),
            (b'{"execute": "no-such-command", "id": 1}', "CommandNotFound"),
            (b'{"arguments": {}, "id": 2}', "InvalidArgument"),
            (b'{"execute": "job-pause", "arguments": {"id": "nope"}, "id": 3}', "InvalidArgument"),
            (b'{"execute": "job-start", "arguments": {"type": "no-such-job"}, "id": 4}', None),
            (b'{"execute": "query-image", "arguments": {"export": "x"}, "id": 5}', None),
            (b'{"execute": "query-status", "arguments": 7, "id": 6}', "InvalidArgument"),
            (b"\xff\xfe garbage", "JSONError"),
        ]
        for line, error_class in cases:
            reply = ask(line)
            assert "error" in reply, (line, reply)
            if error_class is not None:
                assert reply["error"]["class"] == error_class, (line, reply)
        reply = ask(b'{"execute": "query-status", "id": "x"}')
        assert reply["id"] == "x" and reply["return"]["status"] == "running"
        stream.close()
    qemu_io(server.uri(), "write -P 1 0 64k")
    shadow.fill(0, 65536, 1)
    server.finish(qemu, shadow)


def test_check_job_runs_beside_guest_writes_and_reports_events(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = filled(disk)
    server = serve(image, control=True)
    with control(server) as ctl, control(server) as watcher:
        writer = server.client()
        job = ctl.execute("job-start", {"type": "check", "id": "chk"})["id"]
        assert job == "chk"
        # guest writes (allocating ones too) go on around the check
        for i in range(8):
            data = bytes([i + 1]) * 65536
            writer.write(8 * MiB + i * 3 * 65536, data)
            shadow.write(8 * MiB + i * 3 * 65536, data)
        done = wait_event(ctl, status_event(job, "concluded"))
        result = done["data"]["result"]
        assert result["exit-code"] == 0
        assert result["corruptions"] == 0 and result["leaks"] == 0
        assert result["check-errors"] == 0 and result["problems"] == []
        assert result["total-clusters"] == 16 * MiB // 65536
        assert "seconds" in done["timestamp"] and "microseconds" in done["timestamp"]
        # every control client receives every event
        wait_event(watcher, status_event(job, "running"))
        wait_event(watcher, status_event(job, "concluded"))
        (info,) = ctl.execute("query-jobs")
        assert info["id"] == "chk" and info["type"] == "check"
        assert info["status"] == "concluded" and info["result"]["exit-code"] == 0
        assert info["export"] == ""
        # the same id can be used again once the job has finished
        assert ctl.execute("job-start", {"type": "check", "id": "chk"})["id"] == "chk"
        wait_event(ctl, status_event("chk", "concluded"))
        writer.disconnect()
    server.finish(qemu, shadow)


def test_scrub_job_progress_pause_resume_cancel(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = filled(disk)
    server = serve(image, control=True)
    with control(server) as ctl:
        # 8 MiB of data at 2 MiB/s: four seconds of work, 1 MiB chunks
        job = ctl.execute("job-start", {"type": "scrub", "rate": 2 * MiB})["id"]
        progress = wait_event(ctl, lambda e: e["event"] == "JOB_PROGRESS")
        assert progress["data"]["id"] == job
        assert progress["data"]["total"] == 8 * MiB
        ctl.execute("job-pause", {"id": job})
        wait_event(ctl, status_event(job, "paused"))
        time.sleep(0.8)  # a chunk that was under way (0.5 s at most) may still finish
        frozen = next(j for j in ctl.execute("query-jobs") if j["id"] == job)
        assert frozen["status"] == "paused"
        time.sleep(0.8)
        later = next(j for j in ctl.execute("query-jobs") if j["id"] == job)
        assert later["current-progress"] == frozen["current-progress"] < 8 * MiB
        with pytest.raises(qedkit.QedError, match="not running"):
            ctl.execute("job-pause", {"id": job})
        # guest I/O goes on while the job is paused
        qemu_io(server.uri(), "read -P 0x3c 0 1M", "write -P 0x3d 12M 1M")
        shadow.fill(12 * MiB, MiB, 0x3D)
        ctl.execute("job-resume", {"id": job})
        wait_event(ctl, status_event(job, "running"))
        ctl.execute("job-cancel", {"id": job})
        wait_event(ctl, status_event(job, "cancelled"))
        with pytest.raises(qedkit.QedError, match="already cancelled"):
            ctl.execute("job-cancel", {"id": job})
        # a scrub left alone concludes and reads every data cluster
        job2 = ctl.execute("job-start", {"type": "scrub"})["id"]
        assert job2 != job
        done = wait_event(ctl, status_event(job2, "concluded"))
        assert done["data"]["result"] == {"bytes-read": 9 * MiB, "errors": []}
        statuses = {j["id"]: j["status"] for j in ctl.execute("query-jobs")}
        assert statuses == {job: "cancelled", job2: "concluded"}
    server.finish(qemu, shadow)


def test_qed_ctl_prints_human_and_json_output(serve: ServerFactory, disk: Disk, qemu: Qemu) -> None:
    image, shadow = filled(disk)
    server = serve(image, control=True)
    sock = str(server.control)

    human = run(qed_argv("ctl", sock, "query-status"), 30).ok()
    lines = human.stdout.splitlines()
    assert "status: running" in lines
    assert f"pid: {server.pid}" in lines

    as_json = run(qed_argv("ctl", "--output=json", sock, "query-exports"), 30).ok()
    (export,) = json.loads(as_json.stdout)
    assert export["size"] == 16 * MiB and export["format"] == "qed"

    waited = run(qed_argv("ctl", "--wait", sock, "job-start", "type=check"), 30).ok()
    out = waited.stdout.splitlines()
    assert out[0] == "id: check-1"
    assert "status: running" in out and "status: concluded" in out
    assert "exit-code: 0" in out and "corruptions: 0" in out

    waited = run(qed_argv("ctl", "--output=json", "--wait", sock, "job-start", "type=scrub"), 30)
    waited.ok()
    # the job's id, pretty-printed, then one JSON event per line
    parsed = [json.loads(line) for line in waited.stdout.splitlines() if line.startswith('{"')]
    assert parsed and all(e["data"]["id"] == "scrub-2" for e in parsed)
    final = parsed[-1]
    assert final["event"] == "JOB_STATUS_CHANGE" and final["data"]["status"] == "concluded"
    assert final["data"]["result"]["bytes-read"] == 8 * MiB

    jobs = json.loads(run(qed_argv("ctl", "--output=json", sock, "query-jobs"), 30).ok().stdout)
    assert [j["status"] for j in jobs] == ["concluded", "concluded"]

    unknown = run(qed_argv("ctl", sock, "no-such-command"), 30)
    assert unknown.returncode != 0
    assert unknown.stderr.startswith("qed: unknown control command 'no-such-command' (try: ")
    bad_argument = run(qed_argv("ctl", sock, "job-pause", "id"), 30)
    assert bad_argument.returncode != 0 and "KEY=VALUE" in bad_argument.stderr
    nobody = run(qed_argv("ctl", str(Path(sock).with_name("nobody.sock")), "query-status"), 30)
    assert nobody.returncode != 0 and "cannot connect" in nobody.stderr
    server.finish(qemu, shadow)


def test_quit_stops_the_server_cleanly(serve: ServerFactory, disk: Disk, qemu: Qemu) -> None:
    image, shadow = disk(8 * MiB)
    server = serve(image, control=True)
    client = server.client()
    client.write(0, b"\x17" * 65536)  # allocating, not flushed
    shadow.fill(0, 65536, 0x17)
    with control(server) as ctl:
        assert ctl.execute("quit") == {}
    code = server.proc.wait(20)
    assert code == 0, server.log_text()
    client.close()
    assert server.control is not None and not server.control.exists()
    server.finish(qemu, shadow)


def test_ctl_quit_returns_once_the_server_is_gone(
    serve: ServerFactory, disk: Callable[..., tuple[Path, Any]], qemu: Qemu
) -> None:
    """A script that runs `qed ctl SOCK quit` and then starts the next server on the
    same socket must find the socket free and the image unlocked."""
    image, _ = disk(4 * MiB)
    server = serve(image, control=True)
    assert server.control is not None
    run(qed_argv("ctl", str(server.control), "quit"), 60).ok()
    assert server.proc.poll() is not None, "qed ctl quit returned while the server ran"
    assert server.sock is not None and not server.sock.exists()
    again = serve(image, control=True)  # same image: the lock is free
    assert again.proc.poll() is None
