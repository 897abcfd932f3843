"""``qed frag [-f FMT] [--output human|json] [--picture FILE.svg|FILE.png] [-U] FILE``:
how fragmented a QED image is (jobs.frag), read-only, and optionally a picture of
its layout (cli.picture)."""

from __future__ import annotations

import argparse
import sys

from .common import UsageError, add_force_share, add_format, add_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    add_output(p)
    p.add_argument(
        "--picture",
        metavar="PICTURE",
        help="also draw the guest-to-host layout into PICTURE (a .svg or .png file)",
    )
    add_force_share(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..engine.qed import QedImage
    from ..engine.sync import run as run_sync
    from ..jobs.frag import fragmentation_report
    from . import output, picture

    if args.picture is not None and picture.picture_format(args.picture) is None:
        raise UsageError(f"{args.picture}: unknown picture format: use a .svg or .png name")
    with api.open(
        args.filename,
        readonly=True,
        format=args.format,
        backing_chain=False,
        auto_repair=False,
        force_share=args.force_share,
    ) as img:
        if not isinstance(img.engine, QedImage):
            raise UsageError(
                f"{args.filename}: this image format ({img.format}) has no clusters to report on"
            )
        grid = picture.GRID if args.picture is not None else 0
        report = run_sync(fragmentation_report(img.engine, grid=grid))
        window = picture.zoom_window(report) if grid else None
        if window is not None:  # the same figures, the picture over the written range
            report = run_sync(fragmentation_report(img.engine, grid=grid, guest_window=window))
    if args.picture is not None:
        data = picture.render(report, args.picture)
        try:
            with open(args.picture, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise UsageError(f"{args.picture}: {exc.strerror or exc}") from None
    if args.output == "json":
        print(output.frag_json(report))
    else:
        sys.stdout.write(output.frag_human(report))
        if args.picture is not None:
            print(f"picture: {args.picture}")
    return 0
