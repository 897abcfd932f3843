"""Helpers of the remote-image tests (imported as ``remotekit``; tests/ is on sys.path):

* :class:`FaultyHttpServer`, a small HTTP/1.1 server in a thread (Python's
  http.server on 127.0.0.1 and a free port) serving one image with Range support, and
  faults to inject: status bursts, truncated bodies, a server that ignores Range, no
  Content-Length, a stall, and a stop/start on the same port that cuts every open
  connection;
* :class:`Nginx`, Debian's nginx in the foreground with a temporary configuration (a
  free port on 127.0.0.1, a temporary root; every file it writes stays in its
  directory), always stopped;
* :func:`qemu_nbd`, qemu-nbd exporting an image on a unix socket or a TCP port, and
  :func:`nbdkit`, nbdkit's file plugin on a unix socket;
* the nginx *site* of the end-to-end tests (:class:`Site`: an 8 MiB raw base and a
  "stripes" image; the ``site`` fixture of tests/e2e/conftest.py starts it) and
  :func:`make_overlay` (``qed create -b URL``).
"""

from __future__ import annotations

import contextlib
import http.server
import re
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qedtest import qed, require_tool

from qedkit.store.remote import RemoteSource

MiB = 1 << 20
KiB = 1 << 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pattern(size: int, seed: int = 1) -> bytes:
    """Distinct, incompressible-looking bytes: every 4 KiB differs (a misplaced block
    shows), with a run of zeros in the middle (a hole in a sparse copy)."""
    import random

    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    if size >= 4 * MiB:
        data[size // 2 : size // 2 + MiB] = bytes(MiB)
    return bytes(data)


# ---- the fault-injecting HTTP server ---------------------------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """What the server does wrong; tests change it between requests."""

    statuses: list[int] = field(default_factory=list)  # answer these to the next requests
    always_status: int | None = None  # answer every request with this status
    truncate_at: int | None = None  # send only this many body bytes, then close
    ignore_range: bool = False  # 200 with the whole image
    no_content_length: bool = False  # a chunked body instead
    stall_after: int | None = None  # send this many body bytes, then wait for release
    size_claim: int | None = None  # the total in Content-Range (a size change)
    weak_etag: bool = False


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without NODELAY, Nagle and the
        # client's delayed ACK hold the body back 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.lock:
            self.server.connections.discard(self.connection)

    def do_GET(self) -> None:
        owner = self.server.owner
        faults = owner.faults
        with self.server.lock:
            owner.requests.append((self.path, dict(self.headers.items())))
            status = faults.statuses.pop(0) if faults.statuses else faults.always_status
        data = owner.data
        size = len(data)
        etag = f'"v{owner.version}"'
        if faults.weak_etag:
            etag = "W/" + etag
        if status is not None:
            body = f"fault {status}\n".encode()
            self.send_response(status)
            if status == 416:
                self.send_header("Content-Range", f"bytes */{faults.size_claim or size}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match != etag:
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        match = _RANGE.match(self.headers.get("Range", ""))
        if match is None or faults.ignore_range:
            start, end, code = 0, size - 1, 200
        else:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            code = 206
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start : end + 1]
        self.send_response(code)
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            total = faults.size_claim if faults.size_claim is not None else size
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        if faults.no_content_length:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for pos in range(0, len(body), 64 * KiB):
                chunk = body[pos : pos + 64 * KiB]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if faults.truncate_at is not None and faults.truncate_at < len(body):
            self.wfile.write(body[: faults.truncate_at])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if faults.stall_after is not None and faults.stall_after < len(body):
            self.wfile.write(body[: faults.stall_after])
            self.wfile.flush()
            owner.stalled.set()
            owner.release.wait(30)
            with contextlib.suppress(OSError):
                self.wfile.write(body[faults.stall_after :])
            return
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FaultyHttpServer
    lock: threading.Lock
    connections: set[socket.socket]


class FaultyHttpServer:
    """``with FaultyHttpServer(data) as server: server.url`` (see the module doc)."""

    def __init__(self, data: bytes, path: str = "/disk.raw") -> None:
        self.data = data
        self.version = 1  # part of the ETag: bump it when the content changes
        self.path = path
        self.faults = Faults()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.port = free_port()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def replace(self, data: bytes) -> None:
        """New content under the same URL (a new ETag)."""
        self.data = data
        self.version += 1

    def range_requests(self) -> int:
        return sum(1 for _, headers in self.requests if "Range" in headers)

    def start(self) -> FaultyHttpServer:
        deadline = time.monotonic() + 10
        while True:
            try:
                server = _Server(("127.0.0.1", self.port), _Handler)
                break
            except OSError:  # the old socket lingers a moment after stop()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        server.owner = self
        server.lock = threading.Lock()
        server.connections = set()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (a server that went away)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.lock:
            for conn in list(server.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.release.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultyHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- nginx ---------------------------------------------------------------------------

_NGINX_CONF = """\
# A throwaway nginx: one process in the foreground, loopback only, files under {prefix}.
master_process off;
worker_processes 1;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port}{ssl};
        root {root};
{tls}    }}
}}
"""


class Nginx:
    """Debian's nginx serving ``root`` on 127.0.0.1; ``url(name)`` of a file in it."""

    def __init__(self, workdir: Path, root: Path, tls: tuple[Path, Path] | None = None) -> None:
        # Debian installs it in /usr/sbin, which a non-root PATH may lack.
        sbin = Path("/usr/sbin/nginx")
        self.binary = str(sbin) if sbin.exists() else require_tool("nginx")
        self.prefix = workdir
        self.root = root
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "nginx.conf"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls  # (certificate, key): serve https

    def url(self, name: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{name}"

    def start(self) -> Nginx:
        for _ in range(5):  # a free port can be taken by someone else before nginx binds
            self.port = free_port()
            tls = ""
            if self.tls is not None:
                tls = f"        ssl_certificate {self.tls[0]};\n"
                tls += f"        ssl_certificate_key {self.tls[1]};\n"
            self.conf.write_text(
                _NGINX_CONF.format(
                    prefix=self.prefix,
                    port=self.port,
                    root=self.root,
                    ssl=" ssl" if self.tls else "",
                    tls=tls,
                )
            )
            # -e: the error log of start-up, before the file's error_log applies
            argv = [
                self.binary,
                "-e", str(self.prefix / "error.log"),
                "-p", str(self.prefix),
                "-c", str(self.conf),
                "-g", "daemon off;",
            ]  # fmt: skip
            log = open(self.prefix / "nginx.out", "wb")  # noqa: SIM115 - kept by the process
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            if self._wait_listening():
                return self
            self.stop()
        raise AssertionError(f"nginx did not start: {self.log()}")

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return True
            time.sleep(0.02)
        return False

    def log(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def requests(self) -> int:
        """Requests in the access log so far."""
        path = self.prefix / "access.log"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT)  # graceful
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nginx(workdir: Path, root: Path, tls: tuple[Path, Path] | None = None) -> Iterator[Nginx]:
    server = Nginx(workdir, root, tls).start()
    try:
        yield server
    finally:
        server.stop()


# ---- qemu-nbd ------------------------------------------------------------------------


@dataclass
class QemuNbd:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def qemu_nbd(image: Path, fmt: str, workdir: Path, *, tcp: bool = False) -> Iterator[QemuNbd]:
    """qemu-nbd exporting ``image`` read-only (``--persistent``: it outlives a client)."""
    binary = require_tool("qemu-nbd")
    log = workdir / f"qemu-nbd-{image.name}.log"
    argv = [binary, "-f", fmt, "-r", "--persistent", "--shared", "4"]
    if tcp:
        port = free_port()
        argv += ["-b", "127.0.0.1", "-p", str(port)]
        url = f"nbd://127.0.0.1:{port}/"
    else:
        sock = workdir / f"qemu-nbd-{image.name}.sock"
        argv += ["-k", str(sock)]
        url = f"nbd+unix:///?socket={sock}"
    with open(log, "wb") as f:
        proc = subprocess.Popen([*argv, str(image)], stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    server = QemuNbd(proc, url, log)
    try:
        _wait_answering("qemu-nbd", proc, url, log)
        yield server
    finally:
        server.stop()


def _wait_answering(name: str, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Until the server at ``url`` accepts a connection, not merely until its socket
    file exists: qemu-nbd and nbdkit bind before they listen, and a connect() in
    between is refused (seen under load in CI)."""
    deadline = time.monotonic() + 10
    while not _answers(url):
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited: {log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never listened: {log.read_text()}")
        time.sleep(0.02)


def _answers(url: str) -> bool:
    """True once something accepts connections at an NBD URL."""
    if url.startswith("nbd+unix"):
        path = url.split("socket=", 1)[1]
        family: int = socket.AF_UNIX
        address: Any = path
    else:
        host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
        family, address = socket.AF_INET, (host, int(port))
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


@contextlib.contextmanager
def nbdkit(image: Path, workdir: Path) -> Iterator[str]:
    """nbdkit's file plugin exporting ``image`` read-only on a unix socket."""
    binary = require_tool("nbdkit")
    sock = workdir / f"nbdkit-{image.name}.sock"
    log = workdir / f"nbdkit-{image.name}.log"
    url = f"nbd+unix:///?socket={sock}"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [binary, "-f", "-r", "-U", str(sock), "file", str(image)],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
        )
    try:
        _wait_answering("nbdkit", proc, url, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


# ---- the site of the end-to-end tests -------------------------------------------------

BASE_SIZE = 8 * MiB
STRIPE = 64 * KiB  # the stripes image: stripe i is filled with byte stripe_byte(i)


def stripe_byte(i: int) -> int:
    return (i * 37 + 11) % 255 + 1  # never 0: a zero read shows


@dataclass
class Site:
    """The files nginx serves (base.raw, stripes.raw), and the running nginx."""

    root: Path
    base: bytes  # base.raw
    nginx: Nginx


@contextlib.contextmanager
def site(work: Path) -> Iterator[Site]:
    """nginx serving a new site under ``work`` (see the module docstring)."""
    root = work / "root"
    root.mkdir()
    base = pattern(BASE_SIZE, seed=11)
    (root / "base.raw").write_bytes(base)
    stripes = b"".join(bytes([stripe_byte(i)]) * STRIPE for i in range(BASE_SIZE // STRIPE))
    (root / "stripes.raw").write_bytes(stripes)
    with nginx(work, root) as server:
        yield Site(root, base, server)


def make_overlay(tmp_path: Path, backing: str, fmt: str = "raw", name: str = "top.qed") -> Path:
    """``qed create -b BACKING -F FMT`` in ``tmp_path``."""
    overlay = tmp_path / name
    result = qed("create", "-f", "qed", "-b", backing, "-F", fmt, overlay)
    assert result.returncode == 0, result.stderr
    return overlay


# ---- a source in memory, and qedkit's own NBD server in a thread ------------------------


class MemorySource(RemoteSource):
    """A RemoteSource over bytes, for the cache's own tests: counts fetches, can fail
    (``failures``: exceptions raised by the next fetches, in order) and be slow
    (``delay`` seconds per fetch)."""

    def __init__(self, data: bytes, *, piece: int = 256 * KiB, delay: float = 0.0) -> None:
        self.data = data
        self.name = "mem://disk"
        self.max_request = 1 << 62
        self.piece = piece
        self.delay = delay
        self.failures: list[BaseException] = []
        self.open_failures: list[BaseException] = []
        self.fetches: list[tuple[int, int]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.closed = False

    async def open(self, head: int) -> tuple[int, list[bytes]]:
        if self.open_failures:
            raise self.open_failures.pop(0)
        first = self.data[:head]
        return len(self.data), [first[i : i + self.piece] for i in range(0, len(first), self.piece)]

    def fetch(self, offset: int, length: int) -> Any:
        import asyncio

        self.fetches.append((offset, length))
        failure = self.failures.pop(0) if self.failures else None
        assert offset >= 0 and offset + length <= len(self.data), (offset, length)

        async def go() -> list[bytes]:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
                if failure is not None:
                    raise failure
                chunk = self.data[offset : offset + length]
                return [chunk[i : i + self.piece] for i in range(0, length, self.piece)]
            finally:
                self.in_flight -= 1

        return asyncio.ensure_future(go())

    async def close(self) -> None:
        self.closed = True


class NbdThreadServer:
    """qedkit's NBD server in a thread of its own, exporting ``data`` (a raw image in
    memory, read-only) on a unix socket; ``stop()`` and ``start()`` again on the same
    socket simulate a server that goes away and comes back."""

    def __init__(self, data: bytes, sock: Path, name: str = "") -> None:
        self.data = data
        self.sock = sock
        self.name = name
        self._loop: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    def start(self) -> NbdThreadServer:
        import asyncio

        from qedkit.engine.raw import RawImage
        from qedkit.nbd.server import NbdServer, ServedImage
        from qedkit.store import MemoryStore

        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                image = RawImage(MemoryStore(self.data, writable=False), len(self.data))
                self._server = NbdServer(
                    [ServedImage(self.name, image, readonly=True)], max_connections=4
                )
                await self._server.listen_unix(str(self.sock))
                ready.set()
                await self._server.wait_stopped()

            try:
                loop.run_until_complete(serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise AssertionError("the NBD server did not start")
        return self

    def stop(self) -> None:
        import asyncio

        thread, self._thread = self._thread, None
        if thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(10)
        thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()

    def __enter__(self) -> NbdThreadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
