"""The import layering of DESIGN.md §2, read from the source with ast.

    errors  <- everyone
    format  <- store <- engine <- jobs <- (nbd, fuse, cli, api/aio)
    protocol (qedkit.nbd.protocol, the sans-I/O NBD core) <- store and everything above

format/ and the NBD protocol core are pure: no I/O modules, nothing outside the
standard library. Imports inside functions count as well.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

import qedkit

ROOT = Path(qedkit.__file__).resolve().parent
IO_MODULES = {
    "os", "io", "asyncio", "time", "logging", "socket", "threading", "mmap", "subprocess",
    "selectors", "signal", "multiprocessing", "concurrent", "ctypes", "shutil", "tempfile",
    "pathlib",
}  # fmt: skip

# Layer of each qedkit module, by name prefix; the lowest layers first.
LAYERS = [
    "errors", "format", "protocol", "store", "engine", "jobs", "api", "nbd", "fuse", "cli", "root",
]  # fmt: skip
# Which qedkit layers each layer may import (besides itself and errors).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "format": set(),
    "protocol": set(),  # qedkit.nbd.protocol: wire constants a store-layer client uses
    "store": {"format", "protocol"},
    "engine": {"format", "protocol", "store"},
    "jobs": {"format", "protocol", "store", "engine"},
    "api": {"format", "protocol", "store", "engine", "jobs"},  # qedkit.api, qedkit.aio
    "nbd": {"format", "protocol", "store", "engine", "jobs"},
    "fuse": {"format", "protocol", "store", "engine", "jobs"},  # qed mount: serves like nbd
    "cli": {"format", "protocol", "store", "engine", "jobs", "api", "nbd", "fuse"},
    "root": set(LAYERS),  # qedkit/__init__.py and __main__.py re-export
}
PROTOCOL = "qedkit.nbd.protocol"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "qedkit":
        raise ValueError(name)
    if len(parts) == 1 or parts[1] == "__main__":
        return "root"
    if name == PROTOCOL or name.startswith(PROTOCOL + "."):
        return "protocol"
    top = parts[1]
    if top in ("version", "_speedups"):  # leaves like errors: importable everywhere
        return "errors"
    if top in ("api", "aio"):
        return "api"
    if top in LAYERS:
        return top
    raise AssertionError(f"module {name} is in no layer of DESIGN.md §2: add it to LAYERS")


@cache
def imports_of(name: str) -> frozenset[str]:
    """Absolute names of every module ``name`` imports (anywhere in the file)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # "from .. import api" imports the module qedkit.api
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return frozenset(found)


def internal_imports(name: str) -> set[str]:
    return {m for m in imports_of(name) if m == "qedkit" or m.startswith("qedkit.")}


def top_level(module: str) -> str:
    return module.split(".")[0]


# ---- the parser itself -------------------------------------------------------------------


def test_every_module_is_found_and_parsed() -> None:
    assert {
        "qedkit.errors",
        "qedkit.format.header",
        "qedkit.engine.qed",
        "qedkit.cli.main",
        "qedkit.api",
    } <= set(MODULES)
    for name in MODULES:
        imports_of(name)


def test_resolver_sees_relative_function_level_and_package_imports() -> None:
    assert "qedkit.errors" in imports_of("qedkit.format.header")  # from ..errors import
    assert "qedkit.format.geometry" in imports_of("qedkit.format.header")  # from .geometry
    assert "qedkit.errors" in imports_of("qedkit.store.base")  # inside a method, too
    assert "qedkit.engine.qed.image" in imports_of("qedkit.engine.qed.move")  # TYPE_CHECKING
    assert "qedkit.api" in imports_of("qedkit.cli.info")  # from .. import api
    assert "qedkit.cli.output" in imports_of("qedkit.cli.info")  # from . import output


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_belongs_to_a_layer(name: str) -> None:
    assert layer_of(name) in LAYERS


# ---- purity of the format core ---------------------------------------------------------

PURE = sorted(n for n in MODULES if layer_of(n) in ("format", "protocol"))


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports_no_io_module(name: str) -> None:
    bad = {m for m in imports_of(name) if top_level(m) in IO_MODULES}
    assert not bad, f"{name} imports {sorted(bad)}: the format core does no I/O"


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports_only_the_standard_library(name: str) -> None:
    outside = {
        m
        for m in imports_of(name)
        if top_level(m) != "qedkit" and top_level(m) not in sys.stdlib_module_names
    }
    assert not outside, f"{name} imports {sorted(outside)} from outside the standard library"


