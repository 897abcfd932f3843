"""One size parser: every size a user types (``qed create``'s SIZE, ``-o cluster_size``,
``qed map -s/-l``, ``qed io`` offsets and lengths, the ``rate`` of the scrub and defrag
jobs, the benchmarks' ``--size``) is read by ``qedkit.format.sizes.parse_size``, so each
accepts the same forms and refuses the same bad ones with the same message. The forms
themselves are tested in test_sizes.py."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import qedkit
from qedkit.cli.main import main
from qedkit.errors import InvalidRequestError
from qedkit.format.sizes import parse_size
from qedkit.jobs.check import ScrubJob
from qedkit.jobs.defrag import DefragJob

KiB, MiB = 1 << 10, 1 << 20
GOOD = ["4096", "4k", "4K", "0x1000", "1.5k", "1M", "1m", "4096b"]
BAD = ["1X", "1KB", "-1", "1 k", "0x10k", "1.5"]
REPO = Path(__file__).resolve().parents[2]


def message(text: str) -> str:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    return str(info.value)


# ---- the command line -------------------------------------------------------------------


@pytest.mark.parametrize("text", GOOD)
def test_create_size_reads_every_form_and_rounds_up_to_sectors(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.qed"
    assert main(["create", "-q", str(path), text]) == 0
    with qedkit.open(str(path), readonly=True) as img:
        assert img.size == -(-parse_size(text) // 512) * 512


@pytest.mark.parametrize("text", BAD)
def test_create_size_errors_are_the_parser_s(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.qed"
    assert main(["create", str(path), text]) == 1
    assert capsys.readouterr().err == f"qed: {message(text)}\n"
    assert not path.exists()


@pytest.mark.parametrize(("text", "value"), [("4k", 4 * KiB), ("0x10000", 64 * KiB), ("1M", MiB)])
def test_create_cluster_size_option_reads_sizes(
    tmp_path: Path, text: str, value: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.qed"
    assert main(["create", "-q", "-o", f"cluster_size={text}", str(path), "16M"]) == 0
    with qedkit.open(str(path), readonly=True) as img:
        assert img.info().cluster_size == value


def test_create_cluster_size_option_error_is_the_parser_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create", "-o", "cluster_size=64x", str(tmp_path / "a.qed"), "16M"]) == 1
    assert capsys.readouterr().err == f"qed: {message('64x')}\n"


@pytest.mark.parametrize("text", GOOD)
def test_map_offsets_read_every_form(
    new_image: Callable[..., Path], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = new_image(size=4 * MiB)
    assert main(["map", "--output=json", "-s", text, "-l", text, str(path)]) == 0
    assert f'"start": {parse_size(text)}' in capsys.readouterr().out


@pytest.mark.parametrize("text", BAD)
def test_map_offset_errors_are_usage_errors_of_map(
    new_image: Callable[..., Path], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["map", "-s", text, str(new_image())])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qed map ")
    assert err.endswith(f"qed map: error: argument -s/--start-offset: {message(text)}\n")


@pytest.mark.parametrize("text", GOOD)
def test_io_offsets_and_lengths_read_every_form(
    new_image: Callable[..., Path], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    n = parse_size(text)
    assert main(["io", "-c", f"write -P 7 {text} {text}", str(new_image(size=4 * MiB))]) == 0
    assert capsys.readouterr().out == f"wrote {n}/{n} bytes at offset {n}\n"


@pytest.mark.parametrize("text", BAD)
def test_io_size_errors_are_the_parser_s(
    new_image: Callable[..., Path], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, line = new_image(), f"read 0 '{text}'"
    assert main(["io", "-c", line, str(path)]) == 1
    assert capsys.readouterr().err == f"qed: {path}: {line!r}: {message(text)}\n"


# ---- job arguments ------------------------------------------------------------------------

JOBS = [ScrubJob, DefragJob]


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.type)
@pytest.mark.parametrize("text", GOOD)
def test_job_rates_read_every_form(job: Any, text: str) -> None:
    assert job.parse_arguments({"rate": text})["rate"] == parse_size(text)


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.type)
def test_job_rates_given_as_json_numbers_are_bytes(job: Any) -> None:
    assert job.parse_arguments({"rate": 52428800})["rate"] == 50 * MiB
    assert job.parse_arguments({})["rate"] == 0


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.type)
@pytest.mark.parametrize("text", BAD)
def test_job_rate_errors_are_the_parser_s(job: Any, text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        job.parse_arguments({"rate": text})
    assert str(info.value) == f"{job.type}: {message(text)}"


# ---- the benchmarks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_common", REPO / "bench" / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_bench_common", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text", ["2G", "512M", "1.5G", "0x100000"])
def test_bench_sizes_are_the_parser_s(bench_common: ModuleType, text: str) -> None:
    assert bench_common.parse_size(text) == parse_size(text)


@pytest.mark.parametrize("text", BAD)
def test_bench_size_errors_are_the_parser_s(bench_common: ModuleType, text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as info:
        bench_common.parse_size(text, 1)
    assert str(info.value) == message(text)
