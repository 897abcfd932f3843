"""TLS (--tls-cert/--tls-key) with a self-signed certificate made by openssl: libnbd
(nbdinfo, nbdsh) and QEMU (qemu-io with a tls-creds-x509 object) as clients, and a
Python ssl client that speaks NBD itself."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2ekit import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    OPT_GO,
    OPT_STARTTLS,
    REP_ERR_TLS_REQD,
    MiB,
    RawClient,
    Served,
    ServerFactory,
    Shadow,
    assert_same_bytes,
    nbdsh,
    pattern,
    qed_argv,
    qemu_io,
    run,
)
from qedtest import Qemu, require_tool

from qedkit.cli.ctl import ControlClient

Disk = Callable[..., tuple[Path, Shadow]]


def tls_serve(serve: ServerFactory, image: Path, pki: Path, *options: str, **kw: Any) -> Served:
    return serve(image, *options, tls=(pki / "server-cert.pem", pki / "server-key.pem"), **kw)


def libnbd_uri(server: Served, pki: Path) -> str:
    """libnbd's nbds URI, with the directory holding ca-cert.pem."""
    return f"{server.uri()}{'&' if server.sock else '?'}tls-certificates={pki}"


def qemu_io_tls(server: Served, pki: Path, *commands: str, check: bool = True) -> Any:
    """qemu-io through QEMU's own TLS client (a tls-creds-x509 object, verifying the
    server against ca-cert.pem)."""
    if server.sock is not None:
        where = f"server.type=unix,server.path={server.sock},tls-hostname=localhost"
    else:
        where = f"server.type=inet,server.host=127.0.0.1,server.port={server.port}"
    return qemu_io(
        f"driver=nbd,{where},tls-creds=tls0",
        *commands,
        check=check,
        extra=(
            "--object",
            f"tls-creds-x509,id=tls0,dir={pki},endpoint=client",
            "--image-opts",
        ),
    )


def test_tls_is_required_and_libnbd_and_qemu_clients_use_it_over_a_unix_socket(
    serve: ServerFactory, disk: Disk, qemu: Qemu, pki: Path
) -> None:
    image, shadow = disk(16 * MiB)
    server = tls_serve(serve, image, pki)
    nbdinfo = require_tool("nbdinfo")
    info = run([nbdinfo, libnbd_uri(server, pki)]).ok()
    assert "with TLS" in info.stdout
    # without TLS nothing is served
    plain = run([nbdinfo, f"nbd+unix:///?socket={server.sock}"])
    assert plain.returncode != 0
    assert qemu_io(f"nbd+unix:///?socket={server.sock}", "read 0 4k", check=False).returncode
    # QEMU's client over TLS
    qemu_io_tls(server, pki, "write -P 0x71 0 2M", "write -P 0x72 5M 100k", "flush")
    qemu_io_tls(server, pki, "read -P 0x71 0 2M", "read -P 0x72 5M 100k", "read -P 0 6M 1M")
    shadow.fill(0, 2 * MiB, 0x71)
    shadow.fill(5 * MiB, 100 * 1024, 0x72)
    server.finish(qemu, shadow)


NBDSH_TLS = """
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(pki)  # the directory holding ca-cert.pem
h.connect_uri(uri)
data = bytes(range(256)) * 4096
h.pwrite(data, 3 << 20)
h.zero(65536, 4 << 20)
h.flush()
ok = h.pread(len(data), 3 << 20) == data and h.pread(65536, 4 << 20) == bytes(65536)
print(json.dumps({"tls": h.get_tls_negotiated(), "ok": ok}))
h.shutdown()
"""


def test_tls_over_tcp_with_nbdsh_and_qemu_io_verifying_the_certificate(
    serve: ServerFactory, disk: Disk, qemu: Qemu, pki: Path
) -> None:
    image, shadow = disk(16 * MiB)
    server = tls_serve(serve, image, pki, tcp=True)
    out: Any = nbdsh(NBDSH_TLS, uri=server.uri(), pki=str(pki))
    assert out == {"tls": True, "ok": True}
    shadow.write(3 * MiB, bytes(range(256)) * 4096)
    qemu_io_tls(server, pki, "write -P 0x73 8M 1M", "read -P 0x73 8M 1M")
    shadow.fill(8 * MiB, MiB, 0x73)
    server.finish(qemu, shadow)