# ---- direction of imports -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layer_direction(name: str) -> None:
    layer = layer_of(name)
    allowed = ALLOWED[layer] | {layer, "errors"}
    bad = sorted(
        f"{m} ({layer_of(m)})"
        for m in internal_imports(name)
        if m != "qedkit" and layer_of(m) not in allowed
    )
    assert not bad, f"{name} ({layer}) imports {bad}; allowed: {sorted(allowed)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) != "root"))
def test_no_module_below_the_root_imports_the_package_root(name: str) -> None:
    # "import qedkit" or "from qedkit import x" in a submodule hides a layer violation.
    assert "qedkit" not in internal_imports(name)


# ---- no circles -----------------------------------------------------------------------


def import_cycles() -> list[list[str]]:
    """Every strongly connected set of qedkit modules larger than one (Tarjan), each
    sorted: modules that import each other, directly or through others."""
    graph = {name: sorted(internal_imports(name) & set(MODULES)) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_cycles() -> None:
    """Imports inside functions and under TYPE_CHECKING count: a circle hidden by a
    late import is still a circle in the design."""
    assert import_cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    real = internal_imports

    def fake(name: str) -> set[str]:
        if name == "qedkit.errors":
            return {"qedkit.format.header"}
        return real(name)

    monkeypatch.setattr(sys.modules[__name__], "internal_imports", fake)
    assert ["qedkit.errors", "qedkit.format.header"] in import_cycles()


def test_errors_imports_nothing_from_qedkit() -> None:
    assert internal_imports("qedkit.errors") == set()


def test_store_imports_only_format_the_nbd_protocol_core_and_errors() -> None:
    allowed = {"store", "format", "protocol", "errors"}
    for name in (n for n in MODULES if layer_of(n) == "store"):
        assert {layer_of(m) for m in internal_imports(name)} <= allowed, name
    assert PROTOCOL in internal_imports("qedkit.store.nbdclient")


def test_engine_imports_only_format_the_nbd_protocol_core_store_and_errors() -> None:
    for name in (n for n in MODULES if layer_of(n) == "engine"):
        layers = {layer_of(m) for m in internal_imports(name)}
        assert layers <= {"engine", "format", "protocol", "store", "errors"}, name


# ---- the NBD protocol core ---------------------------------------------------------------


def test_the_nbd_protocol_core_is_a_package_of_its_own_layer() -> None:
    core = sorted(n for n in MODULES if layer_of(n) == "protocol")
    assert PROTOCOL in core and f"{PROTOCOL}.wire" in core and f"{PROTOCOL}.connection" in core
    assert layer_of("qedkit.nbd.server") == "nbd"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) == "protocol"))
def test_the_nbd_protocol_core_imports_nothing_from_store_engine_or_jobs(name: str) -> None:
    # Mapping engine exceptions to NBD errors is the server's policy (qedkit.nbd.errors).
    imported = internal_imports(name)
    assert {layer_of(m) for m in imported} <= {"protocol", "errors"}, sorted(imported)
    assert not {m for m in imported if m.split(".")[1] in ("store", "engine", "jobs")}


def test_importing_the_nbd_protocol_core_runs_only_the_core() -> None:
    # "import qedkit.nbd.protocol" first runs qedkit/nbd/__init__.py: if that imported
    # the server, a store-layer NBD client would pull in the engine.
    assert internal_imports("qedkit.nbd") <= {PROTOCOL} | {
        n for n in MODULES if n.startswith(PROTOCOL + ".")
    }


def test_jobs_do_not_import_cli_nbd_or_api() -> None:
    for name in (n for n in MODULES if layer_of(n) == "jobs"):
        assert not {layer_of(m) for m in internal_imports(name)} & {"cli", "nbd", "api"}, name


def test_api_does_not_import_cli_or_nbd() -> None:
    for name in ("qedkit.api", "qedkit.aio"):
        assert not {layer_of(m) for m in internal_imports(name)} & {"cli", "nbd"}, name
