"""What the fuzz suites share (imported as ``fuzzkit``; tests/fuzz is on sys.path).

``capped_address_space(margin)`` caps the address space of the test process at its
current size plus ``margin`` while a fuzzer runs: an image must not make qedkit
allocate gigabytes (a table entry is an untrusted number), and with the cap such an
allocation fails with MemoryError (a failure naming the culprit) instead of waking
the OOM killer. The old limits are restored afterwards.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator


def vm_size() -> int:
    """The address space of this process in bytes (0 when /proc does not say)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def capped_address_space(margin: int) -> Iterator[None]:
    """RLIMIT_AS at the current size plus ``margin`` (never above the hard limit;
    no cap when the size is unknown) for the block, restored after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = vm_size()
    cap = vm + margin if vm else resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
