"""``qed convert [-f FMT] [-O FMT] [-o OPTIONS] [-p] [-q] [-t CACHE] [-U]
[--copy-on-read] SRC DST``: copy an image, its backing chain flattened, into a new one
(jobs.convert). ``--copy-on-read`` opens the source read-write and copies what the
conversion reads from its backing chain into it (a remote base is then fetched once
for both: the target and the source's overlay).

``qed convert --in-place [--dry-run] [--discard-snapshots] [--reclaim compact|punch]
[--output human|json] [-f qcow2] [-p] [-q] IMAGE``: make a qcow2 image a QED image in
the same file, its data clusters left where they are (jobs.inplace).

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
    add_output,
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
    inplace = p.add_argument_group("in-place conversion (qcow2 -> QED in the same file)")
    inplace.add_argument(
        "--in-place",
        action="store_true",
        help="make the qcow2 image SRC a QED image in the same file: data clusters stay "
        "where they are, compressed and partly allocated clusters are copied, the qcow2 "
        "metadata is reclaimed; crash-safe at every step (DST is not given)",
    )
    inplace.add_argument(
        "--dry-run",
        action="store_true",
        help="with --in-place: report what would be reused and copied, write nothing",
    )
    inplace.add_argument(
        "--discard-snapshots",
        action="store_true",
        help="with --in-place: convert an image with internal snapshots or persistent "
        "bitmaps, which QED cannot hold (they are lost)",
    )
    inplace.add_argument(
        "--reclaim",
        choices=("compact", "punch"),
        default="compact",
        help="with --in-place: compact (default) moves clusters into the space the qcow2 "
        "metadata held and truncates, so the image checks clean; punch only punches that "
        "space (no data moves, but checkers report it as leaked clusters)",
    )
    add_output(inplace)
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST", nargs="?")


def run(args: argparse.Namespace) -> int:
    from ..jobs.convert import convert
    from .progress import Progress, shown

    if args.in_place:
        return run_in_place(args)
    for flag, given in (
        ("--dry-run", args.dry_run),
        ("--discard-snapshots", args.discard_snapshots),
        ("--reclaim", args.reclaim != "compact"),
        ("--output", args.output != "human"),
    ):
        if given:
            raise UsageError(f"{flag} goes with --in-place")
    if args.target is None:
        raise UsageError("a target DST is needed (or --in-place for SRC itself)")
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
    show = shown(args.progress, args.quiet)
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


def run_in_place(args: argparse.Namespace) -> int:
    """``--in-place``: jobs.inplace.convert_file, its report printed (cli.output)."""
    from ..engine.sync import run as run_sync
    from ..jobs.inplace import Reclaim, convert_file
    from .output import inplace_human, inplace_json
    from .progress import Progress, shown

    if args.target is not None:
        raise UsageError("--in-place converts SRC itself: no DST")
    if args.output_format not in (None, "qed") or args.options:
        raise UsageError("--in-place makes a QED image; -O and -o do not apply")
    if args.format not in (None, "qcow2", "qed"):
        raise UsageError(f"--in-place converts qcow2 images, not {args.format}")
    show = shown(args.progress, args.quiet) and not args.dry_run
    with Progress(show, "convert --in-place", unit="%") as progress:
        result = run_sync(
            convert_file(
                args.source,
                fmt=args.format,
                dry_run=args.dry_run,
                discard_snapshots=args.discard_snapshots,
                reclaim_mode=Reclaim(args.reclaim),
                checkpoint=progress.checkpoint,
            )
        )
    if result is None:
        if not args.quiet:
            print(
                f"{args.source}: already a QED image; without --dry-run the reclaim of an "
                "interrupted conversion is finished"
            )
        return 0
    report = result.as_dict()
    if args.output == "json":
        print(inplace_json(report))
    elif not args.quiet:
        sys.stdout.write(inplace_human(report, dry_run=args.dry_run))
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
