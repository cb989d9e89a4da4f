"""The import graph explains itself (issue 16): nvmprov's modules import each other at the top, in
layers without cycles; a function-local import of an nvmprov module is there only to keep start-up
fast, in the modules that `--help`, `render` and `validate` (or `import nvmprov.api`) load."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nvmprov"

# Where a deferred import saves start-up: the CLI (each command imports its own modules), the API
# (importing it imports neither libvirt nor paramiko), and the modules on render's/validate's path.
STARTUP = {"nvmprov.cli", "nvmprov.api", "nvmprov.image", "nvmprov.session", "nvmprov.spec"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _targets(mods: dict[str, Path], module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The nvmprov modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    package = module if mods[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    found = []
    for alias in node.names:
        name = f"{base}.{alias.name}"
        found.append(name if name in mods else base)
    return [f for f in found if f in mods]


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Per module, what it imports at the top (TYPE_CHECKING blocks aside), and every import of an
    nvmprov module inside a function (module, line, target)."""
    top: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[str, int, str]] = []
    for module, path in mods.items():
        def walk(node: ast.AST, in_function: bool, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _targets(mods, module, child):
                        if in_function:
                            local.append((module, child.lineno, target))
                        else:
                            top[module].add(target)
                else:
                    walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))
        walk(ast.parse(path.read_text()), False)
    return top, local


def _cycle(top: dict[str, set[str]]) -> list[str] | None:
    """A cycle of top-level imports, if there is one (a submodule loading its own package aside)."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for target in sorted(top[module]):
            if target != module and not module.startswith(target + "."):
                found = visit(target, [*path, module])
                if found:
                    return found
        done.add(module)
        return None

    for module in sorted(top):
        found = visit(module, [])
        if found:
            return found
    return None


def test_the_modules_import_each_other_at_the_top_without_a_cycle() -> None:
    top, _local = _imports(_modules())
    assert _cycle(top) is None, "import cycle: " + " -> ".join(_cycle(top) or [])


def test_function_local_imports_of_nvmprov_modules_only_save_start_up() -> None:
    _top, local = _imports(_modules())
    elsewhere = [f"{m}:{line} imports {t}" for m, line, t in local if m not in STARTUP]
    assert elsewhere == [], ("import these at the top of the module (no cycle needs dodging; only "
                             f"{sorted(STARTUP)} defer imports, for start-up): {elsewhere}")


def test_the_checks_see_a_local_import_and_a_cycle(tmp_path: Path) -> None:
    # The walkers must be able to fail: a made-up pair of modules with both faults.
    mods = {"nvmprov.a": tmp_path / "a.py", "nvmprov.b": tmp_path / "b.py"}
    mods["nvmprov.a"].write_text("from . import b\n\ndef f():\n    from . import b\n")
    mods["nvmprov.b"].write_text("from .a import f\n")
    top, local = _imports(mods)
    assert top == {"nvmprov.a": {"nvmprov.b"}, "nvmprov.b": {"nvmprov.a"}}
    assert local == [("nvmprov.a", 4, "nvmprov.b")]
    assert _cycle(top) == ["nvmprov.a", "nvmprov.b", "nvmprov.a"]
