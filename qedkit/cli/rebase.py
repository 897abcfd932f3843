"""``qed rebase [-f FMT] [-u] [-p] [-q] -b NEWBASE [-F FMT] FILE``: give a QED overlay
another backing file (jobs.rebase). Safe mode (the default) first copies into the
overlay every cluster where the old and the new backing chains differ, so that the
overlay reads the same afterwards; ``-u`` only rewrites the name (the new file need
not exist); ``-b ""`` removes the backing file, copying everything the old chain
provides (flatten). NEWBASE is resolved against the overlay's directory and recorded
as given, as qemu-img does; a raw one is recorded as raw (no probing)."""

from __future__ import annotations

import argparse

from .common import FORMATS, add_format, add_quiet, open_qed_only


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p, ("qed",))
    p.add_argument(
        "-b", dest="base", metavar="NEWBASE", required=True, help='the new backing file ("": none)'
    )
    p.add_argument(
        "-F", dest="base_format", metavar="FMT", choices=FORMATS, help="its format (probed)"
    )
    p.add_argument(
        "-u", dest="unsafe", action="store_true", help="unsafe: only rewrite the backing file name"
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from ..engine.base import BlockImage
    from ..engine.chain import open_image
    from ..engine.names import full_backing_filename
    from ..engine.sync import run as run_sync
    from ..errors import BackingFileError, QedError
    from ..jobs.rebase import rebase
    from .progress import Progress

    name: str = args.base
    top = open_qed_only(
        args.filename, args.format, "only QED images can be rebased", backing_chain=not args.unsafe
    )
    new: BlockImage | None = None
    try:
        raw = args.base_format == "raw"
        if name and not args.unsafe:
            full = full_backing_filename(args.filename, name)
            try:
                new = run_sync(open_image(full, fmt=args.base_format, readonly=True))
            except QedError as exc:
                raise BackingFileError(
                    f"cannot open the new backing file: {exc}", filename=args.filename
                ) from exc
            raw = new.format_name == "raw"
        show = args.progress and not args.quiet
        with Progress(show) as progress:
            run_sync(
                rebase(top, new, name, raw=raw, unsafe=args.unsafe, checkpoint=progress.checkpoint)
            )
            new = None  # the overlay owns it now
    finally:
        try:
            run_sync(top.close())
        finally:
            if new is not None:
                run_sync(new.close())
    return 0
