"""The README's command-line section is true: its block of ``qed`` lines runs as
written, top to bottom, in an empty directory (``qed serve --fork`` included, stopped
by the block's own ``quit``), and its table of job types names every job type and
argument the control socket has."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from qedkit.cli.ctl import ControlClient
from qedkit.errors import QedError
from qedkit.nbd.control import JOB_TYPES

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("## The command line")
    return text[start : text.index("\n## ", start + 1)]


def command_block() -> list[str]:
    match = re.search(r"```sh\n(.*?)```", section(), re.S)
    assert match is not None
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_every_verb_is_in_the_command_line_section() -> None:
    from qedkit.cli.main import VERBS

    lines = command_block()
    for verb in VERBS:
        assert any(line.startswith(f"qed {verb} ") for line in lines), verb


def test_the_command_line_section_runs_as_written(tmp_path: Path) -> None:
    script = 'set -e\nqed() { "$QED_PYTHON" -m qedkit "$@"; }\n' + "\n".join(
        f"echo '+ {n}'\n{line}" for n, line in enumerate(command_block())
    )
    env = {**os.environ, "QED_PYTHON": sys.executable}
    try:
        p = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _stop_stray_server(tmp_path / "ctl.sock")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "ctl.sock").exists() and not (tmp_path / "nbd.sock").exists()
    assert (tmp_path / "map.svg").read_bytes().startswith(b"<?xml")


def _stop_stray_server(control: Path) -> None:
    """If the block failed between its serve and its quit, kill the server it left."""
    if not control.exists():
        return
    with contextlib.suppress(QedError, OSError):
        client = ControlClient(str(control))
        try:
            pid = client.execute("query-status")["pid"]
        finally:
            client.close()
        os.kill(pid, signal.SIGKILL)


def test_the_job_type_table_names_every_job_type_and_argument() -> None:
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `([a-z-]+)` \|[^|]*\|(.*)\|$", section(), re.M)
    }
    assert set(rows) == {j.type for j in JOB_TYPES}
    for job in JOB_TYPES:
        for argument in job.argument_spec:
            assert f"`{argument.name}=" in rows[job.type], (job.type, argument.name)
