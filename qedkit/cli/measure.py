"""``qed measure [--output human|json] [-O FMT] [-o OPTIONS] [-f FMT] [-U] (--size N |
FILE)``: the file size a conversion to a QED (or raw) image needs, and needs once
every cluster is written (jobs.measure). qemu-img measure cannot measure QED targets;
the figures mean what they mean for its qcow2 targets. The target format defaults to
qed (qemu-img's to raw)."""

from __future__ import annotations

import argparse

from .common import (
    UsageError,
    add_force_share,
    add_format,
    add_output,
    geometry,
    parse_options,
    print_create_options,
    size_type,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_output(p)
    add_format(p)
    p.add_argument(
        "-O",
        dest="output_format",
        metavar="FMT",
        choices=("qed", "raw"),
        default="qed",
        help="target format (default qed)",
    )
    p.add_argument(
        "-o", dest="options", metavar="OPTIONS", help="target options (cluster_size, table_size)"
    )
    p.add_argument("--size", type=size_type, metavar="N", help="measure an empty image of N bytes")
    add_force_share(p)
    p.add_argument("filename", metavar="FILE", nargs="?")


def run(args: argparse.Namespace) -> int:
    from ..engine.chain import open_image
    from ..engine.sync import run as run_sync
    from ..jobs.measure import measure_image, measure_size
    from . import output

    opts = parse_options(args.options)
    if "help" in opts:
        print_create_options()
        return 0
    unknown = set(opts) - {"cluster_size", "table_size"}
    if unknown:
        raise UsageError(f"measure takes only cluster_size and table_size, not {sorted(unknown)}")
    cluster_size, table_size = geometry(opts)
    if args.size is not None and args.filename is not None:
        raise UsageError("--size N cannot be used together with a filename")
    if args.size is None and args.filename is None:
        raise UsageError("either --size N or one filename must be given")
    fmt = args.output_format
    if args.size is not None:
        result = measure_size(args.size, fmt=fmt, cluster_size=cluster_size, table_size=table_size)
    else:
        img = run_sync(
            open_image(args.filename, fmt=args.format, readonly=True, force_share=args.force_share)
        )
        try:
            result = run_sync(
                measure_image(img, fmt=fmt, cluster_size=cluster_size, table_size=table_size)
            )
        finally:
            run_sync(img.close())
    print(output.measure_json(result) if args.output == "json" else output.measure_human(result))
    return 0
