"""``qed resize [--shrink] [--force] [-f FMT] [-q] FILE [+|-]SIZE``: grow or shrink an
image (jobs.resize). A shrink needs ``--shrink`` (as in qemu-img) and is refused
when the cut tail holds data, naming its first offset, unless ``--force``; a QED
image gives the cut clusters' space back. Prints qemu-img's "Image resized."."""

from __future__ import annotations

import argparse
import re

from .common import UsageError, add_format, add_quiet, size_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    p.add_argument(
        "--shrink", action="store_true", help="allow a smaller size (cuts the tail of the disk)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="shrink even when the cut tail holds data (it is lost)",
    )
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")
    p.add_argument("size", metavar="[+|-]SIZE", help="new size, or a change of it (+1G, -512M)")
    # "-512M" is a size here, not an option: let argparse take words that start
    # with a minus and a digit as positionals (no option of this verb looks so).
    p._negative_number_matcher = re.compile(r"^-[0-9]")


def run(args: argparse.Namespace) -> int:
    from ..engine.chain import open_image
    from ..engine.sync import run as run_sync
    from ..jobs.resize import new_size_of, resize_image

    text: str = args.size
    sign = text[0] if text[:1] in ("+", "-") else ""
    amount = size_option(text[1:] if sign else text)
    img = run_sync(open_image(args.filename, fmt=args.format))
    try:
        new_size = new_size_of(img.size, amount, sign)
        if new_size < 0:
            raise UsageError(f"{args.filename}: the new size would be negative")
        run_sync(resize_image(img, new_size, shrink=args.shrink, force=args.force))
    finally:
        run_sync(img.close())
    if not args.quiet:
        print("Image resized.")
    return 0
