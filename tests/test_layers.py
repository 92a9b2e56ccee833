"""The package's layers import only downward, and nothing imports in a circle.

docs/architecture.md draws the layers. Every import counts, also one inside a function: a lazy
import that dodges a cycle is still a cycle. The walk reads the source with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as (pyproject.toml's package-dir)
PACKAGES = {"theseus_general": "theseus_general", "adapters": "theseus_general.adapters",
            "integrations": "theseus_general.integrations"}

# lower numbers sit lower; a module may import its own layer or any layer below it
LAYERS = {
    "core": 0, "planning": 1, "runtime": 2, "engine": 3, "checkpoint": 4, "training": 5, "integrations": 6, "top": 7,
}
LAYER_OF = {
    **dict.fromkeys(["errors", "suggest", "adapter", "registry"], "core"),
    **dict.fromkeys(["graph", "plan", "budget", "width", "validation", "measure", "planning"], "planning"),
    **dict.fromkeys(["replacement", "wrapping", "schedulers", "sharding"], "runtime"),
    **dict.fromkeys(["engine", "recipes", "config"], "engine"),
    "checkpoint": "runtime",  # the file format; the engine rebuilds itself from one (from_checkpoint)
    **dict.fromkeys(["training", "matching", "baselines", "distributed", "metrics", "plots"], "training"),
    "cli": "integrations",
    "__init__": "top",
}


def _modules() -> Dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Modules of ours that `name` imports anywhere in its source (module level or inside functions)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports a module when `pkg.mod` is one of ours
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> str:
    if module.startswith("theseus_general.integrations"):
        return "integrations"
    if module == "theseus_general.adapters" or module.startswith("theseus_general.adapters."):
        return "planning"  # adapters describe models: they may use the core and planning only
    if module == "theseus_general":
        return "top"
    return LAYER_OF[module.rpartition(".")[2]]


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules, or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_every_module_has_a_layer():
    missing = [m for m in _graph() if m.startswith("theseus_general.") and m.count(".") == 1
               and not m.startswith(("theseus_general.adapters", "theseus_general.integrations"))
               and m.rpartition(".")[2] not in LAYER_OF]
    assert missing == [], f"give these modules a layer in LAYER_OF (and docs/architecture.md): {missing}"


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downward():
    upward = sorted(f"{a} ({_layer(a)}) imports {b} ({_layer(b)})"
                    for a, targets in _graph().items() for b in targets
                    if a != "theseus_general" and LAYERS[_layer(b)] > LAYERS[_layer(a)])
    assert upward == [], "\n".join(upward)


def test_the_engine_imports_no_model_library():
    for name, path in _modules().items():
        if name.startswith(("theseus_general.adapters", "theseus_general.integrations")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("transformers", "timm", "torchvision") for n in names), (name, names)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycle(graph) == expected
