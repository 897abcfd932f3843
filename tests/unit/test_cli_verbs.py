"""The ``qed`` verbs as modules: each verb's arguments beside its handler
(``qedkit.cli.<verb>``: ``add_arguments`` and ``run``), main only the verb table.

``qed --help`` lists every verb without importing any verb module or the engine; a
verb's own ``--help`` and usage errors print ``usage: qed VERB ...``, exit 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qedkit.cli import main as cli_main
from qedkit.cli.main import VERBS, main, verb_module, verb_parser

IMPORTED = (
    "import sys, runpy\n"
    "sys.argv = ['qed', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('qedkit.cli.main', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stdout.flush()\n"
    "print('\\nMODULES', *sorted(m for m in sys.modules if m.startswith('qedkit')))\n"
)


def modules_after(*argv: str) -> tuple[str, set[str]]:
    """Run ``qed ARGV`` in a fresh interpreter: its stdout and the qedkit modules loaded."""
    p = subprocess.run(
        [sys.executable, "-c", IMPORTED, *argv], capture_output=True, text=True, timeout=60
    )
    out, _, mods = p.stdout.rpartition("\nMODULES")
    return out, set(mods.split())


@pytest.mark.parametrize("name", list(VERBS))
def test_every_verb_module_has_its_arguments_and_its_handler(name: str) -> None:
    module = verb_module(name)
    assert callable(module.add_arguments) and callable(module.run)
    assert module.__doc__ and f"qed {name}" in module.__doc__.split("\n\n")[0]


def test_top_level_help_lists_every_verb_without_importing_any() -> None:
    out, mods = modules_after("--help")
    for name, summary in VERBS.items():
        assert f"    {name:<10}{summary}" in out, out
    verbs = {f"qedkit.cli.{name}" for name in VERBS}
    assert not mods & verbs, mods & verbs
    assert not any(m.startswith(("qedkit.engine", "qedkit.jobs", "qedkit.nbd")) for m in mods)


@pytest.mark.parametrize("name", ["info", "convert", "frag", "serve", "io"])
def test_a_verb_s_usage_imports_that_verb_alone_and_no_engine(name: str) -> None:
    out, mods = modules_after(name, "--help")
    assert out.startswith(f"usage: qed {name} ")
    cli = {m for m in mods if m.startswith("qedkit.cli.")}
    assert cli == {"qedkit.cli.common", f"qedkit.cli.{name}"}  # main runs as __main__
    assert not any(m.startswith(("qedkit.engine", "qedkit.jobs", "qedkit.nbd")) for m in mods)


def test_ctl_imports_the_control_tables_only_for_its_help() -> None:
    """``qed ctl --help`` lists the commands and job types from nbd.control and the
    job classes; parsing a ``qed ctl`` command line imports neither."""
    out, mods = modules_after("ctl", "--help")
    assert "job types (qed ctl SOCKET job-start" in out
    assert "qedkit.nbd.control" in mods
    _, mods = modules_after("ctl", "--bogus", "s.sock", "query-status")
    assert {m for m in mods if m.startswith("qedkit.cli.")} == {
        "qedkit.cli.common",
        "qedkit.cli.ctl",
    }
    assert not any(m.startswith(("qedkit.engine", "qedkit.jobs", "qedkit.nbd")) for m in mods)


@pytest.mark.parametrize("name", list(VERBS))
def test_verb_help_is_the_verb_s_own(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: qed {name} ")
    assert VERBS[name] in out


def test_verb_parser_is_the_one_main_uses() -> None:
    parser = verb_parser("map")
    args = parser.parse_args(["-s", "4k", "x.qed"])
    assert (args.start_offset, args.filename) == (4096, "x.qed")
    assert isinstance(parser, argparse.ArgumentParser) and parser.prog == "qed map"


@pytest.mark.parametrize(
    "argv", [[], ["bogus"], ["--bogus"]], ids=["nothing", "unknown-verb", "unknown-flag"]
)
def test_top_level_errors_print_the_top_level_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qed [-h] [--version] COMMAND ...\n")
    assert "\nqed: error: " in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("qed (qedkit) ")


def test_ctl_takes_options_after_its_key_value_arguments() -> None:
    module, args = cli_main.parse(["ctl", "s.sock", "defrag", "clusters=8", "--until-done"])
    assert module is verb_module("ctl")
    assert (args.socket, args.command, args.arguments, args.until_done) == (
        "s.sock",
        "defrag",
        ["clusters=8"],
        True,
    )


def test_the_installed_entry_point_runs_a_verb(new_image: Callable[..., Path]) -> None:
    path = new_image()
    p = subprocess.run(
        [sys.executable, "-m", "qedkit", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == "qed"
