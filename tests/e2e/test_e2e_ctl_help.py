"""``qed ctl SOCKET help`` / ``query-commands``: a running server lists every control
command and every job type with their arguments, from the code that defines them
(nbd.control.COMMANDS, each Job class's ``argument_spec``), and an unknown command
points at ``help`` instead of reading like a file name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from e2ekit import MiB, ServerFactory, Shadow, qed_argv, run
from qedtest import Qemu

from qedkit.cli.ctl import ControlClient
from qedkit.cli.output import control_reference_human
from qedkit.errors import QedError
from qedkit.nbd.control import COMMANDS, JOB_TYPES, describe

Disk = Callable[..., tuple[Path, Shadow]]


def test_help_and_query_commands_return_the_code_s_tables(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image, control=True)
    client = ControlClient(str(server.control))
    try:
        reference = client.execute("help")
        assert client.execute("query-commands") == reference == describe(JOB_TYPES)
    finally:
        client.close()
    assert [c["name"] for c in reference["commands"]] == [c.name for c in COMMANDS]
    assert [j["type"] for j in reference["job-types"]] == [
        "check",
        "scrub",
        "defrag",
        "stream",
        "convert-to-qed",
    ]
    defrag = reference["job-types"][2]
    assert [a["name"] for a in defrag["arguments"]] == [
        "rate",
        "idle",
        "batch",
        "layout",
        "zero-detect",
    ]
    stream = reference["job-types"][3]
    assert [a["name"] for a in stream["arguments"]] == ["rate", "chunk"]
    server.finish(qemu, shadow)


def test_every_listed_command_is_known_to_the_server(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    """No command in the list is answered CommandNotFound (the table and the
    handlers cannot drift apart)."""
    image, shadow = disk(4 * MiB)
    server = serve(image, control=True)
    client = ControlClient(str(server.control))
    try:
        for command in describe()["commands"]:
            if command["name"] == "quit":
                continue
            try:
                client.execute(command["name"], {"id": "none"})
            except QedError as exc:  # refused for its arguments, never as unknown
                assert "CommandNotFound" not in str(exc), command
    finally:
        client.close()
    server.finish(qemu, shadow)


def test_qed_ctl_help_prints_commands_and_job_types(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image, control=True)
    sock = str(server.control)
    human = run(qed_argv("ctl", sock, "help"), 30).ok().stdout
    assert human.startswith(control_reference_human(describe()))
    for line in (
        "  job-start type=TYPE [export=EXPORT] [id=ID] [KEY=VALUE ...]",
        "  defrag [rate=SIZE] [idle=N] [batch=N] [layout=packed|identity] [zero-detect=on|off]",
        "  scrub [rate=SIZE]   read every data cluster, report what cannot be read",
        "  defrag [export=EXPORT] [clusters=N] [--until-done]",
        "  convert-to-qed [rate=SIZE] [reclaim=compact|punch]",
    ):
        assert line in human.splitlines(), human
    as_json = run(qed_argv("ctl", "--output=json", sock, "query-commands"), 30).ok().stdout
    assert json.loads(as_json) == describe()
    server.finish(qemu, shadow)


def test_unknown_control_command_points_at_help(
    serve: ServerFactory, disk: Disk, qemu: Qemu
) -> None:
    image, shadow = disk(4 * MiB)
    server = serve(image, control=True)
    sock = str(server.control)
    result = run(qed_argv("ctl", sock, "frobnicate", "x=1"), 30)
    assert result.returncode == 1
    hint = f"(try: qed ctl {sock} help)"
    assert result.stderr == f"qed: unknown control command 'frobnicate' {hint}\n"
    assert result.stdout == ""
    server.finish(qemu, shadow)
