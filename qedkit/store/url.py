"""Images named by URL: one dispatch from a URL to its read-only remote store.

``open_url`` is what the engine calls for an image or backing name holding "://":
``http://`` and ``https://`` (range requests, store.http), ``nbd://`` and
``nbd+unix://`` (store.nbdclient), each under a :class:`~qedkit.store.remote.RemoteStore`
(block cache, readahead, retries). Constructing the store does no I/O: the first read
(the format probe) connects. The protocol modules load on first use, so that local
images never import urllib3 or asyncio streams.

A relative backing name recorded in a remote QED image is resolved against its URL by
:func:`resolve_backing_url` (RFC 3986 §5, as a browser resolves a link: the last path
segment is replaced, the query string is dropped since a presigned signature covers
one object only). NBD exports have no directories, so a relative name below an NBD
URL is refused, as QEMU refuses it ("Cannot generate a base directory for nbd nodes").
"""

from __future__ import annotations

import os
import urllib.parse

from ..errors import BackingFileError, ReadOnlyError, UnsupportedFeatureError
from .remote import RemoteOptions, RemoteStore

HTTP_SCHEMES = ("http", "https")
NBD_SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")


def is_url(name: str) -> bool:
    """True if ``name`` names an image by URL rather than by path (QEMU's test too)."""
    return "://" in name


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def open_url(
    url: str, *, readonly: bool = True, options: RemoteOptions | None = None
) -> RemoteStore:
    """A read-only store for ``url``. Raises UnsupportedFeatureError for an unknown
    scheme, ReadOnlyError when asked for a writable one, StoreError for a malformed
    URL; nothing is connected yet (the first read does it)."""
    scheme = scheme_of(url)
    if scheme not in HTTP_SCHEMES + NBD_SCHEMES:
        raise UnsupportedFeatureError(
            f"protocol {scheme!r} is not supported (http, https, nbd, nbd+unix)", filename=url
        )
    if not readonly:
        raise ReadOnlyError(
            "remote images are read-only: open it read-only, or use it as a backing file",
            filename=url,
        )
    options = options or RemoteOptions()
    if scheme in HTTP_SCHEMES:
        from .http import HttpSource

        return RemoteStore(
            HttpSource(url, piece_size=options.block_size, timeout=options.retry.timeout),
            options,
        )
    from .nbdclient import NbdSource

    return RemoteStore(
        NbdSource(url, piece_size=options.block_size, timeout=options.retry.timeout), options
    )


def resolve_backing_url(url: str, name: str) -> str:
    """The backing file ``name`` recorded in the image at ``url``, made absolute: a URL
    or an absolute path as it is (as QEMU has it), a relative name against ``url``."""
    if "\0" in name:
        raise BackingFileError(f"backing file name {name!r} contains a NUL byte")
    if is_url(name) or os.path.isabs(name):
        return name
    if scheme_of(url) not in HTTP_SCHEMES:
        raise BackingFileError(
            f"relative backing file name {name!r} cannot be resolved against {url}: "
            "NBD exports have no directories; record an absolute URL",
            filename=url,
        )
    parts = urllib.parse.urlsplit(url)
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return urllib.parse.urljoin(base, urllib.parse.quote(name, safe="/:@!$&'()*+,;=%"))
