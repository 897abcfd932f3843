"""HTTP(S) range requests as a remote source (urllib3, on worker threads).

An :class:`HttpSource` reads a remote image with ``GET`` and ``Range: bytes=A-B``
(RFC 9110 §14), through one urllib3 connection pool: HTTP/1.1 keep-alive, so a
stream of requests reuses its connections, and up to ``connections`` requests at
once, each on a worker thread of the source's own pool (urllib3 blocks; the socket
reads release the GIL). ``fetch`` submits the request to a thread at once and hands
back an asyncio future of its pieces, read straight from the socket in
``piece_size`` bytes (the cache's block size), so the cache keeps them uncopied.

Why urllib3 and why threads (docs/DESIGN.md §5 has the comparison): over loopback
from nginx, urllib3 on two threads reads as fast as ``curl -o /dev/null`` while
httpx's AsyncClient reached 0.4x of it; urllib3 is one package without
dependencies. It is imported only when an http(s) URL is opened.

What is checked, on every answer (the size first learnt from the Content-Range total of
the open's request for the first block):

* 206 with ``Content-Range: bytes A-B/TOTAL`` exactly the range asked for, and TOTAL
  the size seen at open (else "the remote size changed"); Content-Length, when sent,
  must agree, and the body must have every byte (a shorter body is retried, then
  reported as truncated). No Content-Length (a chunked body) is fine: the length comes
  from Content-Range.
* 200 to a range request means the server ignores Range: refused with a clear error
  (reading the whole image for each block would be useless), except when the whole
  image fits in the first block (then no other request is ever made).
* A strong ETag seen at open is sent as ``If-Match``: an image replaced by another of
  the same size answers 412, reported as changed, instead of mixing two images.
* 408, 425, 429 and 5xx, a refused, reset or timed out connection are transient
  (retried by the store); 3xx, 401, 403, 404, 410, 416 and anything else are not.

The URL is used as given: its path and query go out as the request target (a
presigned URL's signature included; urllib3 only upper-cases percent escapes, an
equivalent form under RFC 3986 §6.2.2.1). A ``user:password@`` in the URL becomes
HTTP basic authentication. Messages name the URL without its query string and
password (a signature is a secret).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import re
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import StoreError, UnsupportedFeatureError
from ..version import __version__
from .remote import RemoteSource, TransientError

if TYPE_CHECKING:
    import urllib3

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
# RFC 9110 §15.5.9 (408), RFC 8470 (425), RFC 6585 (429): worth another try, as 5xx.
_TRANSIENT_STATUS = frozenset({408, 425, 429})


def display_url(url: str) -> str:
    """``url`` fit for messages: no password, no query string (it may hold a
    signature), no fragment."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}@{host}"
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + ("?..." if parts.query else "")


