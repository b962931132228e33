"""The package's shape, read from its source without importing it: no import circle between its modules, the entry
module imported by nobody inside, the weights loader independent of the model file, the leaves importing nothing of
the package (issue 21)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "mambavision_train"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` counted as the module x when it is one)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        found = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first walk (each reported once, from where the walk met it)."""
    found, state, stack = [], {}, []

    def walk(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return found


def test_no_module_imports_back_into_a_module_that_imports_it():
    # A package's __init__ importing its children is its face; a child importing its own package's __init__ at module
    # level is the circle that counts.
    graph = imports(top_level_only=True)
    circles = [c for c in cycles(graph) if not all(a.startswith(b + ".") or b.startswith(a + ".")
                                                   for a, b in zip(c, c[1:]))]
    assert circles == [], "\n".join(" -> ".join(c) for c in circles)


def test_the_entry_module_is_imported_only_by_the_entry_points():
    importers = sorted(m for m, deps in imports(top_level_only=False).items() if "mambavision_train.cli" in deps)
    assert importers == [], importers


def test_the_weights_loader_does_not_import_the_model_file():
    """The model file hands its default_cfgs to timm's builder and the loader reads file names from timm's registry
    (timm's _builder never imports a model file): no circle behind function-level imports."""
    graph = imports(top_level_only=False)
    assert "mambavision_train.models.mambavision" not in graph["mambavision_train.models.pretrained"]


def test_the_leaves_import_nothing_of_the_package_when_imported():
    # config.register() reads the registered variant names when an entry point asks it to: not on import
    graph = imports(top_level_only=True)
    for leaf in ("errors", "log", "files", "config", "tables", "hub"):
        assert graph[f"mambavision_train.{leaf}"] <= {"mambavision_train.errors"}, (leaf, graph[f"mambavision_train.{leaf}"])


def test_markdown_tables_are_written_by_one_module():
    """Every table the package prints or writes goes through tables.py (seven hand-made ones before issue 21)."""
    hand_made = [f"{p.relative_to(PKG)}:{n}" for p in PKG.rglob("*.py") if p.name != "tables.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if '"|---' in line or "'|---" in line]
    assert hand_made == [], hand_made
