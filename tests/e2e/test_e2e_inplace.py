"""Live in-place conversion: ``qed serve --convert-qcow2`` serves a qcow2 image made by
qemu-img read-write while a ``convert-to-qed`` job makes it QED in the same file, and
qemu-io keeps writing through NBD.

The image (64 KiB clusters) holds plain data (reused in place), compressed clusters
written by ``qemu-io write -c`` (copied: the copy phase takes a while), zero clusters
and unallocated space. qemu-io runs a fixed sequence of writes (into reused clusters,
which go through at once; into compressed, zero and unallocated clusters, which wait
for the switch; write -z; reads checking patterns) that starts before the job and
ends after it; the same writes are applied to a raw shadow made by ``qemu-img
convert -O raw`` of the original. At the end the server stops (exit 0, no
traceback), ``qemu-img info`` says qed, ``qemu-img check`` exits 0 and ``qemu-img
compare`` with the shadow is identical.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

from e2ekit import KiB, MiB, Served, ServerFactory, Shadow, qemu_io
from qedtest import Qemu, require_tool

from qedkit.cli.ctl import ControlClient

SIZE = 48 * MiB


def _image(qemu: Qemu, tmp_path: Path) -> tuple[Path, Shadow]:
    path = tmp_path / "disk.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, str(SIZE))
    commands = ["write -P 0x11 0 4m", "write -z 6m 1m", "write -P 0x12 40m 2m"]
    # 16 MiB of compressed clusters: the copy phase inflates them (it takes a while)
    for i in range(16):
        commands.append(f"write -c -P {0x20 + i} {8 + i}m 1m")
    args = [a for c in commands for a in ("-c", c)]
    qemu.io("-f", "qcow2", *args, path)
    shadow = Shadow(tmp_path / "shadow.raw", SIZE)
    qemu.img("convert", "-f", "qcow2", "-O", "raw", path, shadow.path)
    return path, shadow


def _writes(seed: int, n: int) -> list[tuple[str, int, int, int]]:
    """(kind, offset, length, pattern byte): writes all over the disk."""
    rng = random.Random(seed)
    out = [("write", 1 * MiB, 64 * KiB, 0x3F)]  # reused: it goes through at once
    for i in range(n):
        kind = rng.choice(["write", "write", "write", "zero"])
        length = rng.choice([512, 4 * KiB, 64 * KiB, 100 * KiB])
        where = rng.choice(["reused", "compressed", "zero", "unallocated"])
        base = {"reused": 0, "compressed": 8 * MiB, "zero": 6 * MiB, "unallocated": 30 * MiB}
        span = {"reused": 4 * MiB, "compressed": 16 * MiB, "zero": 1 * MiB, "unallocated": 8 * MiB}
        offset = base[where] + rng.randrange(0, span[where] - length) // 512 * 512
        out.append((kind, offset, length, 0x40 + i % 190))
    return out


def _qemu_io_script(writes: list[tuple[str, int, int, int]]) -> list[str]:
    cmds = []
    for kind, offset, length, byte in writes:
        if kind == "zero":
            cmds.append(f"write -z {offset} {length}")
        else:
            cmds.append(f"write -P {byte:#x} {offset} {length}")
            cmds.append(f"read -P {byte:#x} {offset} {length}")
    cmds.append("flush")
    return cmds


def _apply(shadow: Shadow, writes: list[tuple[str, int, int, int]]) -> None:
    for kind, offset, length, byte in writes:
        if kind == "zero":
            shadow.zero(offset, length)
        else:
            shadow.fill(offset, length, byte)


def _job(client: ControlClient, ident: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in client.execute("query-jobs")}
        job = jobs[ident]
        if job["status"] in ("concluded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {ident} still {job['status']}")
        time.sleep(0.02)


def _judge(qemu: Qemu, server: Served, image: Path, shadow: Shadow) -> None:
    code = server.stop()
    log = server.log_text()
    assert code == 0, log
    assert "Traceback" not in log and "internal error" not in log, log
    info = json.loads(qemu.img("info", "--output=json", image).stdout)
    assert info["format"] == "qed"
    check = qemu.img("check", "-f", "qed", image, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = qemu.img("compare", "-f", "qed", "-F", "raw", image, shadow.path, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def _popen_qemu_io(uri: str, commands: list[str]) -> subprocess.Popen[str]:
    argv = [require_tool("qemu-io"), "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_convert_to_qed_job_while_qemu_io_writes_equals_the_shadow(
    serve: ServerFactory, qemu: Qemu, tmp_path: Path
) -> None:
    """Two qemu-io processes on disjoint ranges (so the shadow's order is theirs): one
    writes only into reused clusters, which go through while the job copies (paced at
    8 MiB/s: about 2 s for the 16 MiB of compressed clusters); the other writes all
    over the disk, and waits at its first write into a cluster that needs the
    switch."""
    image, shadow = _image(qemu, tmp_path)
    server = serve(image, "--convert-qcow2=job", "-e", "2", control=True)
    assert server.control is not None
    client = ControlClient(str(server.control))
    exports = client.execute("query-exports")
    assert exports[0]["format"] == "qcow2" and exports[0]["readonly"] is False
    rng = random.Random(11)
    steady = [
        ("write", rng.randrange(0, 4 * MiB - 4 * KiB) // 512 * 512, 4 * KiB, 0x30 + i % 16)
        for i in range(1500)
    ]
    anywhere = [w for w in _writes(7, 300) if w[1] >= 4 * MiB]
    procs = []
    try:
        procs.append(_popen_qemu_io(server.uri(), _qemu_io_script(steady)))
        deadline = time.monotonic() + 30
        while client.execute("query-exports")[0]["bytes-written"] == 0:
            assert time.monotonic() < deadline, "qemu-io never wrote"
            time.sleep(0.005)
        procs.append(_popen_qemu_io(server.uri(), _qemu_io_script(anywhere)))
        started = client.execute("job-start", {"type": "convert-to-qed", "id": "c1", "rate": "8M"})
        assert started == {"id": "c1"}
        job = _job(client, "c1")
        assert job["status"] == "concluded", job
        result = job["result"]
        assert isinstance(result, dict)
        assert result["reused-clusters"] > 0 and result["copied-clusters"] >= 256
        # writes went through in place while the job copied, others were held for it
        assert result["in-place-writes"] >= 20 and result["held-requests"] >= 1, {
            k: result[k] for k in ("in-place-writes", "held-requests", "seconds")
        }
        print(
            f"\njob: {result['seconds']} s, in place {result['in-place-writes']}, "
            f"held {result['held-requests']}"
        )
        assert client.execute("query-exports")[0]["format"] == "qed"
        client.execute("job-start", {"type": "convert-to-qed", "id": "c2"})
        again = _job(client, "c2")
        assert again["status"] == "failed" and "QED already" in str(again["error"]), again
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        client.close()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert "failed" not in out and "Pattern verification" not in out, out
    _apply(shadow, steady)
    _apply(shadow, anywhere)
    _judge(qemu, server, image, shadow)


def test_convert_qcow2_now_converts_at_once_and_serves_the_qed_image(
    serve: ServerFactory, qemu: Qemu, tmp_path: Path
) -> None:
    image, shadow = _image(qemu, tmp_path)
    server = serve(image, "--convert-qcow2=now", control=True)
    assert server.control is not None
    client = ControlClient(str(server.control))
    try:
        job = _job(client, "convert-to-qed-1")
        assert job["status"] == "concluded", job
    finally:
        client.close()
    writes = _writes(8, 60)
    qemu_io(server.uri(), *_qemu_io_script(writes))
    _apply(shadow, writes)
    _judge(qemu, server, image, shadow)


def test_held_writes_fail_cleanly_when_the_server_stops_before_any_conversion(
    serve: ServerFactory, qemu: Qemu, tmp_path: Path
) -> None:
    """--convert-qcow2=job and no job: a write into an unallocated cluster waits; the
    server still stops at SIGTERM (the write fails), and the file is the qcow2 image
    with the write into a reused cluster in it."""
    image, shadow = _image(qemu, tmp_path)
    server = serve(image, "--convert-qcow2=job", control=True)
    qemu_io(server.uri(), "write -P 0x77 64k 4k")  # reused: goes through at once
    held = subprocess.Popen(
        [require_tool("qemu-io"), "-f", "raw", server.uri(), "-c", "write -P 0x78 30m 4k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.5)
        assert held.poll() is None, "the write into an unallocated cluster did not wait"
        assert server.stop() == 0, server.log_text()
        out, _ = held.communicate(timeout=30)
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()
    assert "failed" in out or held.returncode != 0, out
    info = json.loads(qemu.img("info", "--output=json", image).stdout)
    assert info["format"] == "qcow2"
    assert qemu.img("check", image, check=False).returncode == 0
    shadow.fill(64 * KiB, 4 * KiB, 0x77)
    qemu.img("compare", "-f", "qcow2", "-F", "raw", image, shadow.path)


def test_serving_a_qcow2_read_write_needs_convert_qcow2_and_refuses_snapshots(
    qemu: Qemu, tmp_path: Path
) -> None:
    from e2ekit import qed_argv

    image, _ = _image(qemu, tmp_path)
    sock = tmp_path / "s.sock"
    proc = subprocess.run(
        qed_argv("serve", "-k", sock, image), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "--convert-qcow2" in proc.stderr and "read-only" in proc.stderr, proc.stderr
    qemu.img("snapshot", "-c", "s1", image)
    before = image.read_bytes()
    proc = subprocess.run(
        qed_argv("serve", "-k", sock, "--convert-qcow2=now", image),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "internal snapshots" in proc.stderr and "--discard-snapshots" in proc.stderr
    assert image.read_bytes() == before
    assert not sock.exists()
