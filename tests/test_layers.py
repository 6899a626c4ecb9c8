"""Data flows one way: common -> client -> (Flower messages) -> server; deploy sits on top of all three.

A module that imports a layer above it (client importing server, common importing client, ...) couples the
site to the coordinator's code, which the site must never need. This walks every import statement, including
the ones inside functions (fedrad imports heavy modules lazily there).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer may import from fedrad besides itself.
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "deploy": {"common", "client", "server"},
}


def _imported_modules(path: Path) -> list[tuple[int, list[str]]]:
    """(line, dotted name split) of every absolute import statement in `path`, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")) for name in names]
    return found


def _fedrad_imports(path: Path) -> list[tuple[int, str]]:
    return [(line, parts[1]) for line, parts in _imported_modules(path) if parts[0] == "fedrad" and len(parts) > 1]


def _modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_it(layer: str) -> None:
    files = _modules(layer)
    assert files, f"no modules found under {layer}/"
    bad = [f"{path.relative_to(ROOT)}:{line} imports fedrad.{target}"
           for path in files for line, target in _fedrad_imports(path)
           if target != layer and target not in ALLOWED[layer]]
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_the_walker_sees_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from fedrad.server.release import x\n    import fedrad.deploy.cli\n")
    assert _fedrad_imports(probe) == [(2, "server"), (3, "deploy")]


# client/ by lifecycle (issue 24): each sub-package may import only the ones ranked below it, so the stored
# site state never depends on training, training never on the node app, and the per-message app never on the
# offline tools. Same rank: no import either way.
CLIENT_RANK = {"site": 0, "training": 1, "evaluation": 1, "app": 2, "tools": 2, "runtime": 3}


def _client_package(path: Path) -> str | None:
    parts = path.relative_to(ROOT / "client").parts
    return parts[0] if len(parts) > 1 else None


def _client_imports(path: Path) -> list[tuple[int, str]]:
    return [(line, parts[2]) for line, parts in _imported_modules(path)
            if parts[:2] == ["fedrad", "client"] and len(parts) > 2]


def test_every_client_module_lives_in_a_lifecycle_package() -> None:
    loose = [p.name for p in (ROOT / "client").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"client/ modules outside a lifecycle sub-package ({sorted(CLIENT_RANK)}): {loose}"
    packages = {p.name for p in (ROOT / "client").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(CLIENT_RANK), f"sub-packages without a rank in CLIENT_RANK: {packages ^ set(CLIENT_RANK)}"


def test_client_packages_import_only_lower_lifecycles() -> None:
    bad = []
    for path in _modules("client"):
        own = _client_package(path)
        if own is None:
            continue
        for line, target in _client_imports(path):
            if target != own and (target not in CLIENT_RANK or CLIENT_RANK[target] >= CLIENT_RANK[own]):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports fedrad.client.{target}")
    assert not bad, "client lifecycle violations:\n" + "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["fedrad", *parts])


def _module_graph() -> dict[str, set[str]]:
    """fedrad module -> the fedrad modules it imports (at run time: `if TYPE_CHECKING:` blocks excluded)."""
    paths = {_module_name(p): p for layer in ALLOWED for p in _modules(layer)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for imported in names:
                while imported and imported not in paths:
                    imported = imported.rpartition(".")[0]
                if imported and imported != name:
                    targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph.get(step, ())))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_no_import_circle() -> None:
    circles = _cycles(_module_graph())
    assert not circles, "import circles (move the shared piece below both):\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
