"""``qed serve [options] IMAGE...``: serve images over NBD (``qed ctl`` talks to its
control socket).

``qed serve`` opens every IMAGE (locking it as QEMU would), listens on a unix socket
or on TCP (loopback unless --bind says otherwise), and serves until SIGTERM or SIGINT,
or a ``quit`` on the control socket; then it finishes the requests in flight, flushes,
marks the images clean and exits 0. With --fork the parent returns once the server
listens (exit 0), or reports why it could not start (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from ..errors import QedError

DEFAULT_PORT = 10809  # IANA's NBD port

# The longest spin after replies (docs/DESIGN.md §3: on an idle VM it saves a halted
# vCPU's wake-up per request at queue depth 1; QEMU's default poll-max-ns is 32 us).
# It also sets when polling turns back on (replies less than twice this apart), so it
# must exceed a slow VM's QD1 round trip (~200 us seen): 64 left it off there.
DEFAULT_BUSY_POLL_US = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f", dest="format", metavar="FMT", choices=("qed", "raw", "qcow2"), help="image format"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-k", metavar="PATH", help="listen on a unix socket")
    p.add_argument(
        "--bind", "-b", metavar="ADDR", default="127.0.0.1", help="TCP address (default 127.0.0.1)"
    )
    where.add_argument(
        "--port",
        "-p",
        type=int,
        metavar="N",
        help=f"TCP port (default {DEFAULT_PORT}; 0 picks one)",
    )
    p.add_argument(
        "-x",
        "--export-name",
        dest="names",
        action="append",
        metavar="NAME",
        help="export name, once per IMAGE (default: '' for one image, else the file names)",
    )
    p.add_argument("-D", "--description", default="", help="export description")
    p.add_argument(
        "-r", "--read-only", dest="readonly", action="store_true", help="read-only exports"
    )
    p.add_argument(
        "-e",
        "--shared",
        type=int,
        default=1,
        metavar="N",
        help="clients allowed at once (default 1); >1 also advertises multi-conn",
    )
    p.add_argument(
        "--shared-wait",
        type=float,
        metavar="SECONDS",
        help="how long a client over the --shared limit waits for a slot before it is "
        "refused with a message (default 30; 0: refuse at once)",
    )
    p.add_argument(
        "--busy-poll",
        type=int,
        default=DEFAULT_BUSY_POLL_US,
        metavar="USEC",
        help="after sending replies, spin up to USEC microseconds for the next request "
        f"before sleeping (QEMU's adaptive polling; default {DEFAULT_BUSY_POLL_US}; 0: off)",
    )
    p.add_argument("--fork", action="store_true", help="go to the background once listening")
    p.add_argument("--pid-file", metavar="FILE", help="write the server's pid here")
    p.add_argument(
        "--control", metavar="PATH", help="control socket (JSON lines) for jobs and queries"
    )
    p.add_argument(
        "--copy-on-read",
        dest="copy_on_read",
        action="store_true",
        help="every export copies the clusters its clients read from the backing chain "
        "into the image (not with -r)",
    )
    p.add_argument(
        "--allocation",
        choices=("end", "home"),
        help="where new clusters go (home: raw-like layout); recorded in the image",
    )
    p.add_argument(
        "--convert-qcow2",
        choices=("now", "job"),
        metavar="WHEN",
        help="serve qcow2 IMAGEs read-write while making them QED in the same file: the "
        "conversion (a convert-to-qed job) starts at once (now), or when 'job-start "
        "type=convert-to-qed' asks (job; needs --control). Until it switches the file to "
        "QED, writes into clusters that stay in place go through and the others wait",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM); TLS is then required")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="log connections (-vv: debug)"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")


# ---- serve ----------------------------------------------------------------------------


def _export_names(args: argparse.Namespace) -> list[str]:
    names: list[str] = args.names or []
    if len(names) > len(args.images):
        raise QedError(f"{len(names)} export names for {len(args.images)} images")
    if len(args.images) == 1 and not names:
        return [""]
    defaults = [os.path.basename(path) for path in args.images]
    return names + defaults[len(names) :]


def _listen_socket(args: argparse.Namespace) -> socket.socket:
    """Bind before anything else, so that --fork can report failures and clients can
    connect as soon as the parent returns."""
    from ..nbd.server import bind_unix

    if args.socket:
        try:
            sock = bind_unix(args.socket)
        except OSError as exc:
            raise QedError(f"cannot listen on {args.socket}: {exc.strerror or exc}") from exc
    else:
        family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
        port = DEFAULT_PORT if args.port is None else args.port
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.bind, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise QedError(f"cannot listen on {args.bind}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _unlink_socket(args: argparse.Namespace) -> None:
    if args.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)


async def _open(args: argparse.Namespace, path: str) -> Any:
    """One IMAGE: as open_image opens it, or, with --convert-qcow2, a qcow2 image as a
    live conversion (planned, refused before serving if it cannot be converted)."""
    from ..engine.chain import open_for_conversion, open_image
    from ..engine.qcow2 import Qcow2Image
    from ..jobs.inplace_live import LiveConversion

    if not args.convert_qcow2:
        return await open_image(
            path, fmt=args.format, readonly=args.readonly, copy_on_read=args.copy_on_read
        )
    image = await open_for_conversion(path, fmt=args.format)
    if not isinstance(image, Qcow2Image):
        return image
    try:
        return await LiveConversion.prepare(image)
    except BaseException:
        await image.close()
        raise


def _start_conversions(
    args: argparse.Namespace, server: Any, served: list[Any], control: Any
) -> None:
    """Serve the QED image itself once a live conversion switched, fail held writes
    when the server stops, and start the convert-to-qed jobs (--convert-qcow2=now)."""
    from ..jobs.base import JobManager
    from ..jobs.inplace_live import ConvertToQedJob, LiveConversion

    live = [s for s in served if isinstance(s.image, LiveConversion)]
    if not live:
        return
    if args.convert_qcow2 == "job" and control is None:
        raise QedError("--convert-qcow2=job needs --control (the job is started there)")
    for s in live:
        s.image.on_switch.append(lambda img, s=s: setattr(s, "image", img))

        async def release(image: LiveConversion = s.image) -> None:
            image.release_held()

        server.on_stopping.append(release)
    if args.convert_qcow2 != "now":
        return
    if control is not None:
        jobs = control.jobs
    else:
        log = logging.getLogger("qedkit.jobs")
        jobs = JobManager(lambda event, data: log.info("%s %s", event, data))
        jobs.register(ConvertToQedJob)
        server.on_stopping.insert(0, jobs.cancel_all)
    for s in live:
        jobs.start(ConvertToQedJob.type, s.name, s.image, {})


async def _serve(args: argparse.Namespace, sock: socket.socket, ready: int | None) -> int:
    from ..engine.qed import QedImage
    from ..nbd.control import ControlServer
    from ..nbd.server import DEFAULT_CONNECTION_WAIT, NbdServer, ServedImage
    from ..store.file import FileStore

    ssl_context = None
    if args.tls_cert or args.tls_key:
        import ssl

        if not (args.tls_cert and args.tls_key):
            raise QedError("--tls-cert and --tls-key go together")
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise QedError(
                f"cannot load the TLS certificate: {exc}", filename=args.tls_cert
            ) from exc
    if args.convert_qcow2 and args.readonly:
        raise QedError("--convert-qcow2 serves images read-write: it does not go with -r")
    if args.copy_on_read and args.readonly:
        raise QedError("--copy-on-read writes the images: it cannot be combined with -r")
    served: list[ServedImage] = []
    try:
        for name, path in zip(_export_names(args), args.images, strict=True):
            image = await _open(args, path)
            if args.allocation and not args.readonly:
                if not isinstance(image, QedImage):
                    raise QedError(f"{path}: --allocation needs a QED image")
                await image.set_home_allocation(args.allocation == "home")
            if isinstance(image.store, FileStore):
                image.store.offload = True
            served.append(ServedImage(name, image, args.description, args.readonly))
        server = NbdServer(
            served,
            max_connections=max(1, args.shared),
            connection_wait=(
                DEFAULT_CONNECTION_WAIT if args.shared_wait is None else args.shared_wait
            ),
            ssl_context=ssl_context,
            busy_poll_ns=max(0, args.busy_poll) * 1000,
        )
        await server.listen_socket(sock)
        control = None
        if args.control:
            control = ControlServer(server, args.control)
            await control.start()
        _start_conversions(args, server, served, control)
    except BaseException:
        for s in served:
            with contextlib.suppress(QedError):
                await s.image.close()
        raise
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(server.stop()))
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    if ready is not None:
        os.write(ready, b"ok")
        os.close(ready)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if args.verbose else (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    try:
        await server.wait_stopped()
    finally:
        if args.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.pid_file)
        if args.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.socket)
    return 0


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run the server's loop: uvloop when it is installed (``pip install qedkit[fast]``;
    it halves the loop's per-wakeup cost, which is what limits IOPS at queue depth 1),
    else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="qed serve: %(message)s",
    )
    if args.fork:
        return _fork(args)
    sock = _listen_socket(args)
    try:
        return _run(_serve(args, sock, None))
    except BaseException:
        _unlink_socket(args)  # ours: we bound it, and nobody will serve on it
        raise


def _fork(args: argparse.Namespace) -> int:
    """Parent: wait until the child listens (exit 0) or fails (print why, exit 1)."""
    sock = _listen_socket(args)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        sock.close()
        message = b""
        while chunk := os.read(read_end, 4096):
            message += chunk
        os.close(read_end)
        if message == b"ok":
            return 0
        os.waitpid(pid, 0)
        sys.stderr.write(
            message.decode(errors="replace") or "qed: serve: the server failed to start\n"
        )
        return 1
    os.close(read_end)
    os.setsid()
    code = 1
    try:
        code = _run(_serve(args, sock, write_end))
    except QedError as exc:
        _unlink_socket(args)
        with contextlib.suppress(OSError):
            os.write(write_end, f"qed: {exc}\n".encode())
    except BaseException as exc:  # the child must never return into the parent's code
        _unlink_socket(args)
        with contextlib.suppress(OSError):
            os.write(write_end, f"qed: serve: {exc}\n".encode())
    finally:
        os._exit(code)
