"""``qed compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B``: whether two images
(each with its backing chain) show the same guest contents (jobs.compare).

Exit codes and messages are qemu-img's: 0 "Images are identical.", 1 "Content
mismatch at offset N!" (or a strict-mode mismatch), 2 an error (a file that cannot
be opened or read), printed as ``qed: FILE: message``. Images of different sizes
compare equal when the longer one reads zeros past the shorter one's end (with a
warning), except with ``-s``.
"""

from __future__ import annotations

import argparse
import sys

from .common import FORMATS, add_force_share, add_format, add_quiet

EXIT_DIFFERENT = 1
EXIT_ERROR = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    p.add_argument(
        "-F",
        dest="format2",
        metavar="FMT",
        choices=FORMATS,
        help="format of the second image (probed when omitted)",
    )
    p.add_argument(
        "-s",
        dest="strict",
        action="store_true",
        help="strict: the sizes and the allocation (block status) must match too",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_force_share(p, "the images")
    add_quiet(p)
    p.add_argument("filename", metavar="A")
    p.add_argument("filename2", metavar="B")


def run(args: argparse.Namespace) -> int:
    from ..engine.base import BlockImage
    from ..engine.chain import open_image
    from ..engine.sync import run as run_sync
    from ..errors import QedError
    from ..jobs.compare import compare_images
    from .progress import Progress

    opened: list[BlockImage] = []
    try:
        for path, fmt in ((args.filename, args.format), (args.filename2, args.format2)):
            try:
                opened.append(
                    run_sync(open_image(path, fmt=fmt, readonly=True, force_share=args.force_share))
                )
            except QedError as exc:
                raise exc.with_filename(path) from exc.__cause__
        with Progress(args.progress and not args.quiet) as progress:
            result = run_sync(
                compare_images(opened[0], opened[1], strict=args.strict, progress=progress)
            )
    except QedError as exc:
        print(f"qed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for img in opened:
            try:
                run_sync(img.close())
            except QedError as exc:
                print(f"qed: {exc}", file=sys.stderr)
    if not args.quiet:
        print("\n".join(result.messages()))
    return 0 if result.identical else EXIT_DIFFERENT
