"""``qed io [-f FMT] [-r [-U]] [-C] -c CMD [-c CMD ...] FILE``: the subset of qemu-io
that scripts and tests need. ``-C`` is qemu-io's copy-on-read: every cluster a read
takes from the backing chain is copied into the image.

Commands (numbers take k/M/G/T suffixes, binary)::

    read  [-P PATTERN] [-q] OFFSET LENGTH     read; with -P, verify every byte
    write [-P PATTERN] [-q] OFFSET LENGTH     write PATTERN (default 0xcd) bytes
    write -z [-u] [-q] OFFSET LENGTH          write zeroes (-u: may release space)
    discard [-q] OFFSET LENGTH
    flush

Each command that completes prints one line as qemu-io's first line does
("wrote 4096/4096 bytes at offset 0") and the line is flushed at once, so a
process killed mid-script has reported exactly the commands that completed.
A failing command prints its error and the script goes on; the exit status is 1
if any command failed, as with qemu-io.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from ..errors import InvalidRequestError, QedError
from ..format.sizes import parse_size
from .common import UsageError, add_force_share, add_format

if TYPE_CHECKING:
    from ..api import Image

DEFAULT_PATTERN = 0xCD  # qemu-io's default write pattern


class IoCommandError(Exception):
    """A command line qed io cannot parse."""


# ---- the verb -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    p.add_argument("-r", dest="readonly", action="store_true", help="open read-only")
    add_force_share(p, "the image (with -r)")
    p.add_argument(
        "-C",
        dest="copy_on_read",
        action="store_true",
        help="copy-on-read: clusters read from the backing chain are copied into the image",
    )
    p.add_argument(
        "-c",
        dest="commands",
        action="append",
        metavar="CMD",
        help="command to run (repeatable): read, write, write -z, discard, flush",
    )
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from .. import api

    if args.force_share and not args.readonly:
        raise UsageError("-U (force share) needs -r: an image in use cannot be written")
    if args.copy_on_read and args.readonly:
        raise UsageError("-C (copy-on-read) writes the image: it cannot be combined with -r")
    with api.open(
        args.filename,
        readonly=args.readonly,
        format=args.format,
        force_share=args.force_share,
        copy_on_read=args.copy_on_read,
    ) as img:
        return run_script(img, args.commands or [], sys.stdout, sys.stderr)


# ---- the commands ---------------------------------------------------------------------


def _parse(argv: Sequence[str], flags: str) -> tuple[dict[str, str | bool], list[str]]:
    """Tiny getopt: ``flags`` like "P:zuq" (a colon marks an option with a value)."""
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit() and not rest:
            for k, ch in enumerate(arg[1:], start=1):
                pos = flags.find(ch)
                if pos < 0:
                    raise IoCommandError(f"invalid option -{ch}")
                if pos + 1 < len(flags) and flags[pos + 1] == ":":
                    value = arg[k + 1 :] or next(it, None)
                    if value is None:
                        raise IoCommandError(f"option -{ch} needs a value")
                    opts[ch] = value
                    break
                opts[ch] = True
        else:
            rest.append(arg)
    return opts, rest


def _pattern(value: str | bool | None, default: int) -> int:
    if value is None or value is True:
        return default
    try:
        pattern = int(str(value), 0)
    except ValueError:
        raise IoCommandError(f"invalid pattern {value!r}") from None
    if not 0 <= pattern <= 255:
        raise IoCommandError(f"pattern {value!r} is not a byte")
    return pattern


def _range(rest: list[str], name: str) -> tuple[int, int]:
    if len(rest) != 2:
        raise IoCommandError(f"{name} needs OFFSET and LENGTH")
    try:
        return parse_size(rest[0]), parse_size(rest[1])
    except ValueError as exc:
        raise IoCommandError(str(exc)) from None


def run_command(image: Image, line: str, out: TextIO = sys.stdout) -> bool:
    """Run one command; returns False if it failed (after reporting why)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:  # e.g. "No closing quotation"
        raise IoCommandError(str(exc)) from None
    if not argv:
        return True
    name, args = argv[0], argv[1:]
    if name == "read":
        opts, rest = _parse(args, "P:qv")
        offset, length = _range(rest, name)
        data = image.read(offset, length)
        ok = True
        if "P" in opts:
            pattern = _pattern(opts["P"], 0)
            if data.translate(None, bytes([pattern])):  # some byte differs
                out.write(f"Pattern verification failed at offset {offset}, {length} bytes\n")
                ok = False
        if not opts.get("q"):
            out.write(f"read {length}/{length} bytes at offset {offset}\n")
        out.flush()
        return ok
    if name == "write":
        opts, rest = _parse(args, "P:zuq")
        offset, length = _range(rest, name)
        if opts.get("z"):
            if "P" in opts:
                raise IoCommandError("-z and -P cannot be combined")
            image.write_zeroes(offset, length, unmap=bool(opts.get("u")))
        else:
            if opts.get("u"):
                raise IoCommandError("-u needs -z")
            image.write(offset, bytes([_pattern(opts.get("P"), DEFAULT_PATTERN)]) * length)
        if not opts.get("q"):
            out.write(f"wrote {length}/{length} bytes at offset {offset}\n")
            out.flush()
        return True
    if name == "discard":
        opts, rest = _parse(args, "q")
        offset, length = _range(rest, name)
        image.discard(offset, length)
        if not opts.get("q"):
            out.write(f"discard {length}/{length} bytes at offset {offset}\n")
            out.flush()
        return True
    if name == "flush":
        if args:
            raise IoCommandError("flush takes no arguments")
        image.flush()
        return True
    raise IoCommandError(f"unknown command {name!r} (read, write, discard, flush)")


def run_script(image: Image, commands: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Run ``commands`` in order; 0 if all succeeded, else 1."""
    status = 0
    for line in commands:
        try:
            if not run_command(image, line, out):
                status = 1
        except IoCommandError as exc:
            err.write(f"qed: {image.filename}: {line!r}: {exc}\n")
            status = 1
        except InvalidRequestError as exc:
            err.write(f"qed: {exc}\n")
            status = 1
        except QedError as exc:
            err.write(f"qed: {exc.with_filename(image.filename)}\n")
            status = 1
        err.flush()
    return status
