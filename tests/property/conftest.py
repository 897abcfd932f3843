"""Hypothesis profiles and helpers for the property tests.

Profiles (pick one with ``QEDKIT_HYPOTHESIS_PROFILE``; the default is ``fast``):

* ``fast``: the everyday run; the whole of tests/property finishes in well under a
  minute. Stateful runs are ~50 examples of ~30 steps each.
* ``thorough``: twenty times the examples and longer programs, for a nightly job or
  before a release (``QEDKIT_HYPOTHESIS_PROFILE=thorough pytest tests/property``).

Deadlines are off in both: an example's time depends on the page cache and on
fdatasync, not on the code under test.

The chosen profile is registered again as ``qedkit-property`` and the tests here apply
it explicitly (``@settings(settings.get_profile("qedkit-property"))``) instead of
loading it as the global default, so hypothesis tests elsewhere in the suite keep
their own settings.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings
from qedtest import IN_CI, require_tool

PROFILE_ENV = "QEDKIT_HYPOTHESIS_PROFILE"

settings.register_profile(
    "fast",
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "qedkit-property", settings.get_profile(os.environ.get(PROFILE_ENV, "fast"))
)


@pytest.fixture(scope="session")
def qemu_img() -> str | None:
    """Path of qemu-img for the optional oracle checks, or None when it is missing.

    Missing is fine on a developer machine (the checks are skipped, the property
    tests still run), but under CI=true it fails the test (``require_tool``).
    """
    path = shutil.which("qemu-img")
    if path is not None or not IN_CI:
        return path
    return require_tool("qemu-img")  # fails under CI
