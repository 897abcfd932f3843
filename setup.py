"""Only the optional C helper lives here; everything else is in pyproject.toml.

The extension is optional: without a C compiler or Python's headers the build
goes on without it, and qedkit runs its pure-Python path (docs/DESIGN.md,
"Dependencies")."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("qedkit._speedups", ["qedkit/_speedups.c"], optional=True),
    ]
)
