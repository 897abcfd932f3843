"""``qed defrag [-f FMT] [--layout packed|identity] [--output human|json] [-p] [-q] FILE``:
lay a QED image out for sequential reads, offline (jobs.defrag). The image is checked
first; one with corruptions is refused (repair it with ``qed check -r all``)."""

from __future__ import annotations

import argparse

from .common import UsageError, add_format, add_output, add_quiet, open_qed_only


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    add_output(p)
    p.add_argument(
        "--layout",
        choices=("packed", "identity"),
        help="packed (the default unless the image has the home allocation policy): the "
        "tables first, then the allocated clusters in guest order, no holes: a file as small "
        "as a converted copy that checks clean. identity: every cluster at data start + its "
        "guest offset, which stays raw-like for later writes (it sets the home allocation "
        "policy), but the file spans the virtual disk and every QED checker, qemu-img "
        "included, reports its holes as leaked clusters",
    )
    p.add_argument(
        "--no-zero-detect",
        dest="zero_detect",
        action="store_false",
        help="do not read the data to turn clusters that hold only zeros into zero clusters "
        "(faster on a large image that was defragmented before)",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    import json

    from ..engine.check import check_image
    from ..engine.qed import LayoutKind
    from ..engine.sync import run as run_sync
    from ..jobs.defrag import Defragmenter
    from .progress import Progress, shown

    img = open_qed_only(args.filename, args.format, "only QED images can be defragmented")
    try:
        report = run_sync(check_image(img))
        if report.corruptions or report.check_errors:
            raise UsageError(
                f"{args.filename}: the image has {report.corruptions} corruptions; "
                "run 'qed check -r all' first"
            )
        layout = LayoutKind(args.layout) if args.layout else None
        defrag = run_sync(Defragmenter.create(img, layout=layout, zero_detect=args.zero_detect))
        show = shown(args.progress, args.quiet)
        with Progress(show, "defrag", unit=" clusters") as progress:
            stats = run_sync(defrag.run(checkpoint=progress.checkpoint))
    finally:
        run_sync(img.close())
    if args.output == "json":
        print(json.dumps(stats.as_dict(), indent=4))
    elif not args.quiet:
        d = stats.as_dict()
        print(
            f"moved {stats.clusters_moved} clusters ({stats.bytes_moved} bytes, "
            f"{d['mb-per-second']} MB/s) and {stats.tables_moved} L2 tables in "
            f"{stats.rounds} rounds ({stats.layout} layout); "
            f"truncated {stats.truncated_bytes} bytes"
        )
    return 0
