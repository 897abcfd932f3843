"""Remote backing images end to end: a raw base on Debian's nginx, on qemu-nbd (unix
socket and TCP), on nbdkit and on ``qed serve``, used as the backing file of a local
QED overlay; read through the library, the CLI, ``qed serve`` (by qemu-io and
nbdcopy) and QEMU's own curl and nbd drivers (qemu-img info/compare).

Every tool is required: without one a test skips on a developer machine and fails
under CI=true (qedtest.require_tool). The nginx site (``site``) is a fixture of
tests/e2e/conftest.py, shared with test_e2e_stream.py; its helpers are remotekit's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2ekit import ServerFactory, qemu_io, require_tool, run
from qedtest import Qemu, qed
from remotekit import (
    BASE_SIZE,
    STRIPE,
    KiB,
    MiB,
    Site,
    make_overlay,
    nbdkit,
    nginx,
    pattern,
    qemu_nbd,
    stripe_byte,
)

import qedkit
from qedkit.errors import StoreError
from qedkit.store.remote import RemoteOptions, RemoteStore
from qedkit.store.url import open_url


def write_some(overlay: Path, expected: bytearray) -> None:
    """Writes into the overlay (and the expected bytes): a read must merge both layers."""
    with qedkit.open(str(overlay)) as img:
        for offset, length in ((0, 4096), (3 * MiB + 512, 70000), (BASE_SIZE - 4096, 4096)):
            data = bytes([0xA5]) * length
            img.write(offset, data)
            expected[offset : offset + length] = data


def assert_reads_equal(overlay: Path, expected: bytes) -> None:
    """The whole disk, then random ranges, through the synchronous API."""
    with qedkit.open(str(overlay), readonly=True) as img:
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        rng = random.Random(5)
        for _ in range(50):
            offset = rng.randrange(len(expected))
            length = rng.randrange(1, min(300 * KiB, len(expected) - offset) + 1)
            assert img.read(offset, length) == expected[offset : offset + length]


# ---- every kind of remote backing ---------------------------------------------------

KINDS = ["http", "nbd-tcp", "nbd-unix", "nbdkit", "qed-serve"]


@pytest.fixture(params=KINDS)
def backing_url(
    request: pytest.FixtureRequest,
    site: Site,
    tmp_path: Path,
    serve: ServerFactory,
) -> Iterator[str]:
    """The raw base as a URL, served by each kind of server in turn."""
    base = site.root / "base.raw"
    kind = request.param
    if kind == "http":
        yield site.nginx.url("base.raw")
    elif kind in ("nbd-tcp", "nbd-unix"):
        with qemu_nbd(base, "raw", tmp_path, tcp=kind == "nbd-tcp") as server:
            yield server.url
    elif kind == "nbdkit":
        with nbdkit(base, tmp_path) as url:
            yield url
    else:
        served = serve(base, "-r", "-f", "raw", "--shared", "4")
        yield served.uri()


def test_an_overlay_over_a_remote_base_reads_like_the_base(
    backing_url: str, site: Site, tmp_path: Path
) -> None:
    overlay = make_overlay(tmp_path, backing_url)
    expected = bytearray(site.base)
    write_some(overlay, expected)
    assert_reads_equal(overlay, bytes(expected))


def test_qemu_img_reads_the_overlay_through_its_own_drivers(
    backing_url: str, site: Site, tmp_path: Path, qemu: Qemu
) -> None:
    overlay = make_overlay(tmp_path, backing_url)
    expected = bytearray(site.base)
    write_some(overlay, expected)
    (tmp_path / "expected.raw").write_bytes(expected)
    info = json.loads(qemu.img("info", "--output=json", overlay).stdout)
    assert info["backing-filename"] == backing_url  # recorded as given, as qemu-img does
    assert info["backing-filename-format"] == "raw"
    assert info["full-backing-filename"] == backing_url
    chain = json.loads(qemu.img("info", "--backing-chain", "--output=json", overlay).stdout)
    assert len(chain) == 2  # QEMU opened the base through its curl or nbd driver
    assert (chain[1]["format"], chain[1]["virtual-size"]) == ("raw", BASE_SIZE)
    result = qemu.img("compare", "-f", "qed", "-F", "raw", overlay, tmp_path / "expected.raw")
    assert "Images are identical." in result.stdout


def test_qed_convert_of_a_url_copies_the_remote_image(
    backing_url: str, site: Site, tmp_path: Path, qemu: Qemu
) -> None:
    out = tmp_path / "copy.qed"
    result = qed("convert", "-O", "qed", backing_url, out)
    assert result.returncode == 0, result.stderr
    qemu.img("compare", "-f", "qed", "-F", "raw", out, site.root / "base.raw")
    qemu.img("check", out)


def test_a_qed_image_exported_by_qemu_nbd_backs_an_overlay(
    site: Site, tmp_path: Path, qemu: Qemu
) -> None:
    local = tmp_path / "base.qed"
    qemu.img("convert", "-f", "raw", "-O", "qed", site.root / "base.raw", local)
    with qemu_nbd(local, "qed", tmp_path) as server:  # exports the guest view, as raw
        overlay = make_overlay(tmp_path, server.url)
        expected = bytearray(site.base)
        write_some(overlay, expected)
        assert_reads_equal(overlay, bytes(expected))


# ---- qed serve of a remote-backed overlay ---------------------------------------------


def test_qed_serve_of_an_overlay_over_http_reads_the_base_with_qemu_io_and_nbdcopy(
    site: Site, tmp_path: Path, serve: ServerFactory
) -> None:
    overlay = make_overlay(tmp_path, site.nginx.url("stripes.raw"))
    served = serve(overlay, "-r")
    commands = [
        f"read -P {stripe_byte(i):#x} {i * STRIPE} {STRIPE}"
        for i in range(0, BASE_SIZE // STRIPE, 7)
    ]
    qemu_io(served.uri(), *commands, extra=("-f", "raw", "-r"))
    nbdcopy = require_tool("nbdcopy")
    out = tmp_path / "copy.raw"
    run([nbdcopy, served.uri(), out]).ok()
    assert out.read_bytes() == (site.root / "stripes.raw").read_bytes()


# ---- the CLI on URLs ------------------------------------------------------------------


def test_qed_info_and_map_of_a_url_agree_with_qemu_img(site: Site, qemu: Qemu) -> None:
    url = site.nginx.url("base.raw")
    ours = json.loads(qed("info", "--output=json", url, check=True).stdout)
    assert (ours["filename"], ours["format"], ours["virtual-size"]) == (url, "raw", BASE_SIZE)
    ours_map = json.loads(qed("map", "--output=json", url, check=True).stdout)
    theirs_map = json.loads(qemu.img("map", "--output=json", url).stdout)
    assert ours_map == theirs_map


def test_the_cli_names_the_url_of_a_missing_remote_image(site: Site, tmp_path: Path) -> None:
    url = site.nginx.url("missing.raw")
    result = qed("info", url)
    assert result.returncode == 1
    assert f"qed: {url}: not found (HTTP 404 Not Found)" in result.stderr
    result = qed("create", "-f", "qed", "-b", url, "-F", "raw", tmp_path / "top.qed")
    assert result.returncode == 1
    assert url in result.stderr and "HTTP 404" in result.stderr
    assert not (tmp_path / "top.qed").exists()


def test_a_remote_image_cannot_be_opened_for_writing(site: Site) -> None:
    result = qed("io", "-c", "write 0 512", site.nginx.url("base.raw"))
    assert result.returncode == 1
    assert "remote images are read-only" in result.stderr


def test_an_https_base_reads_with_the_servers_certificate_trusted(
    site: Site, tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = (pki / "server-cert.pem", pki / "server-key.pem")
    work = tmp_path / "tls"
    work.mkdir()
    with nginx(work, site.root, tls) as server:
        url = server.url("base.raw")
        assert url.startswith("https://")
        untrusted = open_url(url)
        with pytest.raises(StoreError, match=r"TLS failed: .* does not verify \(self-signed"):
            asyncio.run(untrusted.size())
        asyncio.run(untrusted.close())
        monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca-cert.pem"))  # OpenSSL's own
        overlay = make_overlay(tmp_path, url)
        assert_reads_equal(overlay, site.base)


# ---- a remote QED backing image -------------------------------------------------------


def test_a_remote_qed_base_with_a_relative_backing_name_resolves_against_its_url(
    site: Site, tmp_path: Path, qemu: Qemu
) -> None:
    # mid.qed on the web server, whose backing file is "base.raw" next to it
    mid = site.root / "mid.qed"
    result = qed("create", "-f", "qed", "-b", "base.raw", "-F", "raw", mid)
    assert result.returncode == 0, result.stderr
    expected = bytearray(site.base)
    with qedkit.open(str(mid)) as img:
        img.write(MiB, b"\x5a" * 200000)
    expected[MiB : MiB + 200000] = b"\x5a" * 200000
    url = site.nginx.url("mid.qed")
    overlay = make_overlay(tmp_path, url, fmt="qed")
    chain = qedkit.open(str(overlay), readonly=True)
    try:
        names = [info.filename for info in chain.chain_info()]
    finally:
        chain.close()
    assert names == [str(overlay), url, site.nginx.url("base.raw")]
    assert_reads_equal(overlay, bytes(expected))
    (tmp_path / "expected.raw").write_bytes(expected)
    result = qemu.img("compare", "-f", "qed", "-F", "raw", overlay, tmp_path / "expected.raw")
    assert "Images are identical." in result.stdout


# ---- the cache against a real server ----------------------------------------------------


def test_a_sequential_read_from_nginx_needs_far_fewer_requests_than_blocks(site: Site) -> None:
    big = site.root / "big.raw"
    big.write_bytes(pattern(64 * MiB, seed=3))
    options = RemoteOptions()  # 256 KiB blocks: 256 of them, a 64 MiB cache
    store = open_url(site.nginx.url("big.raw"), options=options)
    assert isinstance(store, RemoteStore)
    before = site.nginx.requests()

    async def read_all() -> bytes:
        out = bytearray()
        for pos in range(0, 64 * MiB, 64 * KiB):
            out += await store.read(pos, 64 * KiB)
            assert store.statistics().cached_bytes <= options.cache_bytes
        await store.close()
        return bytes(out)

    assert asyncio.run(read_all()) == big.read_bytes()
    requests = site.nginx.requests() - before
    assert requests == store.statistics().requests + 1  # and the size probe
    assert requests <= 256 // 8, requests  # readahead: 4 MiB requests once it has grown
    big.unlink()


# ---- NBD block status: holes of a sparse base ----------------------------------------


@pytest.fixture
def sparse_base(tmp_path: Path) -> tuple[Path, bytes]:
    """8 MiB with data in three places and holes elsewhere."""
    path = tmp_path / "sparse.raw"
    data = bytearray(BASE_SIZE)
    with open(path, "wb") as f:
        f.truncate(BASE_SIZE)
        for offset, length in ((0, 64 * KiB), (3 * MiB, 300 * KiB), (7 * MiB, MiB)):
            chunk = pattern(length, seed=offset + 1)
            f.seek(offset)
            f.write(chunk)
            data[offset : offset + length] = chunk
    return path, bytes(data)


@pytest.mark.parametrize("server_kind", ["qemu-nbd", "qed-serve", "nbdkit"])
def test_the_map_of_a_sparse_nbd_export_matches_qemu_img_and_convert_keeps_its_holes(
    server_kind: str,
    sparse_base: tuple[Path, bytes],
    tmp_path: Path,
    qemu: Qemu,
    serve: ServerFactory,
) -> None:
    path, data = sparse_base
    with contextlib.ExitStack() as stack:
        if server_kind == "qemu-nbd":
            url = stack.enter_context(qemu_nbd(path, "raw", tmp_path)).url
        elif server_kind == "nbdkit":
            url = stack.enter_context(nbdkit(path, tmp_path))
        else:
            url = serve(path, "-r", "-f", "raw").uri()
        ours = json.loads(qed("map", "--output=json", url, check=True).stdout)
        theirs = json.loads(qemu.img("map", "--output=json", "-f", "raw", url).stdout)
        assert [(e["start"], e["length"], e["data"], e["zero"]) for e in ours] == [
            (e["start"], e["length"], e["data"], e["zero"]) for e in theirs
        ]
        assert any(e["zero"] and not e["data"] for e in ours)  # holes seen as holes
        out = tmp_path / "copy.raw"
        result = qed("convert", "-O", "raw", url, out)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == data
        assert out.stat().st_blocks * 512 < 3 * MiB  # the holes stayed holes
        # reads that cross data and holes (qemu-nbd answers them in several chunks)
        overlay = make_overlay(tmp_path, url)
        assert_reads_equal(overlay, data)
