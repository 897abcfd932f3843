"""Helpers of the end-to-end tests of ``qed serve``: the server as a subprocess, a raw
"shadow" copy of what the clients wrote, a hand-packed NBD client for hostile and
pipelined traffic, and runners for the real clients (qemu-io, nbdsh ...).

Wire constants are spelled out from proto.md (NetworkBlockDevice/nbd doc/proto.md),
never imported from qedkit, so that a wrong constant there cannot hide here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qedtest import IN_CI, Qemu, require_tool

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB  # qedkit.create's default cluster size

# ---- proto.md constants ---------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7

REP_ACK = 1
REP_INFO = 3
REP_ERR_POLICY = 2**31 + 2
REP_ERR_TLS_REQD = 2**31 + 5

INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

FLAG_FUA = 1

TFLAG_READ_ONLY = 1 << 1
TFLAG_CAN_MULTI_CONN = 1 << 8

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

MAX_PAYLOAD = 32 * MiB  # proto.md: a server need not accept more in one request


# ---- the raw client -------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Reply:
    error: int
    cookie: int
    data: bytes = b""


class RawClient:
    """A blocking NBD client packed by hand: fixed newstyle, simple replies only.

    ``pending`` remembers the length of every READ sent, so that replies can be read
    in any order (the server may answer out of order)."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock: socket.socket | ssl.SSLSocket = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            raise
        self.pending: dict[int, int] = {}
        self.size = 0
        self.flags = 0

    # ---- bytes ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 4 * MiB))
            if not chunk:
                raise Closed(f"end of file with {n} bytes still expected")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True once the server closed its end (replies still queued are skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # ---- handshake ------------------------------------------------------------------

    def greeting(self) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, f"bad greeting {magic:#x} {opt:#x}"
        return int(hflags)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return opt, kind, self.recv_exact(length)

    def go(self, name: str = "") -> None:
        self.send_go(name)
        while True:
            opt, kind, data = self.option_reply()
            assert opt == OPT_GO
            if kind == REP_INFO:
                (info,) = struct.unpack_from(">H", data)
                if info == INFO_EXPORT:
                    _, self.size, self.flags = struct.unpack(">HQH", data)
                continue
            assert kind == REP_ACK, f"NBD_OPT_GO refused: reply type {kind:#x} {data!r}"
            return

    def send_go(self, name: str = "") -> None:
        raw = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))

    def handshake(self, name: str = "") -> RawClient:
        self.greeting()
        self.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
        self.go(name)
        return self

    def starttls(self, context: ssl.SSLContext, hostname: str = "localhost") -> None:
        self.option(OPT_STARTTLS)
        opt, kind, _ = self.option_reply()
        assert (opt, kind) == (OPT_STARTTLS, REP_ACK), f"STARTTLS refused: {kind:#x}"
        plain = self.sock
        assert isinstance(plain, socket.socket)
        self.sock = context.wrap_socket(plain, server_hostname=hostname)

    def abort(self) -> None:
        """NBD_OPT_ABORT: a soft disconnect during the handshake."""
        self.option(OPT_ABORT)

    # ---- transmission ---------------------------------------------------------------

    def request(
        self,
        cmd: int,
        cookie: int,
        offset: int = 0,
        length: int | None = None,
        *,
        flags: int = 0,
        payload: bytes = b"",
        magic: int = REQUEST_MAGIC,
    ) -> None:
        if length is None:
            length = len(payload)
        if cmd == CMD_READ:
            self.pending[cookie] = length
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)

    def reply(self) -> Reply:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        length = self.pending.pop(cookie, 0)
        data = self.recv_exact(length) if length and not error else b""
        return Reply(error, cookie, data)

    def call(self, cmd: int, offset: int = 0, length: int | None = None, **kw: object) -> Reply:
        cookie = 0xC0FFEE
        self.request(cmd, cookie, offset, length, **kw)  # type: ignore[arg-type]
        reply = self.reply()
        assert reply.cookie == cookie
        return reply

    def read(self, offset: int, length: int) -> bytes:
        reply = self.call(CMD_READ, offset, length)
        assert reply.error == 0, f"read of {length} at {offset}: error {reply.error}"
        return reply.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        reply = self.call(CMD_WRITE, offset, payload=data, flags=flags)
        assert reply.error == 0, f"write of {len(data)} at {offset}: error {reply.error}"

    def disconnect(self) -> None:
        """NBD_CMD_DISC, then wait for the server to close: by then it has forgotten
        the connection (which matters with --shared)."""
        self.request(CMD_DISC, 0xD15C)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        assert self.closed_by_server(), "the server did not close after NBD_CMD_DISC"
        self.close()


