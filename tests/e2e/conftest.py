"""Fixtures of the end-to-end tests of ``qed serve`` (helpers in e2ekit.py).

``serve`` starts ``qed serve`` subprocesses on unique sockets in tmp_path and always
stops them in teardown (SIGTERM, then SIGKILL after a timeout; a server that had to be
killed fails the test). ``disk`` makes a fresh QED image with its raw shadow. Every
test takes ``qemu``: its final judgement (qemu-img check and compare) needs QEMU, so
without it the tests skip on a developer machine and fail under CI=true. ``site`` is
nginx serving the remote tests' raw bases (remotekit.Site), once per test module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2ekit import MiB, ServerFactory, Shadow
from qedtest import Qemu, require_tool, run
from remotekit import Site
from remotekit import site as start_site

import qedkit


@pytest.fixture
def serve(tmp_path: Path, qemu: Qemu) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    yield factory
    problems = factory.cleanup()
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def disk(tmp_path: Path) -> Callable[..., tuple[Path, Shadow]]:
    """``disk(size=16 MiB, name="img.qed")``: a new QED image and its (zero) shadow."""

    def make(size: int = 16 * MiB, name: str = "img.qed") -> tuple[Path, Shadow]:
        path = tmp_path / name
        qedkit.create(str(path), size)
        return path, Shadow(tmp_path / f"{name}.shadow", size)

    return make


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with start_site(tmp_path_factory.mktemp("nginx")) as served:
        yield served


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for localhost and 127.0.0.1, laid out as QEMU's and
    libnbd's x509 directories want it: ca-cert.pem (the same certificate, it signs
    itself), server-cert.pem, server-key.pem."""
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("pki")
    run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            directory / "server-key.pem",
            "-out",
            directory / "server-cert.pem",
        ],
        check=True,
    )
    (directory / "ca-cert.pem").write_bytes((directory / "server-cert.pem").read_bytes())
    return directory
