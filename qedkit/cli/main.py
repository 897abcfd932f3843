"""The ``qed`` command: the verb table, the top-level parser, errors and exit codes.

Each verb is a module of this package (``qedkit.cli.<verb>``) with
``add_arguments(parser)`` (its flags, beside its handler) and ``run(args) -> int``
(the handler); a verb may also set ``INTERMIXED = True`` (options and positionals
in any order) and define ``epilog() -> str`` (text after its ``--help``, computed
only when the help is printed). The work is in the library; output formats are in
cli.output.

Start-up imports only what the command needs: ``qed --help`` lists the verbs from
the table below without importing any verb module, and ``qed VERB ...`` imports
that verb's module alone and parses the rest of the command line with the verb's
own parser, so a wrong flag prints ``usage: qed VERB ...`` (exit 2).

Every command that opens an image takes ``-f FMT`` (probed when absent). Failures
print ``qed: FILE: message`` on stderr and exit non-zero; ``check`` uses qemu-img's
exit codes (0 clean, 1 check incomplete, 2 corruptions, 3 leaks only, 63 no check
for this format).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from ..errors import QedError
from ..version import __version__
from .common import UsageError

EXIT_FAILURE = 1

# The verbs, in the order ``qed --help`` lists them, with their one-line summaries.
VERBS: dict[str, str] = {
    "create": "create a new image",
    "info": "show information about an image",
    "map": "show the allocation map of an image and its backing chain",
    "check": "check (and repair) the metadata of a QED image",
    "convert": "copy an image (flattening its chain) into a new one",
    "compare": "check whether two images show the same guest contents",
    "commit": "write an overlay's data into its backing image, then empty it",
    "rebase": "give an overlay another backing file (safely: its view stays)",
    "resize": "grow or shrink an image",
    "measure": "how large a QED image of some content or size would be",
    "io": "run qemu-io style commands on an image",
    "amend": "change a QED image's cluster or table size, or backing format",
    "bench": "time read or write requests through the engine (IOPS, MB/s)",
    "defrag": "pack the clusters in guest order: fast, compact (offline)",
    "frag": "report how fragmented a QED image is (read-only)",
    "mount": "the guest disk of an image as a file under a FUSE mount",
    "stream": "copy the backing file in, then drop the link (offline)",
    "serve": "serve images over NBD",
    "ctl": "send a command to a qed serve control socket",
}


class Verb(Protocol):
    """What main needs of a verb module."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: its epilog, if any, is computed only when help is printed."""

    def __init__(self, *, epilog_source: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epilog_source = epilog_source

    def format_help(self) -> str:
        if self.epilog_source is not None:
            self.epilog = self.epilog_source()
        return super().format_help()


def top_parser() -> argparse.ArgumentParser:
    """``qed [--version] COMMAND ...``: lists the verbs; parses no verb's arguments."""
    parser = argparse.ArgumentParser(
        prog="qed",
        description="Create, inspect, check and convert QED (QEMU Enhanced Disk) images.",
    )
    parser.add_argument("--version", action="version", version=f"qed (qedkit) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in VERBS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def verb_module(name: str) -> Verb:
    return cast(Verb, importlib.import_module(f"{__package__}.{name}"))


def verb_parser(name: str, module: Verb | None = None) -> argparse.ArgumentParser:
    """The parser of ``qed NAME`` (prog "qed NAME"), with the verb's arguments."""
    module = module or verb_module(name)
    parser = VerbParser(
        prog=f"qed {name}",
        description=VERBS[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog_source=getattr(module, "epilog", None),
    )
    module.add_arguments(parser)
    return parser


def parse(words: Sequence[str]) -> tuple[Verb, argparse.Namespace]:
    """The verb module and its arguments; argparse exits (2) on a bad command line
    and on --help/--version."""
    words = list(words)
    if not words or words[0] not in VERBS:
        top_parser().parse_args(words)  # help, version or the error: exits
        raise AssertionError("unreachable: the top-level parser needs a known verb")
    module = verb_module(words[0])
    parser = verb_parser(words[0], module)
    if getattr(module, "INTERMIXED", False):
        args = parser.parse_intermixed_args(words[1:])
    else:
        args = parser.parse_args(words[1:])
    return module, args


def _file_of(args: argparse.Namespace) -> str | None:
    for name in ("filename", "source"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    module, args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return module.run(args)
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
