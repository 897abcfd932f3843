"""``qed ctl [--output human|json] [--wait] [--until-done] SOCKET COMMAND [KEY=VALUE ...]``:
send one command to the control socket of ``qed serve`` (nbd.control) and print the
reply; ``ControlClient`` is the blocking client it uses, for scripts and tests too.

Values of KEY=VALUE are JSON when they parse as JSON, else strings. Options may come
after the arguments (``qed ctl S defrag clusters=8 --until-done``): the verb's
arguments are parsed intermixed.

``qed ctl SOCKET help`` lists the server's commands and job types with their
arguments; ``qed ctl --help`` lists the same from this installation's code (it
imports nbd.control for that, only when the help is printed). Two commands are the
client's own: ``defrag`` (defrag-step, repeated with --until-done) and ``stream``
(job-start type=stream; with --until-done it follows the job's progress and ETA
until the job ends, and exits 0 only if it concluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import time
from typing import Any

from ..errors import QedError
from .common import UsageError

INTERMIXED = True  # main parses KEY=VALUE arguments and options in any order
CLIENT_DEFRAG = (
    "client commands:\n"
    "  defrag [export=EXPORT] [clusters=N] [--until-done]\n"
    "                      defrag-step, printing each move; --until-done: until no\n"
    "                      candidate is left\n"
    "  stream [export=EXPORT] [rate=SIZE] [chunk=SIZE] [--until-done]\n"
    "                      job-start type=stream; --until-done: follow its progress\n"
    "                      and ETA until it ends\n"
)


class ControlCommandError(QedError):
    """The server refused a command: ``error_class`` is the reply's error class
    (CommandNotFound, InvalidArgument, GenericError, JSONError)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format (default human)"
    )
    c.add_argument(
        "--wait", action="store_true", help="after job-start: wait for the job, print events"
    )
    c.add_argument(
        "--until-done",
        action="store_true",
        help="with 'defrag': step until nothing is left to move; with 'stream': until the job ends",
    )
    c.add_argument("socket", metavar="SOCKET", help="the --control socket of qed serve")
    c.add_argument("command", metavar="COMMAND", help="e.g. help, query-status, job-start, defrag")
    c.add_argument(
        "arguments",
        nargs="*",
        metavar="KEY=VALUE",
        help="arguments (values are JSON, else strings)",
    )


def epilog() -> str:
    """The commands and job types of this installation (for ``qed ctl --help``)."""
    from ..nbd.control import describe
    from .output import control_reference_human

    return control_reference_human(describe()) + CLIENT_DEFRAG