def client_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    context.check_hostname = True
    return context


def test_python_ssl_client_negotiates_starttls_and_reads_and_writes(
    serve: ServerFactory, disk: Disk, qemu: Qemu, pki: Path
) -> None:
    image, shadow = disk(8 * MiB)
    server = tls_serve(serve, image, pki)
    client = RawClient(server.address)
    client.greeting()
    client.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
    # before STARTTLS, NBD_OPT_GO is refused with NBD_REP_ERR_TLS_REQD
    client.option(OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 0))
    opt, kind, _ = client.option_reply()
    assert (opt, kind) == (OPT_GO, REP_ERR_TLS_REQD)
    client.starttls(client_context(pki), "localhost")
    assert isinstance(client.sock, ssl.SSLSocket)
    client.go("")
    assert client.size == 8 * MiB
    data = pattern(42, 3 * MiB + 512)
    client.write(MiB - 512, data)
    shadow.write(MiB - 512, data)
    assert_same_bytes(client.read(MiB - 512, len(data)), data)
    client.disconnect()
    server.finish(qemu, shadow)


def test_broken_tls_clients_are_dropped_and_others_are_served(
    serve: ServerFactory, disk: Disk, qemu: Qemu, pki: Path
) -> None:
    image, shadow = disk(8 * MiB)
    server = tls_serve(serve, image, pki, "--shared", "4", names=["secure"], control=True)
    server_sock = server.address

    # garbage where the TLS ClientHello should be
    junk = RawClient(server_sock)
    junk.greeting()
    junk.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
    junk.option(OPT_STARTTLS)
    assert junk.option_reply()[:2] == (OPT_STARTTLS, 1)
    junk.send(random.Random(3).randbytes(4096))
    assert junk.closed_by_server()
    junk.close()

    # a client that does not trust the certificate gives up during the TLS handshake
    distrust = RawClient(server_sock)
    distrust.greeting()
    distrust.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
    try:
        distrust.starttls(ssl.create_default_context(), "localhost")
        raise AssertionError("a certificate nobody signed was accepted")
    except ssl.SSLCertVerificationError:
        pass
    finally:
        distrust.close()

    # clients that vanish (closed or reset) right after asking for STARTTLS
    for attempt in range(10):
        gone = RawClient(server_sock)
        gone.greeting()
        gone.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
        if attempt % 2:
            linger = struct.pack("ii", 1, 0)
            gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        gone.option(OPT_STARTTLS)
        gone.close()
        time.sleep(0.05)

    # none of them keeps a connection slot
    assert server.control is not None
    ctl = ControlClient(str(server.control))
    try:
        deadline = time.monotonic() + 5
        while ctl.execute("query-status")["connections"]:
            assert time.monotonic() < deadline, "a broken TLS client still holds a slot"
            time.sleep(0.05)
    finally:
        ctl.close()

    # the export is still served, over TLS
    qemu_io_tls(server, pki, "write -P 0x74 0 1M", "read -P 0x74 0 1M")
    shadow.fill(0, MiB, 0x74)
    client = RawClient(server_sock)
    client.greeting()
    client.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
    client.starttls(client_context(pki))
    client.go("secure")
    assert client.read(0, 4096) == b"\x74" * 4096
    client.disconnect()
    server.finish(qemu, shadow)


def test_tls_options_are_checked_before_serving(disk: Disk, tmp_path: Path, pki: Path) -> None:
    image, _ = disk(4 * MiB)
    sock = tmp_path / "s.sock"
    alone = run(qed_argv("serve", "-k", sock, "--tls-cert", pki / "server-cert.pem", image), 30)
    assert alone.returncode != 0 and "go together" in alone.stderr
    wrong = run(
        qed_argv(
            "serve",
            "-k",
            sock,
            "--tls-cert",
            pki / "server-key.pem",
            "--tls-key",
            pki / "server-key.pem",
            image,
        ),
        30,
    )
    assert wrong.returncode != 0 and "certificate" in wrong.stderr
