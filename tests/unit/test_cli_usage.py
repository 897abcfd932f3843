"""Usage errors of a verb are the verb's: ``qed info --bogus`` prints ``usage: qed
info ...`` and the error, exit 2, not the top-level usage; and ``qed convert`` refuses
a target that is its source before it opens anything."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qedkit.cli.main import VERBS, main

Cli = Callable[..., Any]  # the qed_cli fixture of tests/conftest.py

# A valid command line of each verb, to put a wrong flag into.
VALID = {
    "create": ["x.qed", "1M"],
    "info": ["x.qed"],
    "map": ["x.qed"],
    "check": ["x.qed"],
    "convert": ["x.qed", "y.raw"],
    "compare": ["x.qed", "y.qed"],
    "measure": ["--size", "1G"],
    "resize": ["x.qed", "+1G"],
    "commit": ["x.qed"],
    "rebase": ["-b", "y.qed", "x.qed"],
    "io": ["-c", "flush", "x.qed"],
    "amend": ["-o", "table_size=8", "x.qed"],
    "bench": ["x.qed"],
    "defrag": ["x.qed"],
    "frag": ["x.qed"],
    "mount": ["x.qed", "mnt"],
    "stream": ["x.qed"],
    "serve": ["x.qed"],
    "ctl": ["s.sock", "query-status"],
}


def test_every_verb_has_a_valid_command_line_here() -> None:
    assert set(VALID) == set(VERBS)


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_wrong_flag_prints_the_verb_s_usage(
    verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--bogus", *VALID[verb]])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"usage: qed {verb} ")
    assert captured.err.endswith(f"qed {verb}: error: unrecognized arguments: --bogus\n")


@pytest.mark.parametrize("verb", ["info", "ctl"])
def test_a_wrong_flag_as_a_command(qed_cli: Cli, tmp_path: Path, verb: str) -> None:
    result = qed_cli(verb, "--bogus", *VALID[verb], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"usage: qed {verb} ")
    assert "usage: qed [-h]" not in result.stderr
    assert result.stderr.endswith(f"qed {verb}: error: unrecognized arguments: --bogus\n")


def test_a_bad_flag_value_is_the_verb_s_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "-r", "everything", "x.qed"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qed check ")
    assert "qed check: error: argument -r: invalid choice: 'everything'" in err


# ---- convert onto its own source ---------------------------------------------------------


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture
def written(new_image: Callable[..., Path], qed_cli: Cli) -> Path:
    path = new_image("a.qed")
    qed_cli("io", "-c", "write -P 0x5a 0 128k", path, check=True)
    return path


def same_file_names(path: Path) -> dict[str, str]:
    """Other names for ``path``: relative, through '..', a symbolic and a hard link."""
    d = path.parent
    (d / "sub").mkdir()
    os.symlink(path.name, d / "link.qed")
    os.link(path, d / "hard.qed")
    return {
        "same": str(path),
        "dotted": str(d / "sub" / ".." / path.name),
        "symlink": str(d / "link.qed"),
        "hardlink": str(d / "hard.qed"),
    }


@pytest.mark.parametrize("kind", ["same", "dotted", "symlink", "hardlink"])
@pytest.mark.parametrize("fmt", ["qed", "raw"])
def test_convert_onto_its_source_is_refused_and_touches_nothing(
    written: Path, qed_cli: Cli, kind: str, fmt: str
) -> None:
    target = same_file_names(written)[kind]
    before = fingerprint(written)
    result = qed_cli("convert", "-O", fmt, written, target)
    assert result.returncode == 1
    assert result.stderr == f"qed: {target}: source and target are the same file\n"
    assert "in use" not in result.stderr
    assert fingerprint(written) == before
    check = qed_cli("check", written)
    assert check.returncode == 0, check.stderr


def test_convert_same_file_is_refused_before_opening_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not even a missing source is looked at: the names alone decide."""
    missing = tmp_path / "nope.qed"
    assert main(["convert", "-O", "qed", str(missing), str(missing)]) == 1
    assert capsys.readouterr().err == f"qed: {missing}: source and target are the same file\n"
    assert not missing.exists()


def test_convert_to_another_file_still_works(written: Path, qed_cli: Cli) -> None:
    target = written.with_name("b.raw")
    qed_cli("convert", "-O", "raw", written, target, check=True)
    assert target.read_bytes()[: 128 * 1024] == b"\x5a" * 128 * 1024
