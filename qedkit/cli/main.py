"""The ``qed`` command: argument parsing and output only; the work is in the library.

Every command that opens an image takes ``-f FMT`` (probed when absent). Failures
print ``qed: FILE: message`` on stderr and exit non-zero; ``check`` uses qemu-img's
exit codes (0 clean, 1 check incomplete, 2 corruptions, 3 leaks only, 63 no check
for this format).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import QedError
from ..format.geometry import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE
from ..format.sizes import parse_size
from ..version import __version__

EXIT_FAILURE = 1
EXIT_NO_CHECK = 63  # qemu-img check: the format has no consistency check

CREATE_OPTIONS = {
    "size": "virtual disk size",
    "backing_file": "file name of a base image",
    "backing_fmt": "image format of the base image (raw or qed)",
    "cluster_size": f"cluster size in bytes (default {DEFAULT_CLUSTER_SIZE})",
    "table_size": f"L1/L2 table size in clusters (default {DEFAULT_TABLE_SIZE})",
    "allocation": "where new clusters go: end (of the file, as QEMU) or home (raw-like)",
}


class UsageError(Exception):
    """Bad command line; printed as ``qed: message``, exit 1."""


# ---- helpers --------------------------------------------------------------------


def _parse_options(text: str | None) -> dict[str, str]:
    opts: dict[str, str] = {}
    if not text:
        return opts
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if key in ("help", "?"):
                opts["help"] = ""
                continue
            raise UsageError(f"invalid option {item!r}: expected name=value")
        if key not in CREATE_OPTIONS:
            raise UsageError(f"unknown option {key!r} (known: {', '.join(CREATE_OPTIONS)})")
        opts[key] = value
    return opts


def _size_arg(text: str, what: str = "size") -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if what == "size":  # qemu-img rounds image sizes up to whole sectors
        value = (value + 511) // 512 * 512
    return value


def _print_create_options() -> None:
    print("Supported options:")
    for key, text in CREATE_OPTIONS.items():
        print(f"  {key:<22}- {text}")


def _geometry(opts: dict[str, str]) -> tuple[int, int]:
    cluster_size = (
        _size_arg(opts["cluster_size"], "cluster_size")
        if "cluster_size" in opts
        else DEFAULT_CLUSTER_SIZE
    )
    table_size = DEFAULT_TABLE_SIZE
    if "table_size" in opts:
        text = opts["table_size"]
        if not text.isascii() or not text.isdigit():
            raise UsageError(f"invalid table_size {text!r}: expected a number of clusters")
        table_size = int(text)
    return cluster_size, table_size


# ---- commands -------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    from .. import api

    opts = _parse_options(args.options)
    if "help" in opts:
        _print_create_options()
        return 0
    fmt = args.format or "qed"
    backing = args.backing or opts.get("backing_file")
    backing_fmt = args.backing_format or opts.get("backing_fmt")
    size_text = args.size or opts.get("size")
    size = _size_arg(size_text) if size_text is not None else None
    cluster_size, table_size = _geometry(opts)
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
    from ..engine.chain import create_image
    from ..engine.sync import run

    if size is None:
        raise UsageError("-u needs an explicit size")
    return run(
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


def cmd_info(args: argparse.Namespace) -> int:
    from .. import api
    from . import output

    with api.open(
        args.filename,
        readonly=True,
        format=args.format,
        backing_chain=args.backing_chain,
        force_share=args.force_share,
    ) as img:
        chain = img.chain_info() if args.backing_chain else [img.info()]
    if args.output == "json":
        print(output.info_json(chain, args.backing_chain))
    else:
        sys.stdout.write(output.info_human(chain))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
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


def cmd_check(args: argparse.Namespace) -> int:
    from .. import api
    from ..engine.check import RepairMode, check_and_repair
    from ..engine.qed import QedImage
    from ..engine.sync import run
    from . import output

    repair = RepairMode(args.repair) if args.repair else None
    with api.open(
        args.filename,
        readonly=repair is None,
        format=args.format,
        backing_chain=False,
        auto_repair=False,
        force_share=args.force_share and repair is None,
    ) as img:
        if not isinstance(img.engine, QedImage):
            print(
                f"qed: {args.filename}: this image format ({img.format}) does not support checks",
                file=sys.stderr,
            )
            return EXIT_NO_CHECK
        report = run(check_and_repair(img.engine, repair))
    if args.output == "json":
        if not args.quiet:
            print(output.check_json(report))
    elif not args.quiet:
        if report.corruptions_fixed or report.leaks_fixed:
            sys.stdout.write(output.repaired_human(report))
        sys.stdout.write(output.check_human(report))
        details = output.problems_human(report)
        if details and report.exit_code:
            sys.stderr.write(details)
    if report.check_errors:
        print(f"qed: {args.filename}: check failed: some tables could not be read", file=sys.stderr)
    return report.exit_code


def cmd_convert(args: argparse.Namespace) -> int:
    from ..jobs.convert import convert
    from .progress import Progress

    opts = _parse_options(args.options)
    if "help" in opts:
        _print_create_options()
        return 0
    cluster_size, table_size = _geometry(opts)
    if args.cache not in ("unsafe", "writeback", "none", "writethrough", "directsync"):
        raise UsageError(f"invalid cache mode {args.cache!r}")
    show = args.progress or (sys.stderr.isatty() and not args.quiet)
    with Progress(show) as progress:
        convert(
            args.source,
            args.target,
            src_format=args.format,
            dst_format=args.output_format or "raw",
            cluster_size=cluster_size,
            table_size=table_size,
            flush=args.cache != "unsafe",
            force_share=args.force_share,
            progress=progress,
        )
    return 0


def cmd_defrag(args: argparse.Namespace) -> int:
    import json

    from ..engine.chain import open_image
    from ..engine.check import check_image
    from ..engine.qed import LayoutKind, QedImage
    from ..engine.sync import run
    from ..jobs.defrag import Defragmenter
    from .progress import Progress

    img = run(open_image(args.filename, fmt=args.format))
    try:
        if not isinstance(img, QedImage):
            raise UsageError(f"{args.filename}: only QED images can be defragmented")
        report = run(check_image(img))
        if report.corruptions or report.check_errors:
            raise UsageError(
                f"{args.filename}: the image has {report.corruptions} corruptions; "
                "run 'qed check -r all' first"
            )
        layout = LayoutKind(args.layout) if args.layout else None
        defrag = run(Defragmenter.create(img, layout=layout))
        show = args.progress or (sys.stderr.isatty() and not args.quiet)
        with Progress(show, "defrag", unit=" clusters") as progress:

            async def checkpoint(done: int, total: int) -> None:
                progress(done, total)

            stats = run(defrag.run(checkpoint=checkpoint))
    finally:
        run(img.close())
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


def cmd_frag(args: argparse.Namespace) -> int:
    from .. import api
    from ..engine.qed import QedImage
    from ..engine.sync import run
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
        report = run(fragmentation_report(img.engine, grid=grid))
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


def cmd_io(args: argparse.Namespace) -> int:
    from .. import api
    from .io import run_script

    if args.force_share and not args.readonly:
        raise UsageError("-U (force share) needs -r: an image in use cannot be written")
    with api.open(
        args.filename, readonly=args.readonly, format=args.format, force_share=args.force_share
    ) as img:
        status = run_script(img, args.commands or [], sys.stdout, sys.stderr)
    return status


# ---- parser ---------------------------------------------------------------------


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        dest="format",
        metavar="FMT",
        choices=("qed", "raw", "qcow2"),
        help="image format (probed when omitted)",
    )


def _add_force_share(p: argparse.ArgumentParser, what: str = "the image") -> None:
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help=f"open {what} even if another process writes it (read-only)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format (default human)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qed",
        description="Create, inspect, check and convert QED (QEMU Enhanced Disk) images.",
    )
    parser.add_argument("--version", action="version", version=f"qed (qedkit) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("create", help="create a new image")
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
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("size", metavar="SIZE", nargs="?", help="size with optional k/M/G/T suffix")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("info", help="show information about an image")
    _add_format(p)
    _add_output(p)
    p.add_argument("--backing-chain", action="store_true", help="also show every backing image")
    _add_force_share(p)
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("map", help="show the allocation map of an image and its backing chain")
    _add_format(p)
    _add_output(p)
    p.add_argument("-s", "--start-offset", type=_size_arg_plain, default=0, metavar="OFFSET")
    p.add_argument("-l", "--max-length", type=_size_arg_plain, default=None, metavar="LENGTH")
    _add_force_share(p)
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("check", help="check (and repair) the metadata of a QED image")
    _add_format(p)
    _add_output(p)
    p.add_argument(
        "-r", dest="repair", choices=("leaks", "all"), help="repair what can be repaired"
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    _add_force_share(p)
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("convert", help="copy an image (flattening its chain) into a new one")
    _add_format(p)
    p.add_argument(
        "-O",
        dest="output_format",
        metavar="FMT",
        choices=("qed", "raw"),
        help="target format (default raw)",
    )
    p.add_argument(
        "-o", dest="options", metavar="OPTIONS", help="target options (cluster_size, table_size)"
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    _add_force_share(p, "the source")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument(
        "-t",
        dest="cache",
        default="unsafe",
        metavar="CACHE",
        help="target cache mode: unsafe (default, as qemu-img: no flush) "
        "or writeback (flush at the end)",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("io", help="run qemu-io style commands on an image")
    _add_format(p)
    p.add_argument("-r", dest="readonly", action="store_true", help="open read-only")
    _add_force_share(p, "the image (with -r)")
    p.add_argument(
        "-c",
        dest="commands",
        action="append",
        metavar="CMD",
        help="command to run (repeatable): read, write, write -z, discard, flush",
    )
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_io)

    p = sub.add_parser(
        "defrag", help="lay the image out for sequential reads and a compact file (offline)"
    )
    _add_format(p)
    _add_output(p)
    p.add_argument(
        "--layout",
        choices=("packed", "identity"),
        help="packed (default unless the image has the home allocation policy): tables "
        "first, then the allocated clusters in guest order, no holes, a file as small as "
        "a converted copy; identity: every cluster at data start + its guest offset, which "
        "stays raw-like for later writes (sets the home allocation policy), but the file "
        "spans the virtual disk and every QED checker reports its holes as leaked clusters",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_defrag)

    p = sub.add_parser("frag", help="report how fragmented a QED image is (read-only)")
    _add_format(p)
    _add_output(p)
    p.add_argument(
        "--picture",
        metavar="PICTURE",
        help="also draw the guest-to-host layout into PICTURE (a .svg or .png file)",
    )
    _add_force_share(p)
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_frag)

    from .serve import add_parsers

    add_parsers(sub)
    return parser


def _size_arg_plain(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _file_of(args: argparse.Namespace) -> str | None:
    for name in ("filename", "source"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["ctl"]:
        # KEY=VALUE arguments may come after options (qed ctl S defrag --until-done
        # clusters=8): parse the subcommand with options and positionals intermixed.
        from .serve import ctl_parser

        args = ctl_parser().parse_intermixed_args(words[1:])
    else:
        args = parser.parse_args(words)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        print(f"qed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except QedError as exc:
        if exc.filename is None and _file_of(args):
            exc.with_filename(_file_of(args) or "")
        print(f"qed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("qed: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as exc:  # e.g. writing output failed
        print(f"qed: {_file_of(args) or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE


def entry_point() -> None:
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = EXIT_FAILURE
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    entry_point()
