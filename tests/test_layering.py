"""Imports point one way (parsed with ast, not grepped; every import, those inside functions too):

- between packages: klein <- deployments <- serve;
- inside deployments, by layer: shared pieces and storage <- stages <- jobs <- api <- ingress;
- and no cycle between any two modules of the project."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("klein", "deployments", "serve")
FORBIDDEN = {
    "klein": {
        "ray",
        "fastapi",
        "starlette",
        "boto3",
        "botocore",
        "diffusers",
        "deployments",
        "serve",
        "pydantic",
    },
    "deployments": {"serve", "diffusers"},
    "serve": {"diffusers"},
}
# deployments' layers, lowest first: a module may import its own layer and those below it
LAYERS = [
    ("deployments", "deployments.options", "deployments.telemetry", "deployments.metrics",
     "deployments.netguard", "deployments.storage"),
    ("deployments.stages",),
    ("deployments.jobs",),
    ("deployments.api",),
    ("deployments.ingress",),
]  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Full names of what a module imports: `from a.b import c` is a.b.c where that is a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    return names


GRAPH = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (i, prefix)
    return None if best is None else best[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_one_way(package):
    bad = {}
    for name, path in MODULES.items():
        if name.split(".")[0] == package:
            roots = {i.split(".")[0] for i in _imports(path)}
            if hit := sorted(roots & FORBIDDEN[package]):
                bad[name] = hit
    assert bad == {}


def test_deployments_layers_import_downwards():
    bad = []
    for name, imports in GRAPH.items():
        if not name.startswith("deployments"):
            continue
        assert _layer(name) is not None, f"{name} belongs to no layer: add it to LAYERS"
        for target in imports:
            if target.startswith("deployments") and _layer(target) > _layer(name):
                bad.append(f"{name} -> {target}")
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checks_see_what_they_check():
    """The graph has the edges it should, and a planted cycle or upward import is caught."""
    assert "deployments.jobs.store" in GRAPH["deployments.jobs.runner"]
    assert "deployments.telemetry" in GRAPH["deployments.ingress"]  # `from deployments import telemetry`
    planted = {k: set(v) for k, v in GRAPH.items()} | {
        "deployments.jobs.records": {"deployments.jobs.runner"}
    }
    assert any("deployments.jobs.runner" in c for c in _cycles(planted))
    assert (
        _layer("deployments.stages.codec") < _layer("deployments.jobs.store") < _layer("deployments.api.bfl")
    )
