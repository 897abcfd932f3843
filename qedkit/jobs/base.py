"""Long-running jobs on an open image: status, progress, pause, resume, cancel.

A job is a coroutine (``Job.work``) that calls ``await self.checkpoint(done, total)``
between steps. The checkpoint reports progress, waits while the job is paused and
raises ``JobCancelled`` once it is cancelled, so a job stops only at points where it
left the image consistent. Jobs run as tasks on the event loop that owns the image
(the server's), next to guest I/O.

Status changes and progress are reported to ``emit(event_name, data)``, which the
control socket turns into events for its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine.base import BlockImage
from ..errors import InvalidRequestError, JobError, QedError

Emit = Callable[[str, dict[str, Any]], None]

log = logging.getLogger("qedkit.jobs")

PROGRESS_INTERVAL = 0.5  # seconds between progress events of one job


class JobStatus(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    CONCLUDED = "concluded"  # finished successfully; ``result`` is set
    FAILED = "failed"  # ``error`` is set
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.CONCLUDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobCancelled(Exception):
    """Raised by a checkpoint of a cancelled job."""


@dataclass(frozen=True, slots=True)
class JobInfo:
    """An immutable snapshot of a job (``Job.statistics()``)."""

    id: str
    type: str
    export: str
    status: JobStatus
    current: int
    total: int
    started: float
    finished: float | None
    result: Mapping[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "export": self.export,
            "status": self.status.value,
            "current-progress": self.current,
            "total-progress": self.total,
            "result": dict(self.result) if self.result is not None else None,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Argument:
    """One argument of a job type (or of a control command), as ``help`` lists it."""

    name: str
    kind: str  # what the value is: "size" (bytes, k/M/G suffixes), "integer", "number", "string"
    help: str
    required: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.kind, "required": self.required, "help": self.help}


class Job:
    """Base class: subclasses set ``type``, ``summary`` and ``argument_spec`` (what
    ``parse_arguments`` accepts, which the control socket's ``help`` lists) and
    implement ``work``."""

    type: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    argument_spec: ClassVar[tuple[Argument, ...]] = ()

    def __init__(
        self,
        job_id: str,
        export: str,
        image: BlockImage,
        options: Mapping[str, Any],
        emit: Emit,
    ) -> None:
        self.id = job_id
        self.export = export
        self.image = image
        self.options = dict(options)  # the arguments as parse_arguments returned them
        self._emit = emit
        self.status = JobStatus.CREATED
        self.current = 0
        self.total = 0
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        self._cancel = False
        self._cancelled = asyncio.Event()  # ends a rest() at once
        self._last_progress = 0.0
        self.task: asyncio.Task[None] | None = None
        # A counter of guest requests on the image (set by the server), for jobs that
        # yield to busy guests.
        self.activity: Callable[[], int] | None = None

    # ---- for subclasses --------------------------------------------------------------

    @classmethod
    def parse_arguments(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Check a job's arguments at job-start (InvalidRequestError if wrong) and
        return them as ``work`` uses them (``self.options``)."""
        return dict(arguments)

    @classmethod
    def argument_names(cls) -> tuple[str, ...]:
        return tuple(a.name for a in cls.argument_spec)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The job type as the control socket's ``help`` lists it."""
        return {
            "type": cls.type,
            "help": cls.summary,
            "arguments": [a.as_dict() for a in cls.argument_spec],
        }

    async def work(self) -> dict[str, Any]:
        raise NotImplementedError

    def progress_data(self) -> dict[str, Any]:
        """The data of a JOB_PROGRESS event; a job may add to it (an ETA)."""
        return {"id": self.id, "current": self.current, "total": self.total}

    async def checkpoint(self, current: int, total: int) -> None:
        """Report progress; wait while paused; raise JobCancelled when cancelled."""
        self.current, self.total = current, total
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            self._emit("JOB_PROGRESS", self.progress_data())
        if self._cancel:
            raise JobCancelled
        if not self._resume.is_set():
            await self._resume.wait()
            if self._cancel:
                raise JobCancelled
        await asyncio.sleep(0)  # let guest I/O in between steps

    @property
    def stopping(self) -> bool:
        """A pause or a cancel was asked for: the next ``checkpoint`` waits or raises
        (a job holding something others wait for releases it first)."""
        return self._cancel or not self._resume.is_set()

    async def rest(self, seconds: float) -> None:
        """Wait ``seconds`` (a rate limit's pause) unless the job is cancelled first:
        a cancel (job-cancel, or the server stopping) must not wait out the pause.
        The next ``checkpoint`` then raises JobCancelled."""
        if seconds <= 0 or self._cancel:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cancelled.wait(), seconds)

    # ---- control ---------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        self._set(JobStatus.RUNNING)
        try:
            self.result = await self.work()
        except JobCancelled:
            self._set(JobStatus.CANCELLED)
        except asyncio.CancelledError:
            self._set(JobStatus.CANCELLED)
            raise
        except QedError as exc:
            self.error = str(exc)
            self._set(JobStatus.FAILED)
        except Exception as exc:  # a bug: report it as a failure, never hang "running"
            log.exception("job %s failed", self.id)
            self.error = f"internal error: {type(exc).__name__}: {exc}"
            self._set(JobStatus.FAILED)
        else:
            self._set(JobStatus.CONCLUDED)

    def pause(self) -> None:
        if self.status is not JobStatus.RUNNING:
            raise JobError(f"job {self.id} is {self.status.value}, not running")
        self._resume.clear()
        self._set(JobStatus.PAUSED)

    def resume(self) -> None:
        if self.status is not JobStatus.PAUSED:
            raise JobError(f"job {self.id} is {self.status.value}, not paused")
        self._resume.set()
        self._set(JobStatus.RUNNING)

    def cancel(self) -> None:
        if self.status.finished:
            raise JobError(f"job {self.id} already {self.status.value}")
        self._cancel = True
        self._cancelled.set()
        self._resume.set()

    def _set(self, status: JobStatus) -> None:
        self.status = status
        if status.finished:
            self.finished = time.time()
        data: dict[str, Any] = {"id": self.id, "type": self.type, "status": status.value}
        if status is JobStatus.CONCLUDED:
            data["result"] = self.result
        if status is JobStatus.FAILED:
            data["error"] = self.error
        self._emit("JOB_STATUS_CHANGE", data)

    def statistics(self) -> JobInfo:
        return JobInfo(
            id=self.id,
            type=self.type,
            export=self.export,
            status=self.status,
            current=self.current,
            total=self.total,
            started=self.started,
            finished=self.finished,
            result=self.result,
            error=self.error,
        )


