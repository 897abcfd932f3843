"""Copy-on-read and streaming end to end, over local and remote backing images.

Backings: a local raw file, a local QED image (qemu-img made), the raw base on
Debian's nginx (the ``site`` fixture, shared with test_e2e_remote.py) and on
qemu-nbd. QEMU judges: ``qemu-img map`` of the overlay shows exactly the clusters
that were read as its own (depth 0), ``qemu-img compare`` against the base (or a
shadow with the clients' writes) says identical, ``qemu-img check`` finds nothing.

* ``qed serve --copy-on-read`` read by qemu-io (chosen clusters) and by nbdcopy (the
  whole disk, skipping what block status reports as holes);
* ``qed io -C`` and ``qed convert --copy-on-read`` (the source side);
* ``qed stream`` offline, and the stream job online through ``qed ctl stream
  --until-done`` while qemu-io writes through ``qed serve``: the header bytes hold no
  backing file afterwards;
* faults of the HTTP server (remotekit.FaultyHttpServer) in the middle of a stream:
  stopped, a 5xx burst, a truncated response, a changed size: a clear error naming
  the URL, a consistent image that still has its backing file, and a second run
  that finishes once the server is back.

Every tool is required (qedtest.require_tool: skipped on a developer machine, failed
under CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2ekit import ServerFactory, Shadow, qed_argv, qemu_io, require_tool, run
from qedtest import Qemu, qed
from remotekit import (
    BASE_SIZE,
    STRIPE,
    FaultyHttpServer,
    KiB,
    MiB,
    Site,
    make_overlay,
    pattern,
    qemu_nbd,
    stripe_byte,
)

import qedkit
from qedkit.engine.chain import open_image
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.errors import StoreError
from qedkit.jobs.base import JobCancelled
from qedkit.jobs.stream import Streamer
from qedkit.store import url as url_module
from qedkit.store.remote import RemoteOptions, RetryPolicy

CLUSTERS = BASE_SIZE // STRIPE  # the stripes image: one stripe per 64 KiB cluster


# ---- helpers --------------------------------------------------------------------------


def header_backing_fields(image: Path) -> tuple[int, int, int]:
    """(features, backing_filename_offset, backing_filename_size) from the header bytes."""
    raw = image.read_bytes()[:64]
    (features,) = struct.unpack_from("<Q", raw, 16)
    offset, size = struct.unpack_from("<II", raw, 56)
    return features, offset, size


def own_clusters(qemu: Qemu, overlay: Path) -> dict[int, str]:
    """Cluster index -> "data" or "zero" for every cluster ``qemu-img map`` reports at
    depth 0 (the overlay's own)."""
    entries = json.loads(qemu.img("map", "--output=json", "-f", "qed", overlay).stdout)
    out: dict[int, str] = {}
    for e in entries:
        if e["depth"] != 0 or not e["present"]:
            continue
        for c in range(e["start"] // STRIPE, -(-(e["start"] + e["length"]) // STRIPE)):
            out[c] = "zero" if e["zero"] else "data"
    return out


def assert_checks_alone(qemu: Qemu, overlay: Path) -> None:
    """qemu-img check of the overlay without opening its backing file (QEMU's curl
    driver needs HEAD, which the fault-injecting server does not answer)."""
    spec = {"driver": "qed", "file": {"driver": "file", "filename": str(overlay)}}
    result = qemu.img("check", "json:" + json.dumps({**spec, "backing": None}))
    assert "No errors were found on the image." in result.stdout


def assert_standalone(qemu: Qemu, image: Path, expected: Path) -> None:
    """No backing file (header bytes and qemu-img info), identical to ``expected``
    (raw), qemu-img check clean."""
    features, _, size = header_backing_fields(image)
    assert features & 0x05 == 0 and size == 0, (hex(features), size)
    info = json.loads(qemu.img("info", "--output=json", image).stdout)
    assert "backing-filename" not in info
    result = qemu.img("compare", "-f", "qed", "-F", "raw", image, expected)
    assert "Images are identical." in result.stdout
    result = qemu.img("check", "-f", "qed", image)
    assert "No errors were found on the image." in result.stdout


@pytest.fixture(params=["raw", "qed", "http", "nbd"])
def stripes(
    request: pytest.FixtureRequest, site: Site, tmp_path: Path, qemu: Qemu
) -> Iterator[tuple[str, str]]:
    """The stripes base as a backing name and format: a local raw file, a local QED
    image, on nginx, on qemu-nbd."""
    source = site.root / "stripes.raw"
    kind = request.param
    if kind == "raw":
        shutil.copy(source, tmp_path / "stripes.raw")
        yield "stripes.raw", "raw"
    elif kind == "qed":
        qemu.img("convert", "-f", "raw", "-O", "qed", source, tmp_path / "stripes.qed")
        yield "stripes.qed", "qed"
    elif kind == "http":
        yield site.nginx.url("stripes.raw"), "raw"
    else:
        with qemu_nbd(source, "raw", tmp_path) as server:
            yield server.url, "raw"


# ---- copy-on-read ---------------------------------------------------------------------

# (offset, length) read by the client; the clusters they touch
READS = [(1 * STRIPE + 100, 5000), (4 * STRIPE - 10, 20), (10 * STRIPE, 3 * STRIPE)]
TOUCHED = {1, 3, 4, 10, 11, 12}


def test_qed_serve_copy_on_read_copies_what_qemu_io_reads(
    stripes: tuple[str, str], site: Site, tmp_path: Path, serve: ServerFactory, qemu: Qemu
) -> None:
    backing, fmt = stripes
    overlay = make_overlay(tmp_path, backing, fmt)
    served = serve(overlay, "--copy-on-read")
    commands = []
    for offset, length in READS:
        first, last = offset // STRIPE, (offset + length - 1) // STRIPE
        if first == last:
            commands.append(f"read -P {stripe_byte(first):#x} {offset} {length}")
        else:
            commands.append(f"read {offset} {length}")
    qemu_io(served.uri(), *commands)
    code = served.stop()
    assert code == 0, served.log_text()
    assert own_clusters(qemu, overlay) == dict.fromkeys(TOUCHED, "data")
    result = qemu.img("compare", "-f", "qed", "-F", "raw", overlay, site.root / "stripes.raw")
    assert "Images are identical." in result.stdout
    assert "No errors" in qemu.img("check", overlay).stdout


def test_nbdcopy_through_copy_on_read_copies_the_whole_base(
    site: Site, tmp_path: Path, serve: ServerFactory, qemu: Qemu
) -> None:
    """nbdcopy reads everything block status calls data: every cluster of an HTTP
    base (its 1 MiB of written zeros become zero clusters)."""
    overlay = make_overlay(tmp_path, site.nginx.url("base.raw"))
    served = serve(overlay, "--copy-on-read")
    nbdcopy = require_tool("nbdcopy")
    out = tmp_path / "copy.raw"
    run([nbdcopy, served.uri(), out]).ok()
    assert out.read_bytes() == site.base
    assert served.stop() == 0
    own = own_clusters(qemu, overlay)
    zeros = set(range(CLUSTERS // 2, CLUSTERS // 2 + MiB // STRIPE))  # remotekit.pattern
    assert own == {c: "zero" if c in zeros else "data" for c in range(CLUSTERS)}
    result = qemu.img("compare", "-f", "qed", "-F", "raw", overlay, site.root / "base.raw")
    assert "Images are identical." in result.stdout


def test_nbdcopy_leaves_the_holes_of_a_sparse_base_alone(
    tmp_path: Path, serve: ServerFactory, qemu: Qemu
) -> None:
    base = tmp_path / "sparse.raw"
    with open(base, "wb") as f:
        f.truncate(BASE_SIZE)
        f.seek(2 * MiB)
        f.write(pattern(4 * STRIPE, seed=4))  # 256 KiB: one request of nbdcopy's
    overlay = make_overlay(tmp_path, "sparse.raw")
    served = serve(overlay, "--copy-on-read")
    run([require_tool("nbdcopy"), served.uri(), tmp_path / "copy.raw"]).ok()
    assert served.stop() == 0
    first = 2 * MiB // STRIPE
    assert own_clusters(qemu, overlay) == dict.fromkeys(range(first, first + 4), "data")


def test_qed_io_C_and_convert_copy_on_read(site: Site, tmp_path: Path, qemu: Qemu) -> None:
    overlay = make_overlay(tmp_path, site.nginx.url("stripes.raw"))
    result = qed("io", "-C", "-c", f"read -P {stripe_byte(2):#x} {2 * STRIPE} 4096", overlay)
    assert result.returncode == 0, result.stderr
    assert own_clusters(qemu, overlay) == {2: "data"}
    result = qed("io", "-r", "-C", "-c", "read 0 512", overlay)
    assert result.returncode == 1 and "cannot be combined with -r" in result.stderr
    out = tmp_path / "flat.qed"
    result = qed("convert", "--copy-on-read", "-O", "qed", overlay, out)
    assert result.returncode == 0, result.stderr
    assert own_clusters(qemu, overlay) == dict.fromkeys(range(CLUSTERS), "data")
    for image in (overlay, out):
        result = qemu.img("compare", "-F", "raw", image, site.root / "stripes.raw")
        assert "Images are identical." in result.stdout
    result = qed("convert", "--copy-on-read", "-U", "-O", "qed", overlay, tmp_path / "x.qed")
    assert result.returncode == 1 and "cannot be combined with -U" in result.stderr


def test_serve_refuses_copy_on_read_with_read_only(tmp_path: Path, qemu: Qemu) -> None:
    overlay = tmp_path / "o.qed"
    qedkit.create(str(overlay), MiB)
    result = qed("serve", "-r", "--copy-on-read", "-k", tmp_path / "s.sock", overlay)
    assert result.returncode == 1
    assert "--copy-on-read writes the images" in result.stderr


# ---- stream offline -------------------------------------------------------------------


def _writes(overlay: Path, shadow: Shadow) -> None:
    """Guest writes into the overlay before it is streamed (partial clusters: their
    copy-on-write reads the backing file too)."""
    for offset, length, byte in ((100, 3000, 0x5A), (5 * STRIPE + 7, 2 * STRIPE, 0x6B)):
        result = qed("io", "-c", f"write -P {byte:#x} {offset} {length}", overlay)
        assert result.returncode == 0, result.stderr
        shadow.fill(offset, length, byte)


def test_qed_stream_offline_leaves_no_backing_file(
    stripes: tuple[str, str], site: Site, tmp_path: Path, qemu: Qemu
) -> None:
    backing, fmt = stripes
    overlay = make_overlay(tmp_path, backing, fmt)
    shadow = Shadow(tmp_path / "shadow.raw", BASE_SIZE)
    shadow.write(0, (site.root / "stripes.raw").read_bytes())
    _writes(overlay, shadow)
    result = qed("stream", "--output=json", overlay)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["done"] is True and stats["backing-file"] == backing
    assert stats["data-clusters"] == CLUSTERS - 4  # clusters 0, 5, 6, 7 were the guest's
    assert_standalone(qemu, overlay, shadow.path)
    again = json.loads(qed("stream", "--output=json", overlay, check=True).stdout)
    assert again["backing-file"] is None and again["bytes-read"] == 0


# ---- stream online --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["http", "nbd"])
def test_the_stream_job_runs_while_qemu_io_writes_through_qed_serve(
    kind: str, site: Site, tmp_path: Path, serve: ServerFactory, qemu: Qemu
) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "http":
            url = site.nginx.url("base.raw")
        else:
            url = stack.enter_context(qemu_nbd(site.root / "base.raw", "raw", tmp_path)).url
        overlay = make_overlay(tmp_path, url)
        shadow = Shadow(tmp_path / "shadow.raw", BASE_SIZE)
        shadow.write(0, site.base)
        served = serve(overlay, "--shared", "2", control=True)
        assert served.control is not None
        # 8 MiB at 4 MiB/s: two seconds of streaming in steps of 256 KiB
        job = subprocess.Popen(
            qed_argv("ctl", served.control, "stream", "rate=4M", "chunk=256k", "--until-done"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        writes = []
        for i in range(12):
            offset = (i * 677 * KiB + 4321) % (BASE_SIZE - 70000)
            byte = 0x10 + i
            writes.append(f"write -P {byte:#x} {offset} 70000")
            shadow.fill(offset, 70000, byte)
        qemu_io(served.uri(), *writes)
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, out + err
        assert "ETA" in out and "status: concluded" in out, out
        qemu_io(served.uri(), "write -P 0x77 0 4096")  # no backing now: NEED_CHECK rules
        shadow.fill(0, 4096, 0x77)
        served.finish(qemu, shadow)  # exit 0, check clean, compare equal, features 0
    assert_standalone(qemu, overlay, shadow.path)


def test_qed_ctl_stream_without_until_done_starts_the_job(
    site: Site, tmp_path: Path, serve: ServerFactory, qemu: Qemu
) -> None:
    overlay = make_overlay(tmp_path, site.nginx.url("base.raw"))
    served = serve(overlay, control=True)
    assert served.control is not None
    result = qed("ctl", "--output=json", served.control, "stream")
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["id"]
    deadline = time.monotonic() + 60
    while True:
        jobs = json.loads(qed("ctl", "--output=json", served.control, "query-jobs").stdout)
        (job,) = [j for j in jobs if j["id"] == job_id]
        if job["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert job["status"] == "concluded", job
    assert job["result"]["done"] is True
    shadow = Shadow(tmp_path / "shadow.raw", BASE_SIZE)
    shadow.write(0, site.base)
    served.finish(qemu, shadow)


# ---- faults of the HTTP server --------------------------------------------------------


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote stores opened in this process retry quickly (the default waits ~8 s)."""
    real = url_module.open_url
    policy = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.02, timeout=5)

    def open_url(url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("options", RemoteOptions(retry=policy))
        return real(url, **kwargs)

    monkeypatch.setattr(url_module, "open_url", open_url)


BASE = pattern(4 * MiB, seed=21)


def _open(overlay: Path) -> QedImage:
    img = asyncio.run(open_image(str(overlay)))
    assert isinstance(img, QedImage)
    return img


async def _stream(img: QedImage, on_step: Any = None) -> Any:
    steps = 0

    async def checkpoint(done: int, total: int) -> None:
        nonlocal steps
        steps += 1
        if on_step is not None:
            on_step(steps)

    return await Streamer(img, chunk=256 * KiB).run(checkpoint=checkpoint)


async def _consistent(img: QedImage) -> None:
    report = await check_image(img)
    assert report.corruptions == 0
    assert img.header.has_backing_file and img.backing is not None


def _finish_and_judge(overlay: Path, qemu: Qemu, tmp_path: Path) -> None:
    """A second run (a new process' worth: a fresh open) completes the stream."""
    img = _open(overlay)
    try:
        stats = asyncio.run(_stream(img))
        assert stats.done
    finally:
        asyncio.run(img.close())
    (tmp_path / "expected.raw").write_bytes(BASE)
    assert_standalone(qemu, overlay, tmp_path / "expected.raw")


@pytest.mark.usefixtures("quick_retries")
@pytest.mark.parametrize("fault", ["stopped", "truncated", "size-changed"])
def test_a_server_fault_mid_stream_fails_clearly_and_a_second_run_finishes(
    fault: str, tmp_path: Path, qemu: Qemu
) -> None:
    with FaultyHttpServer(BASE) as server:
        overlay = make_overlay(tmp_path, server.url)

        def inject(step: int) -> None:
            if step != 4:
                return
            if fault == "stopped":
                server.stop()
            elif fault == "truncated":
                server.faults.truncate_at = 1000  # every answer cut short
            else:
                server.faults.size_claim = len(BASE) + MiB

        img = _open(overlay)
        try:

            async def go() -> None:
                with pytest.raises(StoreError) as info:
                    await _stream(img, inject)
                message = str(info.value)
                assert "127.0.0.1" in message and "disk.raw" in message, message
                if fault == "size-changed":
                    assert "size changed" in message, message
                else:
                    assert "attempts" in message, message
                await _consistent(img)

            asyncio.run(go())
        finally:
            asyncio.run(img.close())
        # the server comes back as it was (qemu-img opens the backing file too)
        server.faults.truncate_at = None
        server.faults.size_claim = None
        if fault == "stopped":
            server.start()
        assert_checks_alone(qemu, overlay)
        _finish_and_judge(overlay, qemu, tmp_path)


@pytest.mark.usefixtures("quick_retries")
def test_a_5xx_burst_mid_stream_is_retried(tmp_path: Path, qemu: Qemu) -> None:
    with FaultyHttpServer(BASE) as server:
        overlay = make_overlay(tmp_path, server.url)
        img = _open(overlay)
        try:

            def burst(step: int) -> None:
                if step == 3:
                    server.faults.statuses = [503, 502]  # fewer than the attempts

            stats = asyncio.run(_stream(img, burst))
            assert stats.done
        finally:
            asyncio.run(img.close())
        assert server.faults.statuses == []  # both errors were answered, and retried
        (tmp_path / "expected.raw").write_bytes(BASE)
        assert_standalone(qemu, overlay, tmp_path / "expected.raw")


def test_the_cli_names_the_url_when_the_remote_size_changes_mid_stream(
    tmp_path: Path, qemu: Qemu
) -> None:
    big = pattern(32 * MiB, seed=22)
    with FaultyHttpServer(big) as server:
        overlay = make_overlay(tmp_path, server.url)
        # 32 MiB at 8 MiB/s: the size changes half a second into the stream, when
        # readahead (16 MiB at most) cannot have fetched everything
        proc = subprocess.Popen(
            qed_argv("stream", "--rate", "8M", "--chunk", "256k", overlay),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        server.faults.size_claim = len(big) - MiB
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err
        assert err.startswith("qed: http://127.0.0.1:") and "disk.raw" in err, err
        assert "size changed" in err and "Traceback" not in err, err
        assert header_backing_fields(overlay)[2] == len(server.url)  # the link is kept
        assert_checks_alone(qemu, overlay)
        server.faults.size_claim = None
        result = qed("stream", "--output=json", overlay)
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        assert 0 < stats["bytes-read"] < len(big)  # the rest only
    (tmp_path / "expected.raw").write_bytes(big)
    assert_standalone(qemu, overlay, tmp_path / "expected.raw")


def test_a_stream_stopped_by_cancel_resumes_where_it_stopped(tmp_path: Path, qemu: Qemu) -> None:
    with FaultyHttpServer(BASE) as server:
        overlay = make_overlay(tmp_path, server.url)
        img = _open(overlay)
        try:

            def cancel(step: int) -> None:
                if step == 6:
                    raise JobCancelled

            with pytest.raises(JobCancelled):
                asyncio.run(_stream(img, cancel))
        finally:
            asyncio.run(img.close())
        before = server.range_requests()
        img = _open(overlay)
        try:
            stats = asyncio.run(_stream(img))
        finally:
            asyncio.run(img.close())
        assert stats.bytes_read == len(BASE) - 5 * 256 * KiB  # only what was missing
        assert server.range_requests() > before
    (tmp_path / "expected.raw").write_bytes(BASE)
    assert_standalone(qemu, overlay, tmp_path / "expected.raw")
