"""``qed info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE``: what
``qemu-img info`` prints, key for key."""

from __future__ import annotations

import argparse
import sys

from .common import add_force_share, add_format, add_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    add_output(p)
    p.add_argument("--backing-chain", action="store_true", help="also show every backing image")
    add_force_share(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
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