@dataclass
class JobManager:
    """The jobs of one server; job types register in ``types``."""

    emit: Emit
    types: dict[str, type[Job]] = field(default_factory=dict)
    # Per export: a counter of guest requests, for jobs with an idle policy.
    activity: dict[str, Callable[[], int]] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def register(self, job_type: type[Job]) -> None:
        self.types[job_type.type] = job_type

    def start(
        self,
        job_type: str,
        export: str,
        image: BlockImage,
        arguments: Mapping[str, Any],
        job_id: str | None = None,
    ) -> Job:
        cls = self.types.get(job_type)
        if cls is None:
            raise InvalidRequestError(
                f"unknown job type {job_type!r} (known: {', '.join(sorted(self.types))})"
            )
        options = cls.parse_arguments(arguments)  # refused before anything starts
        if job_id is None:
            job_id = f"{job_type}-{next(self._ids)}"
        existing = self.jobs.get(job_id)
        if existing is not None and not existing.status.finished:
            raise InvalidRequestError(f"a job with id {job_id!r} is still running")
        job = cls(job_id, export, image, options, self.emit)
        job.activity = self.activity.get(export)
        self.jobs[job_id] = job
        job.start()
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise InvalidRequestError(f"no job with id {job_id!r}")
        return job

    async def cancel_all(self) -> None:
        running = [j for j in self.jobs.values() if not j.status.finished]
        for job in running:
            job.cancel()
        tasks = [j.task for j in running if j.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