# ---- the shadow -----------------------------------------------------------------------


class Shadow:
    """A raw file that receives the same writes as the served image."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        with open(path, "wb") as f:
            f.truncate(size)

    def write(self, offset: int, data: bytes) -> None:
        assert offset + len(data) <= self.size
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def fill(self, offset: int, length: int, byte: int) -> None:
        self.write(offset, bytes([byte]) * length)

    def zero(self, offset: int, length: int) -> None:
        self.fill(offset, length, 0)

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


# ---- image checks ---------------------------------------------------------------------

NEED_CHECK = 0x02  # QED feature bit, in the header's features field at byte 16


def header_features_byte(image: Path) -> int:
    with open(image, "rb") as f:
        f.seek(16)
        return f.read(1)[0]


def assert_clean_and_equal(qemu: Qemu, image: Path, shadow: Shadow) -> None:
    """What every test ends with once the server exited: the image checks clean with
    QEMU, reads exactly like the shadow, and NEED_CHECK is clear."""
    result = qemu.img("check", "-f", "qed", image, check=False)
    assert result.returncode == 0, f"qemu-img check: {result.stdout}{result.stderr}"
    assert "No errors were found on the image." in result.stdout, result.stdout
    result = qemu.img("compare", "-f", "qed", "-F", "raw", image, shadow.path, check=False)
    assert result.returncode == 0, f"qemu-img compare: {result.stdout}{result.stderr}"
    assert "Images are identical." in result.stdout
    byte = header_features_byte(image)
    assert byte & NEED_CHECK == 0, f"NEED_CHECK still set (features byte {byte:#x})"
    assert byte == 0, f"features byte 16 is {byte:#x}, expected 0 (no backing file)"


# ---- the server -----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago (the server cannot report the one it picks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qed_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "qedkit", *map(str, args)]


# ``qed serve`` runs on uvloop when it is installed, else on asyncio's own loop; this
# runs it on asyncio's loop whatever is installed.
_WITHOUT_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; sys.argv[0] = 'qed'; "
    "from qedkit.cli.main import entry_point; entry_point()"
)


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def process_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Served:
    """One ``qed serve`` subprocess and how to reach it."""

    image: Path
    log: Path
    proc: subprocess.Popen[bytes]
    sock: Path | None = None
    port: int | None = None
    control: Path | None = None
    names: Sequence[str] = ("",)
    tls: bool = False
    returncode: int | None = None
    argv: list[str] = field(default_factory=list)
    signalled: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str | tuple[str, int]:
        if self.sock is not None:
            return str(self.sock)
        assert self.port is not None
        return ("127.0.0.1", self.port)

    def uri(self, name: str | None = None) -> str:
        name = self.names[0] if name is None else name
        scheme = "nbds" if self.tls else "nbd"
        if self.sock is not None:
            return f"{scheme}+unix:///{name}?socket={self.sock}"
        return f"{scheme}://127.0.0.1:{self.port}/{name}"

    def client(self, name: str | None = None, timeout: float = 10.0) -> RawClient:
        return RawClient(self.address, timeout).handshake(self.names[0] if name is None else name)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """Until the server's log (it runs with -v) shows ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared in the log:\n{self.log_text()}")
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until the server answers a handshake: the greeting, then NBD_OPT_ABORT and
        the server's close (by then it has forgotten the probe's connection, which
        matters with --shared 1)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"qed serve exited {self.proc.returncode} before accepting:\n{self.log_text()}"
                )
            try:
                probe = RawClient(self.address, timeout=5)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"qed serve never listened:\n{self.log_text()}") from None
                time.sleep(0.02)
                continue
            try:
                probe.greeting()
                probe.send(struct.pack(">I", C_FIXED_NEWSTYLE | C_NO_ZEROES))
                probe.abort()
                assert probe.closed_by_server(5), "the server did not close after NBD_OPT_ABORT"
            finally:
                probe.close()
            return

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)
        self.signalled = True

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server (unless a test did) and wait for it; kill it (and fail)
        if it hangs."""
        if self.proc.poll() is None:
            if not self.signalled:
                self.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"qed serve did not exit within {timeout} s of signal {signum}; killed.\n"
                    f"log:\n{self.log_text()}"
                ) from None
        self.returncode = self.proc.returncode
        return self.returncode

    def finish(self, qemu: Qemu, shadow: Shadow, signum: int = signal.SIGTERM) -> None:
        """Stop the server (it must exit 0), then judge the image against the shadow."""
        code = self.stop(signum)
        log = self.log_text()
        assert code == 0, f"qed serve exited {code}:\n{log}"
        assert "Traceback" not in log and "internal error" not in log, log
        if self.sock is not None:
            assert not self.sock.exists(), "the unix socket was left behind"
        assert_clean_and_equal(qemu, self.image, shadow)


class ServerFactory:
    """``serve(image, *options, tcp=False, control=False, tls=None, names=())``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Served] = []
        self._n = 0

    def __call__(
        self,
        image: Path | Sequence[Path],
        *options: str,
        tcp: bool = False,
        control: bool = False,
        tls: tuple[Path, Path] | None = None,
        names: Sequence[str] = (),
        wait: bool = True,
        loop: str = "default",
    ) -> Served:
        """``loop``: "default" (uvloop if installed), "asyncio" or "uvloop" (the test
        is skipped when uvloop is not installed)."""
        self._n += 1
        images = [image] if isinstance(image, Path) else list(image)
        log = self.tmp_path / f"serve{self._n}.log"
        argv = qed_argv("serve", "-v", *options)
        if loop == "asyncio":
            argv[1:3] = ["-c", _WITHOUT_UVLOOP]
        elif loop == "uvloop" and not uvloop_installed():
            pytest.skip("uvloop is not installed")
        sock = port = ctl = None
        if tcp:
            port = free_port()
            argv += ["--port", str(port)]
        else:
            sock = self.tmp_path / f"nbd{self._n}.sock"
            argv += ["--socket", str(sock)]
        if control:
            ctl = self.tmp_path / f"ctl{self._n}.sock"
            argv += ["--control", str(ctl)]
        if tls is not None:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        for name in names:
            argv += ["-x", name]
        argv += [str(i) for i in images]
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        served = Served(
            image=images[0],
            log=log,
            proc=proc,
            sock=sock,
            port=port,
            control=ctl,
            names=list(names) or ([""] if len(images) == 1 else [i.name for i in images]),
            tls=tls is not None,
            argv=argv,
        )
        self.started.append(served)
        if wait:
            served.wait_ready()
            if ctl is not None:
                wait_for_path(ctl)
        return served

    def cleanup(self) -> list[str]:
        """Stop whatever is still running (SIGTERM, then SIGKILL); report hangs."""
        problems = []
        for served in self.started:
            if served.proc.poll() is not None:
                continue
            try:
                served.stop(signal.SIGTERM, timeout=15)
            except AssertionError as exc:
                problems.append(str(exc))
        return problems


