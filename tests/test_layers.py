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


def _fedrad_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedrad" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


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
