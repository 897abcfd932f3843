"""``examples/tour`` (README command 1) run end to end, as a smoke test whose figures
are real: fragmentation after the online defragmentation is 0.00%, every byte the
qemu-io client wrote reads back, the checks are clean, no server is left running, an
overlay of a base on nginx is streamed and equals the base, and a qemu-made qcow2 image
converted in place checks clean and equals its original.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from qedtest import Qemu

TOUR = Path(__file__).resolve().parents[2] / "examples" / "tour"


def test_the_tour_defragments_while_the_client_runs_and_cleans_up(
    qemu: Qemu, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    p = subprocess.run(
        [sys.executable, str(TOUR), "--quick", "--keep", str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    (summary,) = [line for line in out.splitlines() if line.startswith("summary: ")]
    assert re.match(r"summary: \d+% fragmented -> 0%, sequential read [0-9.]+x faster", summary)
    assert "0 errors, client never stopped, streamed from HTTP, qcow2 converted in place" in (
        summary
    ), summary
    streamed = r"qed stream: \d+ clusters copied .* the backing link dropped; Images are identical"
    assert re.search(streamed, out), out
    converted = (
        r"is QED now, in the same file: \d+ data clusters left in place, \d+ copied; "
        r"qemu-img check clean, Images are identical"
    )
    assert re.search(converted, out), out
    # the figures behind the summary
    before, after = re.findall(r"fragmented ([0-9.]+)% \(as qemu-img check counts\)", out)
    assert float(before) > 50 and float(after) == 0.0, out
    assert re.search(r"every cluster it wrote read back: \d+ requests, 0 errors", out), out
    assert "qed check: No errors were found on the image." in out
    assert "qemu-img check: No errors were found on the image." in out
    assert re.search(r"client: [0-9,]+ requests/s during the job", out), out
    # the pictures exist and are PNGs
    for name in ("before.png", "after.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the server is gone
    (pid_text,) = re.findall(r"\(qed serve, pid (\d+)\)", out)
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"the tour left qed serve (pid {pid}) running")
    # the image is the guest's disk, checked by QEMU too
    result = qemu.img("check", "-f", "qed", work / "disk.qed", check=False)
    assert result.returncode == 0, result.stdout
