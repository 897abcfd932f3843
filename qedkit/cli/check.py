"""``qed check [-f FMT] [--output human|json] [-r leaks|all] [-q] [-U] FILE``: the
consistency check of a QED image (engine.check), with qemu-img check's output and
exit codes: 0 clean, 1 check incomplete, 2 corruptions, 3 leaks only, 63 no check
for this format. A repair removes leaked clusters; those that a corruption may have
orphaned are saved first to ``FILE.lost+found.tar`` (engine.lostfound), which the
output names (``"lost-and-found"`` in JSON)."""

from __future__ import annotations

import argparse
import sys

from .common import add_force_share, add_format, add_output, add_quiet

EXIT_NO_CHECK = 63  # qemu-img check: the format has no consistency check


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_format(p)
    add_output(p)
    p.add_argument(
        "-r",
        dest="repair",
        choices=("leaks", "all"),
        help="repair: leaks (removed by moving clusters into them; only on an image "
        "without corruption) or all (corruptions, then leaks; leaked clusters holding "
        "data are saved first to FILE.lost+found.tar)",
    )
    add_quiet(p)
    add_force_share(p)
    p.add_argument("filename", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..engine.check import RepairMode, check_and_repair
    from ..engine.lostfound import LostFoundTar
    from ..engine.qed import QedImage
    from ..engine.sync import run as run_sync
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
        lost_found = LostFoundTar.beside(args.filename) if repair is not None else None
        report = run_sync(check_and_repair(img.engine, repair, lost_found=lost_found))
    if args.output == "json":
        if not args.quiet:
            print(output.check_json(report))
    elif not args.quiet:
        if report.corruptions_fixed or report.leaks_fixed:
            sys.stdout.write(output.repaired_human(report))
        sys.stdout.write(output.check_human(report))
        sys.stdout.write(output.lost_found_human(report))
        details = output.problems_human(report)
        if details and report.exit_code:
            sys.stderr.write(details)
        sys.stderr.write(output.notes_human(report))
    if report.check_errors:
        print(f"qed: {args.filename}: check failed: some tables could not be read", file=sys.stderr)
    return report.exit_code
