"""The qedkit error tree.

Every error qedkit raises on purpose derives from :class:`QedError`; anything else
escaping a public call is a bug. Messages name the file (when one is known) and,
for on-disk problems, the byte offset and the header field or table involved.
Errors wrapping an OS or protocol failure keep it as ``__cause__``.

::

    QedError
     +-- FormatError              the bytes are not a valid image of the format
     |    +-- CorruptImageError   a valid image whose metadata is damaged (offset=, field=)
     +-- UnsupportedFeatureError  valid, but needs something qedkit does not implement
     +-- BackingFileError         the backing chain cannot be resolved or opened
     +-- StoreError               the byte store failed (I/O error, ENOSPC, short read)
     +-- ReadOnlyError            a write was attempted on an image opened read-only
     +-- InvalidRequestError      a caller asked for something impossible (bad size, range)
     +-- ImageLockedError         another process holds the image open for writing
     +-- JobError                 a long-running job failed or was cancelled
"""

from __future__ import annotations

__all__ = [
    "BackingFileError",
    "CorruptImageError",
    "FormatError",
    "ImageLockedError",
    "InvalidRequestError",
    "JobError",
    "QedError",
    "ReadOnlyError",
    "StoreError",
    "UnsupportedFeatureError",
]


class QedError(Exception):
    """Root of all qedkit errors.

    ``filename`` is set when the error concerns a particular file; ``str()`` of the
    error then reads ``"FILE: message"``, the form the CLI prints after ``qed:``.
    """

    def __init__(self, message: str, *, filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename

    def with_filename(self, filename: str) -> QedError:
        """Attach ``filename`` if none is set yet; returns self for ``raise e.with_filename()``."""
        if self.filename is None:
            self.filename = filename
        return self

    def __str__(self) -> str:
        if self.filename:
            return f"{self.filename}: {self.message}"
        return self.message


class _Located(QedError):
    """An error about something recorded in the image: ``offset`` (bytes from the start
    of the file) and ``field`` (a header field or table name) say where, if known."""

    def __init__(
        self,
        message: str,
        *,
        filename: str | None = None,
        offset: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, filename=filename)
        self.offset = offset
        self.field = field


class FormatError(_Located):
    """The bytes do not form a valid image of the expected format."""


class CorruptImageError(FormatError):
    """The image is recognisably QED but its metadata is inconsistent."""


class UnsupportedFeatureError(_Located):
    """A valid image or request that needs a feature qedkit does not implement.
    For an on-disk feature, ``offset`` and ``field`` say where it is recorded."""


class BackingFileError(QedError):
    """A backing file is missing, unreadable, of the wrong format, or forms a loop."""


class StoreError(QedError):
    """A byte store operation failed; ``errno`` is copied from the OSError if any."""

    def __init__(
        self, message: str, *, filename: str | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message, filename=filename)
        self.errno = errno


class ReadOnlyError(QedError):
    """A modification was requested on an image or store opened read-only."""


class InvalidRequestError(QedError):
    """A request is out of range, misaligned or otherwise impossible."""


class ImageLockedError(QedError):
    """The image is in use by another process in a conflicting mode."""


class JobError(QedError):
    """A long-running job failed or was cancelled."""