def wait_for_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


# ---- real clients ---------------------------------------------------------------------


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    argv: list[str]

    def ok(self) -> Result:
        assert self.returncode == 0, (
            f"{' '.join(self.argv)} exited {self.returncode}\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}"
        )
        return self


def run(argv: Sequence[str | os.PathLike[str]], timeout: float = 60) -> Result:
    """Run a client to completion (no stdin), capturing its output."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, [str(a) for a in argv])


def qemu_io(
    uri: str, *commands: str, check: bool = True, extra: Sequence[str] = ("-f", "raw")
) -> Result:
    """qemu-io on an NBD URI. With ``check``, it must exit 0 and no command may fail
    (qemu-io reports failed commands on stdout/stderr but may still exit 0)."""
    argv: list[str] = [require_tool("qemu-io"), *extra, uri]
    for command in commands:
        argv += ["-c", command]
    result = run(argv)
    if check:
        result.ok()
        text = result.stdout + result.stderr
        assert "failed" not in text and "Pattern verification" not in text, (
            f"qemu-io {commands}:\n{text}"
        )
    return result


@functools.cache
def _nbdsh_python() -> str | None:
    """nbdsh runs ``python3 -m nbd`` from PATH, which may be a python without the
    libnbd bindings (a pyenv or venv python): find one that has them."""
    candidates = ["/usr/bin/python3", shutil.which("python3"), "/usr/local/bin/python3"]
    for python in candidates:
        if python and os.path.exists(python):
            probe = subprocess.run([python, "-c", "import nbd"], capture_output=True)
            if probe.returncode == 0:
                return python
    return None


def require_nbdsh() -> list[str]:
    """argv prefix that runs nbdsh (package python3-libnbd on Debian)."""
    require_tool("nbdsh")
    python = _nbdsh_python()
    if python is None:
        message = "nbdsh is installed but no python3 imports the nbd module (python3-libnbd)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return [python, "-m", "nbd"]


def nbdsh(script: str, *, uri: str, timeout: float = 60, **variables: object) -> object:
    """Run ``script`` in nbdsh, with ``json``, ``uri`` and ``variables`` defined (the
    script connects itself, so that it can ask for meta contexts first); it ends with
    ``print(json.dumps(...))``, whose value is returned."""
    define = "; ".join(f"{k} = {v!r}" for k, v in {"uri": uri, **variables}.items())
    argv = [*require_nbdsh(), "-c", f"import json; {define}", "-c", script]
    result = run(argv, timeout=timeout).ok()
    return json.loads(result.stdout.strip().splitlines()[-1])


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    nbdinfo = require_tool("nbdinfo")
    result = run([nbdinfo, f"--map={context}", "--json", uri]).ok()
    return merge([(e["offset"], e["length"], e["type"]) for e in json.loads(result.stdout)])


def merge(extents: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent extents with the same flags as one."""
    out: list[tuple[int, int, int]] = []
    for offset, length, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


@contextlib.contextmanager
def popen_all(argvs: Sequence[Sequence[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen(
            list(a),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        for a in argvs
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def assert_same_bytes(actual: bytes, expected: bytes, what: str = "data") -> None:
    """Compare big buffers without pytest's diff (slow and huge for MiBs): report the
    first difference and how many 4 KiB blocks differ."""
    if actual == expected:
        return
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: {len(actual)} bytes, expected {len(expected)}")
    first = next(i for i in range(len(actual)) if actual[i] != expected[i])
    blocks = sum(
        actual[i : i + 4096] != expected[i : i + 4096] for i in range(0, len(actual), 4096)
    )
    raise AssertionError(
        f"{what}: first difference at byte {first} "
        f"(got {actual[first : first + 8].hex()}, expected {expected[first : first + 8].hex()}); "
        f"{blocks} of {(len(actual) + 4095) // 4096} 4 KiB blocks differ"
    )


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes, different for every seed (a random 4 KiB block repeated)."""
    block = random.Random(seed).randbytes(4096)
    return (block * (length // 4096 + 1))[:length]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
