"""HTTP(S) remote images (store.http) against a fault-injecting server in a thread:
every fault ends in the bytes of the image or in a StoreError that names the URL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from remotekit import FaultyHttpServer, KiB, MiB, pattern

from qedkit.errors import ReadOnlyError, StoreError, UnsupportedFeatureError
from qedkit.store.http import display_url, request_target
from qedkit.store.remote import RemoteOptions, RemoteStore, RetryPolicy
from qedkit.store.url import open_url, resolve_backing_url

T = TypeVar("T")

RETRY = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05, timeout=5)
AT = 128 * KiB  # an offset in block 2 (block 0 comes with the open)
OPTIONS = RemoteOptions(block_size=64 * KiB, cache_bytes=4 * MiB, retry=RETRY)
DATA = pattern(4 * MiB)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def server() -> Iterator[FaultyHttpServer]:
    with FaultyHttpServer(DATA) as srv:
        yield srv


def run_closing(store: RemoteStore, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, then close ``store`` (also when ``work`` raised)."""

    async def go() -> T:
        try:
            return await work
        finally:
            await store.close()

    return run(go())


def store_for(server: FaultyHttpServer, options: RemoteOptions = OPTIONS) -> RemoteStore:
    return open_url(server.url, options=options)


def _read_fails_after(
    server: FaultyHttpServer, change: Callable[[], None], offset: int, match: str
) -> StoreError:
    """Open a store on ``server`` and learn the size, then ``change()`` the server: a
    read of 10 bytes at ``offset`` must fail with a StoreError matching ``match``
    (returned). The store is closed again."""
    store = store_for(server)

    async def go() -> StoreError:
        await store.size()
        change()
        with pytest.raises(StoreError, match=match) as info:
            await store.read(offset, 10)
        await store.close()
        return info.value

    return run(go())


async def read_all(store: RemoteStore, chunk: int = 256 * KiB) -> bytes:
    out = bytearray()
    size = await store.size()
    for pos in range(0, size, chunk):
        out += await store.read(pos, chunk)
    return bytes(out)


# ---- plain reads --------------------------------------------------------------------


def test_the_whole_image_reads_back_over_keep_alive_connections(
    server: FaultyHttpServer,
) -> None:
    store = store_for(server)
    assert run_closing(store, read_all(store)) == DATA
    ranges = [h["Range"] for _, h in server.requests]
    assert ranges[0] == "bytes=0-65535"  # the size (Content-Range) and the first block
    assert all(h.get("Accept-Encoding") == "identity" for _, h in server.requests)
    assert store.statistics().requests <= len(DATA) // (64 * KiB) // 4


def test_a_presigned_url_goes_out_unchanged(server: FaultyHttpServer) -> None:
    server.path = "/bucket/disk.raw?X-Amz-Signature=ab%2Fcd&X-Amz-Expires=300&x=a/b"
    store = store_for(server)
    assert run_closing(store, store.read(MiB, 100)) == DATA[MiB : MiB + 100]
    assert {path for path, _ in server.requests} == {server.path}
    assert store.name == f"http://127.0.0.1:{server.port}/bucket/disk.raw?..."  # no secret


def test_user_and_password_in_the_url_become_basic_auth(server: FaultyHttpServer) -> None:
    url = server.url.replace("http://", "http://ann:s%3Acret@")
    store = open_url(url, options=OPTIONS)

    async def go() -> None:
        assert await store.read(0, 4) == DATA[:4]
        await store.close()

    run(go())
    assert server.requests[0][1]["Authorization"] == "Basic YW5uOnM6Y3JldA=="  # ann:s:cret
    assert "cret" not in store.name


def test_a_chunked_body_without_content_length_is_read(server: FaultyHttpServer) -> None:
    server.faults.no_content_length = True
    store = store_for(server)
    assert run_closing(store, read_all(store)) == DATA


# ---- transient faults ---------------------------------------------------------------


def test_a_5xx_burst_shorter_than_the_retry_budget_is_invisible(
    server: FaultyHttpServer,
) -> None:
    store = store_for(server)

    async def go() -> bytes:
        await store.size()
        server.faults.statuses = [503, 500, 429]  # attempts - 1 failures
        try:
            return await store.read(AT, 1000)
        finally:
            await store.close()

    assert run(go()) == DATA[AT : AT + 1000]
    assert store.statistics().retries == 3


def test_a_5xx_burst_longer_than_the_retry_budget_fails_naming_the_url(
    server: FaultyHttpServer,
) -> None:
    store = store_for(server)

    async def go() -> None:
        await store.size()
        server.faults.statuses = [503] * RETRY.attempts
        with pytest.raises(StoreError) as info:
            await store.read(AT, 1000)
        message = str(info.value)
        assert message.startswith(server.url + ": read of 65536 bytes at offset 131072 failed")
        assert "after 4 attempts" in message and "HTTP 503" in message
        assert await store.read(AT, 1000) == DATA[AT : AT + 1000]  # the burst is over: reads work
        await store.close()

    run(go())


