"""``qed stream [-f FMT] [-p] [-q] [--output human|json] [--rate R] [--chunk SIZE] FILE``:
copy into a QED image every cluster it still reads from its backing chain, then drop
the backing file (jobs.stream), offline. Stopped by an error or interrupted, it
leaves a consistent image, and running it again goes on where it stopped."""

from __future__ import annotations

import argparse

from .common import add_format, add_output, add_quiet, open_qed_only, size_type


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p, ("qed",))
    add_output(p)
    p.add_argument(
        "--rate",
        type=size_type,
        default=0,
        metavar="R",
        help="bytes read from the backing chain per second at most (k/M/G suffixes; "
        "default: no limit)",
    )
    p.add_argument(
        "--chunk",
        type=size_type,
        default=None,
        metavar="SIZE",
        help="bytes copied per step (default 2M; rounded up to whole clusters)",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress and an ETA")
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    import json

    from ..engine.sync import run as run_sync
    from ..jobs.stream import DEFAULT_CHUNK, Streamer
    from ..store.file import FileStore
    from .progress import Progress, shown

    img = open_qed_only(args.filename, args.format, "only QED images have a backing file to stream")
    try:
        if isinstance(img.store, FileStore):
            img.store.offload = True  # flushes on a thread: the next step goes on meanwhile
        streamer = Streamer(img, chunk=args.chunk or DEFAULT_CHUNK, rate=args.rate)
        show = shown(args.progress, args.quiet)
        with Progress(show, "stream", eta=True) as progress:
            stats = run_sync(streamer.run(checkpoint=progress.checkpoint))
    finally:
        run_sync(img.close())
    if args.output == "json":
        print(json.dumps(stats.as_dict(), indent=4))
    elif not args.quiet:
        if stats.backing_file is None:
            print("no backing file: nothing to stream")
        else:
            d = stats.as_dict()
            print(
                f"copied {stats.bytes_read} bytes from the backing chain "
                f"({stats.data_clusters} data clusters, {stats.zero_clusters} zero clusters, "
                f"{d['mb-per-second']} MB/s); backing file {stats.backing_file!r} dropped"
            )
    return 0
