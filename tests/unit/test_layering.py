"""The layering of docs/architecture.md, enforced: tools -> node -> mesh -> proxy -> core.

Every import counts, including those inside functions and under TYPE_CHECKING.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "proxy", "mesh", "node", "tools")
IO_MODULES = {"anyio", "asyncio", "socket", "subprocess", "aetcd", "grpc", "hiredis", "time",
              "structlog", "tenacity", "uvloop"}

# (module prefix, what it must not import, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    ("core", ("proxy", "mesh", "node", "tools"), "core is the bottom layer"),
    ("proxy", ("mesh", "node", "tools"), "the data path does not know the control plane"),
    ("mesh", ("node", "tools"), "the control plane is driven from above"),
    ("node", ("tools",), "the entry point does not need the operator tools"),
    ("mesh.model", tuple(IO_MODULES) + ("mesh.store", "mesh.agent", "mesh.leader",
                                         "mesh.redisctl", "proxy"),
     "the model is pure: values in, values out"),
    ("tools", ("mesh.leader", "mesh.agent"), "the CLI reads records through the store"),
]
# what mesh/ may use of the data path: its control port and the routing builder (and the
# RESP codec, for the small Redis client that checks backends)
MESH_MAY_IMPORT_FROM_PROXY = {"proxy", "proxy.control", "proxy.routing", "proxy.resp"}
ETCD_CLIENT_OWNER = "mesh.store.etcd"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every module `module` imports, relative imports resolved."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import x` / `from pkg import mod`: the names may be modules
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def project_modules() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = module_name(path)
            graph[name] = imports_of(path.read_text(), name, path.name == "__init__.py")
    return graph


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        for prefix, banned, why in RULES:
            if not under(module, prefix):
                continue
            for target in sorted(imported):
                if any(under(target, b) for b in banned):
                    found.append(f"{module} imports {target}: {why}")
        if under(module, "mesh"):
            for target in sorted(imported):
                if under(target, "proxy") and target not in MESH_MAY_IMPORT_FROM_PROXY \
                        and not target.startswith(("proxy.control.", "proxy.routing.",
                                                   "proxy.resp.")):
                    found.append(f"{module} imports {target}: mesh/ reaches the data path "
                                 "through proxy.control and proxy.routing only")
        if module != ETCD_CLIENT_OWNER:
            for target in imported:
                if under(target, "aetcd"):
                    found.append(f"{module} imports {target}: only {ETCD_CLIENT_OWNER} talks "
                                 "to etcd")
    return found


def cycles(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Import cycles among the modules under `prefix`."""
    inside = {m: {t for t in imported if t in graph and under(t, prefix) and t != m}
              for m, imported in graph.items() if under(m, prefix)}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(inside[m]):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(inside):
        if m not in state:
            visit(m, [m])
    return found


def test_no_module_imports_across_the_layering():
    assert violations(project_modules()) == []


@pytest.mark.parametrize("prefix", ["core", "proxy", "mesh"])
def test_no_import_cycle_inside_a_package(prefix):
    assert cycles(project_modules(), prefix) == []


@pytest.mark.parametrize("module,source,expected", [
    ("proxy.session", "from mesh.store.etcd import EtcdStore", "proxy.session imports mesh.store.etcd"),
    ("proxy.session", "if TYPE_CHECKING:\n    from mesh.agent import NodeAgent", "imports mesh.agent"),
    ("proxy.session", "def f():\n    import mesh.store", "imports mesh.store"),
    ("mesh.model.view", "import anyio", "mesh.model.view imports anyio"),
    ("mesh.model.view", "from ..store import etcd", "mesh.model.view imports mesh.store"),
    ("tools.umctl_mesh.ops", "from mesh.leader import read_nodes", "imports mesh.leader"),
    ("mesh.agent", "from proxy.server import ProxyServer", "reaches the data path"),
    ("mesh.agent", "import aetcd", "only mesh.store.etcd talks to etcd"),
    ("core.view", "from proxy.routing import RoutingTable", "core is the bottom layer"),
])
def test_checker_catches_a_forbidden_import(module, source, expected):
    graph = {module: imports_of(source, module, is_package=False)}
    assert any(expected in v for v in violations(graph)), violations(graph)


def test_checker_catches_a_cycle():
    graph = {"proxy.a": {"proxy.b"}, "proxy.b": {"proxy.c"}, "proxy.c": {"proxy.a"}}
    assert cycles(graph, "proxy") == [["proxy.a", "proxy.b", "proxy.c", "proxy.a"]]
