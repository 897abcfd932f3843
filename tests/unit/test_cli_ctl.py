"""``qed ctl --help`` and the control socket's ``help``: the list of control commands
and job types with their arguments comes from the code that defines them (the table
nbd.control.COMMANDS and each Job class's ``argument_spec``), not from a copy.
The live server's side is tested in tests/e2e/test_e2e_ctl_help.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qedkit.cli.main import main
from qedkit.cli.output import control_reference_human
from qedkit.jobs.base import Argument
from qedkit.jobs.check import ScrubJob
from qedkit.jobs.defrag import DefragJob
from qedkit.nbd.control import COMMANDS, JOB_TYPES, ControlServer, describe
from qedkit.nbd.server import NbdServer


def ctl_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["ctl", "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_ctl_help_lists_every_command_and_job_type_with_its_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = ctl_help(capsys)
    assert out.startswith("usage: qed ctl ")
    assert control_reference_human(describe()) in out
    lines = out.splitlines()
    for command in COMMANDS:
        assert any(line.startswith(f"  {command.name}") for line in lines), command.name
        for argument in command.arguments:
            assert any(line.split()[:1] == [argument.name] for line in lines), argument
    jobs = lines[lines.index("job types (qed ctl SOCKET job-start type=TYPE [KEY=VALUE ...]):") :]
    for job in JOB_TYPES:
        at = next(n for n, x in enumerate(jobs) if x.split()[:1] == [job.type])
        assert job.summary in jobs[at] + jobs[at + 1]
        for argument in job.argument_spec:
            assert f"[{argument.name}=" in jobs[at], (jobs[at], argument)


def test_ctl_help_follows_the_job_classes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new argument in a Job class's spec is in the help at once."""
    extra = Argument("window", "size", "a new argument, for this test")
    monkeypatch.setattr(DefragJob, "argument_spec", (*DefragJob.argument_spec, extra))
    out = ctl_help(capsys)
    assert " [zero-detect=on|off] [window=SIZE]" in out
    assert f"      {'window':<13}a new argument, for this test" in out  # zero-detect's width


def test_describe_is_the_command_table_and_the_job_specs() -> None:
    reference = describe()
    assert [c["name"] for c in reference["commands"]] == [c.name for c in COMMANDS]
    scrub = next(j for j in reference["job-types"] if j["type"] == "scrub")
    assert scrub == {
        "type": "scrub",
        "help": ScrubJob.summary,
        "arguments": [
            {
                "name": "rate",
                "type": "size",
                "required": False,
                "help": ScrubJob.argument_spec[0].help,
            }
        ],
    }
    job_start = next(c for c in reference["commands"] if c["name"] == "job-start")
    assert [(a["name"], a["required"]) for a in job_start["arguments"]] == [
        ("type", True),
        ("export", False),
        ("id", False),
    ]


def test_every_command_in_the_table_has_a_handler(tmp_path: Path) -> None:
    control = ControlServer(NbdServer([]), str(tmp_path / "ctl.sock"))
    assert list(control.commands) == [c.name for c in COMMANDS]
    assert all(callable(h) for h in control.commands.values())
    assert set(control.jobs.types) == {j.type for j in JOB_TYPES}


def test_job_argument_checks_use_the_spec() -> None:
    from qedkit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        DefragJob.parse_arguments({"bogus": 1})
    assert str(info.value) == (
        "defrag: unknown argument 'bogus' (rate, idle, batch, layout, zero-detect)"
    )
    with pytest.raises(InvalidRequestError) as info:
        ScrubJob.parse_arguments({"bogus": 1})
    assert str(info.value) == "scrub: unknown argument 'bogus' (rate)"


def test_ctl_help_as_a_command(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "qedkit", "ctl", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "job types (qed ctl SOCKET job-start type=TYPE [KEY=VALUE ...]):" in p.stdout
    assert "  defrag [export=EXPORT] [clusters=N] [--until-done]" in p.stdout


def test_ctl_to_no_server_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "nobody.sock"
    assert main(["ctl", str(sock), "help"]) == 1
    assert capsys.readouterr().err.startswith(f"qed: {sock}: cannot connect: ")
