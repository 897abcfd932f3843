"""``qed mount [-r] [-f FMT] [--allocation end|home] [--name NAME] FILE DIR``: the
guest disk of an image as one file, ``DIR/NAME`` (the image's name without its
extension by default), through FUSE (qedkit.fuse.mount), until ``fusermount3 -u
DIR`` or SIGTERM/SIGINT, after which the image is flushed and closed. Reads and
writes go through the engine as with ``qed serve``; ``fsync`` flushes. Needs the
optional mfusepy package (``pip install 'qedkit[fuse]'``) and libfuse 3."""

from __future__ import annotations

import argparse
import os

from .common import UsageError, add_format


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", dest="readonly", action="store_true", help="read-only")
    add_format(p)
    p.add_argument(
        "--allocation",
        choices=("end", "home"),
        help="where new clusters go (home: raw-like layout); recorded in the image",
    )
    p.add_argument("--name", help="the file's name under DIR (default: the image's, less .qed)")
    p.add_argument("--debug", action="store_true", help="libfuse's debug output on stderr")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("mountpoint", metavar="DIR")


def default_name(path: str) -> str:
    base = os.path.basename(path.rstrip("/")) or "disk"
    stem, ext = os.path.splitext(base)
    return stem if ext in (".qed", ".raw", ".qcow2", ".img") and stem else base


def run(args: argparse.Namespace) -> int:
    try:
        from ..fuse.mount import EngineThread, mount
    except (ImportError, OSError) as exc:  # no mfusepy, or no libfuse
        raise UsageError(
            f"qed mount needs FUSE: pip install 'qedkit[fuse]' and libfuse 3 ({exc})"
        ) from None
    from ..engine.base import BlockImage
    from ..engine.chain import open_image
    from ..engine.qed import QedImage
    from ..store.file import FileStore

    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"{args.mountpoint}: not a directory")
    name = args.name or default_name(args.filename)
    if "/" in name or name in (".", ".."):
        raise UsageError(f"invalid file name {name!r}")
    engine = EngineThread()
    try:

        async def opening() -> BlockImage:
            image = await open_image(args.filename, fmt=args.format, readonly=args.readonly)
            try:
                if args.allocation and not args.readonly:
                    if not isinstance(image, QedImage):
                        raise UsageError(f"{args.filename}: --allocation needs a QED image")
                    await image.set_home_allocation(args.allocation == "home")
                if isinstance(image.store, FileStore):
                    image.store.offload = True
            except BaseException:
                await image.close()
                raise
            return image

        image = engine.call(opening())
    except BaseException:
        engine.stop()
        raise
    mount(image, engine, args.mountpoint, name=name, debug=args.debug)
    return 0
