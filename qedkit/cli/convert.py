"""``qed convert [-f FMT] [-O FMT] [-o OPTIONS] [-p] [-q] [-t CACHE] [-U]
[--copy-on-read] SRC DST``: copy an image, its backing chain flattened, into a new one
(jobs.convert). ``--copy-on-read`` opens the source read-write and copies what the
conversion reads from its backing chain into it (a remote base is then fetched once
for both: the target and the source's overlay).

A target that is the source file itself (the same path, a symbolic or hard link to
it) is refused before anything is opened: creating the target would truncate the
source.
"""

from __future__ import annotations

import argparse
import os
import sys

from .common import (
    UsageError,
    add_force_share,
    add_format,
    add_quiet,
    geometry,
    parse_options,
    print_create_options,
)

CACHE_MODES = ("unsafe", "writeback", "none", "writethrough", "directsync")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    p.add_argument(
        "-O",
        dest="output_format",
        metavar="FMT",
        choices=("qed", "raw"),
        help="target format (default raw)",
    )
    p.add_argument(
        "-o", dest="options", metavar="OPTIONS", help="target options (cluster_size, table_size)"
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_force_share(p, "the source")
    p.add_argument(
        "--copy-on-read",
        dest="copy_on_read",
        action="store_true",
        help="copy the clusters read from the source's backing chain into the source "
        "(opens it read-write; not with -U)",
    )
    add_quiet(p)
    p.add_argument(
        "-t",
        dest="cache",
        default="unsafe",
        metavar="CACHE",
        help="target cache mode: unsafe (default, as qemu-img: no flush) "
        "or writeback (flush at the end)",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST")


def run(args: argparse.Namespace) -> int:
    from ..jobs.convert import convert
    from .progress import Progress

    opts = parse_options(args.options)
    if "help" in opts:
        print_create_options()
        return 0
    cluster_size, table_size = geometry(opts)
    if args.cache not in CACHE_MODES:
        raise UsageError(f"invalid cache mode {args.cache!r}")
    if args.copy_on_read and args.force_share:
        raise UsageError("--copy-on-read writes the source: it cannot be combined with -U")
    if same_file(args.source, args.target):
        raise UsageError(f"{args.target}: source and target are the same file")
    show = args.progress or (sys.stderr.isatty() and not args.quiet)
    with Progress(show) as progress:
        convert(
            args.source,
            args.target,
            src_format=args.format,
            dst_format=args.output_format or "raw",
            cluster_size=cluster_size,
            table_size=table_size,
            flush=args.cache != "unsafe",
            force_share=args.force_share,
            copy_on_read=args.copy_on_read,
            progress=progress,
        )
    return 0


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same real path, or (hard links,
    bind mounts) the same device and inode. Opens nothing; a path that cannot be
    looked up is another file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
