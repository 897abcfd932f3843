"""What several ``qed`` verbs share: the usage error, the common flags, size
arguments and the ``-o`` image options of create and convert.

Every size on the command line goes through ``format.sizes.parse_size``; the two
adapters here only say how a bad one is reported: ``size_type`` as an argparse
type (the verb's usage and exit 2, like any bad flag value) and ``size_option``
for values read after parsing (``qed: invalid size ...``, exit 1, as qemu-img
reports a bad image size).

``open_qed_only`` opens the image of a verb that works on QED images only and refuses
another format with a usage error, the image closed again.

This module imports nothing heavy: the verb modules import it when ``qed VERB``
only parses its arguments (``--help``, a usage error).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..format.geometry import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE
from ..format.sizes import parse_size

if TYPE_CHECKING:
    from ..engine.qed import QedImage

FORMATS = ("qed", "raw", "qcow2")

CREATE_OPTIONS = {
    "size": "virtual disk size",
    "backing_file": "file name of a base image",
    "backing_fmt": "image format of the base image (raw or qed)",
    "cluster_size": f"cluster size in bytes (default {DEFAULT_CLUSTER_SIZE})",
    "table_size": f"L1/L2 table size in clusters (default {DEFAULT_TABLE_SIZE})",
    "allocation": "where new clusters go: end (of the file, as QEMU) or home (raw-like)",
}


class UsageError(Exception):
    """Bad command line found after parsing; printed as ``qed: message``, exit 1."""


# ---- sizes ----------------------------------------------------------------------------


def size_type(text: str) -> int:
    """An argparse ``type``: the bytes in ``text`` (a bad size is a usage error, exit 2)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_option(text: str) -> int:
    """The bytes in ``text``; UsageError (exit 1) naming the text if it is not a size."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ---- flags ----------------------------------------------------------------------------


def add_format(p: argparse.ArgumentParser, choices: tuple[str, ...] = FORMATS) -> None:
    p.add_argument(
        "-f",
        dest="format",
        metavar="FMT",
        choices=choices,
        help="image format (probed when omitted)",
    )


def add_force_share(p: argparse.ArgumentParser, what: str = "the image") -> None:
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help=f"open {what} even if another process writes it (read-only)",
    )


def add_output(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format (default human)"
    )


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")


# ---- -o options (create, convert) -----------------------------------------------------


def parse_options(text: str | None) -> dict[str, str]:
    """``-o name=value,...`` as a dict (``help`` or ``?`` as the key ``help``);
    UsageError on an unknown name or an item without ``=``."""
    opts: dict[str, str] = {}
    if not text:
        return opts
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if key in ("help", "?"):
                opts["help"] = ""
                continue
            raise UsageError(f"invalid option {item!r}: expected name=value")
        if key not in CREATE_OPTIONS:
            raise UsageError(f"unknown option {key!r} (known: {', '.join(CREATE_OPTIONS)})")
        opts[key] = value
    return opts


def print_create_options() -> None:
    print("Supported options:")
    for key, text in CREATE_OPTIONS.items():
        print(f"  {key:<22}- {text}")


def geometry(opts: dict[str, str]) -> tuple[int, int]:
    """Cluster size (bytes) and table size (clusters) from ``-o`` options."""
    cluster_size = (
        size_option(opts["cluster_size"]) if "cluster_size" in opts else DEFAULT_CLUSTER_SIZE
    )
    table_size = DEFAULT_TABLE_SIZE
    if "table_size" in opts:
        text = opts["table_size"]
        if not text.isascii() or not text.isdigit():
            raise UsageError(f"invalid table_size {text!r}: expected a number of clusters")
        table_size = int(text)
    return cluster_size, table_size


def open_qed_only(
    filename: str, fmt: str | None, refusal: str, *, backing_chain: bool = True
) -> QedImage:
    """Open ``filename`` (format ``fmt``, probed when None) for a verb that works on
    QED images only; the caller closes it. Failure: the errors of ``open_image``; an
    image of another format is closed again and refused with ``UsageError``
    ("FILE: " + ``refusal``)."""
    from ..engine.chain import open_image
    from ..engine.qed import QedImage
    from ..engine.sync import run as run_sync

    img = run_sync(open_image(filename, fmt=fmt, backing_chain=backing_chain))
    if not isinstance(img, QedImage):
        run_sync(img.close())
        raise UsageError(f"{filename}: {refusal}")
    return img
