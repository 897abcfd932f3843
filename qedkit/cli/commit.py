"""``qed commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE``: write an overlay's data into
its backing image, then empty the overlay (jobs.commit), as ``qemu-img commit`` does
for formats it can empty (it cannot empty QED: this does). ``-b BASE`` commits into
an image deeper in the chain (the overlay is then kept, as with qemu-img); ``-d``
keeps the overlay's data. Prints "Image committed."."""

from __future__ import annotations

import argparse

from .common import UsageError, add_format, add_quiet


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    p.add_argument(
        "-b",
        dest="base",
        metavar="BASE",
        help="the image of the backing chain to commit into (default: the backing file); "
        "implies -d",
    )
    p.add_argument(
        "-d", dest="keep", action="store_true", help="do not empty the overlay afterwards"
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from ..engine.chain import open_image
    from ..engine.sync import run as run_sync
    from ..jobs.commit import Committer, find_in_chain, reopen_writable
    from .progress import Progress

    keep = args.keep or args.base is not None
    top = run_sync(open_image(args.filename, fmt=args.format, readonly=keep))
    try:
        if top.backing is None:
            raise UsageError(f"{args.filename}: the image has no backing file to commit into")
        depth = find_in_chain(top, args.base) if args.base is not None else 1
        base = run_sync(reopen_writable(top, depth))
        show = args.progress and not args.quiet
        with Progress(show) as progress:
            run_sync(Committer(top, base, depth).run(keep=keep, checkpoint=progress.checkpoint))
    finally:
        run_sync(top.close())
    if not args.quiet:
        print("Image committed.")
    return 0
