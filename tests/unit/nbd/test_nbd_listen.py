"""bind_unix: a unix socket path that appears only once something listens on it;
and what a connection accepted on it is given."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from qedkit.errors import QedError
from qedkit.nbd.server import UNIX_SNDBUF, NbdServer, bind_unix


def _connects(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def test_the_path_accepts_as_soon_as_it_exists_and_no_temporary_is_left(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    with bind_unix(path) as sock:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert _connects(path)
        assert sock.getsockname()  # bound (under the temporary name, since renamed)
    assert sorted(os.listdir(tmp_path)) == ["a.sock"]


def test_the_rename_comes_after_listen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only window a client can see: when the final name appears, the socket
    behind it already listens."""
    path = str(tmp_path / "b.sock")
    seen: list[bool] = []
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        seen.append(_connects(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with bind_unix(path):
        pass
    assert seen == [True]


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with bind_unix(path):
        assert _connects(path)
        with pytest.raises(QedError, match="in use by a running server"):
            bind_unix(path)


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    path.write_text("keep me")
    with pytest.raises(QedError, match="is not a socket"):
        bind_unix(str(path))
    assert path.read_text() == "keep me"


def test_a_path_too_long_for_a_temporary_twin_is_bound_directly(tmp_path: Path) -> None:
    # 107 bytes fits sun_path (with its NUL); the temporary name would not.
    room = 107 - len(str(tmp_path)) - 1
    path = str(tmp_path / ("e" * room))
    assert len(path) == 107
    with bind_unix(path):
        assert _connects(path)
    assert os.listdir(tmp_path) == ["e" * room]


def test_a_failed_bind_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        bind_unix(str(tmp_path / "missing" / "f.sock"))
    assert os.listdir(tmp_path) == []


def test_a_unix_connection_gets_a_send_buffer_that_holds_large_replies(tmp_path: Path) -> None:
    """SO_SNDBUF raised on every accepted unix connection, so that a 256 KiB READ
    reply goes out in one send (the kernel doubles the value, capped by wmem_max)."""
    path = str(tmp_path / "s.sock")

    async def go() -> int:
        server = NbdServer([])
        await server.listen_unix(path)
        _, writer = await asyncio.open_unix_connection(path)
        try:
            for _ in range(500):
                if server.connections:
                    break
                await asyncio.sleep(0.01)
            (connection,) = server.connections.values()
            assert connection.transport is not None
            sock = connection.transport.get_extra_info("socket")
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        finally:
            writer.close()
            await server.stop()

    got = asyncio.run(go())
    cap = int(Path("/proc/sys/net/core/wmem_max").read_text())
    assert got >= 2 * min(UNIX_SNDBUF, cap)
    assert got > 256 * 1024
