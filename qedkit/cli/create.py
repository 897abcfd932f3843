"""``qed create [-f FMT] [-b BACKING -F FMT] [-o OPTIONS] [-u] [-q] FILE [SIZE]``:
a new image, as ``qemu-img create`` makes it (and prints it)."""

from __future__ import annotations

import argparse

from .common import (
    UsageError,
    add_quiet,
    geometry,
    parse_options,
    print_create_options,
    size_option,
)

SECTOR = 512  # qemu-img rounds image sizes up to whole sectors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f", dest="format", metavar="FMT", choices=("qed", "raw"), help="format (default qed)"
    )
    p.add_argument(
        "-b", dest="backing", metavar="BACKING", help="backing file (relative to FILE's directory)"
    )
    p.add_argument(
        "-F", dest="backing_format", metavar="FMT", help="backing file format (required with -b)"
    )
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        help="cluster_size=..,table_size=.. ('-o help' lists)",
    )
    p.add_argument("-u", dest="unsafe", action="store_true", help="do not open the backing file")
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")
    p.add_argument("size", metavar="SIZE", nargs="?", help="size with optional k/M/G/T suffix")


def image_size(text: str) -> int:
    """An image size from the command line, rounded up to whole sectors."""
    return -(-size_option(text) // SECTOR) * SECTOR


def run(args: argparse.Namespace) -> int:
    from .. import api

    opts = parse_options(args.options)
    if "help" in opts:
        print_create_options()
        return 0
    fmt = args.format or "qed"
    backing = args.backing or opts.get("backing_file")
    backing_fmt = args.backing_format or opts.get("backing_fmt")
    size_text = args.size or opts.get("size")
    size = image_size(size_text) if size_text is not None else None
    cluster_size, table_size = geometry(opts)
    size = (
        api.create(
            args.filename,
            size,
            format=fmt,
            cluster_size=cluster_size,
            table_size=table_size,
            backing_file=backing,
            backing_format=backing_fmt,
            allocation=opts.get("allocation", "end"),
        )
        if not args.unsafe
        else _create_unchecked(
            args.filename, size, fmt, cluster_size, table_size, backing, backing_fmt
        )
    )
    if not args.quiet:
        parts = [f"Formatting '{args.filename}', fmt={fmt} size={size}"]
        if backing:
            parts.append(f"backing_file={backing}")
        if backing_fmt:
            parts.append(f"backing_fmt={backing_fmt}")
        if fmt == "qed":
            parts.append(f"cluster_size={cluster_size}")
            if "table_size" in opts:
                parts.append(f"table_size={table_size}")
        print(" ".join(parts))
    return 0


def _create_unchecked(
    path: str,
    size: int | None,
    fmt: str,
    cluster_size: int,
    table_size: int,
    backing: str | None,
    backing_fmt: str | None,
) -> int:
    """``-u``: create without opening the backing file (the size must be given)."""
    from ..engine.chain import create_image
    from ..engine.sync import run as run_sync

    if size is None:
        raise UsageError("-u needs an explicit size")
    return run_sync(
        create_image(
            path,
            size,
            fmt=fmt,
            cluster_size=cluster_size,
            table_size=table_size,
            backing_file=backing,
            backing_format=backing_fmt,
            check_backing=False,
        )
    )