def _parse_arguments(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise QedError(f"argument {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class ControlClient:
    """A blocking client of the control socket (for ``qed ctl`` and scripts)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise QedError(f"cannot connect: {exc.strerror or exc}", filename=path) from exc
        self.file = self.sock.makefile("rwb")
        self.greeting = self.read()
        self.events: list[dict[str, Any]] = []
        self._next_id = 1

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QedError("the server closed the control connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        ident = self._next_id
        self._next_id += 1
        request = {"execute": command, "arguments": arguments or {}, "id": ident}
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            message = self.read()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != ident:
                continue
            if "error" in message:
                error = message["error"]
                raise ControlCommandError(command, str(error.get("class")), str(error.get("desc")))
            return message.get("return")

    def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        while True:
            message = self.read()
            if "event" in message:
                return message

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _ctl_defrag(client: ControlClient, args: argparse.Namespace) -> int:
    """``qed ctl SOCKET defrag [--until-done] [export=NAME] [clusters=N]``: one
    defrag-step, or steps until no candidate is left."""
    arguments = _parse_arguments(args.arguments)
    moved = steps = 0
    while True:
        result = client.execute("defrag-step", arguments)
        steps += 1
        moved += len(result["moved"])
        if args.output == "json" and not args.until_done:
            print(json.dumps(result, indent=4))
        elif args.output == "human":
            for m in result["moved"]:
                where = "home" if m["home"] else "end of file"
                print(
                    f"moved guest offset {m['guest-offset']:#x}: "
                    f"{m['from']:#x} -> {m['to']:#x} ({where})"
                )
            if result["tables-moved"]:
                print(f"moved {result['tables-moved']} L2 tables")
        if result["done"] or not args.until_done:
            break
    if args.output == "json" and args.until_done:
        print(
            json.dumps({"steps": steps, "clusters-moved": moved, "done": result["done"]}, indent=4)
        )
    elif args.output == "human":
        print(
            "no candidate left: the image is defragmented"
            if result["done"]
            else f"{moved} clusters moved"
        )
    return 0


def _ctl_stream(client: ControlClient, args: argparse.Namespace) -> int:
    """``qed ctl SOCKET stream [--until-done] [export=NAME] [rate=R] [chunk=C]``: start
    a stream job; with --until-done, print its progress (with the ETA) until it ends."""
    from . import output
    from .progress import format_eta

    arguments = {"type": "stream", **_parse_arguments(args.arguments)}
    job_id = client.execute("job-start", arguments)["id"]
    if not args.until_done:
        if args.output == "json":
            print(json.dumps({"id": job_id}, indent=4))
        else:
            print(f"started job {job_id}")
        return 0
    while True:
        event = client.next_event()
        data = event.get("data", {})
        if data.get("id") != job_id:
            continue
        if event["event"] == "JOB_PROGRESS":
            if args.output == "human":
                total = data["total"] or 1
                rate = data.get("bytes-per-second") or 0
                print(
                    f"stream: {100.0 * data['current'] / total:.1f}% "
                    f"({data['current']}/{data['total']} bytes, {rate / 1e6:.1f} MB/s), "
                    f"ETA {format_eta(data.get('eta-seconds'))}"
                )
                sys.stdout.flush()
            continue
        if event["event"] != "JOB_STATUS_CHANGE" or data["status"] not in (
            "concluded",
            "failed",
            "cancelled",
        ):
            continue
        if args.output == "json":
            print(json.dumps({"id": job_id, "status": data["status"], **data}, indent=4))
        else:
            print(f"status: {data['status']}")
            if data.get("result") is not None:
                print(output.ctl_human(data["result"]))
        if data.get("error"):
            print(f"qed: {args.socket}: job {job_id} failed: {data['error']}", file=sys.stderr)
        return 0 if data["status"] == "concluded" else 1


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ControlCommandError as exc:
        if exc.error_class != "CommandNotFound":
            raise
        raise UsageError(
            f"unknown control command {exc.command!r} "
            f"(try: qed ctl {shlex.quote(args.socket)} help)"
        ) from None


QUIT_WAIT = 60.0  # seconds `qed ctl quit` waits for the server to be gone


def _wait_gone(client: ControlClient, pid: int | None) -> None:
    """After ``quit``: close this control connection (the server waits for its control
    clients before it exits) and return once the server process is gone, as a script
    that starts the next server on the same socket right after expects. A server on
    another machine, or not ours to signal, is not waited for; one that lingers past
    QUIT_WAIT is an error."""
    client.close()
    deadline = time.monotonic() + QUIT_WAIT
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if _zombie(pid):
            return  # exited; its parent has not reaped it yet
        time.sleep(0.01)
    if pid is not None:
        raise QedError(f"the server (pid {pid}) did not exit within {QUIT_WAIT:.0f} s")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _run(args: argparse.Namespace) -> int:
    from . import output

    client = ControlClient(args.socket)
    if args.command in ("defrag", "stream"):
        try:
            if args.command == "defrag":
                return _ctl_defrag(client, args)
            return _ctl_stream(client, args)
        finally:
            client.close()
    try:
        pid = client.execute("query-status").get("pid") if args.command == "quit" else None
        result = client.execute(args.command, _parse_arguments(args.arguments))
        if args.command == "quit":
            _wait_gone(client, pid)
        if args.output == "json":
            print(json.dumps(result, indent=4))
        elif args.command in ("help", "query-commands"):
            sys.stdout.write(output.control_reference_human(result) + CLIENT_DEFRAG)
        elif result not in ({}, None):
            print(output.ctl_human(result))
        if args.wait and args.command == "job-start":
            job_id = result["id"]
            while True:
                event = client.next_event()
                data = event.get("data", {})
                if data.get("id") != job_id:
                    continue
                if args.output == "json":
                    print(json.dumps(event))
                elif event["event"] == "JOB_PROGRESS":
                    print(f"progress: {data['current']}/{data['total']}")
                else:
                    print(f"status: {data['status']}")
                sys.stdout.flush()
                if event["event"] == "JOB_STATUS_CHANGE" and data["status"] in (
                    "concluded",
                    "failed",
                    "cancelled",
                ):
                    if args.output == "human" and data.get("result") is not None:
                        print(output.ctl_human(data["result"]))
                    if data.get("error"):
                        print(
                            f"qed: {args.socket}: job {job_id} failed: {data['error']}",
                            file=sys.stderr,
                        )
                    return 0 if data["status"] == "concluded" else 1
    finally:
        client.close()
    return 0
