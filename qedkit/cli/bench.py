"""``qed bench [-c COUNT] [-d DEPTH] [-f FMT] [-o OFFSET] [--pattern BYTE] [-q] [-s SIZE]
[-S STEP] [-t CACHE] [-w] [--flush-interval N] [--output human|json] FILE``: time
COUNT requests of SIZE bytes through the engine (jobs.bench), as ``qemu-img bench``
does, and print the requests per second and MB/s as well. ``-t none`` uses O_DIRECT
for the image's aligned data; ``-t unsafe`` makes flushes no-ops."""

from __future__ import annotations

import argparse

from .common import UsageError, add_format, add_output, add_quiet, size_type

CACHE_MODES = ("none", "writeback", "unsafe")


def _byte(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid pattern {text!r}") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"pattern {text!r} is not a byte (0..255)")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", dest="count", type=int, default=75000, help="requests (default 75000)")
    p.add_argument("-d", dest="depth", type=int, default=64, help="requests in flight (64)")
    add_format(p)
    p.add_argument("-o", dest="offset", type=size_type, default=0, help="first offset (0)")
    p.add_argument("--pattern", type=_byte, default=0, help="byte written by -w (0)")
    p.add_argument("-s", dest="size", type=size_type, default=4096, help="request size (4k)")
    p.add_argument("-S", dest="step", type=size_type, help="offset step (the request size)")
    p.add_argument("-t", dest="cache", default="writeback", choices=CACHE_MODES, help="cache mode")
    p.add_argument("-w", dest="write", action="store_true", help="write (default: read)")
    p.add_argument("--flush-interval", type=int, default=0, metavar="N", help="flush every N")
    add_output(p)
    add_quiet(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    import json

    from ..engine.chain import open_image
    from ..engine.sync import run as run_sync
    from ..jobs.bench import bench

    if args.flush_interval and not args.write:
        raise UsageError("--flush-interval is only for write benchmarks (-w)")
    step = args.size if args.step is None else args.step
    img = run_sync(
        open_image(
            args.filename,
            fmt=args.format,
            readonly=not args.write,
            direct=args.cache == "none",
            unsafe_no_flush=args.cache == "unsafe",
        )
    )
    try:
        if not args.quiet and args.output == "human":
            kind = "write" if args.write else "read"
            print(
                f"Sending {args.count} {kind} requests, {args.size} bytes each, {args.depth} "
                f"in parallel (starting at offset {args.offset}, step size {step})"
            )
        result = run_sync(
            bench(
                img,
                count=args.count,
                size=args.size,
                depth=args.depth,
                write=args.write,
                pattern=args.pattern,
                offset=args.offset,
                step=step,
                flush_interval=args.flush_interval,
            )
        )
    finally:
        run_sync(img.close())
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=4))
    elif not args.quiet:
        print(f"Run completed in {result.seconds:.3f} seconds.")
        print(f"{result.iops:.0f} requests per second, {result.mb_per_second:.1f} MB/s")
    return 0