def test_a_truncated_response_is_retried_then_reported(server: FaultyHttpServer) -> None:
    store = store_for(server)

    async def go() -> None:
        await store.size()
        server.faults.truncate_at = 1000
        with pytest.raises(StoreError, match=r"truncated response: 1000 of 65536 bytes"):
            await store.read(AT, 10)
        server.faults.truncate_at = None
        assert await store.read(AT, 10) == DATA[AT : AT + 10]
        await store.close()

    run(go())


def test_a_server_that_stops_mid_read_fails_clearly_and_works_once_back(
    server: FaultyHttpServer,
) -> None:
    store = store_for(server)
    errors: list[BaseException] = []

    async def go() -> None:
        assert await store.read(0, 100) == DATA[:100]
        server.faults.stall_after = 5000  # the next answer stops after 5000 bytes
        server.stalled.clear()
        reading = asyncio.ensure_future(store.read(2 * MiB, 100))
        await asyncio.to_thread(server.stalled.wait, 10)
        server.stop()  # gone, with the answer half sent
        try:
            await reading
        except StoreError as exc:
            errors.append(exc)
        server.faults.stall_after = None
        server.release.clear()
        server.start()  # back on the same port
        assert await store.read(2 * MiB, 100) == DATA[2 * MiB : 2 * MiB + 100]
        await store.close()

    run(go())
    assert len(errors) == 1
    message = str(errors[0])
    assert message.startswith(server.url + ": read of 65536 bytes at offset 2097152 failed")
    assert "cannot connect: Connection refused" in message


def test_a_server_that_never_answered_fails_fast(server: FaultyHttpServer) -> None:
    server.stop()
    store = store_for(server)
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"opening failed after 2 attempts.*Connection refused"):
        run(store.size())
    assert time.monotonic() - started < 2
    run(store.close())


def test_a_server_that_says_nothing_times_out(server: FaultyHttpServer) -> None:
    quick = RemoteOptions(
        block_size=64 * KiB, retry=RetryPolicy(attempts=2, first_delay=0.01, timeout=0.3)
    )
    store = store_for(server, quick)

    async def go() -> None:
        await store.size()
        server.faults.stall_after = 0
        server.stalled.clear()
        with pytest.raises(StoreError, match=r"no answer within 0.3 s"):
            await store.read(AT, 10)
        server.release.set()
        await store.close()

    run(go())


# ---- permanent faults ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, r"not found \(HTTP 404 Not Found\)"),
        (410, r"not found \(HTTP 410 Gone\)"),
        (403, r"access denied \(HTTP 403 Forbidden; an expired or wrong signature\?\)"),
        (416, r"range not satisfiable \(HTTP 416"),
        (302, r"redirected \(HTTP 302 Found\)"),
        (400, r"unexpected answer HTTP 400 Bad Request"),
    ],
)
def test_a_permanent_http_error_is_reported_at_once(
    server: FaultyHttpServer, status: int, message: str
) -> None:
    def fail_from_now_on() -> None:
        server.faults.always_status = status

    error = _read_fails_after(server, fail_from_now_on, AT, message)
    assert str(error).startswith(server.url + ": ")
    assert len(server.requests) == 2  # the open and one attempt: no retries


def test_a_missing_image_fails_at_open(server: FaultyHttpServer) -> None:
    server.faults.always_status = 404
    store = store_for(server)
    with pytest.raises(StoreError, match=r"disk.raw: not found \(HTTP 404"):
        run(store.size())
    run(store.close())


def test_a_changed_remote_size_is_reported(server: FaultyHttpServer) -> None:
    def grow() -> None:
        server.faults.size_claim = len(DATA) + 4096  # Content-Range says so

    _read_fails_after(server, grow, AT, r"remote size changed from 4194304 to 4198400")


def test_a_shrunk_image_answering_416_is_reported_as_a_size_change(
    server: FaultyHttpServer,
) -> None:
    def shrink() -> None:
        server.data = DATA[:MiB]  # same ETag: only the size tells

    _read_fails_after(server, shrink, 3 * MiB, r"remote size changed from 4194304 to 1048576")


def test_an_image_replaced_by_another_of_the_same_size_is_reported(
    server: FaultyHttpServer,
) -> None:
    store = store_for(server)

    async def go() -> None:
        assert await store.read(0, 10) == DATA[:10]
        server.replace(bytes(len(DATA)))  # a new ETag
        with pytest.raises(StoreError, match="changed since it was opened"):
            await store.read(3 * MiB, 10)
        await store.close()

    run(go())
    assert server.requests[-1][1]["If-Match"] == '"v1"'


