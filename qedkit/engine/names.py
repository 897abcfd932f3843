"""Backing file names: how a name stored in an image becomes something to open."""

from __future__ import annotations

import os

from ..errors import BackingFileError


def full_backing_filename(image_filename: str, backing_name: str) -> str:
    """Resolve a stored backing name as QEMU does: absolute names and URLs as they are,
    relative names against the directory of the image (not the working directory), or
    against the image's URL when the image is remote (store.url says how). A name
    holding a NUL byte cannot name a file: BackingFileError."""
    if "\0" in backing_name:
        raise BackingFileError(f"backing file name {backing_name!r} contains a NUL byte")
    if "://" in image_filename and "://" not in backing_name:
        from ..store.url import resolve_backing_url

        return resolve_backing_url(image_filename, backing_name)
    if os.path.isabs(backing_name) or "://" in backing_name:
        return backing_name
    return os.path.join(os.path.dirname(image_filename), backing_name)
