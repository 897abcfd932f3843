"""The control socket of ``qed serve``: JSON lines on a unix socket, in the spirit of QMP.

Protocol (one JSON object per line, UTF-8)::

    server -> {"QED": {"version": {"qedkit": "0.1.0"}, "capabilities": ["jobs", "events"]}}
    client -> {"execute": "query-status", "arguments": {...}, "id": 1}
    server -> {"return": {...}, "id": 1}
           or {"error": {"class": "InvalidArgument", "desc": "..."}, "id": 1}
    server -> {"event": "JOB_STATUS_CHANGE", "data": {...},
               "timestamp": {"seconds": S, "microseconds": U}}       (at any time)

The commands and their arguments are the table ``COMMANDS``; the job types are the
Job classes registered with the server's JobManager (``JOB_TYPES`` by default), each
with its ``argument_spec``. ``help`` (or ``query-commands``, as in QMP) returns both,
so the list a client sees is the code's. Every client receives every event.
Error classes: GenericError (the command failed), CommandNotFound, InvalidArgument
(bad or missing arguments), JSONError (the line was not a JSON object).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..engine.check import check_image
from ..engine.qed import QedImage
from ..errors import InvalidRequestError, QedError
from ..jobs.base import Argument, Job, JobManager
from ..jobs.check import CheckJob, ScrubJob
from ..jobs.defrag import DefragJob, Defragmenter
from ..jobs.inplace_live import ConvertToQedJob
from ..jobs.stream import StreamJob
from ..version import __version__
from .server import NbdServer, ServedImage, bind_unix

log = logging.getLogger("qedkit.control")

MAX_LINE = 1 << 20  # bytes per command line

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Command:
    """A control command: its name, the ControlServer method that runs it, what it
    does and its arguments (as ``help`` lists them)."""

    name: str
    method: str
    help: str
    arguments: tuple[Argument, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "help": self.help,
            "arguments": [a.as_dict() for a in self.arguments],
        }


_EXPORT = Argument("export", "string", "the export's name (not needed if there is only one)")
_JOB_ID = Argument("id", "string", "the job's id (job-start returns it)", required=True)

COMMANDS: tuple[Command, ...] = (
    Command("help", "_help", "this list: commands, job types, their arguments"),
    Command("query-commands", "_help", "the same as help (QMP's name)"),
    Command("query-status", "_query_status", "the server: status, pid, uptime, connections"),
    Command("query-exports", "_query_exports", "every export: file, format, size, I/O counts"),
    Command(
        "query-image",
        "_query_image",
        "an export's image: sizes, clusters, fragmentation, leaks",
        (_EXPORT,),
    ),
    Command("query-jobs", "_query_jobs", "every job: type, export, status, progress, result"),
    Command(
        "job-start",
        "_job_start",
        "start a job on an export; its type's arguments are below",
        (
            Argument("type", "string", "the job type", required=True),
            _EXPORT,
            Argument("id", "string", "the job's id (default TYPE-N)"),
        ),
    ),
    Command("job-pause", "_job_pause", "pause a running job at its next checkpoint", (_JOB_ID,)),
    Command("job-resume", "_job_resume", "resume a paused job", (_JOB_ID,)),
    Command("job-cancel", "_job_cancel", "cancel a job at its next safe checkpoint", (_JOB_ID,)),
    Command(
        "defrag-step",
        "_defrag_step",
        "one defrag step, not a job (done: nothing left to move)",
        (_EXPORT, Argument("clusters", "integer", "clusters that may move (default 1)")),
    ),
    Command("quit", "_quit", "stop the server: finish requests in flight, flush, exit"),
)

JOB_TYPES: tuple[type[Job], ...] = (CheckJob, ScrubJob, DefragJob, StreamJob, ConvertToQedJob)
# Job types of which one at a time may run on an export.
ONE_PER_EXPORT = (DefragJob.type, StreamJob.type, ConvertToQedJob.type)


def describe(job_types: Iterable[type[Job]] = JOB_TYPES) -> dict[str, Any]:
    """What ``help`` returns: every command and every job type, with their arguments."""
    return {
        "commands": [c.as_dict() for c in COMMANDS],
        "job-types": [j.describe() for j in job_types],
    }


class CommandError(Exception):
    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class ControlServer:
    """Accepts control clients on ``path`` and runs their commands against ``server``."""

    def __init__(self, server: NbdServer, path: str, jobs: JobManager | None = None) -> None:
        self.server = server
        self.path = path
        self.jobs = jobs or JobManager(self.broadcast)
        self.jobs.emit = self.broadcast
        for job_type in JOB_TYPES:
            self.jobs.types.setdefault(job_type.type, job_type)
        for served in server.images:
            self.jobs.activity[served.name] = _counter(served)
        self._defrag: dict[str, Defragmenter] = {}
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: dict[asyncio.Task[None], asyncio.StreamReader] = {}  # the handlers
        self._listener: asyncio.Server | None = None
        self.commands: dict[str, Handler] = {c.name: getattr(self, c.method) for c in COMMANDS}
        server.on_stopping.append(self.jobs.cancel_all)
        server.on_stop.append(self.close)

    async def start(self) -> None:
        self._listener = await asyncio.start_unix_server(
            self._client, sock=bind_unix(self.path), limit=MAX_LINE
        )
        log.info("control socket on %s", self.path)

    async def close(self) -> None:
        await self.jobs.cancel_all()
        if self._listener is not None:
            self._listener.close()
        for writer in list(self._clients):
            writer.close()
        self._clients.clear()
        # Finish the handlers here (an end of input makes each return) rather than
        # leave them to the loop's teardown: a client that resets its connection
        # meanwhile would otherwise leave an exception nobody retrieves (logged as a
        # traceback at exit). Cancelling them instead trips asyncio's own callback.
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            self._tasks[task].feed_eof()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # ---- wire ------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = reader
        self._clients.add(writer)
        greeting = {"QED": {"version": {"qedkit": __version__}, "capabilities": ["jobs", "events"]}}
        self._send(writer, greeting)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self._send(writer, _error("JSONError", f"line longer than {MAX_LINE} bytes"))
                    break
                if not line:
                    break
                if line.strip():
                    self._send(writer, await self._execute(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.pop(task, None)

    async def _execute(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error("JSONError", f"not JSON: {exc}")
        if not isinstance(request, dict):
            return _error("JSONError", "a command must be a JSON object")
        ident = request.get("id")
        reply: dict[str, Any]
        try:
            name = request.get("execute")
            if not isinstance(name, str):
                raise CommandError("InvalidArgument", 'missing "execute"')
            handler = self.commands.get(name)
            if handler is None:
                raise CommandError(
                    "CommandNotFound", f"unknown command {name!r} (help lists the commands)"
                )
            arguments = request.get("arguments", {})
            if not isinstance(arguments, dict):
                raise CommandError("InvalidArgument", '"arguments" must be an object')
            reply = {"return": await handler(arguments)}
        except CommandError as exc:
            reply = _error(exc.error_class, exc.desc)
        except InvalidRequestError as exc:
            reply = _error("InvalidArgument", str(exc))
        except QedError as exc:
            reply = _error("GenericError", str(exc))
        if ident is not None:
            reply["id"] = ident
        return reply

    def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(message).encode() + b"\n")

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        now = time.time()
        message = {
            "event": event,
            "data": data,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        for writer in list(self._clients):
            self._send(writer, message)

    # ---- commands --------------------------------------------------------------------

    def _served(self, arguments: dict[str, Any]) -> ServedImage:
        name = arguments.get("export")
        if name is None:
            if len(self.server.images) == 1:
                return self.server.images[0]
            raise CommandError("InvalidArgument", 'several exports: name one with "export"')
        served = self.server.by_name.get(str(name))
        if served is None:
            raise CommandError("InvalidArgument", f"no export named {name!r}")
        return served

    async def _help(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return describe(self.jobs.types.values())

    async def _query_status(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "stopping" if self.server.stopping else "running",
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(self.server.uptime(), 3),
            "connections": len(self.server.connections),
            "max-connections": self.server.max_connections,
            "waiting-connections": self.server.connections_waiting,
            "jobs": sum(1 for j in self.jobs.jobs.values() if not j.status.finished),
        }

    async def _query_exports(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "filename": s.image.filename,
                "format": s.image.format_name,
                "size": s.image.size,
                "readonly": s.readonly,
                "copy-on-read": bool(getattr(s.image, "copy_on_read", False)),
                "connections": s.stats.connections,
                "requests": s.stats.requests,
                "errors": s.stats.errors,
                "bytes-read": s.stats.bytes_read,
                "bytes-written": s.stats.bytes_written,
            }
            for s in self.server.images
        ]

    async def _query_image(self, arguments: dict[str, Any]) -> dict[str, Any]:
        served = self._served(arguments)
        image = served.image
        info = await image.info()
        out: dict[str, Any] = {
            "export": served.name,
            "filename": info.filename,
            "format": info.format,
            "virtual-size": info.virtual_size,
            "actual-size": info.actual_size,
        }
        if isinstance(image, QedImage):
            async with image.allocations_paused():
                report = await check_image(image)
            allocated = report.allocated_clusters
            out.update(
                {
                    "cluster-size": image.cluster_size,
                    "file-size": await image.store.size(),
                    "need-check": image.header.needs_check,
                    "total-clusters": report.total_clusters,
                    "allocated-clusters": allocated,
                    "fragmented-clusters": report.fragmented_clusters,
                    "allocated-percent": round(100.0 * allocated / report.total_clusters, 2)
                    if report.total_clusters
                    else 0.0,
                    "fragmented-percent": round(100.0 * report.fragmented_clusters / allocated, 2)
                    if allocated
                    else 0.0,
                    "leaks": report.leaks,
                    "corruptions": report.corruptions,
                    "backing-filename": info.backing_filename,
                }
            )
        return out

    async def _query_jobs(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        return [job.statistics().as_dict() for job in self.jobs.jobs.values()]

    async def _job_start(self, arguments: dict[str, Any]) -> dict[str, Any]:
        job_type = arguments.get("type")
        if not isinstance(job_type, str):
            raise CommandError("InvalidArgument", 'missing "type"')
        served = self._served(arguments)
        extra = {k: v for k, v in arguments.items() if k not in ("type", "export", "id")}
        if job_type in ONE_PER_EXPORT and any(
            j.export == served.name and j.type == job_type and not j.status.finished
            for j in self.jobs.jobs.values()
        ):
            raise CommandError(
                "GenericError", f"a {job_type} job is already running on this export"
            )
        job_id = arguments.get("id")
        job = self.jobs.start(
            job_type, served.name, served.image, extra, str(job_id) if job_id else None
        )
        return {"id": job.id}

    def _job(self, arguments: dict[str, Any]) -> Any:
        ident = arguments.get("id")
        if ident is None:
            raise CommandError("InvalidArgument", 'missing "id"')
        return self.jobs.get(str(ident))

    async def _job_pause(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self._job(arguments).pause()
        return {}

    async def _job_resume(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self._job(arguments).resume()
        return {}

    async def _job_cancel(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self._job(arguments).cancel()
        return {}

    async def _defrag_step(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """One defragmentation step on an export: by default one swap (``clusters``
        sets how many clusters may move). Work is looked for in the L2 tables in the
        cache first; only when they hold none are the other tables read. When no
        candidate is left anywhere, the step finishes the job (moves stray L2 tables
        down, truncates and punches free space) and says ``done``."""
        served = self._served(arguments)
        image = served.image
        if not isinstance(image, QedImage):
            raise CommandError("InvalidArgument", f"export {served.name!r} is not a QED image")
        if any(
            j.export == served.name and j.type == DefragJob.type and not j.status.finished
            for j in self.jobs.jobs.values()
        ):
            raise CommandError("GenericError", "a defrag job is running on this export")
        clusters = int(arguments.get("clusters", 1))
        if clusters < 1:
            raise CommandError("InvalidArgument", '"clusters" must be at least 1')
        defrag = self._defrag.get(served.name)
        if defrag is None or image.cluster_map is not defrag.cmap:
            defrag = await Defragmenter.create(image)
            self._defrag[served.name] = defrag
        result = await defrag.round(cached_only=True, limit=clusters)
        if result.done:
            result = await defrag.round(cached_only=False, limit=clusters)
        done = result.done
        finished: dict[str, int] = {}
        if done:
            finished = await defrag.finish(complete=True)
            del self._defrag[served.name]  # the next step plans afresh
        bits = image.geo.cluster_bits
        return {
            "moved": [
                {"guest-offset": m.guest << bits, "from": m.src, "to": m.dst, "home": m.home}
                for m in result.moves
            ],
            "tables-moved": result.tables_moved,
            "done": done,
            **finished,
        }

    async def _quit(self, arguments: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.server.stop()))
        return {}


def _counter(served: ServedImage) -> Callable[[], int]:
    return lambda: served.stats.requests


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}