def test_a_weak_etag_is_not_sent_as_if_match(server: FaultyHttpServer) -> None:
    server.faults.weak_etag = True
    store = store_for(server)
    assert run(store.read(0, 10)) == DATA[:10]
    run(store.close())
    assert all("If-Match" not in headers for _, headers in server.requests)


def test_a_server_that_ignores_range_is_refused_clearly(server: FaultyHttpServer) -> None:
    server.faults.ignore_range = True
    store = store_for(server)
    with pytest.raises(StoreError, match="the server ignores Range requests"):
        run(store.size())
    run(store.close())


def test_a_server_that_starts_ignoring_range_is_refused_clearly(
    server: FaultyHttpServer,
) -> None:
    def start_ignoring() -> None:
        server.faults.ignore_range = True

    _read_fails_after(
        server, start_ignoring, AT, "ignored the Range of a request for bytes 131072-"
    )


def test_an_empty_remote_image_has_size_zero() -> None:
    with FaultyHttpServer(b"") as srv:
        store = store_for(srv)
        assert run(store.size()) == 0
        assert run(store.read(0, 10)) == b""
        run(store.close())


def test_an_image_smaller_than_a_block_reads_back() -> None:
    with FaultyHttpServer(b"tiny image") as srv:
        store = store_for(srv)
        assert run(store.read(0, 100)) == b"tiny image"
        run(store.close())


def test_an_image_within_one_block_from_a_server_that_ignores_range_reads_back() -> None:
    with FaultyHttpServer(b"tiny image") as srv:
        srv.faults.ignore_range = True  # 200 and the whole image: all there is
        store = store_for(srv)
        assert run(store.read(2, 100)) == b"ny image"
        run(store.close())
        assert len(srv.requests) == 1


# ---- URLs ---------------------------------------------------------------------------


def test_urls_are_shown_without_secrets() -> None:
    assert display_url("https://u:pw@h:8/a/b?sig=1#f") == "https://u@h:8/a/b?..."
    assert display_url("http://h/a") == "http://h/a"


def test_the_request_target_is_the_path_and_query_as_written() -> None:
    assert request_target("http://h:1/a%2fb/c?x=%2F&y") == "/a%2fb/c?x=%2F&y"
    assert request_target("http://h") == "/"
    assert request_target("http://h?q=1") == "/?q=1"
    assert request_target("http://h/p#frag") == "/p"


def test_open_url_refuses_writes_and_unknown_protocols() -> None:
    with pytest.raises(ReadOnlyError, match="remote images are read-only"):
        open_url("http://127.0.0.1:1/x", readonly=False)
    with pytest.raises(UnsupportedFeatureError, match="protocol 'ftp' is not supported"):
        open_url("ftp://h/x")
    with pytest.raises(UnsupportedFeatureError, match="nbds"):
        open_url("nbds://h/x")


def test_relative_backing_names_resolve_against_the_url() -> None:
    base = "http://h:8/images/v1/overlay.qed?X-Sig=abc/def"
    assert resolve_backing_url(base, "base.raw") == "http://h:8/images/v1/base.raw"
    assert resolve_backing_url(base, "../base.raw") == "http://h:8/images/base.raw"
    assert resolve_backing_url(base, "my disk.raw") == "http://h:8/images/v1/my%20disk.raw"
    assert resolve_backing_url(base, "nbd://other/x") == "nbd://other/x"
    assert resolve_backing_url(base, "/srv/base.raw") == "/srv/base.raw"  # as QEMU: a file
    from qedkit.errors import BackingFileError

    with pytest.raises(BackingFileError, match="NBD exports have no directories"):
        resolve_backing_url("nbd://h/overlay", "base.raw")


def test_requests_run_on_worker_threads_and_overlap() -> None:
    """Readahead keeps more than one request in flight (the HTTP source's threads)."""
    active = 0
    peak = 0
    lock = threading.Lock()
    with FaultyHttpServer(DATA) as srv:
        store = store_for(srv)
        from qedkit.store import http as store_http

        real_get = store_http.HttpSource._get

        def counted(self: Any, offset: int, length: int) -> list[bytes]:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            try:
                time.sleep(0.01)
                return real_get(self, offset, length)
            finally:
                with lock:
                    active -= 1

        store_http.HttpSource._get = counted  # type: ignore[method-assign]
        try:
            assert run(read_all(store)) == DATA
        finally:
            store_http.HttpSource._get = real_get  # type: ignore[method-assign]
            run(store.close())
    assert peak >= 2
