"""The packages depend one way: no import cycles, the libraries below never import the
daemon, and the pure modules import without libvirt or pyroute2.

The import graph is read from the source with `ast`: every `import` and `from ... import`
of a project module, at the top, inside functions and under TYPE_CHECKING alike.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "hostagent", "pki", "network", "cloudconfig")
# What each package must never import: the daemon sits on top, common at the bottom.
FORBIDDEN = {
    "common": {"hostagent", "pki", "network", "cloudconfig"},
    "pki": {"hostagent"},
    "network": {"hostagent"},
    "cloudconfig": {"hostagent"},
    "hostagent": set(),
}
PURE = (
    "common.names",
    "common.errors",
    "common.failover",
    "hostagent.nodeplan",
    "hostagent.virt.domain",
    "hostagent.zone.placement",
    "hostagent.zone.keys",
    "hostagent.zone.leadership",
    "hostagent.zone.liveness",
    "network.plan",
    "network.firewall",
    "cloudconfig.render",
    "pki.certset",
    "pki.lifetime",
    "pki.controlca",
    "hostagent.zone.auth",
    "hostagent.zone.rollout",
    "hostagent.zone.remediation",
    "hostagent.zone.observe",
    "hostagent.nodehealth",
    "hostagent.imagesource",
    "hostagent.console",
)

Graph = dict[str, set[str]]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The module names one import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            prefix = here[: len(here) - node.level + 1]
            base = ".".join([*prefix, base] if base else prefix)
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


@functools.cache
def import_graph() -> Graph:
    modules = project_modules()
    graph: Graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        targets = {
            name
            for node in ast.walk(tree)
            for name in imported(node, module, is_package)
            if name in modules and name != module
        }
        graph[module] = targets
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: Graph) -> str:
    """One path around the cycle, e.g. `a -> b -> a`, and which modules are in it."""
    members = set(component)
    path = [component[0]]
    while True:
        following = sorted(graph[path[-1]] & members)
        step = next((m for m in following if m == path[0] or m not in path), following[0])
        path.append(step)
        if step in path[:-1]:
            return " -> ".join(path[path.index(step) :])


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = [describe(component, graph) for component in cycles(graph)]
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def test_the_cycle_finder_names_the_cycle() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (component,) = cycles(graph)
    assert component == ["a", "b", "c"]
    assert describe(component, graph) == "a -> b -> c -> a"


def test_relative_imports_resolve() -> None:
    tree = ast.parse("from . import layout\nfrom .keys import KeyType")
    names = [name for node in tree.body for name in imported(node, "pki.certset", False)]
    assert names == ["pki", "pki.layout", "pki.keys", "pki.keys.KeyType"]


def package_graph(graph: Graph) -> Graph:
    packages: Graph = {package: set() for package in PACKAGES}
    for module, targets in graph.items():
        packages[module.split(".")[0]] |= {target.split(".")[0] for target in targets}
    return {package: targets - {package} for package, targets in packages.items()}


def test_packages_depend_one_way() -> None:
    graph = package_graph(import_graph())
    found = [describe(component, graph) for component in cycles(graph)]
    assert not found, "packages importing each other:\n  " + "\n  ".join(found)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_do_not_import_those_above_them(package: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] in FORBIDDEN[package]
    )
    assert not wrong, f"{package} must not import {sorted(FORBIDDEN[package])}:\n  " + (
        "\n  ".join(wrong)
    )


def test_pure_modules_import_without_outside_systems() -> None:
    # None in sys.modules makes `import libvirt` raise ImportError, as if not installed.
    code = f"""
import importlib, sys
sys.modules["libvirt"] = sys.modules["pyroute2"] = None
for module in {PURE!r}:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(f"{{module}}: {{exc}}")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert not result.stdout, f"pure modules that need an outside system:\n{result.stdout}"


# Each outside system's library, and the only modules that may import it.
ADAPTERS = {
    "libvirt": {"hostagent.virt.libvirt"},
    "pyroute2": {"network.netlink"},
    "httpx": {"common.http"},
    "requests": {"pki.vault"},  # hvac's transport: its errors are caught there
    "hvac": {"pki.vault"},
    "sqlite3": {"hostagent.sqlite"},
    "prometheus_client": {"hostagent.metrics"},
    "pycdlib": {"cloudconfig.configdrive"},
    "icmplib": {"network.health"},
    "psutil": {"hostagent.daemon"},
    "jinja2": {"cloudconfig.render"},
    "yaml": {"common.yamlio"},
    "aetcd": {"hostagent.zone.etcd"},
    "grpc": {"hostagent.zone.etcd"},  # aetcd's transport: TLS channels
}
# aiohttp serves the APIs; it is no client.
SERVERS = {"hostagent.api", "hostagent.daemon", "hostagent.zone.api", "hostagent.zone.server"}


def outside_imports() -> dict[str, set[str]]:
    """Per top-level outside library: the project modules that import it."""
    found: dict[str, set[str]] = {}
    for module, path in project_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(module)
    return found


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_each_outside_library_has_one_adapter(library: str) -> None:
    users = outside_imports().get(library, set())
    assert users <= ADAPTERS[library], (
        f"{library} is imported outside its adapter {sorted(ADAPTERS[library])}: "
        f"{sorted(users - ADAPTERS[library])}"
    )


def test_aiohttp_only_serves() -> None:
    users = outside_imports().get("aiohttp", set())
    assert users <= SERVERS, f"aiohttp outside the servers: {sorted(users - SERVERS)}"


def test_cryptography_stays_inside_pki() -> None:
    users = outside_imports().get("cryptography", set())
    outside = sorted(user for user in users if user.split(".")[0] != "pki")
    assert not outside, f"cryptography used outside pki: {outside}"
