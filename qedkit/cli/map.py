"""``qed map [-f FMT] [--output human|json] [-s OFFSET] [-l LENGTH] [-U] FILE``: the
allocation map of an image and its backing chain, as ``qemu-img map`` prints it."""

from __future__ import annotations

import argparse
import sys

from .common import add_force_share, add_format, add_output, size_type


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    add_output(p)
    p.add_argument("-s", "--start-offset", type=size_type, default=0, metavar="OFFSET")
    p.add_argument("-l", "--max-length", type=size_type, default=None, metavar="LENGTH")
    add_force_share(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from .. import api
    from . import output

    start = args.start_offset
    with api.open(
        args.filename, readonly=True, format=args.format, force_share=args.force_share
    ) as img:
        # Like qemu-img: a start at or past the end gives an empty map, not an error.
        end = img.size if args.max_length is None else min(img.size, start + args.max_length)
        entries = img.map(start, end - start) if start < end else []
    if args.output == "json":
        sys.stdout.write(output.map_json(entries, start))
    else:
        sys.stdout.write(output.map_human(entries))
    return 0