def request_target(url: str) -> str:
    """The path and query of ``url`` exactly as written (``/`` if it has no path)."""
    rest = url.split("://", 1)[1].split("#", 1)[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    target = rest[cut:]
    if not target.startswith("/"):
        target = "/" + target
    return target


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a transport failure (the cause of a urllib3 error)."""
    import urllib3.exceptions as ux

    if isinstance(exc, ux.NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return f"cannot connect: {cause.strerror}"
        return "cannot connect"
    if isinstance(exc, ux.TimeoutError | TimeoutError):
        return f"no answer within {timeout:g} s"
    for arg in (*getattr(exc, "args", ()), exc.__cause__, exc.__context__):
        if isinstance(arg, OSError) and arg.strerror:
            return f"connection lost: {arg.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connection lost: {exc.strerror}"
    return f"connection lost: {exc}"


class HttpSource(RemoteSource):
    """One http:// or https:// URL (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        piece_size: int,
        timeout: float = 30.0,
        connections: int = 4,
        max_request: int = 1 << 62,
    ) -> None:
        try:
            import urllib3
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise UnsupportedFeatureError(
                "http(s) images need urllib3: pip install 'qedkit[remote]'",
                filename=display_url(url),
            ) from exc
        self.url = url
        self.name = display_url(url)
        self.piece_size = piece_size
        self.timeout = timeout
        self.max_request = max_request
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError("not an http(s) URL with a host", filename=self.name)
        try:
            port = parts.port
        except ValueError as exc:
            raise StoreError(f"invalid port in URL: {exc}", filename=self.name) from exc
        self._target = request_target(url)
        self._headers = {
            "User-Agent": f"qedkit/{__version__}",
            "Accept-Encoding": "identity",  # byte ranges of the stored bytes, never gzip
        }
        if parts.username is not None:
            auth = f"{urllib.parse.unquote(parts.username)}:"
            auth += urllib.parse.unquote(parts.password or "")
            self._headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        pool_class = (
            urllib3.HTTPSConnectionPool if parts.scheme == "https" else urllib3.HTTPConnectionPool
        )
        self._pool: urllib3.HTTPConnectionPool = pool_class(
            parts.hostname,
            port,
            maxsize=connections,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
        )
        self._threads = concurrent.futures.ThreadPoolExecutor(
            connections, thread_name_prefix="qed-http"
        )
        self._size: int | None = None
        self._etag: str | None = None
        self._closed = False

    # ---- the source -------------------------------------------------------------------

    async def open(self, head: int) -> tuple[int, Sequence[bytes]]:
        self._check_open()
        size, etag, pieces = await asyncio.wrap_future(self._threads.submit(self._probe, head))
        if self._size is not None and size != self._size:
            raise StoreError(
                f"the remote size changed from {self._size} to {size} bytes", filename=self.name
            )
        self._size, self._etag = size, etag
        return size, pieces

    def fetch(self, offset: int, length: int) -> asyncio.Future[Sequence[bytes]]:
        self._check_open()
        loop = asyncio.get_running_loop()
        return asyncio.wrap_future(self._threads.submit(self._get, offset, length), loop=loop)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._pool.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed", filename=self.name)

    # ---- worker threads -----------------------------------------------------------------

    def _request(self, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        import urllib3.exceptions as ux

        try:
            return self._pool.urlopen(
                "GET",
                self._target,
                headers={**self._headers, **headers},
                preload_content=False,
                decode_content=False,
                redirect=False,
                retries=False,
                assert_same_host=False,
            )
        except ux.NameResolutionError as exc:
            raise StoreError(f"cannot resolve the host name: {exc}", filename=self.name) from exc
        except ux.SSLError as exc:  # a certificate that does not verify will not start to
            cause = exc.__cause__ or exc.__context__ or exc
            verify = getattr(cause, "verify_message", None)
            detail = f"the server's certificate does not verify ({verify})" if verify else cause
            raise StoreError(f"TLS failed: {detail}", filename=self.name) from exc
        except (ux.HTTPError, OSError) as exc:
            raise TransientError(_describe(exc, self.timeout)) from exc

    def _probe(self, head: int) -> tuple[int, str | None, list[bytes]]:
        """``GET bytes=0-(head-1)``: the size (Content-Range total), a strong ETag and
        the first bytes."""
        resp = self._request({"Range": f"bytes=0-{head - 1}"})
        try:
            etag = resp.headers.get("ETag")
            strong = etag if etag and not etag.startswith("W/") else None
            if resp.status == 416:  # an empty image has no byte 0
                match = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
                if match and int(match.group(1)) == 0:
                    return 0, None, []
            declared = resp.headers.get("Content-Length", "").strip()
            if resp.status == 200 and declared.isdigit() and int(declared) <= head:
                # the whole (small) image: no range was needed, and none ever will be
                size = int(declared)
                return size, strong, self._read_body(resp, 0, size)
            if resp.status == 200:
                raise StoreError(
                    "the server ignores Range requests (it answered 200 with the whole "
                    "image): it cannot serve a remote image",
                    filename=self.name,
                )
            if resp.status != 206:
                self._status_error(resp, "the first block")
            start, end, total = self._content_range(resp)
            if total is None:
                raise StoreError(
                    "the server does not tell the image's size (Content-Range total '*')",
                    filename=self.name,
                )
            if (start, end) != (0, min(head, total) - 1):
                raise StoreError(
                    f"asked for bytes 0-{head - 1}, the server answered bytes {start}-{end}",
                    filename=self.name,
                )
            return total, strong, self._read_body(resp, 0, end + 1)
        finally:
            _finish(resp)

    def _get(self, offset: int, length: int) -> list[bytes]:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self._etag is not None:
            headers["If-Match"] = self._etag
        resp = self._request(headers)
        try:
            what = f"bytes {offset}-{offset + length - 1}"
            if resp.status == 200:
                if not (offset == 0 and length == self._size):
                    raise StoreError(
                        f"the server ignored the Range of a request for {what} "
                        "(it answered 200 with the whole image)",
                        filename=self.name,
                    )
            elif resp.status == 206:
                start, end, total = self._content_range(resp)
                if total is not None and total != self._size:
                    raise StoreError(
                        f"the remote size changed from {self._size} to {total} bytes",
                        filename=self.name,
                    )
                if (start, end) != (offset, offset + length - 1):
                    raise StoreError(
                        f"asked for {what}, the server answered bytes {start}-{end}",
                        filename=self.name,
                    )
            else:
                self._status_error(resp, what)
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.strip() != str(length):
                raise StoreError(
                    f"asked for {what}, the server announced {declared.strip()} bytes",
                    filename=self.name,
                )
            return self._read_body(resp, offset, length)
        finally:
            _finish(resp)

    def _read_body(self, resp: urllib3.BaseHTTPResponse, offset: int, length: int) -> list[bytes]:
        import urllib3.exceptions as ux

        pieces: list[bytes] = []
        got = 0
        try:
            while got < length:
                piece = resp.read(min(self.piece_size, length - got), decode_content=False)
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
        except (ux.HTTPError, OSError) as exc:
            raise TransientError(
                f"truncated response: {got} of {length} bytes at offset {offset} arrived "
                f"({_describe(exc, self.timeout)})"
            ) from exc
        if got != length:
            raise TransientError(
                f"truncated response: {got} of {length} bytes at offset {offset} arrived"
            )
        return pieces

    def _content_range(self, resp: urllib3.BaseHTTPResponse) -> tuple[int, int, int | None]:
        header = resp.headers.get("Content-Range")
        match = _CONTENT_RANGE.match(header or "")
        if match is None:
            raise StoreError(
                f"a partial answer (206) with Content-Range {header!r}", filename=self.name
            )
        total = match.group(3)
        return int(match.group(1)), int(match.group(2)), None if total == "*" else int(total)

    def _status_error(self, resp: urllib3.BaseHTTPResponse, what: str) -> None:
        status = resp.status
        reason = f"HTTP {status} {resp.reason or ''}".rstrip()
        if status in _TRANSIENT_STATUS or 500 <= status <= 599:
            raise TransientError(f"the server answered {reason} for {what}")
        if status in (404, 410):
            raise StoreError(f"not found ({reason})", filename=self.name)
        if status in (401, 403):
            raise StoreError(
                f"access denied ({reason}; an expired or wrong signature?)", filename=self.name
            )
        if status == 412:
            raise StoreError(
                "the remote image changed since it was opened (its ETag no longer matches)",
                filename=self.name,
            )
        if status == 416:
            match = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
            if match and self._size is not None and int(match.group(1)) != self._size:
                raise StoreError(
                    f"the remote size changed from {self._size} to {match.group(1)} bytes "
                    f"({reason} for {what})",
                    filename=self.name,
                )
            raise StoreError(f"range not satisfiable ({reason} for {what})", filename=self.name)
        if 300 <= status <= 399:
            location = resp.headers.get("Location", "?")
            shown = display_url(location) if "://" in location else location
            raise StoreError(f"redirected ({reason}) to {shown}: use that URL", filename=self.name)
        raise StoreError(f"unexpected answer {reason} for {what}", filename=self.name)


def _finish(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to the pool: reusable if the body was read to its end,
    closed otherwise (a half-read body would poison the next request)."""
    if not resp.closed:
        resp.close()
    resp.release_conn()
