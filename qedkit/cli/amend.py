"""``qed amend [-f FMT] [-p] [-q] -o OPTIONS FILE``: change a QED image's options in
place (jobs.amend), which qemu-img cannot do for QED: ``cluster_size`` and
``table_size`` rebuild the tables (and the data when the cluster size grows) past the
end of the file, switch with one header write, then compact, so that a crash leaves
the old image or the new one; ``backing_fmt=raw`` records the backing file as raw
(never probed), another format clears that. ``-o help`` lists the options."""

from __future__ import annotations

import argparse

from .common import UsageError, add_format, add_quiet, open_qed_only, parse_options, size_option

AMEND_OPTIONS = {
    "cluster_size": "new cluster size in bytes (a power of two, 4k to 64M)",
    "table_size": "new L1/L2 table size in clusters (2 to 16)",
    "backing_fmt": "format of the backing file: raw sets BACKING_FORMAT_NO_PROBE",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p, ("qed",))
    p.add_argument("-o", dest="options", metavar="OPTIONS", required=True, help="name=value,...")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from ..engine.chain import SUPPORTED_FORMATS
    from ..engine.sync import run as run_sync
    from ..jobs.amend import amend
    from .progress import Progress

    opts = parse_options(args.options)
    if "help" in opts:
        print("Supported options:")
        for key, text in AMEND_OPTIONS.items():
            print(f"  {key:<22}- {text}")
        return 0
    other = sorted(set(opts) - set(AMEND_OPTIONS))
    if other:
        raise UsageError(
            f"amend cannot change {', '.join(other)} (sizes: qed resize; backing files: qed rebase)"
        )
    if not opts:
        raise UsageError("nothing to amend: give -o cluster_size=, table_size= or backing_fmt=")
    cluster_size = size_option(opts["cluster_size"]) if "cluster_size" in opts else None
    table_size = None
    if "table_size" in opts:
        text = opts["table_size"]
        if not text.isascii() or not text.isdigit():
            raise UsageError(f"invalid table_size {text!r}: expected a number of clusters")
        table_size = int(text)
    backing_format = opts.get("backing_fmt")
    if backing_format is not None and backing_format not in SUPPORTED_FORMATS:
        raise UsageError(
            f"unknown backing_fmt {backing_format!r} (known: {', '.join(SUPPORTED_FORMATS)})"
        )
    img = open_qed_only(args.filename, args.format, "only QED images can be amended")
    try:
        show = args.progress and not args.quiet
        with Progress(show, "amend", unit=" steps") as progress:
            img, _ = run_sync(
                amend(
                    img,
                    cluster_size=cluster_size,
                    table_size=table_size,
                    backing_format=backing_format,
                    checkpoint=progress.checkpoint,
                )
            )
    finally:
        run_sync(img.close())
    return 0
