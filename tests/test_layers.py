"""The layer table of ../shared/DESIGN.md, enforced: every lowbit import points down (or stays in its layer),
and no function imports a lowbit module (a hidden edge the table could not see).

The table is written out here, bottom first, exactly as DESIGN.md lists it; a module belongs to the layer
named by its first path component under lowbit/ (the top-level base modules are named one by one).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lowbit"
LAYERS = ["base", "formats", "kernels", "nn", "io", "models", "calib", "methods", "runtime", "eval",
          "recipes", "api", "cli"]
BASE = {"errors", "settings", "atomic_file"}
# where the table names a room by another word than the module's
ALIASES = {"__init__": "api", "__main__": "cli"}
# The CLI answers --help before it imports the package: it may import api inside its commands. The
# api imports runtime.server (FastAPI, ~0.5 s) only in `serve`: eval and generate never pay for it.
LATE_IMPORTS_ALLOWED = {("cli", "api"), ("api", "runtime")}


def layer_of(module: str) -> str:
    """'lowbit.kernels.cpu.build' -> 'kernels'; 'lowbit.settings' -> 'base'."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head in BASE:
        return "base"
    head = ALIASES.get(head, head)
    if head not in LAYERS:
        raise AssertionError(f"{module}: not in the layer table (add it to DESIGN.md's table and to LAYERS)")
    return head


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != ["lowbit"]:
        parts = parts[:-1]
    return ".".join(parts)


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The lowbit modules an import statement names (resolving relative imports)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lowbit"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if base.split(".")[0] != "lowbit":
        return []
    if node.module is None or base == "lowbit":  # `from . import x`, `from lowbit import x`: submodules
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def edges():
    """(importing module, imported module, line, inside a function?) for every lowbit import."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        local = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            for target in imported(node, module, path.name == "__init__.py"):
                yield module, target, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", id(node) in local


def test_imports_point_down_the_layer_table():
    bad = []
    for src, dst, where, _ in edges():
        a, b = layer_of(src), layer_of(dst)
        if LAYERS.index(b) > LAYERS.index(a):
            bad.append(f"{where}: {src} ({a}) imports {dst} ({b})")
    assert not bad, "imports that point up the layer table:\n" + "\n".join(bad)


def test_no_function_local_imports_of_lowbit_modules():
    bad = [f"{where}: {src} imports {dst} inside a function" for src, dst, where, local in edges()
           if local and (layer_of(src), layer_of(dst)) not in LATE_IMPORTS_ALLOWED]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from ...errors import X", "lowbit.errors"), ("from ... import api", "lowbit.api"),
    ("from .. import reference", "lowbit.kernels.reference"),
    ("from . import codegen", "lowbit.kernels.cpu.codegen"), ("from lowbit.io import save", "lowbit.io"),
    ("import lowbit.formats", "lowbit.formats")])
def test_import_resolution(source, expected):
    """The checker itself: relative imports resolve to the module they name (else the test above proves little)."""
    node = ast.parse(source).body[0]
    assert imported(node, "lowbit.kernels.cpu.build", False)[0] == expected


def test_the_checker_sees_an_upward_edge(tmp_path):
    """An upward import planted in a scratch copy of a module is reported."""
    tree = ast.parse("from ..api import quantize\n")
    targets = imported(tree.body[0], "lowbit.formats.uniform", False)
    assert targets == ["lowbit.api"]
    assert LAYERS.index(layer_of(targets[0])) > LAYERS.index(layer_of("lowbit.formats.uniform"))
